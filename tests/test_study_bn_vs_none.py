"""The BN-against-no-BN study (experiments/bn_vs_none.py) in its --quick form."""

import math

import numpy as np
import pytest

from experiments import bn_vs_none
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(bn_vs_none, tmp_path_factory.mktemp("studies"))


def test_quick_bn_vs_none_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_vs_none" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/curves.png",
                 "figures/products.png", "figures/cost.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Model summary", "## Cost", "## Claims",
                    "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    claims = results["claims"]
    assert len(claims) == 3
    for c in claims:
        assert set(c) == {"claim", "measured", "verdict", "figure"}
        assert c["verdict"] in VERDICTS and c["measured"]
        assert (run / c["figure"]).is_file()
    sizes = results["sizes"]
    entries = results["entries"]
    assert sorted((e["activation"], e["norm"]) for e in entries) == sorted(
        (a, n) for a in sizes["activations"] for n in ("none", "batch"))
    for e in entries:
        # One test accuracy per epoch (eval_every = the epoch length), at epochs 1..E.
        assert e["epochs"] == pytest.approx(list(range(1, sizes["epochs"] + 1)))
        values = np.asarray(e["test_accuracy_curve"]["values"])
        assert values.shape == (sizes["seeds"], sizes["epochs"])
        assert np.all((values >= 0) & (values <= 1))
        assert len(e["log10_weight_grad_norms_init"]) == sizes["depth"]
        assert len(e["log10_products_init"]) == sizes["depth"] + 1
        assert abs(e["log10_products_init"][-1]) < 1e-5  # P_L is the identity
        assert e["final_measured_at_step"] == [results["table"][0]["steps"]] * sizes["seeds"]
        assert len(e["epochs_to_target"]) == sizes["seeds"]


def test_quick_bn_vs_none_counts_the_batchnorm_variables(quick):
    """BN adds gamma and beta (2 x width) and a running mean and var (2 x width) per BN
    layer; there is one after the stem's Dense and one in each of the L blocks."""
    _, _, results = quick
    s = results["sizes"]
    counts = results["variable_counts"]
    per_layer = 2 * s["width"]
    bn, no = counts["batch"]["total"], counts["none"]["total"]
    assert bn["bn_layers"] == s["depth"] + 1
    assert bn["bn_params"] == bn["bn_stats"] == per_layer * (s["depth"] + 1)
    assert bn["params"] - no["params"] == bn["bn_params"]
    assert no["bn_params"] == no["bn_stats"] == no["bn_layers"] == 0
    assert counts["batch"]["blocks"]["bn_layers"] == s["depth"]


def test_quick_bn_vs_none_measures_the_cost(quick):
    """The compiled BN training step does more work and keeps more temporaries than the
    plain one (deterministic: XLA's cost and buffer analysis); times are positive."""
    _, _, results = quick
    for act, per in results["costs"].items():
        bn, no = per["batch"], per["none"]
        assert bn["train_memory"]["temp"] > no["train_memory"]["temp"]
        assert bn["train_flops"] > no["train_flops"]
        assert bn["eval_memory"]["argument"] > no["eval_memory"]["argument"]  # + gamma, beta, mean, var
        for c in (bn, no):
            assert c["train_step_s"] > 0 and c["eval_step_s"] > 0
            m = c["train_memory"]
            assert m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
        r = results["cost_ratios"][act]
        assert r["train_flops"] == pytest.approx(bn["train_flops"] / no["train_flops"])


def test_quick_bn_vs_none_batchnorm_keeps_the_sigmoid_gradients(quick):
    """Deep sigmoid/Xavier without BN: the first block's weight gradient is orders of magnitude
    below the last block's at initialisation; with BN they are within a decade."""
    _, _, results = quick
    by = {(e["activation"], e["norm"]): e for e in results["entries"]}
    no, bn = by[("sigmoid", "none")], by[("sigmoid", "batch")]
    assert np.mean(no["log10_grad_ratio_init"]) < -bn_vs_none.GRAD_DECADES
    assert abs(np.mean(bn["log10_grad_ratio_init"])) < 1.0
    assert np.mean(bn["log10_products_init"][0]) > np.mean(no["log10_products_init"][0]) + 3
    gradient_claim = results["claims"][2]
    assert gradient_claim["verdict"] in ("holds", "holds partly")


def test_epoch_helpers_against_numpy():
    epochs = np.array([1.0, 2.0, 3.0])
    assert bn_vs_none.epochs_to(epochs, np.array([0.1, 0.5, 0.6]), 0.5) == 2.0
    assert bn_vs_none.epochs_to(epochs, np.array([0.1, np.nan, 0.2]), 0.5) == math.inf
    steps = np.arange(1, 9)
    values = np.arange(16, dtype=float).reshape(2, 8)
    values[0, 1] = np.nan
    out = bn_vs_none.per_epoch_mean(steps, values, per_epoch=4, epochs=2)
    want = np.array([[np.nanmean(values[0, :4]), values[0, 4:].mean()],
                     [values[1, :4].mean(), values[1, 4:].mean()]])
    np.testing.assert_allclose(out, want)


def test_bn_vs_none_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(bn_vs_none, ((["--activations", "swish"], "invalid --activations"),
                               (["--depth", "0"], "invalid --depth"),
                               (["--target", "1.5"], "invalid --target"),
                               (["--learning-rates", "-0.1"], "invalid --learning-rates")),
                  tmp_path, capsys)
