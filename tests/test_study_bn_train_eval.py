"""The BN train/eval study (experiments/bn_train_eval.py) in its --quick form."""

import numpy as np
import pytest

from experiments import bn_train_eval
from studies_setup import check_refuses, run_quick
from vgrad.study import VERDICTS



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(bn_train_eval, tmp_path_factory.mktemp("studies"))


def test_quick_bn_train_eval_writes_the_study_conventions(quick):
    code, run, results = quick
    assert code == 0
    assert results["study"] == "bn_train_eval" and results["status"] == "completed"
    for name in ("config.json", "report.md", "figures/summary.png", "figures/gaps.png",
                 "figures/final.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Claims", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert results["conclusion"] and results["conclusion"] in report
    assert len(results["claims"]) == 3
    for c in results["claims"]:
        assert set(c) == {"claim", "measured", "verdict", "figure"}
        assert c["verdict"] in VERDICTS and c["measured"]
        assert (run / c["figure"]).is_file()
    sizes, at = results["sizes"], results["measure_steps"]
    assert at[0] == 0 and at[-1] == sizes["steps"]
    entries = results["entries"]
    assert sorted((e["batch_size"], e["momentum"]) for e in entries) == sorted(
        (b, m) for b in sizes["batch_sizes"] for m in sizes["momenta"])
    for e in entries:
        assert e["steps"] == at
        assert e["num_eval_examples"] % e["batch_size"] == 0
        for mode in bn_train_eval.MODES:
            acc = np.asarray(e["accuracy"][mode])
            assert acc.shape == (sizes["seeds"], len(at))
            assert np.all((acc >= 0) & (acc <= 1))
        np.testing.assert_allclose(e["gap_running"], np.asarray(e["accuracy"]["batch"])
                                   - np.asarray(e["accuracy"]["running"]))


def test_quick_bn_train_eval_momentum_changes_only_the_running_averages(quick):
    """Training never reads the running averages: two momenta train the same network, so the
    batch-statistics and population-statistics accuracies agree (to one test example), while
    the running averages differ; at step 0 they are the initial mean 0 / var 1 for both."""
    _, _, results = quick
    for b in results["sizes"]["batch_sizes"]:
        es = sorted([e for e in results["entries"] if e["batch_size"] == b], key=lambda e: e["momentum"])
        low, high = es[0], es[-1]
        one = 1.0 / low["num_eval_examples"] + 1e-9
        for mode in ("batch", "precise"):
            np.testing.assert_allclose(low["accuracy"][mode], high["accuracy"][mode], atol=one)
        err_low = np.asarray(low["running_var_log10_error"])
        err_high = np.asarray(high["running_var_log10_error"])
        np.testing.assert_allclose(err_low[:, 0], err_high[:, 0], rtol=1e-6)
        assert np.all(err_low[:, 0] > 0.05)
        # After a few dozen steps the slow average (m = 0.999) still holds mostly its initial
        # value: further from the population statistics than the fast one.
        assert np.all(err_high[:, -1] > err_low[:, -1])


def test_measure_steps_are_half_decades():
    assert bn_train_eval.measure_steps(2000) == [0, 10, 30, 100, 300, 1000, 2000]
    assert bn_train_eval.measure_steps(40) == [0, 10, 30, 40]
    assert bn_train_eval.measure_steps(5) == [0, 5]


def test_stat_errors_against_numpy():
    pop = {"stem": {"BatchNorm_0": {"mean": np.array([0.0, 1.0]), "var": np.array([1.0, 4.0])}}}
    run = {"stem": {"BatchNorm_0": {"mean": np.array([0.5, 1.0]), "var": np.array([10.0, 4.0])}}}
    out = bn_train_eval.stat_errors(run, pop)
    eps = bn_train_eval.VAR_EPS
    want_var = np.mean(np.abs(np.log10((np.array([10.0, 4.0]) + eps) / (np.array([1.0, 4.0]) + eps))))
    want_mean = np.mean(np.array([0.5, 0.0]) / np.sqrt(np.array([1.0, 4.0]) + eps))
    assert out["running_var_log10_error"] == pytest.approx(want_var)
    assert out["running_mean_error"] == pytest.approx(want_mean)


def test_bn_train_eval_refuses_bad_arguments(tmp_path, capsys):
    check_refuses(bn_train_eval, ((["--batch-sizes", "1"], "invalid --batch-sizes"),
                                  (["--momenta", "1.0"], "invalid --momenta"),
                                  (["--steps", "0"], "invalid --steps")), tmp_path, capsys)
