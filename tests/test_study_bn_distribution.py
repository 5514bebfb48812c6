"""The BN input-distribution study (experiments/bn_distribution.py) in its --quick form,
and its measurement checked against a direct NumPy computation."""

import math

import jax
import numpy as np
import pytest

from experiments import bn_distribution
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS
from vgrad import ModelConfig, data, models



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(bn_distribution, tmp_path_factory.mktemp("studies"))


def test_quick_bn_distribution_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_distribution" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/units.png",
                 "figures/learning_rates.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Claims", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    size = results["sizes"]
    entries = results["entries"]
    assert sorted((e["form"], e["learning_rate"]) for e in entries) == sorted(
        (f, lr) for f in bn_distribution.FORMS for lr in size["learning_rates"])
    steps = results["measure_steps"]
    assert steps[0] == 0 and steps[-1] == size["steps"] and len(steps) == size["measure_points"]
    S, T, U = size["seeds"], len(steps), size["width"]
    for e in entries:
        assert e["measure_steps"] == steps
        for mode in ("train_mode", "eval_mode"):
            assert np.asarray(e[mode]["percentiles_shown"]).shape == (S, T, 3, size["units"])
            assert np.asarray(e[mode]["drift"]).shape == (S, U)
            p = np.asarray(e[mode]["percentiles_shown"])
            assert np.all(p[:, :, 0] <= p[:, :, 1]) and np.all(p[:, :, 1] <= p[:, :, 2])
        c = e["test_accuracy_curve"]
        assert np.asarray(c["values"]).shape == (S, len(c["steps"])) and c["steps"][-1] == size["steps"]
    claims = results["claims"]
    assert [c["claim"] for c in claims] == [
        "BN stabilises each layer's input distribution (less internal covariate shift)",
        "BN trains faster in this setting"]
    for c in claims:
        assert c["verdict"] in VERDICTS and c["measured"] and (run / c["figure"]).is_file()
        assert c["claim"] in report


def test_quick_bn_input_starts_normalised_and_drifts_less(quick):
    """With batch statistics, BN's output over the fixed batch has mean beta = 0 and std
    gamma = 1 at initialisation, so its 15-85 % spread is near 2 (about 2.07 for a Gaussian);
    without BN the median of the sigmoid input moves further, relative to its spread."""
    _, _, results = quick
    lr = results["sizes"]["learning_rate"]
    bn = bn_distribution.entry(results["entries"], "BN", lr)
    none = bn_distribution.entry(results["entries"], "no BN", lr)
    p0 = np.asarray(bn["train_mode"]["percentiles_shown"])[:, 0]  # (S, 3, units) at step 0
    assert np.all(np.abs(p0[:, 1]) < 0.5)
    assert np.all((p0[:, 2] - p0[:, 0] > 1.4) & (p0[:, 2] - p0[:, 0] < 2.6))
    assert (bn_distribution.median_of(bn["train_mode"]["drift"])
            < bn_distribution.median_of(none["train_mode"]["drift"]))


def _numpy_preactivation(variables, h, train: bool, eps: float) -> np.ndarray:
    """Dense -> BatchNorm of the last block, by hand: h (B, n) -> (B, n)."""
    p = {k: np.asarray(v[-1]) for k, v in variables["params"]["blocks"]["block"]["layer_0"]
         ["Dense_0"].items()}
    z = h @ p["kernel"] + p["bias"]
    bn = variables["params"]["blocks"]["block"]["layer_0"].get("BatchNorm_0")
    if bn is None:
        return z
    stats = variables["batch_stats"]["blocks"]["block"]["layer_0"]["BatchNorm_0"]
    mean, var = (z.mean(0), z.var(0)) if train else (np.asarray(stats["mean"][-1]),
                                                       np.asarray(stats["var"][-1]))
    return (z - mean) / np.sqrt(var + eps) * np.asarray(bn["scale"][-1]) + np.asarray(bn["bias"][-1])


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_last_preactivations_are_dense_then_bn_of_the_last_hidden_layer(norm):
    """Checked against NumPy (the last block's Dense and BN applied by hand to h^{L-1}),
    and sigmoid of it is the model's own last hidden state h^L."""
    cfg = ModelConfig(depth=2, width=8, activation="sigmoid", init="glorot_normal", norm=norm)
    model = models.build(cfg)
    x = np.asarray(data.load("mnist1d").x_test[:20])
    variables = model.init(jax.random.key(3), x)
    if norm == "batch":  # running statistics that are not the initial 0 / 1
        stats = variables["batch_stats"]
        variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a + 0.3, stats)
    out = bn_distribution.last_preactivations(model, variables, x)
    for mode, train in (("train", True), ("eval", False)):
        z = out[mode]
        hs = np.asarray(model.hidden_states(variables, x, train=train))
        expected = _numpy_preactivation(variables, hs[cfg.depth - 1], train, cfg.bn_epsilon)
        np.testing.assert_allclose(z, expected, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(1 / (1 + np.exp(-z)), hs[cfg.depth], rtol=1e-5, atol=1e-6)
    if norm == "batch":  # batch statistics and running averages give different inputs
        assert not np.allclose(out["train"], out["eval"])


def test_drift_spread_and_speed_helpers_by_hand():
    steps = np.array([0, 10, 20, 30])
    # One unit: median 0, 1, 3, 2 with spread 2, 2, 4, 4 (percentiles median -+ spread/2).
    median = np.array([0.0, 1.0, 3.0, 2.0])
    spread = np.array([2.0, 2.0, 4.0, 4.0])
    p = np.stack([median - spread / 2, median, median + spread / 2], axis=1)[:, :, None]  # (T, 3, 1)
    assert bn_distribution.drift(p, steps)[0] == pytest.approx(3.0 / 3.0)
    assert bn_distribution.drift(p, steps, since=20)[0] == pytest.approx(1.0 / 4.0)
    assert bn_distribution.spread_change(p, steps)[0] == pytest.approx(math.log10(2.0))
    assert bn_distribution.spread_change(p, steps, since=20)[0] == pytest.approx(0.0)
    assert bn_distribution.steps_to(steps, [0.1, 0.5, 0.7, 0.9], 0.6) == 20
    assert math.isnan(bn_distribution.steps_to(steps, [0.1, 0.2, np.nan, 0.3], 0.6))


def test_bn_distribution_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(bn_distribution, ((["--learning-rates", "0"], "invalid --learning-rates"),
                                    (["--hidden-layers", "1"], "invalid --hidden-layers"),
                                    (["--units", "500"], "invalid --units"),
                                    (["--init", "zeros"], "invalid --init")),
                  tmp_path, capsys, quick=False)
