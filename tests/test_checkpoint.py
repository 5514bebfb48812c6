"""Checkpoints and exact resume: what is saved and when, resuming after an
interrupt, a damaged or incompatible checkpoint, multi-seed/mesh states, loading
a checkpoint for analysis, and a run killed with SIGKILL mid-epoch."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import vgrad.group_records as vrecords
from vgrad import ModelConfig, TrainConfig, data
from vgrad.checkpoint import (committed_steps, load_checkpoint, restore_model_config,
                              restore_variables)
from vgrad.io import read_jsonl
from vgrad.models import build
from vgrad.loop import fit

# 128 examples / batch 16 = 8 steps per epoch, 3 epochs = 24 steps. Checkpoints
# every 5 steps and at every epoch end: 5, 8, 10, 15, 16, 20, 24.
MODEL = ModelConfig(depth=2, width=8, num_classes=4, norm="batch")
TRAIN = TrainConfig(optimizer="adam", schedule="cosine", learning_rate=0.01, batch_size=16, epochs=3)
ALL_SAVES = [5, 8, 10, 15, 16, 20, 24]


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", dim=8, num_train=128, num_test=32, num_classes=4)


def _fit(ds, run_dir, *, train=TRAIN, model=MODEL, **kw):
    kw.setdefault("checkpoint_every", 5)
    return fit(build(model), train, ds, run_dir=run_dir, progress=False, **kw)


def _assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def _interrupt_at(monkeypatch, step, sig=signal.SIGINT):
    """Deliver ``sig`` to this process while fit is taking step ``step``."""
    calls = {"n": 0}
    original = vrecords.as_numpy_metrics

    def wrapper(metrics):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), sig)
        return original(metrics)

    monkeypatch.setattr(vrecords, "as_numpy_metrics", wrapper)


@pytest.fixture(scope="module")
def reference(ds, tmp_path_factory):
    """An uninterrupted run, keeping every checkpoint."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, _fit(ds, run_dir, keep_checkpoints=100)


@pytest.fixture(scope="module")
def interrupted(ds, tmp_path_factory):
    """The same run stopped by SIGINT while the host handles step 11 (mid-epoch), one
    step per dispatch; never modified by tests. The loop copies a step's metrics
    while the next step runs, so the run stops after step 11 or 12."""
    run_dir = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, 11)
        result = _fit(ds, run_dir, keep_checkpoints=3, steps_per_dispatch=1)
    return run_dir, result


def _copy(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_checkpoints_every_n_steps_and_each_epoch_end(reference):
    run_dir, result = reference
    assert result.status == "completed"
    assert committed_steps(run_dir / "checkpoints") == ALL_SAVES == result.checkpoint_steps
    meta = json.loads((run_dir / "checkpoints" / "10" / "meta" / "metadata").read_text())
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"], meta["seed"]) == (10, 1, 2, 0)
    # Every record logged up to step 10 (10 train records + the eval at step 8).
    assert meta["num_records"] == 11
    assert meta["config"]["model"]["depth"] == 2 and meta["config"]["train"]["optimizer"] == "adam"


def test_interrupt_saves_checkpoint_and_keeps_last_k(interrupted):
    run_dir, result = interrupted
    assert result.status == "interrupted"
    stopped = result.final["step"]
    assert stopped in (11, 12)
    assert "SIGINT" in result.message and f"step {stopped}" in result.message
    assert result.final["last_train"]["step"] == stopped
    assert int(result.state.step) == stopped
    # keep_checkpoints=3 of 5, 8, 10, 11 or 12.
    assert committed_steps(run_dir / "checkpoints") == [8, 10, stopped] == result.checkpoint_steps
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")][-1] == stopped


def test_resume_after_interrupt_is_exact(ds, reference, interrupted, tmp_path):
    ref_dir, ref = reference
    run_dir = _copy(interrupted[0], tmp_path)
    # Records written after the checkpoint (by a run killed later), and a torn line.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 12, "seed": 0, "loss": 1.0}) + "\n" + '{"step": 13, "lo')
    result = _fit(ds, run_dir, resume=True, keep_checkpoints=3)
    assert result.status == "completed" and result.resumed_from == interrupted[1].final["step"]
    assert result.history == ref.history
    assert (run_dir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    assert result.final == ref.final
    _assert_trees_equal(result.state, ref.state)
    assert committed_steps(run_dir / "checkpoints") == [16, 20, 24]


def test_resume_falls_back_to_previous_checkpoint_when_latest_is_damaged(ds, reference, interrupted,
                                                                         tmp_path):
    ref_dir, ref = reference
    run_dir, stopped = _copy(interrupted[0], tmp_path), interrupted[1].final["step"]
    shutil.rmtree(run_dir / "checkpoints" / str(stopped) / "state")
    with pytest.warns(RuntimeWarning, match=f"could not restore checkpoint step {stopped}"):
        result = _fit(ds, run_dir, resume=True)
    assert result.resumed_from == 10
    assert (run_dir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    _assert_trees_equal(result.state, ref.state)


def test_resume_with_incompatible_config_names_the_fields(ds, interrupted, tmp_path):
    run_dir = _copy(interrupted[0], tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    other_train = dataclasses.replace(TRAIN, learning_rate=0.5)
    with pytest.raises(ValueError) as err:
        _fit(ds, run_dir, resume=True, model=dataclasses.replace(MODEL, depth=3),
             train=other_train)
    msg = str(err.value)
    assert "incompatible config" in msg
    assert "model.depth: checkpoint has 2, this run has 3" in msg
    assert "train.learning_rate: checkpoint has 0.01, this run has 0.5" in msg
    other_data = data.load("synthetic", dim=8, num_train=128, num_test=32, num_classes=4, seed=1)
    with pytest.raises(ValueError, match=r"dataset\.sha"):
        _fit(other_data, run_dir, resume=True)
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_needs_a_checkpoint_and_a_fresh_run_refuses_old_checkpoints(ds, interrupted, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint in"):
        _fit(ds, tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="need run_dir"):
        fit(build(MODEL), TRAIN, ds, resume=True, progress=False)
    run_dir = _copy(interrupted[0], tmp_path)
    with pytest.raises(ValueError, match=r"already holds the checkpoints.*resume=True"):
        _fit(ds, run_dir)


def test_restore_variables_for_analysis(reference):
    run_dir, result = reference
    variables = restore_variables(run_dir)
    assert restore_model_config(run_dir) == MODEL
    _assert_trees_equal(variables, result.state.variables)
    logits, _ = build(restore_model_config(run_dir)).apply(variables, np.zeros((2, 8), np.float32),
                                                           train=False)
    assert logits.shape == (2, 4)
    # The checkpoints directory and one step directory work too.
    at_8 = restore_variables(run_dir / "checkpoints" / "8")
    also_8 = restore_variables(run_dir / "checkpoints", step=8)
    _assert_trees_equal(at_8, also_8)
    assert not np.array_equal(at_8["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
    ckpt = load_checkpoint(run_dir, step=8)
    assert ckpt.step == 8 and int(ckpt.state.step) == 8 and ckpt.train_config == TRAIN
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        restore_variables(run_dir / "checkpoints" / "8" / "meta")
    with pytest.raises(ValueError, match="no checkpoint for step 9 .* available steps"):
        restore_variables(run_dir, step=9)  # a ValueError too: one clear line on the CLI
    with pytest.raises(ValueError, match="does not exist"):
        restore_variables(run_dir / "nope")


def test_multi_seed_state_on_a_mesh_resumes_exactly(ds, tmp_path):
    from vgrad.parallel import data_mesh

    train = dataclasses.replace(TRAIN, steps=10)
    kw = dict(train=train, seeds=2, mesh=data_mesh(), checkpoint_every=3, keep_checkpoints=10)
    full = _fit(ds, tmp_path / "full", **kw)
    assert full.checkpoint_steps == [3, 6, 8, 9, 10]
    # Resume the same run from its step-3 checkpoint, as if it had died there.
    run_dir = _copy(tmp_path / "full", tmp_path, "partial")
    for step in (6, 8, 9, 10):
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    resumed = _fit(ds, run_dir, resume=True, **kw)
    assert resumed.resumed_from == 3 and resumed.history == full.history
    _assert_trees_equal(resumed.state, full.state)
    variables = restore_variables(run_dir, seed_index=1)
    _assert_trees_equal(variables, jax.tree_util.tree_map(lambda a: a[1], full.state.variables))
    _assert_trees_equal(load_checkpoint(run_dir).variables, full.state.variables)
    for bad in (None, 2):
        with pytest.raises(ValueError, match=r"holds 2 seeds \[0, 1\]"):
            restore_variables(run_dir, seed_index=bad)


# ----------------------------------------------------------------------------
# A real process killed with SIGKILL mid-epoch, then resumed with the CLI
# ----------------------------------------------------------------------------

# Runs `vgrad train` (vgrad.cli.main); an optional per-step delay (seconds, argv[1])
# keeps the run alive long enough to be killed mid-epoch.
_SCRIPT = textwrap.dedent("""
    import sys, time
    import vgrad.group_records
    delay = float(sys.argv[1])
    if delay:
        original = vgrad.group_records.as_numpy_metrics
        def slow(metrics):
            time.sleep(delay)
            return original(metrics)
        vgrad.group_records.as_numpy_metrics = slow
    from vgrad.cli import main
    sys.exit(main(sys.argv[2:]))
""")

# The run of the `reference` fixture, from the command line.
CLI_ARGS = ["train", "--data.name", "synthetic", "--data.options", "dim", "8", "num_train", "128",
            "num_test", "32", "num_classes", "4", "--model.num_classes", "4", "--model.depth", "2",
            "--model.width", "8", "--model.norm", "batch", "--train.optimizer", "adam",
            "--train.schedule", "cosine", "--train.learning_rate", "0.01", "--train.batch_size", "16",
            "--train.epochs", "3", "--checkpoint_every", "5", "--keep_checkpoints", "3",
            "--progress", "False"]
PER_EPOCH, TOTAL = 8, 24


def _cli(tmp_path, run_id, *extra, delay=0.0):
    script = tmp_path / "run_vgrad.py"
    script.write_text(_SCRIPT)
    # The resumed process reuses the killed one's compiled programs (same binaries, faster test).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, str(script), str(delay), *CLI_ARGS, "--out_dir", str(tmp_path / "runs"),
           "--run_id", run_id, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until(predicate, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(reference, tmp_path):
    ref_dir, ref = reference
    run_dir = tmp_path / "runs" / "train" / "victim"
    victim = _cli(tmp_path, "victim", delay=0.1)
    ckpts, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"

    def killable():
        # A checkpoint inside the second epoch exists and the run has logged steps past it.
        steps = [s for s in committed_steps(ckpts) if s > PER_EPOCH]
        records = read_jsonl(metrics)
        return bool(steps) and bool(records) and records[-1]["step"] >= steps[-1] + 2

    _wait_until(killable, victim, 90, "a mid-epoch checkpoint")
    victim.send_signal(signal.SIGKILL)
    rc, _ = _finish(victim)
    assert rc == -signal.SIGKILL
    killed_at = read_jsonl(metrics)[-1]["step"]
    saved = committed_steps(ckpts)[-1]
    assert saved % PER_EPOCH != 0 and saved < killed_at < TOTAL  # mid-epoch, records past it
    assert not (run_dir / "results.json").exists()

    rc, out = _finish(_cli(tmp_path, "victim", "--resume", "True"))
    assert rc == 0, out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["resumed_from_step"] >= saved
    assert results["final"] == ref.final
    assert metrics.read_text() == (ref_dir / "metrics.jsonl").read_text()
    got = load_checkpoint(run_dir)
    assert got.step == TOTAL
    _assert_trees_equal(got.state, ref.state)
    # No temporary directory of an unfinished save is left behind.
    assert all(re.fullmatch(r"\d+", p.name) for p in ckpts.iterdir())
