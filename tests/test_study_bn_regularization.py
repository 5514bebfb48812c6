"""The BatchNorm regularisation study (experiments/bn_regularization.py) in its --quick form."""

import numpy as np
import pytest

from experiments import bn_regularization
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(bn_regularization, tmp_path_factory.mktemp("studies"))


def test_quick_bn_regularization_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_regularization" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/curves.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Claims", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    sizes = results["sizes"]
    entries = results["entries"]
    assert sorted((e["norm"], e["weight_decay"]) for e in entries) == sorted(
        (n, w) for n in sizes["norms"] for w in sizes["weight_decays"])
    # Weight decays are values of one program: one compiled group per norm.
    assert len(results["groups"]) == len(sizes["norms"])
    claims = results["claims"]
    assert [c["claim"] for c in claims] == [
        "BN has a mild regularising effect (smaller train–test gap)",
        "BN's regularising effect is milder than weight decay's"]
    for c in claims:
        assert c["verdict"] in VERDICTS and c["measured"] and (run / c["figure"]).exists()


def test_quick_bn_regularization_gap_is_train_minus_test(quick):
    _, _, results = quick
    steps = bn_regularization.measure_steps(results["sizes"])
    for e in results["entries"]:
        train, test = np.asarray(e["train_accuracy"]["values"]), np.asarray(e["test_accuracy"]["values"])
        np.testing.assert_allclose(e["gap"]["values"], train - test)
        c = e["curves"]
        assert c["steps"] == steps and c["steps"][0] == 0 and c["steps"][-1] == results["sizes"]["steps"]
        assert np.asarray(c["train_accuracy"]).shape == (len(e["seeds"]), len(steps))
        # The curve's last point is the final evaluation (both on the whole sets, eval mode).
        np.testing.assert_allclose(np.asarray(c["train_accuracy"])[:, -1], train, atol=1e-6)
        np.testing.assert_allclose(np.asarray(c["test_accuracy"])[:, -1], test, atol=1e-6)
        np.testing.assert_allclose(np.asarray(c["test_loss"])[:, -1], e["test_loss"]["values"],
                                   rtol=1e-4)


def test_quick_bn_regularization_networks_overfit_the_small_training_set(quick):
    """The setting is one of overfitting: every network without weight decay fits its 256
    training examples far better than it predicts the test set."""
    _, _, results = quick
    for e in results["entries"]:
        if e["weight_decay"] == 0:
            assert e["train_accuracy"]["mean"] > 0.9
            assert e["gap"]["mean"] > 0.3
        # Training accuracy rises from chance at initialisation.
        assert np.mean(np.asarray(e["curves"]["train_accuracy"])[:, 0]) < 0.3


def test_bn_regularization_claims_follow_the_numbers():
    def entry(norm, wd, train, test):
        stats = lambda v: {"mean": v, "std": 0.0, "values": [v, v]}
        return {"norm": norm, "weight_decay": wd, "train_accuracy": stats(train),
                "test_accuracy": stats(test), "gap": stats(train - test)}
    size = {"norms": ("none", "batch")}
    regularises = [entry("none", 0.0, 1.0, 0.6), entry("batch", 0.0, 1.0, 0.65),
                   entry("none", 1e-2, 1.0, 0.75), entry("batch", 1e-2, 1.0, 0.7)]
    claims = bn_regularization.claims(regularises, size)
    assert [c["verdict"] for c in claims] == ["holds", "holds"]
    overfits_more = [entry("none", 0.0, 1.0, 0.65), entry("batch", 0.0, 1.0, 0.6),
                     entry("none", 1e-2, 1.0, 0.64), entry("batch", 1e-2, 1.0, 0.6)]
    claims = bn_regularization.claims(overfits_more, size)
    assert claims[0]["verdict"] == "does not hold here"
    assert bn_regularization.best_weight_decay(regularises, "none") == 1e-2


def test_bn_regularization_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(bn_regularization, ((["--weight-decays", "0.001"], "invalid --weight-decays"),
                                      (["--weight-decays", "0", "-1"], "invalid --weight-decays"),
                                      (["--norms", "none"], "invalid --norms"),
                                      (["--train-examples", "5000"], "invalid --train-examples"),
                                      (["--steps", "0"], "invalid --steps")), tmp_path, capsys)
