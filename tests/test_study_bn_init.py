"""The BatchNorm initialisation study (experiments/bn_init.py) in its --quick form."""

import math

import numpy as np
import pytest

from experiments import bn_init as study
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(study, tmp_path_factory.mktemp("studies"))


def _cells(results, norm):
    return {c["init"]: c for c in results["cells"] if c["norm"] == norm}


def test_quick_bn_init_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_init" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/products.png",
                 "figures/ends.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    sizes = results["sizes"]
    L, S = sizes["depth"], sizes["seeds"]
    inits = [study.init_key(s) for s in sizes["scales"]] + list(sizes["named"])
    assert sorted((c["activation"], c["norm"], c["init"]) for c in results["cells"]) == sorted(
        (a, n, i) for a in sizes["activations"] for n in study.NORMS for i in inits)
    # One compiled training program per (activation, norm): init kind and scale are values.
    assert len(results["groups"]) == len(sizes["activations"]) * len(study.NORMS)
    for c in results["cells"]:
        assert len(c["log10_products"]) == L + 1 and abs(c["log10_products"][-1]) < 1e-5
        for key in ("test_accuracy", "log10_P0", "logit_std_at_init", "run_trains",
                    "block_kernel_growth", "head_kernel_growth"):
            assert len(c[key]) == S, key
    for c in results["claims"]:
        assert c["verdict"] in VERDICTS and c["measured"] and c["figure"].startswith("figures/")
        assert c["verdict"] in report


def test_quick_bn_init_product_is_invariant_to_the_weight_scale_with_bn(quick):
    """N(0, s^2) draws of one seed differ only by the factor s, and BN's output is invariant
    to the scale of the weights before it: ||P_0|| is the same at every s (up to BN's epsilon),
    and the logits (the unnormalised output Dense, also drawn at s) scale exactly with s."""
    _, _, results = quick
    scales = results["sizes"]["scales"]
    bn = _cells(results, "batch")
    p0 = np.asarray([bn[study.init_key(s)]["log10_P0"] for s in scales])
    assert np.ptp(p0, axis=0).max() < 0.05
    logits = np.asarray([bn[study.init_key(s)]["logit_std_at_init"] for s in scales])
    np.testing.assert_allclose(logits[-1] / logits[0], scales[-1] / scales[0], rtol=0.05)
    spread = results["gradient_product_spread"]
    (act,) = results["sizes"]["activations"]
    assert spread[f"{act}|batch"]["max"] - spread[f"{act}|batch"]["min"] < 0.05
    (flat,) = [c for c in results["claims"] if c["claim"].startswith("BN removes")]
    assert flat["verdict"] == "holds"


def test_quick_bn_init_kernel_norms_match_the_init_scale(quick):
    """The extra measurement reads the block kernels: ||W||_F of a width x width kernel with
    N(0, s^2) entries is s * width, within the sampling spread."""
    _, _, results = quick
    n = results["sizes"]["width"]
    for c in results["cells"]:
        expected = c["scale"] * n
        np.testing.assert_allclose(c["block_kernel_norm_at_init"], expected, rtol=0.15)
        # Growth over training is a ratio of finite norms (no run diverges at quick size).
        assert all(g > 0 for g in c["block_kernel_growth"] if not math.isnan(g))


def test_quick_bn_init_product_without_bn_follows_mean_field(quick):
    """ReLU without BN: ||P_0||^2/n = (s^2 width / 2)^L, measured and predicted alike."""
    _, _, results = quick
    sizes = results["sizes"]
    L, n = sizes["depth"], sizes["width"]
    none = _cells(results, "none")
    for s in sizes["scales"]:
        c = none[study.init_key(s)]
        expected = L * math.log10(s * s * n / 2)
        assert c["mean_field_log10_P0"] == pytest.approx(expected, abs=1e-6)
        assert np.mean(c["log10_P0"]) == pytest.approx(expected, abs=1.0)
    assert all(math.isnan(c["mean_field_log10_P0"]) for c in _cells(results, "batch").values())


def test_named_initialisers_sit_at_their_equivalent_std():
    """A named init is drawn on the s axis at the std with its block-weight variance:
    LeCun / Xavier (square layers) 1/width, He 2/width, orthogonal its gain^2 / width."""
    from vgrad import ModelConfig, TrainConfig, sweep

    n = 64
    expected = {"lecun": 1 / n, "xavier": 1 / n, "he": 2 / n}
    for act, orth in (("relu", 2 / n), ("tanh", 1 / n)):
        for key, var in {**expected, "orthogonal": orth}.items():
            (run,) = sweep.variants({key: study.NAMED[key][2](act)},
                                    model=ModelConfig(depth=3, width=n, activation=act),
                                    train=TrainConfig(steps=1))
            assert study.equivalent_std(run.model) == pytest.approx(math.sqrt(var)), (act, key)


def test_named_initialisers_in_the_claims_table_and_figure(quick):
    """The named-init paths of the claims, the table and the summary figure, on the quick
    run's cells plus a copy of each N(0, 1) cell relabelled as He (no training needed)."""
    import copy

    _, _, results = quick
    sizes = {**results["sizes"], "named": ("he",)}
    cells = copy.deepcopy(results["cells"])
    for c in [c for c in cells if c["scale"] == sizes["scales"][-1]]:
        cells.append({**copy.deepcopy(c), "init": "he", "named": True, "scale": None})
    claim = study.claim_insensitive(cells, sizes)
    assert "named initialisers that train" in claim["measured"]
    assert claim["verdict"] in VERDICTS
    rows = study.table_rows(cells)
    assert sum(r["init"].startswith("he (≈ s") for r in rows) == len(study.NORMS)
    fig = study.figure_summary(cells, sizes)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "He" in labels
    # Each named marker is drawn once per panel (accuracy and product) and norm.
    he_markers = [l for ax in fig.axes for l in ax.get_lines() if l.get_marker() == "^"]
    assert len(he_markers) == 2 * len(study.NORMS) * len(sizes["activations"])


def test_bn_init_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(study, ((["--activations", "swish"], "invalid --activations"),
                          (["--scales", "0"], "invalid --scales"),
                          (["--named", "kaiming"], "invalid --named"),
                          (["--depth", "0"], "invalid --depth")), tmp_path, capsys)
