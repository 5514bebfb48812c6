"""The study engine (vgrad.sweep / vgrad.loop): grids, exactness against fit,
per-run divergence, no recompiles for new hyperparameter values, chunking,
measurements, and resume of a killed sweep."""

import dataclasses
import math
import os
import re
import signal

import jax
import numpy as np
import pytest

from vgrad import ModelConfig, TrainConfig, data, group_records, io, loop, programs, sweep
from vgrad.analysis import gradient_flow, jacobian_products
from vgrad.loop import fit
from vgrad.models import build

MODEL = ModelConfig(depth=3, width=8, num_classes=4, activation="tanh", norm="batch")
TRAIN = TrainConfig(batch_size=16, epochs=2, eval_every=5)  # 8 steps per epoch, 16 steps


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", dim=8, num_train=128, num_test=32, num_classes=4)


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------
# grids
# ----------------------------------------------------------------------------


def test_grid_is_the_product_with_seeds_fastest():
    runs = sweep.grid(MODEL, dataclasses.replace(TRAIN, seed=5),
                      vary={"model.activation": ["relu", "tanh"], "train.learning_rate": [0.1, 0.2]},
                      seeds=2)
    assert len(runs) == 8
    assert [r.seed for r in runs[:2]] == [5, 6]
    assert [(r.model.activation, r.train.learning_rate) for r in runs[::2]] == [
        ("relu", 0.1), ("relu", 0.2), ("tanh", 0.1), ("tanh", 0.2)]
    assert dict(runs[3].values) == {"model.activation": "relu", "train.learning_rate": 0.2}
    named = sweep.variants({"a": {"model.depth": 2}, "b": {"model.norm": "none"}}, model=MODEL, seeds=3)
    assert [r.label for r in named] == ["a"] * 3 + ["b"] * 3
    assert named[0].model.depth == 2 and named[3].model.norm == "none"


def test_grid_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown field 'model.activaton'.*model.activation"):
        sweep.grid(MODEL, TRAIN, vary={"model.activaton": ["relu"]})
    with pytest.raises(ValueError, match=r"unknown field 'lr'"):
        sweep.grid(MODEL, TRAIN, vary={"lr": [0.1]})
    with pytest.raises(ValueError, match=r"vary\['train.learning_rate'\]=\[\]: must be a non-empty"):
        sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": []})
    with pytest.raises(ValueError, match=r"invalid activation='swish2'"):
        sweep.grid(MODEL, TRAIN, vary={"model.activation": ["swish2"]})
    with pytest.raises(ValueError, match=r"invalid seeds=0"):
        sweep.grid(MODEL, TRAIN, seeds=0)
    with pytest.raises(ValueError, match="runs is empty"):
        sweep.run([], None)


def test_groups_split_on_program_not_on_values():
    runs = (sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": [0.1, 1.0],
                                          "train.momentum": [0.0, 0.9],
                                          "model.init": ["normal", "he_normal"]}, seeds=2)
            + sweep.grid(MODEL, TRAIN, vary={"model.width": [16]})
            + sweep.grid(MODEL, TRAIN, vary={"train.batch_size": [32]}))
    assert sweep.groups(runs) == [list(range(16)), [16], [17]]


# ----------------------------------------------------------------------------
# exactness, divergence, compilation
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lr_sweep(ds):
    """One group: 3 learning rates (the last diverges) x 2 seeds, and two init scales."""
    runs = sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": [0.05, 0.3, 1e38]}, seeds=2)
    runs += sweep.grid(dataclasses.replace(MODEL, init="normal"), TRAIN,
                       vary={"model.init_std": [0.1, 0.5]})
    return runs, sweep.run(runs, ds, progress=False, measure_at=[0, 8, 16])


def test_sweep_is_one_group_and_each_run_equals_fit_alone(ds, lr_sweep):
    """Exactness, for a small network (width 8). Bit-identical on CPU: the
    parameters and optimiser state, and so every later step. Within float32
    rounding (rtol 1e-6): values that end in a reduction XLA may order
    differently in a vmapped program -- the logged gradient norms and losses,
    the BatchNorm running averages, and hence the evaluations made with them.
    (For wide layers XLA:CPU may choose another matmul kernel for the batched
    product; then the runs agree to float32 rounding per step only.)"""
    runs, result = lr_sweep
    assert len(result.groups) == 1 and result.groups[0]["runs"] == list(range(8))
    for i in (0, 3, 6, 7):  # two learning rates, seeds 0 and 1, both init scales
        alone = fit(build(runs[i].model), runs[i].train, ds, progress=False)
        got = result.runs[i]
        assert got.status == alone.status == "completed"
        own = [{k: v for k, v in r.items() if k != "run"} for r in got.history]
        assert len(own) == len(alone.history)
        for mine, ref in zip(own, alone.history):
            assert mine.keys() == ref.keys()
            for key, value in ref.items():
                if isinstance(value, (bool, int, str)):
                    assert mine[key] == value, key
                else:
                    np.testing.assert_allclose(mine[key], value, rtol=1e-6, err_msg=key)
        assert [r["step"] for r in own if "test_loss" in r] == [5, 10, 15, 16]
        assert got.final.keys() == alone.final.keys() and got.final["step"] == alone.final["step"]
        for key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy"):
            np.testing.assert_allclose(got.final[key], alone.final[key], rtol=1e-6)
    # The parameters themselves, for one run.
    group = loop.train_group(build(MODEL), [loop.RunSpec(build(r.model), r.train) for r in runs[:4]],
                             ds, config={}, progress=False)
    alone = fit(build(MODEL), runs[3].train, ds, progress=False)
    assert _leaves_equal(jax.tree_util.tree_map(lambda a: a[3], group.state.params), alone.state.params)
    assert _leaves_equal(jax.tree_util.tree_map(lambda a: a[3], group.state.opt_state),
                         alone.state.opt_state)


def test_a_diverging_run_is_frozen_and_the_others_go_on(ds, lr_sweep):
    runs, result = lr_sweep
    for i in (4, 5):
        bad = result.runs[i]
        assert bad.status == "diverged"
        assert re.search(r"non-finite loss or gradient at step \d+", bad.message)
        assert "backpropagation order" in bad.message or "update made" in bad.message
        stopped = bad.final["step"]
        assert 0 <= stopped < 16
        # Train records stop at the bad step; its last good state is what was evaluated.
        assert max(r["step"] for r in bad.history if "loss" in r) == stopped + 1
        assert math.isfinite(bad.final["train_loss"]) or math.isnan(bad.final["train_loss"])
    assert [r.status for r in result.runs].count("completed") == 6
    table = result.table()
    assert table[4]["status"] == "diverged" and table[4]["train.learning_rate"] == 1e38
    assert {"run", "label", "seed", "test_accuracy", "step_time_s"} <= set(table[0])


def test_diverged_state_is_finite_and_equals_fit_stopping_there(ds, lr_sweep):
    runs, result = lr_sweep
    alone = fit(build(runs[4].model), runs[4].train, ds, progress=False)
    assert alone.status == "diverged" and alone.final == result.runs[4].final
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(alone.state))


def test_numeric_residual_scales_are_values_of_one_program(ds):
    """alpha is a variable (batch_stats/residual_scale): runs that differ in it share one
    group, and each equals ``fit`` on its own model; the named scales stay programs."""
    model = dataclasses.replace(MODEL, residual=True, norm="none")
    runs = sweep.grid(model, TRAIN, vary={"model.residual_scale": [0.0, 0.5, 2.0]})
    runs += sweep.grid(model, TRAIN, vary={"model.residual_scale": ["inv_sqrt_depth"]})
    assert sweep.groups(runs) == [[0, 1, 2], [3]]
    variables = build(runs[1].model).init(jax.random.key(0), ds.x_train[:4])
    np.testing.assert_array_equal(variables["batch_stats"]["blocks"]["block"]["residual_scale"],
                                  np.full(model.depth, 0.5, np.float32))
    result = sweep.run(runs[:3], ds, progress=False)
    finals = []
    for r, got in zip(runs[:3], result.runs):
        alone = fit(build(r.model), r.train, ds, progress=False)
        np.testing.assert_allclose(got.final["train_loss"], alone.final["train_loss"], rtol=1e-6)
        finals.append(got.final["train_loss"])
    assert len(set(finals)) == 3  # the scale changed the function


def test_new_learning_rates_do_not_recompile(ds):
    programs.programs_cache_clear()
    model = build(MODEL)
    first = sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": [0.01, 0.02]})
    sweep.run(first, ds, progress=False)
    steps = 16  # the run's length, which is also its chunk length (< DEFAULT_STEPS_PER_DISPATCH)
    chunk = programs.program("chunk", model, TRAIN, steps, steps, True, None, 2)
    compiled = chunk._cache_size()
    assert compiled == 1
    other = sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": [0.5, 0.7],
                                           "train.weight_decay": [1e-4]})
    sweep.run(other, ds, progress=False)
    assert chunk._cache_size() == compiled


def test_chunking_does_not_change_results(ds):
    model = build(MODEL)
    a = fit(model, TRAIN, ds, progress=False, steps_per_dispatch=1)
    b = fit(model, TRAIN, ds, progress=False, steps_per_dispatch=7)
    c = fit(model, TRAIN, ds, progress=False)
    assert a.history == b.history == c.history and a.final == b.final == c.final
    assert _leaves_equal(a.state, c.state) and _leaves_equal(b.state, c.state)


# ----------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------


def test_measurements_at_init_match_the_analysis_functions(ds, lr_sweep):
    runs, result = lr_sweep
    got = result.runs[7]  # init="normal", init_std=0.5
    assert [m["step"] for m in got.measurements] == [0, 8, 16]
    model = build(runs[7].model)
    x, y = ds.x_train[:64], ds.y_train[:64]
    variables = jax.jit(model.init)(jax.random.key(runs[7].seed), x)
    jac = jacobian_products(model, variables, x, train=True, key=jax.random.key(0), num_probes=8)
    flow = gradient_flow(model, variables, {"x": x, "y": y}, train=True)
    at_init = got.measurements[0]
    np.testing.assert_allclose(at_init["log10_product_sq_norms"],
                               jac.log_product_sq_norms / math.log(10), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(at_init["weight_grad_norms"], flow.weight_grad_norms, rtol=1e-5)
    np.testing.assert_allclose(at_init["dead_fraction"], flow.dead_fraction, rtol=1e-6)
    assert len(at_init["log10_product_sq_norms"]) == MODEL.depth + 1
    # Training moved the weights: the gradients measured later differ, and so do the weights.
    assert got.measurements[2]["weight_grad_norms"] != at_init["weight_grad_norms"]
    assert at_init["relative_weight_change"] == [0.0] * MODEL.depth
    assert all(c > 0 for c in got.measurements[2]["relative_weight_change"])


def test_extra_measure_sees_each_runs_own_variables(ds):
    """A study's own measurement joins the built-in ones: here the training-mode loss of
    each run's variables on the measurement batch, which must equal the built-in ``loss``
    (measured by gradient_flow) run by run and step by step."""
    x, y = ds.x_train[:32], ds.y_train[:32]

    def extra(model, variables):
        logits, _ = model.apply(variables, x, train=True)
        logp = jax.nn.log_softmax(logits)
        return {"own_loss": float(-np.mean(np.take_along_axis(np.asarray(logp), y[:, None], 1))),
                "stem_bias": np.asarray(variables["params"]["stem"]["Dense_0"]["bias"])}

    runs = sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": [0.05, 0.2]})
    result = sweep.run(runs, ds, measure_at=[0, 16], measure_batch_size=32, jacobians=False,
                       extra_measure=extra, progress=False)
    for r in result.runs:
        for m in r.measurements:
            assert m["own_loss"] == pytest.approx(m["loss"], rel=1e-5)
            assert len(m["stem_bias"]) == MODEL.width
    # Different learning rates: the runs' own variables, not one run's.
    assert result.runs[0].measurements[1]["stem_bias"] != result.runs[1].measurements[1]["stem_bias"]
    # Without the built-in gradient flow: the same extra values, and nothing else measured.
    alone = sweep.run(runs, ds, measure_at=[0, 16], measure_batch_size=32, jacobians=False,
                      gradient_flow=False, extra_measure=extra, progress=False)
    for r, ref in zip(alone.runs, result.runs):
        for m, m_ref in zip(r.measurements, ref.measurements):
            assert set(m) == {"step", "own_loss", "stem_bias", "relative_weight_change"}
            assert m["own_loss"] == m_ref["own_loss"] and m["stem_bias"] == m_ref["stem_bias"]
    with pytest.raises(ValueError, match="clash"):
        sweep.run(runs[:1], ds, measure_at=[0], jacobians=False, gradient_flow=False,
                  progress=False, extra_measure=lambda model, variables: {"loss": 0.0})


# ----------------------------------------------------------------------------
# faults: interrupted and killed sweeps resume; finished groups are not recomputed
# ----------------------------------------------------------------------------


def _two_groups():
    return (sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": [0.05, 0.2]})
            + sweep.grid(dataclasses.replace(MODEL, activation="relu"), TRAIN,
                         vary={"train.learning_rate": [0.05, 0.2]}))


def test_interrupted_sweep_resumes_to_the_same_results(ds, tmp_path, monkeypatch):
    runs = _two_groups()
    calls = {"n": 0}
    original = group_records.as_numpy_metrics

    def counting(metrics):  # called once per chunk of steps
        calls["n"] += 1
        return original(metrics)

    monkeypatch.setattr(group_records, "as_numpy_metrics", counting)
    sweep.run(runs[:2], ds, progress=False, run_dir=tmp_path / "count", steps_per_dispatch=4,
              checkpoint_every=4)
    group0_chunks, calls["n"] = calls["n"], 0
    reference = sweep.run(runs, ds, progress=False, steps_per_dispatch=4)

    def interrupt_in_second_group(metrics):
        calls["n"] += 1
        if calls["n"] == group0_chunks + 2:  # group 1's second chunk
            os.kill(os.getpid(), signal.SIGINT)
        return original(metrics)

    calls["n"] = 0
    monkeypatch.setattr(group_records, "as_numpy_metrics", interrupt_in_second_group)
    first = sweep.run(runs, ds, progress=False, run_dir=tmp_path, steps_per_dispatch=4,
                      checkpoint_every=4)
    monkeypatch.setattr(group_records, "as_numpy_metrics", original)
    assert [r.status for r in first.runs] == ["completed"] * 2 + ["interrupted"] * 2
    assert (tmp_path / "groups" / "0" / "result.json").exists()
    assert not (tmp_path / "groups" / "1" / "result.json").exists()
    with pytest.raises(ValueError, match="already holds a sweep"):
        sweep.run(runs, ds, progress=False, run_dir=tmp_path)

    trained = []
    monkeypatch.setattr(sweep, "train_group", lambda *a, **k: trained.append(k["resume"])
                        or loop.train_group(*a, **k))
    resumed = sweep.run(runs, ds, progress=False, run_dir=tmp_path, resume=True, checkpoint_every=4)
    assert trained == [True]  # group 0 read back, group 1 continued from its checkpoint
    for a, b in zip(resumed.runs, reference.runs):
        assert a.status == b.status == "completed"
        assert a.final == b.final and a.history == b.history
    saved = io.read_json(tmp_path / "groups" / "1" / "result.json")
    assert [r["final"] for r in saved["runs"]] == [r.final for r in reference.runs[2:]]


def test_crashed_sweep_resumes_from_its_last_periodic_checkpoint(ds, tmp_path, monkeypatch):
    """A crash (here an exception from the host side, as a killed process would
    leave things: no interrupt checkpoint) mid-way through the second group."""
    runs = _two_groups()
    reference = sweep.run(runs, ds, progress=False, steps_per_dispatch=4)
    calls = {"n": 0}
    original = group_records.as_numpy_metrics

    def crash_late(metrics):
        calls["n"] += 1
        if calls["n"] == 12:  # group 1, after its checkpoint at step 8
            raise RuntimeError("simulated crash")
        return original(metrics)

    monkeypatch.setattr(group_records, "as_numpy_metrics", crash_late)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep.run(runs, ds, progress=False, run_dir=tmp_path, steps_per_dispatch=4, checkpoint_every=4)
    monkeypatch.setattr(group_records, "as_numpy_metrics", original)
    from vgrad.checkpoint import committed_steps

    kept = committed_steps(tmp_path / "groups" / "1" / "checkpoints")
    assert kept and 0 < kept[-1] < 16  # a mid-run checkpoint, not an end-of-run one
    resumed = sweep.run(runs, ds, progress=False, run_dir=tmp_path, resume=True, checkpoint_every=4,
                        steps_per_dispatch=4)
    for a, b in zip(resumed.runs, reference.runs):
        assert a.status == "completed" and a.final == b.final and a.history == b.history


def test_resume_refuses_a_changed_grid(ds, tmp_path):
    runs = sweep.grid(MODEL, dataclasses.replace(TRAIN, epochs=1), vary={"train.learning_rate": [0.1]})
    sweep.run(runs, ds, progress=False, run_dir=tmp_path)
    changed = sweep.grid(MODEL, dataclasses.replace(TRAIN, epochs=1), vary={"train.learning_rate": [0.2]})
    with pytest.raises(ValueError, match="different group"):
        sweep.run(changed, ds, progress=False, run_dir=tmp_path, resume=True)

