"""The initialisation study (experiments/initialization.py) in its --quick form."""

import numpy as np
import pytest

from experiments import initialization
from studies_setup import run_quick


@pytest.fixture(scope="module")
def quick_initialization(tmp_path_factory):
    return run_quick(initialization, tmp_path_factory.mktemp("studies"))


def test_quick_initialization_study_writes_the_study_conventions(quick_initialization):
    code, run, results = quick_initialization
    assert code == 0
    for name in ("config.json", "results.json", "report.md", "figures/classic.png",
                 "figures/forward_backward.png", "figures/curves.png", "figures/accuracy.png",
                 "figures/spectrum.png"):
        assert (run / name).stat().st_size > 0, name
    assert results["study"] == "initialization" and results["status"] == "completed"
    sizes = results["sizes"]
    L, S = sizes["depth"], sizes["seeds"]
    assert {(c["activation"], c["init"]) for c in results["cells"]} == {
        (a, i) for a in sizes["activations"] for i in sizes["inits"]}
    for c in results["cells"]:
        assert np.shape(c["activation_std"]) == (S, L + 1)
        assert np.shape(c["log10_weight_grad_norms"]) == (S, L)
        assert len(c["test_accuracy"]) == S
    assert {(s["variant"], s["depth"]) for s in results["spectra"]} == {
        (v, d) for v in sizes["spectrum_variants"] for d in sizes["spectrum_depths"]}
    n = sizes["spectrum_batch"] * sizes["spectrum_width"]
    for s in results["spectra"]:
        assert np.shape(s["singular_values"]) == (S, n)
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Spectra", "## Conclusion", "## Figures",
                    "## Run"):
        assert heading in report
    assert "classic example" in report


def _cell(results, act, init):
    return next(c for c in results["cells"] if c["activation"] == act and c["init"] == init)


def test_quick_initialization_classic_example(quick_initialization):
    """Naive sigmoid's first-block gradient is many decades below ReLU + He's."""
    _, _, results = quick_initialization
    classic = results["classic"]
    assert (classic["sigmoid_naive"]["log10_first_block_grad"]
            < classic["relu_he"]["log10_first_block_grad"] - 4)
    assert classic["sigmoid_naive"]["log10_P0"] < classic["relu_he"]["log10_P0"] - 5


def test_quick_initialization_forward_signal(quick_initialization):
    """ReLU with N(0, 0.01^2) weights shrinks the signal by ~0.03 per layer (it dies
    within a few layers); He keeps its scale."""
    _, _, results = quick_initialization
    small = np.mean(_cell(results, "relu", "normal_0.01")["activation_std"], axis=0)
    he = np.mean(_cell(results, "relu", "he")["activation_std"], axis=0)
    assert small[-1] < 1e-3 * small[0]
    assert 0.25 < he[-1] / he[0] < 4


def test_quick_initialization_dynamical_isometry(quick_initialization):
    """Orthogonal linear blocks are an exact isometry (every singular value 1);
    Gaussian ReLU + He spreads the singular values over decades."""
    _, _, results = quick_initialization
    spec = {s["variant"]: s for s in results["spectra"]}
    orth = np.asarray(spec["linear, orthogonal"]["singular_values"])
    assert np.max(np.abs(orth - 1)) < 1e-4
    assert spec["linear, orthogonal"]["p10_p90_decades"] < 1e-3
    he = spec["ReLU, He (Gaussian)"]
    assert he["p10_p90_decades"] > 0.3
    assert 0.3 < he["mean_sq_sv"] < 3
