"""The activation-function study (experiments/activations.py) in its --quick form."""

import numpy as np
import pytest

from experiments import activations
from studies_setup import run_quick


@pytest.fixture(scope="module")
def quick_activations(tmp_path_factory):
    return run_quick(activations, tmp_path_factory.mktemp("studies"))


def test_quick_activations_study_writes_the_study_conventions(quick_activations):
    code, run, results = quick_activations
    assert code == 0
    for name in ("config.json", "results.json", "report.md", "figures/summary.png",
                 "figures/gradient_flow.png", "figures/units.png", "figures/curves.png",
                 "figures/prelu_slopes.png"):
        assert (run / name).stat().st_size > 0, name
    assert results["study"] == "activations" and results["status"] == "completed"
    sizes = results["sizes"]
    acts = results["activations"]
    assert [a["activation"] for a in acts] == sizes["activations"]
    L, S, T = sizes["depth"], sizes["seeds"], len(sizes["measure_at"])
    for a in acts:
        assert a["init"] == activations.ACTIVATIONS[a["activation"]][1]
        assert a["measure_steps"] == sizes["measure_at"]
        assert np.shape(a["log10_product_sq_norms"]) == (S, T, L + 1)
        assert np.shape(a["log10_weight_grad_norms"]) == (S, T, L)
        assert np.shape(a["unit_fraction"]) == (S, T, L + 1)
        assert len(a["test_accuracy"]) == S
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert "PReLU's slopes moved" in report


def test_quick_activations_study_findings(quick_activations):
    """Sigmoid + Xavier (phi' <= 1/4) starts with a product many decades below a
    He-initialised rectifier; the rectifier has about half its units at z <= 0
    at init; sigmoid's statistic is saturation."""
    _, _, results = quick_activations
    a = {x["activation"]: x for x in results["activations"]}
    p0 = lambda x: np.mean(np.asarray(x["log10_P0"])[:, 0])
    assert p0(a["sigmoid"]) < p0(a["prelu"]) - 3
    assert a["sigmoid"]["unit_fraction_kind"] == "saturated_fraction"
    assert a["prelu"]["unit_fraction_kind"] == "dead_fraction"
    negative = np.asarray(a["prelu"]["unit_fraction"])[:, 0, 1:]
    assert 0.3 < negative.mean() < 0.7


def test_quick_activations_study_reads_learned_prelu_slopes(quick_activations):
    """The slopes come from the trained network (they moved from 0.25), one per
    unit of the stem and of every block, and the refit is the sweep's own run."""
    _, _, results = quick_activations
    sizes, prelu = results["sizes"], results["prelu"]
    slopes = np.asarray(prelu["slopes"])
    assert slopes.shape == (sizes["seeds"], sizes["depth"] + 1, sizes["width"])
    assert prelu["initial_slope"] == 0.25
    assert np.max(np.abs(slopes - 0.25)) > 1e-4
    assert np.allclose(prelu["mean_per_layer"], slopes.mean(axis=(0, 2)))
    sweep_acc = next(x for x in results["activations"] if x["activation"] == "prelu")["test_accuracy"]
    assert np.allclose(prelu["refit_test_accuracy"], sweep_acc, atol=1e-6)
