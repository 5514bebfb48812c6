"""The BatchNorm learning-rate study (experiments/bn_learning_rate.py) in its --quick form."""

import math

import numpy as np
import pytest

from experiments import bn_learning_rate as study
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(study, tmp_path_factory.mktemp("studies"))


def test_quick_bn_learning_rate_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_learning_rate" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/loss_curves.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    sizes = results["sizes"]
    V, S = len(sizes["learning_rates"]), sizes["seeds"]
    entries = results["entries"]
    assert sorted((e["activation"], e["norm"]) for e in entries) == sorted(
        (a, n) for a in sizes["activations"] for n in study.NORMS)
    # One compiled program per (activation, norm): the learning rate is a value.
    assert len(results["groups"]) == len(entries)
    assert len(results["table"]) == len(entries) * V * S
    for e in entries:
        assert e["learning_rates"] == list(sizes["learning_rates"])
        for key in ("test_accuracy", "train_loss", "diverged_at_step", "run_trains", "score"):
            assert np.shape(e[key]) == (V, S), key
        assert set(e["loss_curves"]) == {str(lr) for lr in sizes["curve_learning_rates"]}
    claims = results["claims"]
    assert [c["claim"] for c in claims] == ["BN allows (much) higher learning rates",
                                            "BN networks train well over a wider range of "
                                            "learning rates"]
    for c in claims:
        assert c["verdict"] in VERDICTS and c["measured"] and c["figure"] == "figures/summary.png"
        assert c["verdict"] in report


def test_quick_bn_learning_rate_numbers_follow_the_definitions(quick):
    """Recomputed here from the per-run numbers: a run trains when it did not diverge and
    reaches 20 %; the largest trainable rate is the largest with at least half the seeds
    training; a diverged seed scores chance."""
    _, _, results = quick
    for e in results["entries"]:
        lrs = e["learning_rates"]
        acc = np.asarray(e["test_accuracy"], float)
        div = np.asarray([[d is not None for d in row] for row in e["diverged_at_step"]])
        trains = ~div & (acc >= study.TRAINS)
        np.testing.assert_array_equal(e["run_trains"], trains)
        np.testing.assert_allclose(e["score"], np.where(div, study.CHANCE, acc))
        ok = [lr for lr, t in zip(lrs, trains) if t.mean() >= 0.5]
        expected = max(ok) if ok else math.nan
        got = e["largest_trainable_learning_rate"]
        assert (math.isnan(got) and math.isnan(expected)) or got == expected
        best = np.mean(e["score"], axis=1)
        lo, hi = e["near_best_span"]
        assert lo <= e["best_learning_rate"] <= hi
        inside = [(lo <= lr <= hi) for lr in lrs]
        assert all(best[inside] >= best.max() - study.NEAR_BEST - 1e-9)


def test_quick_bn_learning_rate_shows_diverged_runs(quick):
    """SGD at learning rate 10 diverges without BN (any seed): kept, with its step, in the
    entries and the report, and it is not a trainable learning rate."""
    _, run, results = quick
    (none,) = [e for e in results["entries"] if e["norm"] == "none"]
    v = none["learning_rates"].index(10.0)
    steps = none["diverged_at_step"][v]
    assert all(isinstance(s, int) and 1 <= s <= results["sizes"]["steps"] for s in steps)
    assert not any(none["run_trains"][v])
    assert none["largest_trainable_learning_rate"] < 10.0 or math.isnan(
        none["largest_trainable_learning_rate"])
    assert f"diverged at step {min(steps)}" in (run / "report.md").read_text()


def test_bn_learning_rate_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(study, ((["--activations", "swish"], "invalid --activations"),
                          (["--learning-rates", "0.1", "-1"], "invalid --learning-rates"),
                          (["--curve-learning-rates", "0.5"], "invalid --curve-learning-rates"),
                          (["--steps", "0"], "invalid --steps")), tmp_path, capsys)
