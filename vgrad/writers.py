"""Per-layer metrics where researchers already look: TensorBoard and Weights & Biases.

``metrics.jsonl`` stays the source of truth; a writer is a thin mirror of the
records the training loop logs (:class:`vgrad.group_records.GroupRecords`
hands it every row it writes) and of the gradient-flow measurements. Each run
of a group (a seed of ``fit``, a run of a sweep) is its own TensorBoard run
(``<logdir>/<name>``) or W&B run. Scalars, at the optimiser step of the row:

* ``train/loss``, ``train/accuracy``, ``train/grad_norm``, ``train/learning_rate``;
  ``test/loss``, ``test/accuracy``;
* ``weight_grad_norm/block_NNN`` (every logged step, from the training step);
* at the measured steps: ``log10_product_sq_norm/layer_NNN`` (‖P_l‖²/n),
  ``saturated_fraction/layer_NNN``, ``dead_fraction/layer_NNN``,
  ``activation_std/layer_NNN``, ``relative_weight_change/block_NNN``.

Both backends are optional extras (``pip install -e ".[tensorboard]"``,
``".[wandb]"``): tensorboardX (no TensorFlow) and wandb, imported only when a
writer is made. W&B runs honour ``WANDB_MODE`` (``offline`` writes locally).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_TRAIN = {"loss": "train/loss", "accuracy": "train/accuracy", "grad_norm": "train/grad_norm",
          "learning_rate": "train/learning_rate", "test_loss": "test/loss",
          "test_accuracy": "test/accuracy"}
_PER_BLOCK = {"block_grad_norms": "weight_grad_norm/block",
              "relative_weight_change": "relative_weight_change/block"}
_PER_LAYER = {"log10_product_sq_norms": "log10_product_sq_norm/layer",
              "saturated_fraction": "saturated_fraction/layer", "dead_fraction": "dead_fraction/layer",
              "activation_std": "activation_std/layer"}


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite scalars of one record (a metrics row or a measurement), by tag.

    Per-block values are numbered from 1 (block l), per-layer ones from 0
    (layer 0 = the stem output h^0); NaN/inf values (e.g. the dead fraction
    of a sigmoid) are left out.
    """
    out: dict[str, float] = {}
    for key, tag in _TRAIN.items():
        if key in row:
            out[tag] = row[key]
    for key, tag in _PER_BLOCK.items():
        for l, v in enumerate(row.get(key) or (), 1):
            out[f"{tag}_{l:03d}"] = v
    for key, tag in _PER_LAYER.items():
        for l, v in enumerate(row.get(key) or (), 0):
            out[f"{tag}_{l:03d}"] = v
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_name(row: Mapping[str, Any]) -> str:
    """Which run a record belongs to: ``run-<index>`` in a sweep, else ``seed-<seed>``."""
    return f"run-{row['run']:04d}" if "run" in row else f"seed-{row['seed']}"


class Writer:
    """Base: routes rows to one backend run per vgrad run (made on first use)."""

    def __init__(self) -> None:
        self._runs: dict[str, Any] = {}

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Mirror metrics.jsonl rows (train and eval records)."""
        for row in rows:
            values = scalars(row)
            if values:
                self._emit(self._run(run_name(row)), int(row["step"]), values)

    def write_measurement(self, step: int, runs: Sequence[Mapping[str, Any]],
                          names: Sequence[str]) -> None:
        """Mirror one measurement: ``runs[r]`` belongs to the run called ``names[r]``."""
        for name, values in zip(names, runs):
            values = scalars(values)
            if values:
                self._emit(self._run(name), int(step), values)

    def _run(self, name: str) -> Any:
        if name not in self._runs:
            self._runs[name] = self._open(name)
        return self._runs[name]

    def close(self) -> None:
        for handle in self._runs.values():
            self._close(handle)
        self._runs.clear()

    # backend hooks
    def _open(self, name: str) -> Any:
        raise NotImplementedError

    def _emit(self, handle: Any, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _close(self, handle: Any) -> None:
        raise NotImplementedError


class TensorBoardWriter(Writer):
    """Event files under ``logdir/<run name>/`` (tensorboardX; view with
    ``tensorboard --logdir <logdir>``)."""

    def __init__(self, logdir: str | Path):
        super().__init__()
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise ValueError("TensorBoard logging needs tensorboardX: pip install -e \".[tensorboard]\"") from err
        self._summary_writer = SummaryWriter
        self.logdir = Path(logdir)

    def _open(self, name: str) -> Any:
        return self._summary_writer(logdir=str(self.logdir / name), flush_secs=10)

    def _emit(self, handle: Any, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            handle.add_scalar(tag, value, step)

    def _close(self, handle: Any) -> None:
        handle.close()


class WandbWriter(Writer):
    """One W&B run per vgrad run, in ``project``, grouped under ``group``."""

    def __init__(self, project: str, *, group: str | None = None, config: Any = None,
                 directory: str | Path | None = None, mode: str | None = None):
        super().__init__()
        try:
            import wandb
        except ImportError as err:
            raise ValueError("W&B logging needs wandb: pip install -e \".[wandb]\"") from err
        self._wandb = wandb
        self.project, self.group, self.mode = project, group, mode
        self.directory = None if directory is None else str(directory)
        from vgrad.io import to_jsonable

        self.config = to_jsonable(config) if config is not None else None

    def _open(self, name: str) -> Any:
        return self._wandb.init(project=self.project, group=self.group, name=name, config=self.config,
                                dir=self.directory, mode=self.mode, reinit="create_new")

    def _emit(self, handle: Any, step: int, values: dict[str, float]) -> None:
        handle.log(values, step=step)

    def _close(self, handle: Any) -> None:
        handle.finish()


def make_writers(*, tensorboard: str | Path | None = None, wandb_project: str | None = None,
                 group: str | None = None, config: Any = None,
                 wandb_dir: str | Path | None = None) -> list[Writer]:
    """The writers a command asked for (none by default)."""
    writers: list[Writer] = []
    if tensorboard:
        writers.append(TensorBoardWriter(tensorboard))
    if wandb_project:
        writers.append(WandbWriter(wandb_project, group=group, config=config, directory=wandb_dir))
    return writers
