"""The BN smoothness study (experiments/bn_smoothness.py) in its --quick form."""

import math

import numpy as np
import pytest

from experiments import bn_smoothness
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(bn_smoothness, tmp_path_factory.mktemp("studies"))


def test_quick_bn_smoothness_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_smoothness" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/landscape.png",
                 "figures/distributions.png", "figures/tracks.png", "figures/curves.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Claims", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    sizes = results["sizes"]
    assert sorted((e["form"], e["learning_rate"]) for e in results["entries"]) == sorted(
        (f, lr) for f in bn_smoothness.forms(sizes) for lr in sizes["learning_rates"])
    assert {"no BN", "BN"} < {e["form"] for e in results["entries"]}
    assert any(e["form"].startswith("noisy BN") for e in results["entries"])
    T, S = len(results["measure_steps"]), sizes["seeds"]
    assert results["measure_steps"][0] == 0 and results["measure_steps"][-1] == sizes["steps"]
    for e in results["entries"]:
        for key in ("loss_variation", "gradient_predictiveness", "effective_beta",
                    "train_mode_accuracy", "noise_off_accuracy", "probe_loss", "probe_loss_min"):
            assert np.asarray(e[key]).shape == (S, T), key
        assert np.asarray(e["input_drift"]).shape == (S, 2)
        assert np.asarray(e["unit_mean_traces"]).shape == (3, T)
        assert e["drift_layers"] == [sizes["depth"] // 2, sizes["depth"]]
        # Every measurement of a completed run is finite, and the probe is self-consistent:
        # the loss range is max - min of the probed losses, the band contains it.
        assert all(s == "completed" for s in e["status"])
        lv = np.asarray(e["loss_variation"])
        assert np.isfinite(lv).all() and (lv >= 0).all()
        band = np.asarray(e["probe_loss_max"]) - np.asarray(e["probe_loss_min"])
        np.testing.assert_allclose(lv, band, rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(e["effective_beta"]) > 0)
        acc = np.asarray(e["train_mode_accuracy"])
        assert ((acc >= 0) & (acc <= 1)).all()
        if not e["form"].startswith("noisy"):  # without noise "noise off" changes nothing
            np.testing.assert_array_equal(e["noise_off_accuracy"], acc)
    assert len(results["table"]) == len(results["entries"]) * S


def test_quick_bn_smoothness_claims_are_computed(quick):
    _, _, results = quick
    claims = results["claims"]
    assert [c["claim"] for c in claims] == [
        "BN makes the loss landscape smoother (less loss variation, more predictive gradients, "
        "smaller effective β)",
        "noisy BN (distribution shift re-injected) trains about as well as BN",
        "BN's benefit tracks smoothness, not distribution stability"]
    for c in claims:
        assert c["verdict"] in VERDICTS
        assert c["figure"].startswith("figures/") and c["measured"].endswith(".")
        assert any(ch.isdigit() for ch in c["measured"])


def test_quick_bn_input_distribution_is_more_stable_than_noisy_bn(quick):
    """BatchNorm pins each unit's batch mean and spread (γ, β move slowly); noisy BN shifts
    and rescales every unit at every step: its units' means move over training by a
    sizeable part of their spread, BN's by far less (holds for any seed)."""
    _, _, results = quick
    by = {e["form"]: e for e in results["entries"]}
    noisy = next(e for f, e in by.items() if f.startswith("noisy BN"))
    bn_drift = np.mean(np.asarray(by["BN"]["input_drift"])[:, 0])
    noisy_drift = np.mean(np.asarray(noisy["input_drift"])[:, 0])
    assert noisy_drift > 3 * bn_drift


def test_input_drift_and_spearman_against_hand_computed_values():
    # Two units, three steps: means (0, 1, 2) and (1, 1, 1), std 0.5 throughout.
    means = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    stds = np.full((3, 2), 0.5)
    expected = np.mean([np.std([0.0, 1.0, 2.0]), 0.0]) / 0.5
    assert bn_smoothness.input_drift(means, stds) == pytest.approx(expected)
    # Scale invariant: a layer multiplied by 10 drifts the same.
    assert bn_smoothness.input_drift(10 * means, 10 * stds) == pytest.approx(expected)
    assert math.isnan(bn_smoothness.input_drift(means[:1], stds[:1]))
    assert bn_smoothness.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bn_smoothness.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # A monotone but non-linear relation is still a perfect rank correlation.
    assert bn_smoothness.spearman([1, 2, 3, 4, 5], np.exp([1, 2, 3, 4, 5])) == pytest.approx(1.0)
    assert math.isnan(bn_smoothness.spearman([1, 2], [1, 2]))
    # Ties share their average rank: ranks (1.5, 1.5, 3) and (1, 2, 3) correlate at sqrt(3)/2.
    assert bn_smoothness.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def test_claim_verdicts_follow_the_numbers():
    """The claim functions on hand-made entries: BN smoother everywhere -> holds; noisy BN 20
    points below BN -> does not hold."""
    size = {"learning_rates": (0.1,), "noise_levels": (1.0,), "depth": 4}

    def entry(form, beta, acc, drift):
        return {"form": form, "learning_rate": 0.1, "loss_variation_median": [beta / 10],
                "gradient_predictiveness_median": [beta / 2], "effective_beta_median": [beta],
                "final_train_mode_accuracy": [acc], "final_noise_off_accuracy": [acc],
                "input_drift": [[drift, drift]]}

    entries = [entry("no BN", 10.0, 0.5, 0.3), entry("BN", 1.0, 0.8, 0.02),
               entry("noisy BN a=1", 2.0, 0.6, 0.5)]
    assert bn_smoothness.claim_smoother(entries, size)["verdict"] == "holds"
    assert bn_smoothness.claim_noisy_trains(entries, size)["verdict"] == "does not hold here"
    tracks = bn_smoothness.claim_tracks_smoothness(entries, size)
    assert tracks["spearman_accuracy_smoothness"] == pytest.approx(1.0)
    assert tracks["verdict"] == "holds"
    entries[0]["effective_beta_median"] = [0.5]  # no BN now the smoothest
    entries[0]["loss_variation_median"] = [0.01]
    entries[0]["gradient_predictiveness_median"] = [0.1]
    assert bn_smoothness.claim_smoother(entries, size)["verdict"] == "does not hold here"


def test_bn_smoothness_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(bn_smoothness, ((["--learning-rates", "0"], "invalid --learning-rates"),
                                  (["--noise-levels", "-1"], "invalid --noise-levels"),
                                  (["--step-sizes", "nan"], "invalid --step-sizes"),
                                  (["--measure-points", "2"], "invalid --measure-points"),
                                  (["--depth", "1"], "invalid --depth")), tmp_path, capsys)
