"""The BatchNorm batch-size study (experiments/bn_batch_size.py) in its --quick form."""

import math

import numpy as np
import pytest

from experiments import bn_batch_size
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(bn_batch_size, tmp_path_factory.mktemp("studies"))


def test_quick_bn_batch_size_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_batch_size" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/curves.png",
                 "figures/noise.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Claims", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    sizes = results["sizes"]
    entries = results["entries"]
    assert sorted((e["norm"], e["batch_size"]) for e in entries) == sorted(
        (n, b) for n in sizes["norms"] for b in sizes["batch_sizes"])
    for e in entries:
        # Same number of examples for every batch size: epochs x full batches per epoch.
        assert e["steps"] == sizes["epochs"] * (sizes["train_examples"] // e["batch_size"])
        # Linear scaling: lr / B is the same for every batch size.
        assert e["learning_rate"] / e["batch_size"] == pytest.approx(
            results["config"]["learning_rate"] / sizes["reference_batch_size"])
        assert len(e["test_accuracy"]["values"]) == sizes["seeds"]
        curve = e["test_accuracy_curve"]
        assert np.asarray(curve["values"]).shape == (sizes["seeds"], len(curve["epochs"]))
        assert curve["epochs"][-1] == pytest.approx(sizes["epochs"])  # one evaluation per epoch
    claims = results["claims"]
    expected = ["BN depends on the batch size (small batches hurt)",
                "LayerNorm does not depend on the batch size",
                "batch statistics get noisier as batches shrink (≈1/√B)"]
    # The LayerNorm claim needs LayerNorm runs (the quick form trains none and batch only).
    assert [c["claim"] for c in claims] == [
        c for c in expected if "layer" in sizes["norms"] or "LayerNorm" not in c]
    for c in claims:
        assert c["verdict"] in VERDICTS and c["measured"] and c["figure"] == "figures/summary.png"
        assert (run / c["figure"]).exists()


def test_quick_bn_batch_size_noise_follows_one_over_sqrt_b_at_the_input_layer(quick):
    """The input layer's pre-BN activations are a fixed function of each example: their
    batch mean scatters as 1/sqrt(B) and the batch variance as the kurtosis-corrected form,
    at initialisation and after training."""
    _, _, results = quick
    noise = results["noise"]
    b = np.asarray(noise["batch_sizes"], float)
    np.testing.assert_allclose(noise["predicted_mean_spread"], 1 / np.sqrt(b))
    layer = noise["layers"]["input layer"]
    for when in ("init", "trained"):
        t = layer[when]
        assert np.asarray(t["mean_spread"]).shape == (results["sizes"]["seeds"], len(b))
        np.testing.assert_allclose(np.mean(t["mean_spread"], 0), 1 / np.sqrt(b), rtol=0.15)
        np.testing.assert_allclose(np.mean(t["var_spread"], 0),
                                   np.mean(t["predicted_var_spread"], 0), rtol=0.25)
        # The mean batch variance is (B-1)/B of the population's (BatchNorm's biased form).
        np.testing.assert_allclose(np.mean(t["var_bias"], 0), (b - 1) / b, atol=0.08)
    assert layer["init"]["step"] == 0 and layer["trained"]["step"] > 0
    nums = results["noise_numbers"]["input layer"]
    assert -0.6 < nums["mean_slope"] < -0.4


def test_quick_bn_batch_size_bn_at_batch_two_is_below_the_unnormalised_network(quick):
    """A batch of two normalises every unit to +-1: BatchNorm evaluated with its running
    averages is far below the same network without normalisation at batch 2, and below its
    own accuracy at the larger batch."""
    _, _, results = quick
    acc = {(e["norm"], e["batch_size"]): e["test_accuracy"]["mean"] for e in results["entries"]}
    small, large = min(results["sizes"]["batch_sizes"]), max(results["sizes"]["batch_sizes"])
    assert acc[("batch", small)] < acc[("none", small)] - 0.03
    assert acc[("batch", small)] < acc[("batch", large)]
    assert results["claims"][0]["verdict"] in ("holds", "holds partly")


def test_bn_batch_size_claims_follow_the_numbers():
    """The verdicts come from the measurements: a flat BN curve does not 'hold'."""
    def entries(bn, ln, none=(0.6, 0.6)):
        return [{"norm": n, "batch_size": b, "test_accuracy": {"mean": a}}
                for n, accs in (("batch", bn), ("layer", ln), ("none", none))
                for b, a in zip((2, 64), accs)]
    noise = {"batch_sizes": [2, 64], "trained_with_batch_size": 64,
             "predicted_mean_spread": [1 / math.sqrt(2), 1 / 8], "layers": {"input layer": {
                 "trained": {"mean_spread": [[1 / math.sqrt(2), 1 / 8]], "var_spread": [[0.7, 0.17]],
                             "var_bias": [[0.5, 0.98]], "predicted_var_spread": [[0.7, 0.17]],
                             "kurtosis": [[3.0, 3.0]]}}}}
    size = {"norms": ("none", "batch", "layer")}
    hurt = bn_batch_size.claims(entries((0.2, 0.6), (0.6, 0.6)), noise, size)
    flat = bn_batch_size.claims(entries((0.6, 0.6), (0.6, 0.6)), noise, size)
    assert hurt[0]["verdict"] == "holds" and flat[0]["verdict"] == "does not hold here"
    assert hurt[1]["verdict"] == flat[1]["verdict"] == "holds"
    # LayerNorm that collapses at batch 2 as badly as BatchNorm does depend on the batch size ...
    assert bn_batch_size.claims(entries((0.2, 0.6), (0.2, 0.6)), noise, size)[1]["verdict"] \
        == "does not hold here"
    # ... but not when the network without normalisation loses as much (the optimiser's doing).
    assert bn_batch_size.claims(entries((0.2, 0.6), (0.4, 0.6), (0.4, 0.6)), noise,
                                size)[1]["verdict"] == "holds"
    assert hurt[2]["verdict"] == "holds"  # slopes exactly the i.i.d. ones
    noise["layers"]["input layer"]["trained"]["mean_spread"] = [[0.05, 0.05]]  # flat: no 1/sqrt(B)
    assert bn_batch_size.claims(entries((0.2, 0.6), (0.6, 0.6)), noise, size)[2]["verdict"] \
        == "holds partly"


def test_bn_batch_size_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(bn_batch_size, ((["--batch-sizes", "1", "8"], "invalid --batch-sizes"),
                                  (["--norms", "group"], "invalid --norms"),
                                  (["--norms", "none", "layer"], "invalid --norms"),
                                  (["--lr-scaling", "sqrt"], "invalid --lr-scaling"),
                                  (["--reference-batch-size", "64"], "invalid --reference-batch-size"),
                                  (["--epochs", "0"], "invalid --epochs")), tmp_path, capsys)
