"""vgrad.trainable_range against brute-force references (every interval enumerated)."""

import itertools
import math

import numpy as np
import pytest

from vgrad import trainable_range as tr

VALUES = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]


def _all_runs(ok):
    """Brute force: every interval [a, b] whose entries are all True and that cannot grow."""
    n = len(ok)
    return [(a, b) for a, b in itertools.combinations_with_replacement(range(n), 2)
            if all(ok[a:b + 1]) and (a == 0 or not ok[a - 1]) and (b == n - 1 or not ok[b + 1])]


def test_runs_train_needs_accuracy_and_no_divergence():
    acc = [[0.5, 0.15, math.nan], [0.2, 0.9, 0.3]]
    div = [[False, False, False], [False, True, False]]
    np.testing.assert_array_equal(tr.runs_train(acc, div, threshold=0.2),
                                  [[True, False, False], [True, False, True]])
    with pytest.raises(ValueError, match="shape"):
        tr.runs_train([[0.5]], [[False, True]], threshold=0.2)


def test_values_train_is_a_seed_fraction():
    t = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(tr.values_train(t), [True, False, False, True])
    np.testing.assert_array_equal(tr.values_train(t, min_fraction=1 / 3), [True, True, False, True])
    np.testing.assert_array_equal(tr.values_train(t, min_fraction=1.0), [False, False, False, True])
    with pytest.raises(ValueError, match="min_fraction"):
        tr.values_train(t, min_fraction=0)


def test_largest():
    assert tr.largest(VALUES, [1, 1, 1, 0, 1, 0, 0, 0]) == 0.1
    assert math.isnan(tr.largest(VALUES, [0] * 8))
    with pytest.raises(ValueError, match="increasing"):
        tr.largest([1.0, 0.5], [1, 1])


@pytest.mark.parametrize("seed", range(40))
def test_contiguous_span_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    ok = rng.random(len(VALUES)) < 0.6
    runs = _all_runs(list(ok))
    got = tr.contiguous_span(VALUES, ok)
    if not runs:
        assert all(math.isnan(x) for x in got)
        return
    longest = max(b - a for a, b in runs)
    a, b = min((r for r in runs if r[1] - r[0] == longest), key=lambda r: r[0])
    assert got == (VALUES[a], VALUES[b])
    i = int(rng.integers(len(VALUES)))
    around = tr.contiguous_span(VALUES, ok, containing=i)
    hit = [r for r in runs if r[0] <= i <= r[1]]
    if hit:
        assert around == (VALUES[hit[0][0]], VALUES[hit[0][1]])
    else:
        assert all(math.isnan(x) for x in around)


@pytest.mark.parametrize("seed", range(40))
def test_near_best_span_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    score = rng.uniform(0.1, 0.6, len(VALUES))
    score[rng.random(len(VALUES)) < 0.15] = np.nan
    if np.isnan(score).all():
        score[0] = 0.3
    tol = 0.05
    best = int(np.nanargmax(score))
    # Brute force: the widest interval containing the best whose scores are all within tol.
    good = [(a, b) for a in range(best + 1) for b in range(best, len(VALUES))
            if all(np.nan_to_num(score[a:b + 1], nan=-1) >= score[best] - tol)]
    a, b = max(good, key=lambda r: r[1] - r[0])
    assert tr.near_best_span(VALUES, score, tolerance=tol) == (VALUES[a], VALUES[b])


def test_near_best_span_and_decades_by_hand():
    score = [0.25, 0.44, 0.46, 0.47, 0.40, 0.45]
    span = tr.near_best_span(VALUES[:6], score, tolerance=0.05)
    assert span == (3e-3, 3e-2)  # 0.40 breaks the run; 0.45 beyond it does not count
    assert tr.span_decades(span) == pytest.approx(1.0)
    assert tr.span_decades((0.1, 0.1)) == 0.0
    assert math.isnan(tr.span_decades(tr.near_best_span(VALUES[:2], [np.nan, np.nan],
                                                         tolerance=0.05)))
