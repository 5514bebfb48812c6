"""Seed-parallel (vmap) and data-parallel (sharded) training.

Multi-device tests need 8 devices. On CPU that means
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set *before jax is
imported*, which the main pytest process (1 device) cannot do any more. So:

* ``pytest tests/`` (1 device): the tests marked ``needs_8_devices`` are
  skipped in-process and ``test_multi_device_tests_pass_in_a_subprocess``
  re-runs exactly those tests in a fresh ``python -m pytest`` with the flag;
  it fails with their output if any of them fails.
* ``XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/test_parallel.py``:
  they run in-process and the subprocess test skips itself.

Tolerances: on CPU a vmapped step computes exactly what the single-seed step
computes (asserted bit-equal). Sharding over devices changes the summation
order of batch reductions (BatchNorm statistics, gradients: a per-device
partial sum, then a cross-device sum), so sharded results agree with one
device to float32 rounding (rtol/atol 1e-5 here; observed ~1e-6 relative).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad import parallel
from vgrad.config import ModelConfig, TrainConfig
from vgrad.models import build
import vgrad.train as vtrain
from vgrad.train import create_state, train_step_fn

NUM_DEVICES = 8
FORCE_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason=f"needs {NUM_DEVICES} devices; run in a subprocess by "
           "test_multi_device_tests_pass_in_a_subprocess")

RTOL = ATOL = 1e-5
BATCH, IN_DIM, CLASSES = 16, 5, 4


# ----------------------------------------------------------------------------
# helpers (cached: every distinct jitted function is one compilation)
# ----------------------------------------------------------------------------


def configs(norm: str, seed: int = 0) -> tuple[ModelConfig, TrainConfig]:
    model_cfg = ModelConfig(depth=3, width=8, num_classes=CLASSES, norm=norm, activation="relu")
    train_cfg = TrainConfig(batch_size=BATCH, learning_rate=0.1, momentum=0.9, seed=seed)
    return model_cfg, train_cfg


@functools.lru_cache(maxsize=None)
def single_step(norm: str):
    """The plain (one device, one seed) jitted step; no donation so inputs can be reused."""
    model_cfg, train_cfg = configs(norm)
    return jax.jit(train_step_fn(build(model_cfg), train_cfg))


@functools.lru_cache(maxsize=None)
def single_init(norm: str):
    model_cfg, train_cfg = configs(norm)
    model = build(model_cfg)
    return jax.jit(lambda key: create_state(model, train_cfg, key, jnp.zeros((BATCH, IN_DIM))))


def single_state(norm: str, seed: int):
    return single_init(norm)(jax.random.key(seed))


def stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def shifted_batches(steps: int, seeds: int | None = None, seed: int = 0):
    """Batches whose 8 shards of 2 examples have very different input means
    (shard i is offset by 3 i), so per-shard BatchNorm statistics are far from
    the global-batch ones and a per-device BN would give different numbers."""
    rng = np.random.default_rng(seed)
    lead = () if seeds is None else (seeds,)
    offsets = 3.0 * np.repeat(np.arange(NUM_DEVICES), BATCH // NUM_DEVICES)[:, None]
    out = []
    for _ in range(steps):
        x = rng.standard_normal(lead + (BATCH, IN_DIM)) + offsets
        y = rng.integers(0, CLASSES, lead + (BATCH,))
        out.append({"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)})
    return out


def run_steps(step, state, batches):
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


# ----------------------------------------------------------------------------
# seed-parallel (any device count)
# ----------------------------------------------------------------------------


def test_vmapped_seeds_equal_single_seed_runs_exactly():
    norm, seeds, steps = "batch", 3, 3
    model_cfg, train_cfg = configs(norm)
    batches = shifted_batches(steps, seeds=seeds, seed=1)
    stacked = vtrain.init_state(build(model_cfg), train_cfg, batches[0]["x"][0], seeds=seeds)
    # Seed i is initialised from key(train_cfg.seed + i), exactly like the single runs.
    assert_trees_equal(stacked, stack([single_state(norm, s) for s in range(seeds)]))
    vstep = vtrain.make_train_step(build(model_cfg), train_cfg, seeds=seeds)
    stacked, vmetrics = run_steps(vstep, stacked, batches)
    for s in range(seeds):
        state, metrics = run_steps(single_step(norm), single_state(norm, s),
                                   [{k: v[s] for k, v in b.items()} for b in batches])
        assert_trees_equal(jax.tree_util.tree_map(lambda a: a[s], stacked), state)
        for vm, m in zip(vmetrics, metrics):
            assert float(vm["loss"][s]) == float(m["loss"])


def test_fit_seeds_equals_single_seed_fits():
    """fit(seeds=2) per seed == fit(seed=s): same init, same data order, same
    records. Seed 3 + 1 (the second) is compared: the one that needs the offset.
    Bit-identical: parameters, optimiser state, losses. Within float32 rounding
    (rtol 1e-6, atol 1e-8 for running means near 0): the BatchNorm running
    averages, whose batch reductions XLA orders differently inside the vmapped
    training loop than in the one-run loop."""
    from vgrad import data
    from vgrad.loop import fit

    dataset = data.load("synthetic", dim=IN_DIM, num_classes=CLASSES, num_train=64, num_test=32)
    model_cfg, train_cfg = configs("batch", seed=3)
    train_cfg = dataclasses.replace(train_cfg, steps=6, eval_every=3)
    model = build(model_cfg)
    kw = dict(progress=False, handle_signals=False)
    multi = fit(model, train_cfg, dataset, seeds=2, **kw)
    for i in (1,):
        one = fit(model, dataclasses.replace(train_cfg, seed=3 + i), dataset, **kw)
        mine_state = jax.tree_util.tree_map(lambda a: a[i], multi.state)
        assert_trees_equal(mine_state.params, one.state.params)
        assert_trees_equal(mine_state.opt_state, one.state.opt_state)
        for x, y in zip(jax.tree_util.tree_leaves(mine_state.batch_stats),
                        jax.tree_util.tree_leaves(one.state.batch_stats)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)
        mine = [r for r in multi.history if r["seed"] == 3 + i]
        assert [r.get("loss") for r in mine] == [r.get("loss") for r in one.history]
        np.testing.assert_allclose(multi.final["test_loss"][i], one.final["test_loss"], rtol=1e-6)


def test_maybe_initialize_distributed_does_nothing_without_env(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(1))
    assert parallel.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is not multi-host
    assert parallel.maybe_initialize_distributed() is False
    assert called == []


@pytest.mark.parametrize("env", [{"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"},
                                 {"SLURM_NTASKS": "4"}])
def test_maybe_initialize_distributed_initializes_with_env(monkeypatch, env):
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(1))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(called))
    assert parallel.maybe_initialize_distributed() is True
    assert parallel.maybe_initialize_distributed() is False  # already initialised
    assert called == [1]


def test_shardings_and_divisibility():
    mesh = parallel.data_mesh(jax.devices()[:1])
    assert parallel.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert parallel.state_sharding(mesh).spec == jax.sharding.PartitionSpec()
    parallel.check_batch_divisible(mesh, 3)  # one device divides everything


# ----------------------------------------------------------------------------
# data-parallel over 8 devices (subprocess or forced host devices)
# ----------------------------------------------------------------------------


@needs_8_devices
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_sharded_step_equals_single_device_step(norm):
    """Batch split over 8 devices, state replicated: the same numbers as one
    device. With BatchNorm that needs statistics over the global batch: the
    batches put very different inputs on each device (see shifted_batches), so
    a per-device BatchNorm would fail this test; the test checks that it would."""
    mesh = parallel.data_mesh()
    model_cfg, train_cfg = configs(norm)
    model = build(model_cfg)
    batches = shifted_batches(3)
    ref, ref_metrics = run_steps(single_step(norm), single_state(norm, 0), batches)

    state = vtrain.init_state(model, train_cfg, batches[0]["x"], mesh=mesh)
    step = vtrain.make_train_step(model, train_cfg, mesh=mesh)
    placed = [parallel.place_batch(b, mesh) for b in batches]
    assert placed[0]["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(placed[0]["x"].addressable_shards) == NUM_DEVICES
    state, metrics = run_steps(step, state, placed)
    assert jax.tree_util.tree_leaves(state.params)[0].sharding.is_fully_replicated
    assert_trees_close(state, ref)  # params, optimizer state and BN running statistics
    assert_trees_close([m["loss"] for m in metrics], [m["loss"] for m in ref_metrics])

    if norm == "batch":
        # What a per-device BatchNorm would compute: each device's 2 examples
        # normalised with their own statistics, gradients averaged over devices.
        shards = jax.tree_util.tree_map(lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:]),
                                        batches[0])
        per_device = jax.jit(jax.vmap(train_step_fn(model, train_cfg), in_axes=(None, 0)))
        local, _ = per_device(single_state(norm, 0), shards)
        ref1, _ = single_step(norm)(single_state(norm, 0), batches[0])
        gap = max(float(jnp.max(jnp.abs(a.mean(0) - b))) for a, b in zip(
            jax.tree_util.tree_leaves(local.params), jax.tree_util.tree_leaves(ref1.params)))
        assert gap > 100 * ATOL, "these batches do not tell per-device from global statistics"


@needs_8_devices
@pytest.mark.parametrize("seeds", [8, 3])
def test_sharded_seeds_equal_single_device_and_single_seed_runs(seeds):
    """8 seeds on 8 devices: the seed axis is sharded (one seed per device).
    3 seeds (not divisible): state replicated, each seed's batch sharded."""
    mesh = parallel.data_mesh()
    model_cfg, train_cfg = configs("batch")
    model = build(model_cfg)
    batches = shifted_batches(2, seeds=seeds, seed=2)
    state = vtrain.init_state(model, train_cfg, batches[0]["x"][0], seeds=seeds, mesh=mesh)
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    if seeds % NUM_DEVICES == 0:
        assert leaf.sharding.spec == jax.sharding.PartitionSpec("data")
        assert {s.data.shape[0] for s in leaf.addressable_shards} == {seeds // NUM_DEVICES}
    else:
        assert leaf.sharding.is_fully_replicated
        assert parallel.batch_sharding(mesh, seeds).spec == jax.sharding.PartitionSpec(None, "data")
    step = vtrain.make_train_step(model, train_cfg, seeds=seeds, mesh=mesh)
    state, _ = run_steps(step, state, [parallel.place_batch(b, mesh, seeds) for b in batches])
    assert jax.tree_util.tree_leaves(state.params)[0].sharding == leaf.sharding  # kept
    # Seeds are picked out on the host: indexing a sharded array eagerly runs
    # one small 8-device program with an all-reduce per leaf and seed, and
    # XLA's CPU in-process collectives can deadlock (abort after 40 s) when
    # many such programs are in flight on a loaded 2-core machine.
    host = jax.device_get(state)
    for s in range(seeds):
        ref, _ = run_steps(single_step("batch"), single_state("batch", s),
                           [{k: v[s] for k, v in b.items()} for b in batches])
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[s], host), ref)


@needs_8_devices
def test_check_batch_divisible_names_the_problem():
    mesh = parallel.data_mesh()
    with pytest.raises(ValueError, match="batch_size=12.*multiple of the 8 devices"):
        parallel.check_batch_divisible(mesh, 12)
    with pytest.raises(ValueError, match="seeds"):
        parallel.check_batch_divisible(mesh, 12, seeds=3)
    parallel.check_batch_divisible(mesh, 12, seeds=16)  # seeds sharded: any batch


@needs_8_devices
def test_fit_with_mesh_equals_fit_on_one_device():
    from vgrad import data
    from vgrad.loop import fit

    dataset = data.load("synthetic", dim=IN_DIM, num_classes=CLASSES, num_train=64, num_test=32)
    model_cfg, train_cfg = configs("batch")
    train_cfg = dataclasses.replace(train_cfg, steps=4)
    model = build(model_cfg)
    kw = dict(progress=False, handle_signals=False)
    ref = fit(model, train_cfg, dataset, **kw)
    sharded = fit(model, train_cfg, dataset, mesh=parallel.data_mesh(), **kw)
    assert_trees_close(sharded.state, ref.state)
    np.testing.assert_allclose(sharded.final["test_loss"], ref.final["test_loss"], rtol=RTOL)


@needs_8_devices
@pytest.mark.parametrize("runs", [8, 3])
def test_sweep_with_mesh_equals_sweep_on_one_device(runs):
    """8 runs: the run axis is sharded (one run per device); 3 runs: each run's
    batch is split over the devices. Both equal the one-device sweep."""
    from vgrad import data, sweep

    dataset = data.load("synthetic", dim=IN_DIM, num_classes=CLASSES, num_train=64, num_test=32)
    model_cfg, train_cfg = configs("batch")
    grid = sweep.grid(model_cfg, dataclasses.replace(train_cfg, steps=4),
                      vary={"train.learning_rate": [0.01, 0.05, 0.1, 0.2][:max(1, runs // 2)]},
                      seeds=2 if runs == 8 else 3)[:runs]
    ref = sweep.run(grid, dataset, progress=False)
    mesh = parallel.data_mesh()
    sharded = sweep.run(grid, dataset, progress=False, mesh=mesh)
    for a, b in zip(ref.runs, sharded.runs):
        assert a.status == b.status == "completed"
        np.testing.assert_allclose(b.final["test_loss"], a.final["test_loss"], rtol=RTOL)
        np.testing.assert_allclose(b.curve("loss")[1], a.curve("loss")[1], rtol=RTOL)


@needs_8_devices
def test_cli_data_parallel_mesh_run_equals_one_device(tmp_path):
    from vgrad.cli import main
    from vgrad.io import read_json

    common = ["train", "--data.name", "synthetic", "--data.options", "dim", str(IN_DIM),
              "num_classes", str(CLASSES), "num_train", "64", "num_test", "32",
              "--model.num-classes", str(CLASSES), "--model.depth", "2", "--model.width", "8",
              "--model.norm", "batch", "--train.steps", "4", "--train.batch-size", "16",
              "--progress", "False", "--out-dir", str(tmp_path)]
    assert main(common + ["--run-id", "one"]) == 0
    assert main(common + ["--run-id", "mesh", "--data-parallel", "True"]) == 0
    one, mesh = (read_json(tmp_path / "train" / r / "results.json")["final"] for r in ("one", "mesh"))
    np.testing.assert_allclose(mesh["test_loss"], one["test_loss"], rtol=RTOL)
    # A batch that cannot be split over the devices is refused up front.
    assert main(common + ["--run-id", "bad", "--data-parallel", "True", "--train.batch-size", "12"]) == 2


# ----------------------------------------------------------------------------
# the subprocess runner
# ----------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() >= NUM_DEVICES,
                    reason="multi-device tests already run in this process")
def test_multi_device_tests_pass_in_a_subprocess():
    env = dict(os.environ)
    # LLVM optimisation level 0 halves compile time; both sides of every
    # comparison run under the same flags.
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), FORCE_FLAG,
                                 "--xla_backend_optimization_level=0"]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    here = Path(__file__).resolve()
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-p", "no:randomly",
           "-x", str(here), "-k", "sharded or mesh or divisible"]
    proc = subprocess.run(cmd, env=env, cwd=here.parents[1], capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"multi-device tests failed:\n{out[-6000:]}"
    assert " skipped" not in out.splitlines()[-1], f"multi-device tests were skipped:\n{out[-3000:]}"
    assert "passed" in out.splitlines()[-1], out[-3000:]
