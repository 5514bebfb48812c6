"""The clipping study (experiments/clipping.py) in its --quick form."""

import numpy as np
import pytest

from experiments import clipping
from studies_setup import run_quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(clipping, tmp_path_factory.mktemp("studies"))


def test_quick_clipping_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "clipping" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/training.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary: vanishing", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    sizes = results["sizes"]
    (setting,) = sizes["settings"]
    forms = results["settings"][setting]["forms"]
    expected = [clipping.label(kind, v) for kind, values in sizes["thresholds"].items() for v in values]
    assert [f["form"] for f in forms] == expected
    depth = sizes["depths"][setting]
    for f in forms:
        assert len(f["log10_products_init"]) == depth + 1
        assert len(f["log10_step0_update_norms"]) == len(f["log10_relative_weight_change"]) == depth
        assert np.asarray(f["log10_step0_clip_factor"]).shape == (sizes["seeds"], depth)
    assert len(results["table"]) == len(expected) * sizes["seeds"]


def test_step0_update_is_the_engines_gradient(quick):
    """The study's own step-0 gradient (same weights, same batch) equals the per-block weight
    gradient the engine measured at initialisation."""
    _, _, results = quick
    none = results["settings"]["vanishing"]["forms"][0]
    assert none["kind"] == "none"
    np.testing.assert_allclose(none["log10_step0_update_norms"],
                               none["log10_weight_grad_norms_init_measured"], atol=1e-3)


def test_clipping_cannot_enlarge_a_vanishing_gradient(quick):
    """Sigmoid + naive init: the product is tiny at init and stays tiny after training with
    every clipping; no block's update is ever larger than the unclipped gradient."""
    _, _, results = quick
    forms = results["settings"]["vanishing"]["forms"]
    base = forms[0]
    assert np.mean(base["log10_P0_init"]) < -15
    for f in forms:
        # Every form starts from the same weights, so the product at init is the same.
        np.testing.assert_allclose(f["log10_P0_init"], base["log10_P0_init"], atol=1e-4)
        assert np.nanmax(f["log10_step0_clip_factor"]) <= 1e-6, f["form"]
        # A gradient that underflowed to exactly 0 is 0 after clipping too.
        assert f["step0_zero_blocks"] == base["step0_zero_blocks_unclipped"], f["form"]
        assert np.mean(f["log10_P0_final"]) < -15, f["form"]
        assert f["train_accuracy"]["mean"] < clipping.CHANCE + 0.1, f["form"]
    assert "cannot make a vanishing gradient larger" in results["conclusion"]


def test_clipping_refuses_bad_thresholds(tmp_path, capsys):
    assert clipping.main(["--quick", "--out", str(tmp_path), "--value", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgrad: error:") and "invalid --value" in err
    assert not any(tmp_path.iterdir())
