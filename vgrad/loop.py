"""The training loop: a group of runs trained as one compiled program.

A *group* is a list of runs that share one compiled program: the same model
program (everything but the initialiser) and the same optimiser structure,
schedule, batch size and run length. They may differ in seed, initialiser and
init scale (initialisation happens before the step) and in the values of
:data:`vgrad.steps.HYPERPARAMS` (learning rate, momentum, weight decay, clip
value), which live in each run's optimiser state. The group's states are
stacked along a leading run axis R and trained by a ``jax.vmap`` of the step.

The step is scanned over a *chunk* of up to ``steps_per_dispatch`` batches
(``jax.lax.fori_loop`` inside one jitted call), so small networks are not
bound by Python dispatch; the training set lives on the device and batches
are gathered there from (K, R, B) index arrays. Chunks end where the host
must act (evaluation, checkpoint, measurement, the end of the run); in
between, a chunk's metrics are copied to the host while the next chunk runs.
Chunking does not change results: the batches of step s of a run are a pure
function of (seed, s), and every step is the same program.

A run whose loss, gradient or update becomes non-finite is frozen at its last
good state (``on_nonfinite="stop"``; status "diverged", with the step and the
first non-finite layer) while the other runs of its group go on; "skip" drops
that update and goes on. :func:`fit` is the one-run (or N-seed) case.

Layering: this module composes :mod:`vgrad.programs` (the compiled chunk,
init and eval programs), :mod:`vgrad.group_records` (records, run status,
evaluation, checkpoints on the host), :mod:`vgrad.parallel` (devices) and
:mod:`vgrad.steps`; :mod:`vgrad.sweep` builds grids of groups on top of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgrad import checkpoint as vckpt
from vgrad import data as vdata
from vgrad import parallel
from vgrad.config import TrainConfig
from vgrad.group_records import GroupRecords, RunFiles, RunOutcome
from vgrad.programs import TRAIN_VALUE_FIELDS, init_group, program, train_program, unstack
from vgrad.steps import TrainState, check_run, total_steps

DEFAULT_STEPS_PER_DISPATCH = 64
EVAL_BATCH_SIZE = 1000

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a group.

    init_model: the model whose ``init`` draws this run's variables (for vgrad's
        own models: ``build(cfg)`` of the run's config; runs of a group differ
        only in :data:`vgrad.config.MODEL_INIT_FIELDS`).
    train: the run's TrainConfig; its seed is the init key and the data order.
    fields: extra fields written into every metrics record of the run (a sweep
        adds {"run": index}).
    """

    init_model: Any
    train: TrainConfig
    fields: tuple[tuple[str, Any], ...] = ()



@dataclasses.dataclass
class GroupResult:
    """What :func:`train_group` returns.

    state: the final (last good) states, stacked along the run axis (R, ...).
    runs: one :class:`RunOutcome` per run, in order.
    history: every record written to metrics.jsonl, in order (per step, the
        runs in order; train records have "loss", eval records "test_loss").
    measurements: [{"step": s, "runs": [per-run dict]}] at the ``measure_at`` steps.
    status: "interrupted" if the group was interrupted, else "diverged" if any
        run diverged, else "completed"; message: why (one line per run).
    step_time_s: steady-state wall time of one step of the whole group
        (all R runs at once), compilation excluded where possible.
    compile_time_s: wall time of the first chunk (mostly compilation).
    """

    state: TrainState
    runs: list[RunOutcome]
    history: list[dict]
    measurements: list[dict]
    status: str
    message: str
    steps_done: int
    resumed_from: int | None = None
    checkpoint_steps: list[int] = dataclasses.field(default_factory=list)
    step_time_s: float = float("nan")
    compile_time_s: float = float("nan")



# ----------------------------------------------------------------------------
# Host side: batches, records, signals
# ----------------------------------------------------------------------------


class _Batches:
    """(K, R, B) int32 example indices of steps s .. s+n-1 for every run; the
    order of epoch e of a run is ``vgrad.data.epoch_permutation(N, seed, e)``."""

    def __init__(self, seeds: Sequence[int], num_train: int, batch_size: int):
        self.seeds, self.num_train, self.batch_size = list(seeds), num_train, batch_size
        self.per_epoch = vdata.steps_per_epoch(num_train, batch_size)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        if (seed, epoch) not in self._perms:
            if len(self._perms) > 4 * len(set(self.seeds)):
                self._perms.clear()
            self._perms[seed, epoch] = vdata.epoch_permutation(self.num_train, seed=seed, epoch=epoch)
        return self._perms[seed, epoch]

    def indices(self, start: int, n: int, K: int) -> np.ndarray:
        B = self.batch_size
        out = np.zeros((K, len(self.seeds), B), np.int32)
        for i in range(n):
            epoch, j = divmod(start + i, self.per_epoch)
            for r, seed in enumerate(self.seeds):
                out[i, r] = self._perm(seed, epoch)[j * B:(j + 1) * B]
        return out


class InterruptFlag:
    """While active (main thread only), SIGINT and SIGTERM set ``signum`` instead
    of stopping the process, so the loop can finish its chunk and checkpoint; a
    second signal raises KeyboardInterrupt at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "InterruptFlag":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nvgrad: received {signal.Signals(signum).name}: stopping after the current steps "
              "and saving a checkpoint (send it again to abort at once)", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()



def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"invalid {field}={value!r}: must be an integer >= {minimum}")


def check_group(specs: Sequence[RunSpec]) -> None:
    """Raise ``ValueError`` unless every run of the group shares one program."""
    if not specs:
        raise ValueError("a group needs at least one run")
    first = train_program(specs[0].train)
    for i, spec in enumerate(specs[1:], 1):
        if train_program(spec.train) != first:
            diff = [f.name for f in dataclasses.fields(TrainConfig)
                    if getattr(spec.train, f.name) != getattr(specs[0].train, f.name)
                    and f.name not in TRAIN_VALUE_FIELDS]
            raise ValueError(f"run {i} of the group differs from run 0 in train fields that change "
                             f"the compiled program ({', '.join(diff)}); group such runs separately "
                             "(vgrad.sweep.run does)")


# ----------------------------------------------------------------------------
# The group loop
# ----------------------------------------------------------------------------


def _event_steps(num_steps: int, per_epoch: int, eval_every: int, checkpoint_every: int | None,
                 measure_at: Sequence[int]) -> list[int]:
    """Steps after which the host needs the state (the chunk ends there)."""
    events = set(range(eval_every, num_steps, eval_every)) | {num_steps}
    if checkpoint_every is not None:
        events |= set(range(per_epoch, num_steps, per_epoch))
        if checkpoint_every > 0:
            events |= set(range(checkpoint_every, num_steps, checkpoint_every))
    events |= {s for s in measure_at if 0 < s <= num_steps}
    return sorted(events)


def train_group(model: Any, specs: Sequence[RunSpec], dataset: Any, *, config: dict,
                run_dir: Any = None, progress: Any = True, log_every: int = 1, mesh: Any = None,
                checkpoint_every: int | None = None, keep_checkpoints: int = 3,
                resume: bool = False, handle_signals: bool = True,
                steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH,
                measure_at: Sequence[int] = (),
                measure: Callable[[int, TrainState, np.ndarray], list[dict]] | None = None,
                label: str = "train", writers: Sequence[Any] = ()) -> GroupResult:
    """Train the R runs of ``specs`` (one program; see :func:`check_group`) together.

    model: the model whose ``apply`` every run uses (for vgrad's models any run's
        ``build(cfg)``; init-only fields do not matter).
    config: the JSON-able config stored with checkpoints and compared on resume.
    run_dir: where ``metrics.jsonl``, ``measurements.jsonl`` and
        ``checkpoints/`` go (None: nothing is written).
    progress: True/False for a bar of its own, or a ``tqdm`` bar to advance.
    measure_at: steps (0 = initialisation) at which ``measure(step, state_R,
        alive_R)`` is called; it returns one JSON-able dict per run.
    writers: :mod:`vgrad.writers` mirrors (TensorBoard, W&B) of every record and
        measurement; the caller closes them.
    Other arguments as in :func:`fit`.
    """
    from tqdm.auto import tqdm

    _check_int("log_every", log_every, 1)
    _check_int("steps_per_dispatch", steps_per_dispatch, 1)
    _check_int("keep_checkpoints", keep_checkpoints, 1)
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every, 0)
    if run_dir is None and (resume or checkpoint_every is not None):
        raise ValueError("checkpointing and resume=True need run_dir (where checkpoints live)")
    check_group(specs)
    template = specs[0].train
    check_run(model, template, dataset, seeds=len(specs))
    R, seeds = len(specs), [s.train.seed for s in specs]

    num_train, batch_size = dataset.num_train, template.batch_size
    batches = _Batches(seeds, num_train, batch_size)
    per_epoch, num_steps = batches.per_epoch, total_steps(template, num_train)
    eval_every = template.eval_every or per_epoch
    # Evaluation batches are larger than training ones (fewer dispatches); in
    # evaluation mode every example's output is independent of its batch.
    eval_batch = max(batch_size, EVAL_BATCH_SIZE)
    measure_at = sorted({int(s) for s in measure_at if 0 <= int(s) <= num_steps}) if measure else []
    events = _event_steps(num_steps, per_epoch, eval_every, checkpoint_every, measure_at)
    K = min(steps_per_dispatch, num_steps)

    paths = RunFiles(run_dir, config, resume, keep_checkpoints, checkpoint_every)
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)

    try:
        state = init_group(specs, num_steps, dataset.x_train[:batch_size])
        alive = jnp.ones((R,), bool)
        loop = GroupRecords(specs, seeds, paths, log_every, per_epoch, num_steps, label, dataset,
                            resume, writers)
        resumed_from = done = None
        if resume:
            state, resumed_from = loop.restore(state)
            alive = jnp.asarray(loop.alive_array())
        done = resumed_from or 0
        if mesh is not None:
            parallel.check_batch_divisible(mesh, batch_size, R)
            state, alive = parallel.place_state((state, alive), mesh, R)
        chunk = program("chunk", model, template, num_steps, K, template.on_nonfinite == "stop",
                         mesh, R)
        eval_fn = program("eval", model, template, num_steps)
        if 0 in measure_at and not loop.measured(0):
            loop.add_measurement(0, measure(0, state, loop.alive_array()))

        timer = _Timer()
        with InterruptFlag(handle_signals) as interrupts:
            bar = progress if hasattr(progress, "update") else tqdm(
                total=num_steps, initial=done, disable=not progress, desc=label, dynamic_ncols=True)
            pending = None
            while done < num_steps and interrupts.signum is None and loop.any_alive:
                n = min(K, next(e for e in events if e > done) - done)
                idx = batches.indices(done, n, K)
                t0 = time.perf_counter()
                (state, alive), out = chunk((state, alive), x_train, y_train, idx, np.int32(n))
                timer.chunk_dispatched(t0, n, alive)
                if pending is not None:  # the previous chunk's metrics, while this one runs
                    loop.process(*pending, bar)
                pending, done = (out, done, n), done + n
                if done not in events:
                    continue
                loop.process(*pending, bar)
                pending = None
                with timer.host():
                    if done in measure_at:
                        loop.add_measurement(done, measure(done, state, loop.alive_array()))
                    if done % eval_every == 0 and done != num_steps:
                        loop.evaluate(eval_fn, state, done, x_test, y_test, eval_batch)
                    if loop.any_alive and paths.wants_checkpoint(done, per_epoch, num_steps):
                        loop.save(done, state)
            if pending is not None:
                loop.process(*pending, bar)
            timer.stop()
            if bar is not progress:
                bar.close()
            if interrupts.signum is not None and done < num_steps and loop.any_alive:
                loop.interrupt(done, num_steps, interrupts.name, state)
            else:
                loop.finish(done, eval_fn, state, x_train, y_train, x_test, y_test, eval_batch)
                if num_steps in measure_at and not loop.measured(num_steps):
                    # Every run diverged early: the end-of-run measurement is of the frozen states.
                    loop.add_measurement(num_steps, measure(num_steps, state, loop.alive_array()))
    finally:
        paths.close()
    return GroupResult(
        state=state, runs=loop.outcomes, history=loop.history, measurements=loop.measurements,
        status=loop.group_status(), message=loop.group_message(), steps_done=done,
        resumed_from=resumed_from, checkpoint_steps=paths.steps(),
        step_time_s=timer.step_time(), compile_time_s=timer.compile_time)


class _Timer:
    """Wall time of the first chunk (compilation, measured by blocking on it) and
    the steady-state time per step after it, host work (evaluation,
    checkpoints, measurements) excluded."""

    def __init__(self):
        self.compile_time = float("nan")
        self.steps = 0
        self.host_time = 0.0
        self.t_steady: float | None = None
        self.t_end: float | None = None

    def chunk_dispatched(self, t0: float, n: int, out: Any) -> None:
        """After dispatching a chunk that started at ``t0``: the first one is
        waited for (its time is mostly compilation), later ones only counted."""
        if self.t_steady is None:
            jax.block_until_ready(out)
            self.t_steady = time.perf_counter()
            self.compile_time, self.first_steps = self.t_steady - t0, n
        else:
            self.steps += n

    @contextlib.contextmanager
    def host(self):
        t0 = time.perf_counter()
        yield
        self.host_time += time.perf_counter() - t0

    def stop(self) -> None:
        self.t_end = time.perf_counter()

    def step_time(self) -> float:
        if self.t_steady is None:
            return float("nan")
        if not self.steps:  # one chunk only: compilation included
            return self.compile_time / self.first_steps
        return (self.t_end - self.t_steady - self.host_time) / self.steps



# ----------------------------------------------------------------------------
# fit: one run, or N seeds of it
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    state: the final (last good) TrainState; seed-stacked with leading axis N when seeds > 1.
    history: every record written to metrics.jsonl, in order (train records have
        "loss", "accuracy", ...; eval records have "test_loss", "test_accuracy").
        A resumed run's history starts with the records of the run it continues.
    final: "completed" and "diverged" runs: final test (and train-set) metrics
        of the (last good) state, per-seed lists when seeds > 1. "interrupted"
        runs skip that evaluation: {"step", "last_train", "last_eval"} with the
        last logged records (per-seed lists when seeds > 1).
    status: "completed", "diverged" (a non-finite step with on_nonfinite="stop";
        with several seeds, any of them: the others train to the end) or
        "interrupted" (SIGINT/SIGTERM).
    message: why a run did not complete ("" when it did).
    resumed_from: the checkpoint step a resumed run started from, else None.
    checkpoint_steps: steps of the checkpoints kept in run_dir/checkpoints.
    seed_status: per seed, "completed", "diverged" or "interrupted".
    step_time_s: steady-state seconds per step (all seeds at once).
    """

    state: TrainState
    history: list[dict]
    final: dict
    status: str = "completed"
    message: str = ""
    resumed_from: int | None = None
    checkpoint_steps: list[int] = dataclasses.field(default_factory=list)
    seed_status: list[str] = dataclasses.field(default_factory=list)
    step_time_s: float = float("nan")


def fit(model: Any, train_cfg: TrainConfig, dataset: Any, *, run_dir: Any = None,
        seeds: int = 1, progress: bool = True, log_every: int = 1, mesh: Any = None,
        checkpoint_every: int | None = None, keep_checkpoints: int = 3, resume: bool = False,
        run_config: dict | None = None, handle_signals: bool = True,
        steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH, writers: Sequence[Any] = ()) -> FitResult:
    """Train on ``dataset`` (a vgrad.data.Dataset) and evaluate on its test split.

    Runs ``total_steps(train_cfg, N_train)`` steps with deterministic batches
    (a function of seed and epoch), evaluates every ``train_cfg.eval_every``
    steps (0: every epoch) and at the end, shows a progress bar, and appends
    every record to ``run_dir/metrics.jsonl`` when ``run_dir`` is given.
    With ``seeds=N`` it trains seeds train_cfg.seed .. train_cfg.seed+N-1 in
    one vmapped program; records carry a "seed" field each.
    ``mesh`` (a ``vgrad.parallel.data_mesh()``) shards the work over devices.
    ``steps_per_dispatch``: steps run per call into the compiled program
    (results do not depend on it). ``writers``: TensorBoard / W&B mirrors of
    the records (:func:`vgrad.writers.make_writers`), one backend run per seed.

    Failures (see docs/reliability.md):

    * Non-finite loss, gradient or update: ``train_cfg.on_nonfinite="stop"``
      freezes that seed at its last good state, with status "diverged" and a
      message naming the step and the first layer (in backpropagation order)
      whose gradient is non-finite; existing checkpoints are kept; other seeds
      go on. "skip" drops that update and goes on.
    * SIGINT (Ctrl-C) / SIGTERM (``handle_signals``): the current chunk of
      steps finishes, a checkpoint is saved (when ``run_dir`` is given) and the
      run returns with status "interrupted"; a second signal aborts at once.

    Checkpoints (orbax, in ``run_dir/checkpoints``; needs ``run_dir``):
      checkpoint_every: None: none (except on an interrupt); 0: at the end of
        every epoch and of the run; N > 0: also every N steps.
      keep_checkpoints: keep the last k.
      resume: continue from the latest checkpoint in ``run_dir`` (same config,
        else ValueError naming the fields that differ); metrics.jsonl is cut
        back to the records written when that checkpoint was taken, so a
        resumed run ends with exactly the records, metrics and parameters of an
        uninterrupted one. Without ``resume``, metrics.jsonl is started afresh
        and a ``run_dir`` that already holds checkpoints is refused.
      run_config: extra JSON-able config (e.g. the data config) stored with the
        checkpoints and compared on resume, besides the model and train configs,
        ``seeds`` and a fingerprint of the dataset.
    """
    _check_int("seeds", seeds, 1)
    specs = [RunSpec(model, dataclasses.replace(train_cfg, seed=train_cfg.seed + i))
             for i in range(seeds)]
    config = {"model": getattr(model, "cfg", type(model).__name__), "train": train_cfg,
              "seeds": seeds, "dataset": vckpt.dataset_fingerprint(dataset), **(run_config or {})}
    group = train_group(model, specs, dataset, config=config, run_dir=run_dir, progress=progress,
                        log_every=log_every, mesh=mesh, checkpoint_every=checkpoint_every,
                        keep_checkpoints=keep_checkpoints, resume=resume,
                        handle_signals=handle_signals, steps_per_dispatch=steps_per_dispatch,
                        writers=writers)
    if seeds == 1:
        state, final = unstack(group.state, 0), group.runs[0].final
    else:
        state = group.state
        final = {k: ([run.final[k] for run in group.runs] if k != "step" else
                     max(run.final["step"] for run in group.runs)) for k in group.runs[0].final}
    return FitResult(state=state, history=group.history, final=final, status=group.status,
                     message=group.message, resumed_from=group.resumed_from,
                     checkpoint_steps=group.checkpoint_steps,
                     seed_status=[run.status for run in group.runs], step_time_s=group.step_time_s)
