"""Reliability: the non-finite guard, interrupted runs (SIGTERM), atomic result
files, reproducibility and environment records, and float64 analysis."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad import DataConfig, ModelConfig, TrainConfig, data, io
from vgrad.checkpoint import committed_steps, load_checkpoint
from vgrad.cli import TrainArgs, main, run_train
from vgrad.models import build
from vgrad.loop import fit
from vgrad.train import create_state, describe_nonfinite, make_train_step, nonfinite_layers

MODEL = ModelConfig(depth=3, width=8, num_classes=4)
SYNTH = dict(dim=8, num_train=64, num_test=16, num_classes=4)


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", **SYNTH)


def _with_nan_example(ds, index=5):
    """The dataset with one NaN input, as a plain object (so nothing validates it away):
    the batch holding example ``index`` gives a non-finite loss, every other batch is fine."""
    x = ds.x_train.copy()
    x[index, 3] = np.nan
    return types.SimpleNamespace(x_train=x, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                                 num_classes=ds.num_classes, num_train=ds.num_train, name="nan")


def _nan_steps(ds, index=5, batch_size=16, epochs=2):
    """Global steps (1-based) whose batch holds example ``index``."""
    per_epoch = ds.num_train // batch_size
    out = []
    for epoch in range(epochs):
        perm = data.epoch_permutation(ds.num_train, seed=0, epoch=epoch)
        out.append(epoch * per_epoch + int(np.nonzero(perm == index)[0][0]) // batch_size + 1)
    return out


def _finite(tree):
    return all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------
# Non-finite guard
# ----------------------------------------------------------------------------


def test_step_reports_nonfinite_and_keeps_the_old_state():
    model = build(MODEL)
    x = jax.random.normal(jax.random.key(0), (8, 5))
    cfg = TrainConfig(optimizer="adam")
    state = jax.jit(lambda key, x: create_state(model, cfg, key, x))(jax.random.key(1), x)
    before = jax.tree_util.tree_map(np.array, state)
    step = make_train_step(model, cfg)
    new, metrics = step(state, {"x": x.at[2, 1].set(jnp.inf), "y": jnp.arange(8) % 4})
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    for name in ("params", "batch_stats", "opt_state"):
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(
            np.array_equal, jax.tree_util.tree_map(np.asarray, getattr(new, name)), getattr(before, name)))
    assert int(new.step) == 1  # the data position still advances
    _, ok = step(new, {"x": x, "y": jnp.arange(8) % 4})
    assert bool(ok["finite"]) and np.isfinite(float(ok["stem_grad_norm"])) and "head_grad_norm" in ok


def test_describe_nonfinite_names_first_layer_in_backprop_order():
    metrics = {"loss": np.float32(2.0), "finite": np.bool_(False), "head_grad_norm": np.float32(1.0),
               "block_grad_norms": np.array([np.nan, np.inf, np.nan, 3.0, 1.0], np.float32),
               "stem_grad_norm": np.float32(np.nan)}
    assert nonfinite_layers(metrics) == ["block 3", "block 2", "block 1", "stem"]
    text = describe_nonfinite(metrics)
    assert "first non-finite gradient in backpropagation order: block 3" in text
    assert "forward pass" not in text  # the loss is finite: the backward pass overflowed
    stacked = {k: np.stack([v, v]) for k, v in metrics.items()}
    stacked["finite"] = np.array([True, False])
    assert "seeds affected: [8]" in describe_nonfinite(stacked, seeds=[7, 8])
    deep = {**metrics, "block_grad_norms": np.full(1000, np.nan, np.float32)}
    text = describe_nonfinite(deep)  # 1001 layers are counted, 8 named
    assert "non-finite in 1001 layers: block 1000, block 999," in text and "(993 more)" in text
    assert len(text) < 400


def test_nonfinite_stop_diverges_naming_step_and_keeping_checkpoint_and_metrics(ds, tmp_path):
    bad, first = _with_nan_example(ds), _nan_steps(ds)[0]
    result = fit(build(MODEL), TrainConfig(batch_size=16, epochs=2), bad, run_dir=tmp_path,
                 progress=False, checkpoint_every=1, keep_checkpoints=2)
    assert result.status == "diverged"
    assert f"non-finite loss or gradient at step {first} " in result.message
    assert "first non-finite gradient in backpropagation order: head" in result.message
    assert _finite(result.state.params)
    records = io.read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, first + 1))
    assert train[-1]["finite"] is False and all(r["finite"] for r in train[:-1])
    if first > 1:  # the last good checkpoint is kept, nothing after it is written
        assert committed_steps(tmp_path / "checkpoints")[-1] == first - 1
        assert f"last checkpoint (step {first - 1}) is kept" in result.message


def test_nonfinite_skip_drops_only_the_bad_updates(ds):
    bad, steps = _with_nan_example(ds), _nan_steps(ds)
    result = fit(build(MODEL), TrainConfig(batch_size=16, epochs=2, on_nonfinite="skip"), bad,
                 progress=False)
    assert result.status == "completed" and result.final["step"] == 8
    skipped = [r["step"] for r in result.history if r.get("finite") is False]
    assert skipped == steps
    assert _finite(result.state.params)


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(a).dtype, np.inexact))


# learning rate x weight decay x |parameter| > 3.4e38: the update overflows float32
# although every gradient is small and finite.
@pytest.mark.parametrize("how", [dict(learning_rate=1e30, weight_decay=1e30),
                                 dict(learning_rate=1e20, weight_decay=1e20, momentum=0.0)])
def test_a_finite_gradient_with_a_nonfinite_update_is_caught(ds, tmp_path, how):
    """Finite loss and gradients, but the update overflows float32 (a huge learning
    rate or weight decay): the step keeps the old state, "stop" diverges naming the
    update, "skip" ends with a finite state, and no kept checkpoint is non-finite."""
    from vgrad.checkpoint import load_checkpoint

    cfg = TrainConfig(batch_size=16, epochs=2, **how)
    stop = fit(build(MODEL), cfg, ds, run_dir=tmp_path / "stop", checkpoint_every=1,
               progress=False)
    assert stop.status == "diverged" and "non-finite loss or gradient at step 1 " in stop.message
    assert "every layer's gradient norm is finite" in stop.message
    assert "update made the parameters or optimiser state non-finite" in stop.message
    assert _all_finite(stop.state) and int(stop.state.step) == 0
    train = [r for r in io.read_jsonl(tmp_path / "stop" / "metrics.jsonl") if "loss" in r]
    assert [r["update_finite"] for r in train] == [False] and np.isfinite(train[0]["grad_norm"])
    skip = fit(build(MODEL), dataclasses.replace(cfg, on_nonfinite="skip"), ds,
               run_dir=tmp_path / "skip", checkpoint_every=1, progress=False)
    assert _all_finite(skip.state) and skip.status == "completed"
    assert not any(r["update_finite"] for r in skip.history if "loss" in r)  # every update dropped
    for step in skip.checkpoint_steps:
        assert _all_finite(load_checkpoint(tmp_path / "skip", step=step).state)


def test_cli_writes_diverged_results_and_exits_nonzero(tmp_path, capsys):
    rc = main(["train", "--data.name", "synthetic", "--data.options", "dim", "8", "num_train", "64",
               "num_test", "16", "num_classes", "4", "--model.num_classes", "4", "--model.depth", "3",
               "--model.width", "8", "--train.learning_rate", "1e30", "--train.momentum", "0.0",
               "--train.batch_size", "16", "--train.epochs", "2", "--checkpoint_every", "1",
               "--out_dir", str(tmp_path), "--run_id", "boom", "--progress", "False"])
    assert rc == 1
    run_dir = tmp_path / "train" / "boom"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "diverged"
    assert "non-finite loss or gradient at step 2" in results["message"]
    assert committed_steps(run_dir / "checkpoints") == [1]
    assert [r["step"] for r in io.read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert "non-finite loss or gradient at step 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Interrupted runs: SIGTERM to a real `vgrad train` process
# ----------------------------------------------------------------------------

_SLOW_CLI = """
import sys, time
import vgrad.group_records
original = vgrad.group_records.as_numpy_metrics
def slow(metrics):
    time.sleep(0.05)
    return original(metrics)
vgrad.group_records.as_numpy_metrics = slow
from vgrad.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_saves_checkpoint_writes_interrupted_results_and_exits_nonzero(tmp_path):
    script = tmp_path / "slow_vgrad.py"
    script.write_text(_SLOW_CLI)
    run_dir = tmp_path / "train" / "term"
    cmd = [sys.executable, str(script), "train", "--data.name", "synthetic", "--data.options",
           "dim", "8", "num_train", "64", "num_test", "16", "num_classes", "4",
           "--model.num_classes", "4", "--model.depth", "2", "--model.width", "8",
           "--train.batch_size", "8", "--train.epochs", "50", "--out_dir", str(tmp_path),
           "--run_id", "term", "--progress", "False"]
    proc = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while len(io.read_jsonl(run_dir / "metrics.jsonl")) < 3:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "run did not start"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "received SIGTERM" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and "SIGTERM" in results["message"]
    step = results["final"]["step"]
    assert 3 <= step < 400
    assert committed_steps(run_dir / "checkpoints")[-1] == step  # saved at the step it stopped
    assert [r["step"] for r in io.read_jsonl(run_dir / "metrics.jsonl")][-1] == step
    assert results["final"]["last_train"]["step"] == step
    assert int(load_checkpoint(run_dir).state.step) == step


# ----------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------


def test_failed_write_leaves_previous_file_intact_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    io.write_json(path, {"status": "completed", "value": 1})
    jsonl = tmp_path / "metrics.jsonl"
    io.write_jsonl(jsonl, [{"step": 1}, {"step": 2}])

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        io.write_json(path, {"status": "completed", "value": 2, "big": list(range(10000))})
    with pytest.raises(OSError, match="disk full"):
        io.write_jsonl(jsonl, [{"step": 1}])
    assert io.read_json(path) == {"status": "completed", "value": 1}
    assert io.read_jsonl(jsonl) == [{"step": 1}, {"step": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "results.json"]


def test_torn_last_jsonl_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert io.read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_run_files_are_written_atomically_and_record_the_environment(tmp_path, monkeypatch):
    written = []
    original = io.atomic_write_text

    def spy(path, text):
        written.append(Path(path).name)
        return original(path, text)

    monkeypatch.setattr(io, "atomic_write_text", spy)
    args = TrainArgs(model=MODEL, train=TrainConfig(batch_size=16, epochs=2, seed=3),
                     data=DataConfig(name="synthetic", options=tuple(SYNTH.items())),
                     out_dir=str(tmp_path), run_id="r", progress=False)
    results = run_train(args)
    assert {"config.json", "results.json", "metrics.jsonl"} <= set(written)
    on_disk = io.read_json(tmp_path / "train" / "r" / "results.json")
    assert on_disk["status"] == "completed" and on_disk["seed"] == 3 and on_disk["seeds"] == [3]
    assert on_disk["config"]["train"]["seed"] == 3 and on_disk["config"]["model"]["depth"] == 3
    env = on_disk["environment"]
    assert env["packages"]["jax"] == jax.__version__ and env["packages"]["vgrad"]
    assert {"flax", "optax", "orbax-checkpoint", "numpy"} <= set(env["packages"])
    assert env["jax_backend"] == jax.default_backend()
    assert env["devices"] == [str(d) for d in jax.devices()] and env["python"]
    assert results["status"] == "completed"
    assert io.read_json(tmp_path / "train" / "r" / "config.json")["train"]["seed"] == 3



# ----------------------------------------------------------------------------
# Reproducibility
# ----------------------------------------------------------------------------


def test_same_config_and_seed_are_bit_identical_other_seed_is_not(ds):
    from vgrad.programs import programs_cache_clear

    cfg = TrainConfig(batch_size=16, epochs=2, eval_every=3)
    model = build(MODEL)
    a = fit(model, cfg, ds, progress=False)
    programs_cache_clear()  # the second run compiles afresh too
    b = fit(build(model.cfg), cfg, ds, progress=False)
    assert a.history == b.history and a.final == b.final  # exact, not approximate
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    c = fit(model, dataclasses.replace(cfg, seed=1), ds, progress=False)
    assert c.history != a.history


# ----------------------------------------------------------------------------
# Numerical range: float32 with log-domain accumulation vs float64
# ----------------------------------------------------------------------------


def _to_float64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_float64_analysis_agrees_with_float32_log_domain():
    from vgrad.analysis import jacobian_products

    # Linear blocks with orthogonal weights of gain 1/2: every ||P_l||^2/n is exactly
    # 4^-(L-l), down to 4^-150 = 5e-91, far below float32's smallest number (1e-45):
    # float32 with log-domain accumulation gets it right, and so does float64.
    L = 150
    model = build(ModelConfig(depth=L, width=16, num_classes=3, activation="linear",
                              init="orthogonal", weight_var=0.25))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    variables, key = jax.jit(model.init)(jax.random.key(0), x), jax.random.key(2)
    expected = (L - np.arange(L + 1)) * np.log(0.25)
    f32 = jacobian_products(model, variables, x, train=False, key=key, num_probes=4)
    with jax.enable_x64(True):
        f64 = jacobian_products(model, _to_float64(variables), _to_float64(x), train=False,
                                key=key, num_probes=4)
    assert f32.log_product_sq_norms.dtype == np.float64  # reported in float64 either way
    np.testing.assert_allclose(f32.log_product_sq_norms, expected, atol=1e-3)
    np.testing.assert_allclose(f64.log_product_sq_norms, expected, atol=1e-5)
    np.testing.assert_allclose(f32.log_product_sq_norms, f64.log_product_sq_norms, atol=1e-3)

    # A nonlinear net with BatchNorm, where float32 is valid: the two agree within
    # the estimators' own standard errors (their random probes differ).
    model = build(ModelConfig(depth=6, width=16, num_classes=3, activation="tanh", norm="batch"))
    x = jax.random.normal(jax.random.key(3), (8, 5))
    variables = jax.jit(model.init)(jax.random.key(4), x)
    a = jacobian_products(model, variables, x, train=True, key=key, num_probes=32)
    with jax.enable_x64(True):
        b = jacobian_products(model, _to_float64(variables), _to_float64(x), train=True, key=key,
                              num_probes=32)
    tol = 5 * (a.product_rel_stderr + b.product_rel_stderr) + 1e-4
    assert np.all(np.abs(a.log_product_sq_norms - b.log_product_sq_norms) <= tol)
