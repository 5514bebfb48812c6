"""The depth study (experiments/depth.py) in its --quick form."""

import numpy as np
import pytest

from experiments import depth
from studies_setup import run_quick


@pytest.fixture(scope="module")
def quick_depth(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    code, run, results = run_quick(depth, out, "--figure", str(out / "headline.png"))
    return code, run, out, results


def test_quick_depth_study_writes_the_study_conventions(quick_depth):
    code, run, out, results = quick_depth
    assert code == 0
    for name in ("config.json", "results.json", "report.md", "figures/ratio.png",
                 "figures/layers.png", "figures/weight_change.png"):
        assert (run / name).stat().st_size > 0, name
    assert (out / "headline.png").read_bytes() == (run / "figures" / "ratio.png").read_bytes()
    assert results["study"] == "depth" and results["status"] == "completed"
    assert results["config"]["quick"] is True
    sizes = results["sizes"]
    cells = results["cells"]
    assert {(c["variant"], c["depth"]) for c in cells} == {
        (v, d) for v in sizes["variants"] for d in sizes["depths"]}
    for c in cells:
        L, S = c["depth"], sizes["seeds"]
        assert np.shape(c["log10_product_sq_norms"]) == (S, L + 1)
        assert len(c["theory_log10_product_sq_norms"]) == L + 1
        assert c["theory_log10_product_sq_norms"][-1] == 0.0
        assert np.shape(c["log10_hidden_grad_norms"]) == (S, L + 1)
        assert np.shape(c["log10_weight_grad_norms"]) == (S, L)
        assert np.shape(c["log10_relative_weight_change"]) == (S, L)
        assert c["final_step"] == sizes["steps"]
        assert c["input_second_moment"] > 0
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert "figures/ratio.png" in report and "decades per block" in report
    assert len(results["table"]) == len(cells) * sizes["seeds"]


def _cell(results, variant, d):
    return next(c for c in results["cells"] if c["variant"] == variant and c["depth"] == d)


def test_quick_depth_study_matches_mean_field_theory(quick_depth):
    """Naive sigmoid (sigma_w^2 = width * 1e-4, phi'(0) = 1/4) loses about 4 decades
    per block at width 16, ReLU + He none; measurement and mean-field prediction
    agree within 0.5 decade (sigmoid: deterministic decay) or 1 decade (ReLU at
    width 16, whose finite-width fluctuations are larger)."""
    _, _, _, results = quick_depth
    deepest = max(results["sizes"]["depths"])
    sig = _cell(results, "sigmoid, naive N(0, 0.01²)", deepest)
    he = _cell(results, "ReLU, He", deepest)
    assert np.mean(sig["log10_P0"]) < np.mean(he["log10_P0"]) - 10
    for c, tol in ((sig, 0.5), (he, 1.0)):
        measured = np.mean(np.asarray(c["log10_product_sq_norms"]), axis=0)
        assert np.max(np.abs(measured - np.asarray(c["theory_log10_product_sq_norms"]))) < tol
    rate = results["decades_per_block"]["sigmoid, naive N(0, 0.01²)"]
    assert 3.0 < rate["measured"] < 5.0 and abs(rate["measured"] - rate["theory"]) < 0.2
    assert results["agreement"]["per_variant"]["sigmoid, naive N(0, 0.01²)"] < 0.5


def test_quick_depth_study_vanishing_gradient_freezes_the_first_blocks(quick_depth):
    """In the naive sigmoid network the first block's weights move many decades
    less than the last block's; in ReLU + He they move comparably."""
    _, _, _, results = quick_depth
    deepest = max(results["sizes"]["depths"])
    sig = np.mean(_cell(results, "sigmoid, naive N(0, 0.01²)", deepest)
                  ["log10_relative_weight_change"], axis=0)
    he = np.mean(_cell(results, "ReLU, He", deepest)["log10_relative_weight_change"], axis=0)
    assert sig[0] < sig[-1] - 5
    assert abs(he[0] - he[-1]) < 1.5
