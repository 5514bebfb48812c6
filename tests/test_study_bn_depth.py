"""The BN-at-initialisation depth study (experiments/bn_depth.py) in its --quick form,
and its numerical helpers against closed forms and Monte Carlo."""

import math

import jax
import numpy as np
import pytest

from experiments import bn_depth
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS
from vgrad import ModelConfig, data, models
from vgrad.analysis import gradient_flow



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(bn_depth, tmp_path_factory.mktemp("studies"))


def test_quick_bn_depth_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_depth" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/growth.png",
                 "figures/products.png", "figures/weight_gradients.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Claims", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    size = results["sizes"]
    entries = results["entries"]
    assert sorted((e["form"], e["activation"], e["depth"]) for e in entries) == sorted(
        (f, a, d) for f in size["forms"] for a in size["activations"] for d in size["depths"])
    for e in entries:
        L = e["depth"]
        assert len(e["log10_products"]) == L + 1 and abs(e["log10_products"][-1]) < 1e-5  # P_L = I
        assert len(e["log10_weight_grad_norms"]) == L and len(e["log10_hidden_grad_norms"]) == L + 1
        assert len(e["log10_P0"]) == len(e["seeds"]) == size["seeds"]
    growth = results["growth"]
    assert sorted((g["width"], g["batch_size"]) for g in growth) == sorted(
        (w, b) for w in size["growth_widths"] for b in size["growth_batch_sizes"])
    claims = results["claims"]
    assert len(claims) == 3
    for c in claims:
        assert c["verdict"] in VERDICTS and c["measured"] and (run / c["figure"]).is_file()
        assert c["claim"] in report
    assert results["references"]["large_batch"] == pytest.approx(math.pi / (math.pi - 1))


def test_quick_bn_gradients_explode_at_init(quick):
    """A plain ReLU + BN network's gradient grows geometrically towards the input (per-layer
    factor well above 1, ||P_0||^2/n decades above the He network without BN, whose factor is
    about 1), so the 'BN cures vanishing' claim cannot hold for it."""
    _, _, results = quick
    depth = max(results["sizes"]["depths"])
    by = {e["form"]: e for e in results["entries"] if e["activation"] == "relu" and e["depth"] == depth}
    bn, none = by["BN"], by["no BN"]
    assert np.mean(bn["log10_P0"]) > np.mean(none["log10_P0"]) + 1.5
    assert min(bn["growth"]["product"] + bn["growth"]["hidden"]) > 1.3
    assert max(none["growth"]["product"]) < 1.2
    # The same fit of ||dL/dh||^2 and ||P||^2/n sees the same explosion.
    assert np.mean(bn["growth"]["hidden"]) == pytest.approx(np.mean(bn["growth"]["product"]), rel=0.15)
    cures = results["claims"][0]
    assert cures["verdict"] == "does not hold here"


def test_growth_factor_of_a_geometric_sequence():
    layers = np.arange(21)
    log10_sq = 5.0 - layers * math.log10(1.59)  # grows by 1.59 per layer towards l = 0
    assert bn_depth.growth_factor(log10_sq, layers, (2, 16)) == pytest.approx(1.59, rel=1e-9)
    noisy = log10_sq.copy()
    noisy[:2] = np.nan  # NaN (overflow) outside or inside the window is skipped
    noisy[10] = np.inf
    assert bn_depth.growth_factor(noisy, layers, (0, 20)) == pytest.approx(1.59, rel=1e-9)
    assert math.isnan(bn_depth.growth_factor(log10_sq, layers, (3, 4)))  # < 3 points
    assert bn_depth.fit_window(50) == (5, 40)


def test_measure_draws_the_sweeps_initialisation():
    """The vmapped init of ``measure`` gives each seed the variables of
    ``model.init(jax.random.key(seed), x)`` (what vgrad.sweep trains from): its gradient
    norms equal those of gradient_flow on that init."""
    # The quick study's ReLU + BN network: its compiled functions are reused when the
    # module's fixture ran first.
    cfg = ModelConfig(depth=12, width=32, activation="relu", init="he_normal", norm="batch")
    ds = data.load("mnist1d")
    x, y = np.asarray(ds.x_train[:16]), np.asarray(ds.y_train[:16])
    model = models.build(cfg)
    (m0,), (m1,) = (bn_depth.measure(cfg, [seed], x, y, num_probes=4) for seed in (0, 1))
    flow = gradient_flow(model, model.init(jax.random.key(0), x), {"x": x, "y": y})
    np.testing.assert_allclose(m0["log10_weight_grad_norms"], np.log10(flow.weight_grad_norms),
                               rtol=1e-4, atol=1e-5)
    assert m0["seed"] == 0 and len(m0["log10_product_sq_norms"]) == cfg.depth + 1
    assert not np.allclose(m0["log10_weight_grad_norms"], m1["log10_weight_grad_norms"])


def _growth(width, b, mean, std=0.005):
    return {"width": width, "batch_size": b, "seeds": [0, 1, 2], "hidden_mean": mean,
            "hidden_std": std, "weight": [mean] * 3}


def test_yang_verdict_follows_the_numbers():
    size = {"growth_depth": 50}
    near = [_growth(512, 16, 1.592), _growth(512, 64, 1.49), _growth(512, 256, 1.47)]
    assert bn_depth.claim_yang(near, [], size)["verdict"] == "holds"
    # Within 2 % of pi/(pi-1) at B = 256, but 4 std below it and still falling with B.
    falling = [_growth(512, 16, 1.592), _growth(512, 64, 1.487), _growth(512, 256, 1.446)]
    claim = bn_depth.claim_yang(falling, [], size)
    assert claim["verdict"] == "holds partly" and "does not level off" in claim["measured"]
    far = [_growth(512, 16, 1.40), _growth(512, 256, 1.30)]
    assert bn_depth.claim_yang(far, [], size)["verdict"] == "does not hold here"
    # Only the widest width is compared.
    mixed = near + [_growth(128, 16, 1.2), _growth(128, 256, 1.2)]
    assert bn_depth.claim_yang(mixed, [], size)["verdict"] == "holds"


def test_bn_depth_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(bn_depth, ((["--forms", "resnet"], "invalid --forms"),
                             (["--activations", "swish"], "invalid --activations"),
                             (["--depths", "2"], "invalid --depths"),
                             (["--growth-batch-sizes", "2"], "invalid --batch-size")),
                  tmp_path, capsys, quick=False)
