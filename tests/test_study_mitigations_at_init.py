"""The gradient product at initialisation (experiments/mitigations_at_init.py), --quick."""

import numpy as np
import pytest

from experiments import mitigations_at_init as study_module
from studies_setup import check_refuses, run_quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    code, run, results = run_quick(study_module, out, "--seeds", "2",
                                   "--figure", str(out / "headline.png"))
    return code, run, out, results


def test_quick_study_writes_the_study_conventions(quick):
    code, run, out, results = quick
    assert code == 0
    for name in ("config.json", "results.json", "report.md", "figures/products.png"):
        assert (run / name).stat().st_size > 0, name
    assert (out / "headline.png").read_bytes() == (run / "figures" / "products.png").read_bytes()
    assert results["study"] == "mitigations_at_init" and results["status"] == "completed"
    size = results["sizes"]
    assert (size["depth"], size["seeds"]) == (8, 2)
    for cell in results["cells"]:
        assert np.shape(cell["log_product_sq_norms"]) == (2, 9)
        # P_L = identity: log ||I||²/n = 0 at the last layer, for every seed.
        np.testing.assert_allclose(np.asarray(cell["log_product_sq_norms"])[:, -1], 0.0, atol=1e-5)
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert "figures/products.png" in report


def test_quick_study_measures_what_mean_field_theory_predicts(quick):
    *_, results = quick
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == set(study_module.VARIANTS)
    naive = rows[study_module.BASELINE]
    # Even at depth 8 the naive sigmoid network loses many decades; theory agrees.
    assert naive["log10_P0_mean"] < -15
    np.testing.assert_allclose(naive["log10_P0_mean"], naive["theory_log10_P0"], atol=1.0)
    assert naive["log10_P0_min"] <= naive["log10_P0_mean"] <= naive["log10_P0_max"]
    assert abs(rows["sigmoid, naive + residual"]["log10_P0_mean"]) < 1
    # Pre-activation residual blocks have a prediction too: (1 + 1/L)^L at depth 8,
    # which the 16-unit networks measure within their finite-width scatter.
    residual = rows["ReLU, He + residual 1/√L"]
    np.testing.assert_allclose(residual["theory_log10_P0"], 8 * np.log10(1 + 1 / 8), rtol=1e-9)
    assert abs(residual["log10_P0_mean"] - residual["theory_log10_P0"]) < 0.2
    assert rows["ReLU, He + BN + residual 1/√L"]["theory_log10_P0"] is None


def test_conclusion_is_computed_from_the_rows():
    rows = [{"variant": study_module.BASELINE, "log10_P0_mean": -40.0, "theory_log10_P0": -39.5},
            {"variant": "ReLU, He", "log10_P0_mean": 0.3, "theory_log10_P0": 0.0},
            {"variant": "tanh, Xavier", "log10_P0_mean": -7.0, "theory_log10_P0": None},
            {"variant": "BN", "log10_P0_mean": 1.5, "theory_log10_P0": None}]
    text = study_module.conclusion(rows, depth=10)
    assert "10^-40.0 (4.00 decades per layer)" in text
    assert "ReLU, He (10^0.30)" in text and "Outside that range besides the baseline: tanh" in text
    assert "Of these, BN amplifies the gradient" in text
    assert "within 0.50 decade" in text and "each of the 2 variants" in text


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys):
    check_refuses(study_module, [(["--depth", "0"], "--depth=0"),
                                 (["--num-probes", "-1"], "--num-probes=-1"),
                                 (["--dataset", "mnist"], "allowed values are mnist1d, digits, synthetic")], tmp_path, capsys)
