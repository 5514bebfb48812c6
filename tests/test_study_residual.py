"""The residual study (experiments/residual.py) in its --quick form."""

import math

import numpy as np
import pytest

from experiments import residual
from studies_setup import check_refuses, run_quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(residual, tmp_path_factory.mktemp("studies"))


def test_quick_residual_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "residual" and results["status"] == "completed"
    assert results["config"]["quick"] is True and results["wall_time_s"] > 0
    for name in ("config.json", "report.md", "figures/summary.png", "figures/products.png",
                 "figures/plain_bn_gradients.png", "figures/curves.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    sizes = results["sizes"]
    entries = results["entries"]
    assert sorted((e["form"], e["depth"]) for e in entries) == sorted(
        (f, d) for f in sizes["forms"] for d in sizes["depths"])
    for e in entries:
        depth = e["depth"]
        assert len(e["log10_products_init"]) == depth + 1
        assert abs(e["log10_products_init"][-1]) < 1e-5  # P_L is the identity
        assert len(e["log10_weight_grad_norms_init"]) == depth
        assert len(e["train_accuracy"]["values"]) == len(e["seeds"]) == sizes["seeds"]
        steps, values = e["batch_accuracy_curve"]["steps"], e["batch_accuracy_curve"]["values"]
        assert np.asarray(values).shape == (len(e["seeds"]), len(steps)) and steps[-1] == e["steps"]
    assert len(results["table"]) == len(entries) * sizes["seeds"]


def test_quick_residual_products_follow_mean_field(quick):
    """A pre-activation ReLU/He residual network with alpha = 1/sqrt(L) multiplies ||P||^2 by
    1 + alpha^2 per block: ||P_0||^2/n = (1 + 1/L)^L, measured and predicted alike."""
    _, _, results = quick
    (e,) = [e for e in results["entries"] if e["form"] == "residual α=1/√L"]
    depth = e["depth"]
    expected = depth * math.log10(1 + 1 / depth)
    assert e["mean_field_log10_products"][0] == pytest.approx(expected, abs=1e-6)
    assert np.mean(e["log10_P0_init"]) == pytest.approx(expected, abs=0.3)
    agreement = {(a["form"], a["depth"]): a for a in results["theory_agreement"]}
    assert agreement[("residual α=1/√L", depth)]["predicted"] == pytest.approx(expected, abs=1e-6)
    # BatchNorm has no mean-field prediction of this form.
    (bn,) = [e for e in results["entries"] if e["form"] == "plain + BN"]
    assert bn["mean_field_log10_products"] is None


def test_quick_residual_plain_bn_gradients_explode_at_init(quick):
    """A plain ReLU + BatchNorm network's gradient product grows with depth at initialisation
    (the gradient explosion of BN networks), far above the residual 1/sqrt(L) network's."""
    _, _, results = quick
    by = {e["form"]: e for e in results["entries"]}
    bn, res = by["plain + BN"], by["residual α=1/√L"]
    assert np.mean(bn["log10_P0_init"]) > np.mean(res["log10_P0_init"]) + 0.8
    # ... and its first block's weight gradient exceeds its last block's.
    assert np.mean(bn["log10_grad_ratio_init"]) > 0.3
    assert residual.gradient_verdict(3.0) == "exploding"
    assert residual.gradient_verdict(-3.0) == "vanishing"
    assert residual.gradient_verdict(0.5) == "healthy"
    assert residual.gradient_verdict(math.nan).startswith("overflow")


def test_residual_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(residual, ((["--forms", "resnet"], "invalid --forms"),
                             (["--depths", "0"], "invalid --depths"),
                             (["--steps", "0"], "invalid --steps")), tmp_path, capsys)
