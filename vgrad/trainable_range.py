"""Which values of a swept hyperparameter train: the largest, and the span around the best.

A sweep over one hyperparameter (learning rate, init scale, ...) gives, for V
values in increasing order and S seeds each, a final accuracy and whether the
run diverged. This module turns that into the numbers a study reports:

* :func:`runs_train` (V, S) bool: a run *trains* when it did not diverge and its
  accuracy reaches ``threshold`` (e.g. chance + 10 points);
* :func:`values_train` (V,) bool: a value trains when at least ``min_fraction``
  of its seeds do (default: half, the median run);
* :func:`largest` the largest value that trains (NaN if none);
* :func:`contiguous_span` the unbroken run of trainable values (the longest, or
  the one containing a given index) as (lowest, highest) value;
* :func:`near_best_span` the unbroken run of values around the best score whose
  score is within ``tolerance`` of it ("trains well over a range");
* :func:`span_decades` log10(highest / lowest) of a span (0 for one value).

Values must be positive and strictly increasing (they are compared on a log
scale). NaN scores count as failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def runs_train(accuracy_VxS, diverged_VxS, *, threshold: float) -> np.ndarray:
    """(V, S) bool: not diverged and accuracy >= threshold (NaN accuracy: False)."""
    acc = np.asarray(accuracy_VxS, float)
    div = np.asarray(diverged_VxS, bool)
    if acc.shape != div.shape:
        raise ValueError(f"accuracy shape {acc.shape} != diverged shape {div.shape}")
    return ~div & (np.nan_to_num(acc, nan=-np.inf) >= threshold)


def values_train(trains_VxS, *, min_fraction: float = 0.5) -> np.ndarray:
    """(V,) bool: at least ``min_fraction`` of the S seeds of each value train."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"invalid min_fraction={min_fraction!r}: must be in (0, 1]")
    t = np.asarray(trains_VxS, bool)
    return t.mean(axis=-1) >= min_fraction - 1e-12


def _check_values(values: Sequence[float], n: int) -> np.ndarray:
    v = np.asarray(values, float)
    if v.shape != (n,):
        raise ValueError(f"values shape {v.shape} != ({n},)")
    if n and (np.any(v <= 0) or np.any(np.diff(v) <= 0)):
        raise ValueError(f"values must be positive and strictly increasing, got {v.tolist()}")
    return v


def largest(values: Sequence[float], ok_V) -> float:
    """The largest value whose ``ok_V`` entry is True; NaN if none is."""
    ok = np.asarray(ok_V, bool)
    v = _check_values(values, ok.size)
    return float(v[ok].max()) if ok.any() else math.nan


def _runs(ok: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive True entries as (first, last) indices."""
    out, start = [], None
    for i, flag in enumerate(ok):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(ok) - 1))
    return out


def contiguous_span(values: Sequence[float], ok_V, *, containing: int | None = None
                    ) -> tuple[float, float]:
    """(lowest, highest) value of an unbroken run of True entries of ``ok_V``: the run
    containing index ``containing`` if given, else the longest (the lowest one on a
    tie). (NaN, NaN) when there is none (or ``ok_V[containing]`` is False)."""
    ok = np.asarray(ok_V, bool)
    v = _check_values(values, ok.size)
    runs = _runs(ok)
    if containing is not None:
        runs = [(a, b) for a, b in runs if a <= containing <= b]
    if not runs:
        return math.nan, math.nan
    a, b = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
    return float(v[a]), float(v[b])


def near_best_span(values: Sequence[float], score_V, *, tolerance: float) -> tuple[float, float]:
    """(lowest, highest) value of the unbroken run around the best score whose scores
    are >= best - tolerance (the best: the first maximum). (NaN, NaN) if every score is NaN."""
    s = np.asarray(score_V, float)
    if not np.isfinite(s).any():
        _check_values(values, s.size)
        return math.nan, math.nan
    best = int(np.nanargmax(s))
    ok = np.nan_to_num(s, nan=-np.inf) >= s[best] - tolerance
    return contiguous_span(values, ok, containing=best)


def span_decades(span: tuple[float, float]) -> float:
    """log10(highest / lowest) of a span; NaN for (NaN, NaN)."""
    lo, hi = span
    return float(np.log10(hi / lo)) if np.isfinite(lo) and np.isfinite(hi) else math.nan
