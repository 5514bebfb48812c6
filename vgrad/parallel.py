"""Devices: a 1-D data mesh, where states and batches live on it, and the
seed-parallel / data-parallel train step.

vgrad uses JAX's own SPMD sharding, not a hand-written scheme: arrays carry a
``NamedSharding`` and the jitted step is partitioned by XLA.

* One seed: the batch is sharded along its leading axis over the "data" mesh
  axis, the state is replicated. BatchNorm's batch mean/variance are plain
  ``mean`` reductions over the batch axis, which XLA turns into a cross-device
  reduction, so statistics are over the global batch (the same numbers as on
  one device, up to float summation order), and so are the gradients.
* N seeds (a seed-stacked state, ``jax.vmap`` over the step; see
  ``vgrad.train.fit(seeds=N)``): when N is a multiple of the device count the
  seed axis of both state and batch is sharded (each device trains N / D whole
  seeds, no cross-device traffic at all); otherwise each seed's batch is
  sharded as above and the stacked state is replicated.
* Several hosts: call :func:`maybe_initialize_distributed` first; ``data_mesh()``
  then spans every process's devices, and :func:`place_state` /
  :func:`place_batch` build global arrays from the (identical) host copies that
  every process computes, each process supplying only its own shards.

This module only says where arrays live; the steps that use it are
``vgrad.steps.init_state`` / ``vgrad.steps.make_train_step(..., mesh=mesh)``
and the loop of ``vgrad.loop``. Typical use::

    mesh = parallel.data_mesh()
    state = train.init_state(model, train_cfg, x_example, seeds=8, mesh=mesh)
    step = train.make_train_step(model, train_cfg, seeds=8, mesh=mesh)
    state, metrics = step(state, parallel.place_batch(batch_NxBx..., mesh, seeds=8))
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that describe a multi-process JAX job.
_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a
    multi-host job (JAX's coordinator variables, or a cluster JAX auto-detects
    such as SLURM with several tasks); return whether it did.

    Without those variables (a single machine, the tests) it does nothing, so
    it is safe to call at the start of every entry point. It must run before
    anything touches a device.
    """
    multi_host = any(os.environ.get(v) for v in _COORDINATOR_VARS)
    try:
        multi_host |= int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        pass
    if multi_host and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        return True
    return False


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with axis "data"."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def seed_axis_sharded(mesh: Mesh, seeds: int) -> bool:
    """Whether N seeds are split over the devices (N > 1 and a multiple of the device count)."""
    return seeds > 1 and seeds % mesh.size == 0


def state_sharding(mesh: Mesh, seeds: int = 1) -> NamedSharding:
    """Replicated state, or seed axis split over devices when seeds % devices == 0."""
    return NamedSharding(mesh, P(DATA_AXIS) if seed_axis_sharded(mesh, seeds) else P())


def batch_sharding(mesh: Mesh, seeds: int = 1) -> NamedSharding:
    """Batch (B, ...) split along B; seed-stacked (N, B, ...) split along N or B."""
    if seeds == 1 or seed_axis_sharded(mesh, seeds):
        return NamedSharding(mesh, P(DATA_AXIS))
    return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that places a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def check_batch_divisible(mesh: Mesh, batch_size: int, seeds: int = 1) -> None:
    """Raise ``ValueError`` when the batch cannot be split evenly over the devices."""
    if not seed_axis_sharded(mesh, seeds) and batch_size % mesh.size:
        hint = (f" (or use a number of seeds that is a multiple of {mesh.size} to shard seeds "
                "instead)" if seeds > 1 else "")
        raise ValueError(f"invalid batch_size={batch_size}: must be a multiple of the "
                         f"{mesh.size} devices to shard the batch{hint}")


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """``device_put`` on one host; on several, assemble global arrays from the
    host copy every process holds (each process supplies its addressable shards)."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(leaf: Any) -> jax.Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def place_state(state: Any, mesh: Mesh, seeds: int = 1) -> Any:
    """Put every leaf of ``state`` on the mesh (see :func:`state_sharding`)."""
    return _put(state, state_sharding(mesh, seeds))


def place_batch(batch: Any, mesh: Mesh, seeds: int = 1) -> Any:
    """Put a batch dict on the mesh (see :func:`batch_sharding`)."""
    return _put(batch, batch_sharding(mesh, seeds))
