"""Devices: a 1-D data mesh, and where states and batches are placed on it.

vgrad uses JAX's own SPMD sharding, not a hand-written scheme: arrays carry a
``NamedSharding`` and the jitted step is partitioned by XLA.

* One seed: the batch is sharded along its leading axis over the "data" mesh
  axis, the state is replicated. BatchNorm's batch mean/variance are plain
  ``mean`` reductions over the batch axis, which XLA turns into a cross-device
  reduction, so statistics are over the global batch.
* N seeds (vmapped, see ``vgrad.train.fit``): when N is a multiple of the
  device count the seed axis of both state and batch is sharded (each device
  trains N / D seeds); otherwise each seed's batch is sharded as above.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a
    multi-host job (JAX's coordinator variables, or a cluster JAX auto-detects
    such as SLURM with several tasks); return whether it did."""
    multi_host = any(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"))
    multi_host |= int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if multi_host and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        return True
    return False


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) with axis "data"."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def _seed_axis_sharded(mesh: Mesh, seeds: int) -> bool:
    return seeds > 1 and seeds % mesh.size == 0


def state_sharding(mesh: Mesh, seeds: int = 1) -> NamedSharding:
    """Replicated state, or seed axis split over devices when seeds % devices == 0."""
    return NamedSharding(mesh, P(DATA_AXIS) if _seed_axis_sharded(mesh, seeds) else P())


def batch_sharding(mesh: Mesh, seeds: int = 1) -> NamedSharding:
    """Batch (B, ...) split along B; seed-stacked (N, B, ...) split along N or B."""
    if seeds == 1:
        return NamedSharding(mesh, P(DATA_AXIS))
    if _seed_axis_sharded(mesh, seeds):
        return NamedSharding(mesh, P(DATA_AXIS))
    return NamedSharding(mesh, P(None, DATA_AXIS))


def check_batch_divisible(mesh: Mesh, batch_size: int, seeds: int = 1) -> None:
    if not _seed_axis_sharded(mesh, seeds) and batch_size % mesh.size:
        raise ValueError(f"invalid batch_size={batch_size}: must be a multiple of the "
                         f"{mesh.size} devices to shard the batch")


def place_state(state: Any, mesh: Mesh, seeds: int = 1) -> Any:
    """Put every leaf of ``state`` on the mesh (see :func:`state_sharding`)."""
    return jax.device_put(state, state_sharding(mesh, seeds))


def place_batch(batch: Any, mesh: Mesh, seeds: int = 1) -> Any:
    """Put a batch dict on the mesh (see :func:`batch_sharding`)."""
    return jax.device_put(batch, batch_sharding(mesh, seeds))
