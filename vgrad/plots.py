"""The figure style every study shares (matplotlib, Agg backend).

* One colour per technique, the same in every study: :data:`TECHNIQUE_COLORS`
  (mitigations) and :data:`ACTIVATION_COLORS` (activation functions);
  :func:`color` looks a label up and gives anything else a stable colour.
* :func:`band` / :func:`curve_band`: the mean over seeds with a shaded min-max band.
* :func:`log10`, :func:`nanmean`, :func:`smoothed`: the array helpers figures of
  diverged and noisy runs need.
* :func:`heatmap`: a labelled grid (layer x step, depth x sigma_w^2, ...).
* :func:`save`: atomic PNG writes (``vgrad.analysis.plots.save``).

Quantities that span decades are drawn as log10 values on a linear axis with
power-of-ten tick labels (:func:`power_of_ten_axis`), so no point is lost to
underflow.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

# No matplotlib.use() here: a library that picks the backend at import would switch
# off a notebook's inline figures; without a display matplotlib falls back to Agg.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from vgrad.analysis.plots import save  # noqa: F401  (re-exported: one atomic save)

# Mitigations: one colour each, in every study and figure.
TECHNIQUE_COLORS = {
    "baseline": "#7f7f7f",        # sigmoid + naive init: the vanishing baseline
    "activation": "#1f77b4",      # a better activation alone
    "init": "#17becf",            # a better initialisation alone
    "batchnorm": "#2ca02c",
    "layernorm": "#bcbd22",
    "residual": "#ff7f0e",
    "bn_residual": "#d62728",
    "clipping": "#9467bd",
    "best": "#000000",
}
ACTIVATION_COLORS = {
    "sigmoid": "#7f7f7f", "tanh": "#8c564b", "relu": "#1f77b4", "leaky_relu": "#17becf",
    "prelu": "#9467bd", "elu": "#2ca02c", "selu": "#bcbd22", "gelu": "#ff7f0e", "silu": "#e377c2",
    "linear": "#000000", "hard_tanh": "#c49c94", "softsign": "#dbdb8d",
}
_FALLBACK = plt.get_cmap("tab20").colors


def color(name: str) -> Any:
    """The colour of a technique or activation name; other names get a stable
    colour from their hash (the same in every run and study)."""
    if name in TECHNIQUE_COLORS:
        return TECHNIQUE_COLORS[name]
    if name in ACTIVATION_COLORS:
        return ACTIVATION_COLORS[name]
    digest = int(hashlib.md5(name.encode()).hexdigest(), 16)
    return _FALLBACK[digest % len(_FALLBACK)]


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 3.6,
           **kwargs: Any) -> tuple[Figure, Any]:
    """A constrained-layout figure of ``nrows x ncols`` panels of the given size each."""
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained",
                        squeeze=False, **kwargs)


def power_of_ten_axis(ax: Any, axis: str = "y") -> None:
    """Label a log10-valued axis as powers of ten."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(MaxNLocator(nbins=8, integer=True))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"$10^{{{v:g}}}$"))


def band(ax: Any, x: Sequence[float], ys: Any, *, label: str | None = None, color: Any = None,
         linestyle: str = "-", marker: str | None = None) -> None:
    """Mean over seeds of ``ys`` (S, T) against ``x`` (T,), with the min-max band.

    NaNs (a diverged seed's missing points) are left out of the mean and band.
    """
    if not len(x):  # e.g. a run that diverged before its first record: nothing to draw
        return
    ys = np.asarray(ys, float).reshape(-1, len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
    ax.plot(x, mean, linestyle=linestyle, marker=marker, color=color, label=label, lw=1.8)
    if ys.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def curve_band(ax: Any, curve: dict, **kwargs: Any) -> None:
    """:func:`band` of a ``{"steps": (T,), "values": (S, T)}`` curve (as studies store them)."""
    band(ax, curve["steps"], curve["values"], **kwargs)


def log10(values: Any, floor: float | None = None) -> np.ndarray:
    """log10 of ``values`` as a float array: 0 -> -inf, negative -> NaN, no warnings;
    ``floor`` clips finite and -inf values from below (NaN stays NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(np.asarray(values, float))
    return out if floor is None else np.where(np.isnan(out), np.nan, np.maximum(out, floor))


def nanmean(values: Any, axis: int = 0) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN (diverged or missing seeds); all-NaN -> NaN, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(values, float), axis)


def smoothed(values: Any, window: int) -> np.ndarray:
    """Trailing moving average along the last axis, NaN-aware, same length."""
    v = np.asarray(values, float)
    out = np.full_like(v, np.nan)
    for t in range(v.shape[-1]):
        out[..., t] = nanmean(v[..., max(0, t + 1 - window):t + 1], axis=-1)
    return out


def heatmap(ax: Any, values: Any, *, x: Sequence[Any], y: Sequence[Any], label: str,
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
            xlabel: str = "", ylabel: str = "") -> Any:
    """values (len(y), len(x)) as a colour grid with its colour bar; NaN cells are grey."""
    values = np.ma.masked_invalid(np.asarray(values, float))
    cm = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    mesh = ax.pcolormesh(np.arange(len(x) + 1), np.arange(len(y) + 1), values, cmap=cm,
                         vmin=vmin, vmax=vmax, shading="flat")
    for axis, ticks, setter in ((ax.xaxis, x, ax.set_xticks), (ax.yaxis, y, ax.set_yticks)):
        step = max(1, math.ceil(len(ticks) / (6 if axis is ax.xaxis else 10)))
        setter(np.arange(len(ticks))[::step] + 0.5, [_tick(t) for t in ticks][::step])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.figure.colorbar(mesh, ax=ax, label=label)
    return mesh


def _tick(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)
