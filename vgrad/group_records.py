"""The host side of a group's training: records, run status, evaluation, checkpoints.

:class:`GroupRecords` turns each chunk's metrics into ``metrics.jsonl``
records (one per run and logged step), notes the runs that diverge, runs the
evaluations, saves and restores checkpoints (with each run's status in the
metadata) and builds each run's :class:`RunOutcome`. :class:`RunFiles` is the
files of a group in its run directory. :func:`vgrad.loop.train_group` drives
both; they hold no device code.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vgrad import checkpoint as vckpt
from vgrad import io
from vgrad.programs import unstack
from vgrad.steps import TrainState, as_numpy_metrics, describe_nonfinite, evaluate
from vgrad.writers import run_name


@dataclasses.dataclass
class RunOutcome:
    """How one run of a group ended: status, message, final metrics."""

    status: str
    message: str
    final: dict



def _to_list(v: Any) -> Any:
    return np.asarray(v).tolist()


class RunFiles:
    """The files of a group in ``run_dir``: metrics.jsonl, measurements.jsonl, checkpoints/."""

    def __init__(self, run_dir: Any, config: dict, resume: bool, keep: int, every: int | None):
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.every, self.keep, self.ckpt = every, keep, None
        self.config = vckpt.normalize_config(config)
        if self.run_dir is None:
            self.metrics = self.measurements = self.ckpt_dir = None
            return
        self.metrics = self.run_dir / "metrics.jsonl"
        self.measurements = self.run_dir / "measurements.jsonl"
        self.ckpt_dir = vckpt.checkpoint_dir(self.run_dir)
        existing = vckpt.committed_steps(self.ckpt_dir)
        if resume and not existing:
            raise ValueError(
                f"cannot resume: no checkpoint in {self.ckpt_dir} (the run stopped before its first "
                "checkpoint, or the directory is wrong); start the run again without resume")
        if not resume and existing:
            raise ValueError(
                f"{self.run_dir} already holds the checkpoints of a run (steps {existing}); pass "
                "resume=True (--resume True) to continue it, or use a new run directory")
        if resume:
            self.ckpt = self._open()
            try:
                for step in reversed(existing):  # the newest checkpoint whose metadata reads back
                    try:
                        saved = self.ckpt.read_meta(step)
                    except Exception:
                        continue
                    vckpt.check_compatible(saved.get("config", {}), self.config, where=self.ckpt_dir)
                    break
            except BaseException:
                self.close()
                raise
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _open(self):
        return vckpt.RunCheckpointer(self.ckpt_dir, keep=self.keep, save_every=self.every)

    def checkpointer(self):
        if self.ckpt is None:
            self.ckpt = self._open()
        return self.ckpt

    def wants_checkpoint(self, step: int, per_epoch: int, num_steps: int) -> bool:
        if self.every is None or self.run_dir is None:
            return False
        return step % per_epoch == 0 or step == num_steps or (self.every > 0 and step % self.every == 0)

    def steps(self) -> list[int]:
        return vckpt.committed_steps(self.ckpt_dir) if self.ckpt_dir is not None else []

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()  # waits for a save in progress
            self.ckpt = None


class GroupRecords:
    """Host-side bookkeeping of a group: records, run status, evaluation,
    checkpoints. Split from :func:`train_group` so the loop itself stays short."""

    def __init__(self, specs, seeds, paths: RunFiles, log_every, per_epoch, num_steps, label,
                 dataset, resume, writers=()):
        self.specs, self.seeds, self.paths = specs, seeds, paths
        self.log_every, self.per_epoch, self.num_steps = log_every, per_epoch, num_steps
        self.label, self.writers = label, list(writers)
        R = len(specs)
        self.status = ["running"] * R
        self.messages = [""] * R
        self.history: list[dict] = []
        self.measurements: list[dict] = []
        self.outcomes: list[RunOutcome] = []
        self.last_eval: dict | None = None
        self.last_saved: int | None = None
        self.skipped = [0] * R
        self.stopped_at: list[int | None] = [None] * R  # last good step of a diverged run
        self.input_dtype = str(np.asarray(dataset.x_train).dtype)
        if paths.metrics is not None and not resume:
            io.write_jsonl(paths.metrics, [])
            io.write_jsonl(paths.measurements, [])

    # -- state of the runs ----------------------------------------------------

    @property
    def any_alive(self) -> bool:
        return any(s == "running" for s in self.status)

    def alive_array(self) -> np.ndarray:
        return np.asarray([s == "running" for s in self.status])

    def _fields(self, r: int, step: int) -> dict:
        return {"step": step, "seed": self.seeds[r], **dict(self.specs[r].fields)}

    def _log(self, rows: list[dict]) -> None:
        rows = [{k: _to_list(v) if not isinstance(v, (str, int, float)) else v for k, v in row.items()}
                for row in rows]
        self.history.extend(rows)
        if self.paths.metrics is not None and rows:
            io.append_jsonl_many(self.paths.metrics, rows)
        for writer in self.writers:  # thin mirrors (TensorBoard, W&B) of metrics.jsonl
            writer.write(rows)

    # -- train chunks ------------------------------------------------------------

    def process(self, out: Any, start: int, n: int, bar: Any) -> None:
        """Copy a chunk's metrics to the host, log them, note divergences."""
        metrics, live = out
        metrics = as_numpy_metrics(metrics)
        live = np.asarray(live)
        rows = []
        for i in range(n):
            step = start + i + 1
            for r in np.flatnonzero(live[i]):
                m = {k: v[i, r] for k, v in metrics.items()}
                finite = bool(m["finite"])
                if not finite:
                    self._nonfinite(r, step, m, bar)
                if step % self.log_every == 0 or step == self.num_steps or not finite:
                    rows.append({**self._fields(r, step), "epoch": (step - 1) // self.per_epoch,
                                 **m})
        self._log(rows)
        bar.update(n)
        alive = live[n - 1]
        if alive.any():
            postfix = {"loss": f"{float(np.mean(metrics['loss'][n - 1][alive])):.4f}",
                       "acc": f"{float(np.mean(metrics['accuracy'][n - 1][alive])):.3f}"}
            if self.last_eval is not None:
                postfix["test_acc"] = f"{self.last_eval:.3f}"
            bar.set_postfix(postfix, refresh=False)

    def _nonfinite(self, r: int, step: int, m: dict, bar: Any) -> None:
        what = f"non-finite loss or gradient at step {step} ({describe_nonfinite(m)})"
        who = self._who(r)
        if self.specs[r].train.on_nonfinite == "skip":
            self.skipped[r] += 1
            if self.skipped[r] <= 3:
                bar.write(f"vgrad: {who}{what}; update skipped (on_nonfinite='skip')", file=sys.stderr)
            return
        kept = (f"; the last checkpoint (step {self.last_saved}) is kept"
                if self.last_saved is not None else "")
        self.status[r], self.stopped_at[r] = "diverged", step - 1
        self.messages[r] = f"{what}; stopped, the state is the last good one (step {step - 1}){kept}"
        bar.write(f"vgrad: {who}{self.messages[r]}", file=sys.stderr)

    def _who(self, r: int) -> str:
        if len(self.specs) == 1:
            return ""
        fields = dict(self.specs[r].fields)
        return f"run {fields['run']} (seed {self.seeds[r]}): " if "run" in fields \
            else f"seed {self.seeds[r]}: "

    # -- evaluation ------------------------------------------------------------

    def evaluate(self, eval_fn, state, step, x, y, batch_size, bar=None) -> dict:
        test = evaluate(eval_fn, state, x, y, batch_size)
        alive = self.alive_array()
        self._log([{**self._fields(r, step), "test_loss": test["loss"][r],
                    "test_accuracy": test["accuracy"][r]} for r in np.flatnonzero(alive)])
        if alive.any():
            self.last_eval = float(np.mean(test["accuracy"][alive]))
        return test

    def finish(self, done, eval_fn, state, x_train, y_train, x_test, y_test, batch_size) -> None:
        """Final evaluation of every run (diverged ones: of their last good state)."""
        running = self.alive_array()
        for r in np.flatnonzero(running):
            self.status[r] = "completed"
        test = evaluate(eval_fn, state, x_test, y_test, batch_size)
        self._log([{**self._fields(r, done), "test_loss": test["loss"][r],
                    "test_accuracy": test["accuracy"][r]} for r in np.flatnonzero(running)])
        train = evaluate(eval_fn, state, x_train, y_train, batch_size)
        steps = [done if at is None else at for at in self.stopped_at]
        self.outcomes = [RunOutcome(self.status[r], self.messages[r], {
            "step": steps[r], "test_loss": float(test["loss"][r]),
            "test_accuracy": float(test["accuracy"][r]), "train_loss": float(train["loss"][r]),
            "train_accuracy": float(train["accuracy"][r])}) for r in range(len(self.specs))]

    def interrupt(self, done, num_steps, signame, state) -> None:
        where = "nothing saved (no run_dir)"
        if self.paths.run_dir is not None:
            if done > 0 and self.last_saved != done:
                self.save(done, state)
            if self.paths.ckpt is not None:
                self.paths.ckpt.wait()  # the checkpoint is complete before we report it
            where = (f"checkpoint at step {self.last_saved} in {self.paths.ckpt_dir}; continue with "
                     "resume=True (--resume)") if self.last_saved is not None \
                else "no checkpoint (no step was taken)"
        message = f"interrupted by {signame} at step {done} of {num_steps}; {where}"
        print(f"vgrad: {message}", file=sys.stderr, flush=True)
        for r in range(len(self.specs)):
            if self.status[r] == "running":
                self.status[r], self.messages[r] = "interrupted", message
        self.outcomes = [RunOutcome(self.status[r], self.messages[r], self._last_records(r, done))
                         for r in range(len(self.specs))]

    def _last_records(self, r: int, done: int) -> dict:
        """{"step", "last_train", "last_eval"}: the run's newest train and eval records."""
        fields = {"seed": self.seeds[r], **dict(self.specs[r].fields)}
        mine = [row for row in self.history if fields.items() <= row.items()]
        newest = lambda key: next((row for row in reversed(mine) if key in row), None)
        return {"step": done, "last_train": newest("loss"), "last_eval": newest("test_loss")}

    def group_status(self) -> str:
        for status in ("interrupted", "diverged"):
            if status in self.status:
                return status
        return "completed"

    def group_message(self) -> str:
        messages = [(self._who(r) if len(self.specs) > 1 else "") + m
                    for r, m in enumerate(self.messages) if m]
        return "; ".join(dict.fromkeys(messages))

    # -- measurements ------------------------------------------------------------

    def measured(self, step: int) -> bool:
        return any(m["step"] == step for m in self.measurements)

    def add_measurement(self, step: int, runs: list[dict]) -> None:
        record = io.from_jsonable(io.to_jsonable({"step": step, "runs": runs}))  # plain floats
        self.measurements.append(record)
        if self.paths.measurements is not None:
            io.append_jsonl_many(self.paths.measurements, [record])
        names = [run_name({"seed": s, **dict(spec.fields)}) for s, spec in zip(self.seeds, self.specs)]
        for writer in self.writers:
            writer.write_measurement(step, record["runs"], names)

    # -- checkpoints -------------------------------------------------------------

    def save(self, step: int, state: TrainState) -> None:
        io.fsync_path(self.paths.metrics)  # the records this checkpoint counts are on disk first
        io.fsync_path(self.paths.measurements)
        epoch, batch_in_epoch = divmod(step, self.per_epoch)
        single = len(self.specs) == 1
        self.paths.checkpointer().save(step, unstack(state, 0) if single else state, {
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "seed": self.seeds[0],
            "seeds": self.seeds, "num_records": len(self.history),
            "num_measurements": len(self.measurements), "total_steps": self.num_steps,
            "input_dtype": self.input_dtype, "config": self.paths.config,
            "status": self.status, "messages": self.messages, "stopped_at": self.stopped_at})
        self.last_saved = step

    def restore(self, state: TrainState) -> tuple[TrainState, int]:
        """Restore the newest checkpoint that reads back (falling back to older ones,
        with a warning, if the newest is damaged); cut the records back to it."""
        ckpt, single = self.paths.ckpt, len(self.specs) == 1
        target = unstack(state, 0) if single else state
        errors = []
        for step in reversed(ckpt.all_steps()):
            try:
                meta = ckpt.read_meta(step)
                vckpt.check_compatible(meta.get("config", {}), self.paths.config, where=ckpt.directory)
                restored, meta = ckpt.restore(target, step)
                break
            except ValueError:
                raise
            except Exception as err:  # damaged checkpoint: try an older one
                vckpt.warn_fallback(step, err, ckpt.directory)
                errors.append(f"step {step}: {type(err).__name__}: {err}")
        else:
            raise ValueError(f"cannot resume: none of the checkpoints in {ckpt.directory} could be "
                             f"restored ({'; '.join(errors)})")
        state = jax.tree_util.tree_map(lambda a: a[None], restored) if single else restored
        self.stopped_at = list(meta.get("stopped_at", self.stopped_at))
        self.status = list(meta.get("status", self.status))
        self.messages = list(meta.get("messages", self.messages))
        resumed_from = int(meta["step"])
        self.last_saved = resumed_from
        self.history = self._truncate(self.paths.metrics, int(meta["num_records"]), resumed_from)
        self.measurements = self._truncate(self.paths.measurements,
                                           int(meta.get("num_measurements", 0)), resumed_from)
        return state, resumed_from

    @staticmethod
    def _truncate(path: Path, wanted: int, step: int) -> list[dict]:
        records = io.from_jsonable(io.read_jsonl(path))
        if len(records) < wanted:
            warnings.warn(f"{path} has {len(records)} records but the checkpoint at step {step} "
                          f"was taken after {wanted}; earlier records are missing",
                          RuntimeWarning, stacklevel=4)
        records = records[:wanted]
        io.write_jsonl(path, records)  # drop records written after the checkpoint
        return records
