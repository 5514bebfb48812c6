"""Checkpoints of a training run (orbax-checkpoint), and loading them back.

A run directory holds its checkpoints in ``run_dir/checkpoints/<step>/``, one
per saved step, each with two items:

* ``state``: the whole :class:`vgrad.steps.TrainState` (step, params,
  batch_stats, optimizer state), saved with ``StandardSave`` and restored with
  ``StandardRestore`` onto an abstract target built from the current state, so
  dtypes, shapes and shardings come back exactly (also for seed-stacked states
  and states placed on a device mesh).
* ``meta``: JSON with the step, the epoch and batch position, the seeds (the
  only randomness of a run: initialisation keys and data order are pure
  functions of the seed), the number of metrics.jsonl records written when the
  checkpoint was taken, and the run's config, so that resuming with another
  config fails with a clear error naming the fields that differ.

There is no separate data-loader state to save: the batch of global step ``s``
is a pure function of (seed, s) (see :mod:`vgrad.data`), so ``state.step`` is the
data position. Orbax writes each checkpoint to a temporary directory and renames
it when complete, so a run killed mid-save leaves only complete checkpoints.

Loading for analysis: :func:`restore_variables` (``{"params", "batch_stats"}``),
:func:`restore_model_config`, and :func:`load_checkpoint` (everything).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vgrad.config import ModelConfig, TrainConfig

CHECKPOINT_SUBDIR = "checkpoints"
# 2: optimiser hyperparameters live in the optimiser state (optax.inject_hyperparams),
# runs of a group are stacked, and metadata records each run's status.
# 3: a numeric residual scale is a variable (batch_stats/residual_scale).
FORMAT_VERSION = 3
# Config fields that may differ between a checkpoint and the run resuming it:
# where the data files or the cache live does not change the data (the dataset
# fingerprint, which is compared, does).
RESUME_IGNORED_FIELDS = frozenset({"data.cache_dir", "data.path"})

_STEP_DIR = re.compile(r"^\d+$")


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """No (such) checkpoint. A FileNotFoundError, and a ValueError so that the
    command line reports it as bad input in one line."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """Where the checkpoints of the run in ``run_dir`` live: ``run_dir/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_SUBDIR


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in a checkpoint directory, ascending.

    Cheap (a directory listing, no orbax): orbax renames a checkpoint to its
    bare step number only once it is complete, so unfinished saves (temporary
    directories) are not listed. A missing directory has no steps.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


class _QuietReadOnly(logging.Filter):
    """Drops orbax's "Given directory is read only" warning: vgrad opens
    checkpoints read-only on purpose whenever it loads one, so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not str(record.getMessage()).startswith("Given directory is read only")
        except Exception:  # a malformed record is not ours to judge
            return True


_QUIET = _QuietReadOnly()


def _ocp():
    # Imported lazily: orbax takes over a second to import and most uses of
    # vgrad (analysis, notebooks) never checkpoint.
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    if _QUIET not in absl_logger.filters:
        absl_logger.addFilter(_QUIET)
    return ocp


class RunCheckpointer:
    """An orbax ``CheckpointManager`` for one run's ``checkpoints/`` directory.

    keep: how many of the most recent checkpoints to keep (older ones are deleted).
    save_every: recorded as orbax's ``save_interval_steps``; :meth:`save` always
        saves the step it is given (the caller, :func:`vgrad.loop.fit`, decides
        when: every ``save_every`` steps, every epoch end, the end of the run, and
        on an interrupt).
    async_save: write in a background thread. The arrays are copied to host
        memory before :meth:`save` returns, so the caller may donate or update
        the state right away; :meth:`wait` blocks until the write is complete.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, save_every: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"invalid keep_checkpoints={keep!r}: must be an integer >= 1")
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else (save_every or 1),
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
            # A run killed mid-save leaves a temporary directory; remove it on reopening.
            cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    # -- queries ---------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of checkpoint ``step`` (default: the latest)."""
        ocp = _ocp()
        step = self._step(step)
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        if meta.get("format", 1) != FORMAT_VERSION:
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} has format {meta.get('format', 1)}, "
                f"written by another vgrad version; this version reads format {FORMAT_VERSION} "
                "(its state is laid out differently): start the run again")
        return meta

    # -- save / restore ----------------------------------------------------------

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Save ``state`` (a pytree) and ``meta`` (JSON-able) as checkpoint ``step``."""
        ocp = _ocp()
        from vgrad.io import to_jsonable

        meta = {"format": FORMAT_VERSION, "step": int(step), **to_jsonable(dict(meta))}
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of checkpoint ``step`` (default: the latest).

        ``target``: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the
        structure, dtypes, shapes and shardings to restore onto (e.g. a freshly
        initialised state).
        """
        ocp = _ocp()
        step = self._step(step)
        abstract = _abstract(target)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta)

    def wait(self) -> None:
        """Block until any save in progress has been written completely."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}")
        return int(step)


def _abstract(target: Any) -> Any:
    import jax

    ocp = _ocp()

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree_util.tree_map(leaf, target)


# ----------------------------------------------------------------------------
# Config compatibility
# ----------------------------------------------------------------------------


def normalize_config(config: Any) -> dict:
    """A config (dataclasses, dicts, tuples) as the plain JSON it is stored as."""
    from vgrad.io import to_jsonable

    return json.loads(json.dumps(to_jsonable(config)))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


_MISSING = "<absent>"


def config_differences(saved: Mapping, current: Mapping,
                       ignore: frozenset[str] = RESUME_IGNORED_FIELDS) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for every dotted field that differs."""
    a, b = _flatten(normalize_config(saved)), _flatten(normalize_config(current))
    return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k, _MISSING) != b.get(k, _MISSING)]


def check_compatible(saved: Mapping, current: Mapping, *, where: str | os.PathLike = "") -> None:
    """Raise ``ValueError`` naming every field in which ``current`` differs from ``saved``."""
    diffs = config_differences(saved, current)
    if diffs:
        listed = "; ".join(f"{k}: checkpoint has {v_saved!r}, this run has {v_now!r}"
                           for k, v_saved, v_now in diffs)
        raise ValueError(
            f"cannot resume from the checkpoint in {where}: it was written by an incompatible "
            f"config ({len(diffs)} field(s) differ: {listed}). Resume with the run's original "
            f"config (see config.json in the run directory) or start a new run.")


def check_resumable(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> list[int]:
    """Check, before anything is written, that ``run_dir`` can be resumed with ``config``.

    Raises ``CheckpointNotFoundError`` (a ValueError) when ``run_dir`` holds no
    complete checkpoint, and ``ValueError`` naming every differing field when
    the newest readable checkpoint was written by another config. Only the
    top-level keys of ``config`` that the checkpoint also stores are compared
    (e.g. "model", "train", "seeds", "data", "dataset"), so a caller may pass
    the parts it knows. Returns the committed steps.
    """
    ckpt_dir = checkpoint_dir(run_dir)
    steps = committed_steps(ckpt_dir)
    if not steps:
        raise CheckpointNotFoundError(
            f"cannot resume: no checkpoint in {ckpt_dir} (the run stopped before its first "
            "checkpoint, or the run id is wrong); start the run again without --resume")
    current = normalize_config(dict(config))
    with RunCheckpointer(ckpt_dir, read_only=True) as ckpt:
        for step in reversed(steps):
            try:
                saved = ckpt.read_meta(step).get("config", {})
            except Exception:  # damaged metadata: the loop falls back to an older checkpoint
                continue
            shared = [k for k in current if k in saved]
            check_compatible({k: saved[k] for k in shared}, {k: current[k] for k in shared},
                             where=ckpt_dir)
            break
    return steps


def dataset_fingerprint(dataset: Any) -> dict:
    """Name, sizes, shapes and a content hash of a dataset (for resume checks)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        a = np.ascontiguousarray(getattr(dataset, key))
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(memoryview(a).cast("B"))
    return {"name": getattr(dataset, "name", ""), "num_train": int(len(dataset.y_train)),
            "num_test": int(len(dataset.y_test)), "input_shape": list(dataset.x_train.shape[1:]),
            "num_classes": int(dataset.num_classes), "sha": digest.hexdigest()}


# ----------------------------------------------------------------------------
# Loading a checkpoint without the run that wrote it
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint loaded by :func:`load_checkpoint`.

    state: the TrainState (seed-stacked with leading axis N when ``len(seeds) > 1``).
    model_config / train_config: the configs of the run that wrote it.
    seeds: training seeds of the stacked states, in order.
    step: the optimiser step it was taken at.
    meta: the raw metadata (also holds the full run config under "config").
    """

    state: Any
    model_config: ModelConfig
    train_config: TrainConfig
    seeds: list[int]
    step: int
    meta: dict

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.state.params, "batch_stats": self.state.batch_stats}


def resolve(path: str | os.PathLike) -> tuple[Path, int | None]:
    """A run directory, its ``checkpoints/`` directory, or one ``checkpoints/<step>``
    directory -> (checkpoint directory, step or None for the latest)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint path does not exist: {p}")
    if (p / CHECKPOINT_SUBDIR).is_dir():
        return p / CHECKPOINT_SUBDIR, None
    if _STEP_DIR.match(p.name) and (p / "state").is_dir():
        return p.parent, int(p.name)
    if committed_steps(p):
        return p, None
    raise CheckpointNotFoundError(
        f"no checkpoint found at {p}: expected a run directory (with {CHECKPOINT_SUBDIR}/), "
        f"a {CHECKPOINT_SUBDIR}/ directory, or one {CHECKPOINT_SUBDIR}/<step> directory")


def load_checkpoint(path: str | os.PathLike, *, step: int | None = None) -> Checkpoint:
    """Load a checkpoint written by :func:`vgrad.loop.fit` into host/default-device arrays.

    path: a run directory, its ``checkpoints/`` directory or a ``checkpoints/<step>``
        directory. step: which checkpoint (default: the one named by ``path``,
        else the latest).

    The target structure is rebuilt from the stored configs with
    ``jax.eval_shape`` (nothing is initialised), and every array is restored
    onto the first local device, whatever mesh the run was trained on.
    """
    import jax

    from vgrad.models import build
    from vgrad.steps import create_state

    directory, path_step = resolve(path)
    step = path_step if step is None else step
    with RunCheckpointer(directory, read_only=True) as ckpt:
        meta = ckpt.read_meta(step)
        config = meta["config"]
        model_cfg = stored_config(ModelConfig, config["model"], where=directory, field="model")
        train_cfg = stored_config(TrainConfig, config["train"], where=directory, field="train")
        seeds = list(meta.get("seeds", [train_cfg.seed]))
        ds = config["dataset"]
        example = jax.ShapeDtypeStruct((train_cfg.batch_size, *ds["input_shape"]),
                                       np.dtype(meta.get("input_dtype", "float32")))
        model = build(model_cfg)
        total = meta.get("total_steps")
        init = lambda key, x: create_state(model, train_cfg, key, x, total_steps=total)
        keys = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        if len(seeds) > 1:
            keys = jax.ShapeDtypeStruct((len(seeds),), keys.dtype)
            init = jax.vmap(init, in_axes=(0, None))
        abstract = jax.eval_shape(init, keys, example)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
        state, meta = ckpt.restore(abstract, meta["step"])
    return Checkpoint(state=state, model_config=model_cfg, train_config=train_cfg, seeds=seeds,
                      step=int(meta["step"]), meta=meta)


def restore_variables(path: str | os.PathLike, *, step: int | None = None,
                      seed_index: int | None = None) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of a training checkpoint, for analysis.

    path: a run directory (``runs/train/<run-id>``), its ``checkpoints/``
        directory, or one ``checkpoints/<step>`` directory.
    step: which checkpoint (default: the one ``path`` names, else the latest).
    seed_index: which seed of a multi-seed run (``seeds=N``), 0 .. N-1; required
        for those (their states are stacked; ``load_checkpoint(path).variables``
        gives the stacked variables), optional (0) for a single-seed run.

    The model they belong to is ``vgrad.models.build(restore_model_config(path))``.
    """
    import jax

    ckpt = load_checkpoint(path, step=step)
    n = len(ckpt.seeds)
    if n == 1:
        if seed_index not in (None, 0):
            raise ValueError(f"invalid seed_index={seed_index!r}: the checkpoint holds one seed "
                             f"({ckpt.seeds[0]})")
        return ckpt.variables
    if seed_index is None or not (isinstance(seed_index, int) and 0 <= seed_index < n):
        raise ValueError(f"invalid seed_index={seed_index!r}: the checkpoint holds {n} seeds "
                         f"{ckpt.seeds}, stacked; pass seed_index in [0, {n}) to take one")
    return jax.tree_util.tree_map(lambda a: a[seed_index], ckpt.variables)


def restore_model_config(path: str | os.PathLike, *, step: int | None = None) -> ModelConfig:
    """The ModelConfig of the run that wrote a checkpoint (reads metadata only)."""
    directory, path_step = resolve(path)
    with RunCheckpointer(directory, read_only=True) as ckpt:
        meta = ckpt.read_meta(path_step if step is None else step)
    return stored_config(ModelConfig, meta["config"]["model"], where=directory, field="model")


_NONFINITE_STRINGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
                      "-infinity": -math.inf}


def stored_config(cls: type, stored: Mapping[str, Any], *, where: Any = "",
                  field: str = "config") -> Any:
    """The config ``cls`` (ModelConfig, TrainConfig, ...) from its stored JSON.

    JSON turns tuples into lists and non-finite floats into the strings "nan"
    and "inf" (see :func:`vgrad.io.to_jsonable`); both are turned back. Fields
    this version does not know are an error naming them, and fields it added
    since take their defaults. A stored value that no longer validates gives
    one ValueError naming the checkpoint and the field.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(stored) - set(known))
    if unknown:
        raise ValueError(f"checkpoint {where}: its {field} config has field(s) this version of "
                         f"vgrad does not know: {', '.join(unknown)} (written by a newer vgrad?)")

    def decode(name: str, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(decode(name, v) for v in value)
        if isinstance(value, str) and value.lower() in _NONFINITE_STRINGS \
                and "float" in str(known[name].type):
            return _NONFINITE_STRINGS[value.lower()]
        return value

    try:
        return cls(**{k: decode(k, v) for k, v in stored.items()})
    except ValueError as err:
        raise ValueError(f"checkpoint {where}: its stored {field} config no longer validates: "
                         f"{err}") from err


def warn_fallback(step: int, err: BaseException, directory: Path) -> None:
    """Warn (one line) that checkpoint ``step`` could not be restored and an older one is tried."""
    from vgrad.io import describe_error

    warnings.warn(f"could not restore checkpoint step {step} in {directory} "
                  f"({describe_error(err, limit=240)}); trying the previous checkpoint",
                  RuntimeWarning, stacklevel=3)
