"""The trainability study (experiments/trainability.py) in its --quick form."""

import numpy as np
import pytest

from experiments import trainability
from studies_setup import run_quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(trainability, tmp_path_factory.mktemp("studies"))


def test_quick_trainability_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "trainability" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/phase_diagram.png",
                 "figures/accuracy_vs_depth.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    depths, ws = results["depths"], results["weight_vars"]
    seeds = results["sizes"]["seeds"]
    acc = np.asarray(results["train_accuracy"], float)
    assert acc.shape == (len(depths), len(ws), seeds)
    assert np.isfinite(acc).all() and ((acc >= 0) & (acc <= 1)).all()
    # One compiled training program per depth: every sigma_w^2 of a depth shares it.
    assert len(results["groups"]) == len(depths)
    assert len(results["table"]) == len(depths) * len(ws) * seeds


def test_six_xi_c_is_finite_and_largest_near_criticality(quick):
    _, _, results = quick
    ws = np.asarray(results["weight_vars"])
    six_xi = np.asarray(results["six_xi_c"], float)
    assert np.isfinite(six_xi).all() and (six_xi > 0).all()
    theory = results["theory"]
    # tanh with sigma_b^2 = 0.05: the order-to-chaos transition is near sigma_w^2 = 1.76.
    assert 1.6 < theory["critical_weight_var"] < 1.9
    assert ws[np.argmax(six_xi)] == ws[np.argmin(np.abs(ws - theory["critical_weight_var"]))]
    assert six_xi.max() > 10 * six_xi.min()
    # Ordered phase: xi_c = -1/log(chi_c) with chi_c = chi_1 < 1; c* = 1 there.
    fine_w = np.asarray(theory["weight_vars"])
    c_star = np.asarray(theory["c_star"])
    assert (c_star[fine_w < 1.5] == 1.0).all() and (c_star[fine_w > 2.0] < 1.0).all()


def test_agreement_counts_match_the_grid(quick):
    """The agreement with L <= 6 xi_c is recomputed from the saved accuracies and depth scales."""
    _, _, results = quick
    depths = np.asarray(results["depths"], float)[:, None]
    predicted = depths <= np.asarray(results["six_xi_c"])[None, :]
    measured = np.asarray(results["train_accuracy_mean"]) >= results["threshold"]
    agree = results["agreement"]
    assert agree["agree"] == int((predicted == measured).sum())
    assert agree["cells"] == predicted.size
    assert agree["untrainable_within_6xi"] == int((predicted & ~measured).sum())
    deepest = results["deepest_trainable_depth"]
    for j, d in enumerate(deepest):
        ok = [results["depths"][i] for i in range(len(results["depths"])) if measured[i, j]]
        assert (d == max(ok)) if ok else np.isnan(d)
