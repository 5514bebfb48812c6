"""Grids of runs (seeds x hyperparameters x variants), trained group by group.

A grid is a list of :class:`Run` (a ModelConfig, a TrainConfig, a label and
the values that were varied); build one with :func:`grid` (a Cartesian
product) or :func:`variants` (named techniques), and concatenate lists freely::

    runs = sweep.grid(model=ModelConfig(depth=20), train=TrainConfig(steps=500),
                      vary={"model.activation": ["relu", "tanh"],
                            "train.learning_rate": [0.01, 0.1]}, seeds=3)
    result = sweep.run(runs, data.load("mnist1d"), run_dir="runs/my_sweep")
    rows = result.table()            # pandas.DataFrame(rows) in one line

:func:`run` groups the runs by what changes the compiled program (the model
without its initialiser; the optimiser kind, clip kind, schedule, batch size
and run length) and trains each group as one vmapped, jitted program
(:func:`vgrad.loop.train_group`): seeds, learning rates, momenta, weight
decays, clip values, initialisers, init scales and numeric residual scales
(a variable of the model) of a group are values, not programs, so a new
learning rate never recompiles. A run that diverges is frozen and marked
"diverged" while the rest of its group trains on.

With ``run_dir``, every group writes ``groups/<g>/`` (metrics.jsonl,
measurements.jsonl, checkpoints/, result.json when it finishes); a sweep
killed or interrupted part-way continues with ``resume=True``: finished groups
are read back, not recomputed, and an unfinished one resumes from its latest
checkpoint with the same results as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vgrad import checkpoint as vckpt
from vgrad import io
from vgrad.config import ModelConfig, TrainConfig
from vgrad.loop import DEFAULT_STEPS_PER_DISPATCH, InterruptFlag, RunSpec, train_group
from vgrad.programs import model_program, train_program
from vgrad.measure import make_measure
from vgrad.models import build
from vgrad.steps import total_steps

_SECTIONS = {"model": ModelConfig, "train": TrainConfig}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid.

    model, train: its configs (``train.seed`` is the run's seed).
    label: a name for the technique or variant ("" if none).
    values: the fields that were varied, as (("model.activation", "relu"), ...).
    """

    model: ModelConfig
    train: TrainConfig
    label: str = ""
    values: tuple[tuple[str, Any], ...] = ()

    @property
    def seed(self) -> int:
        return self.train.seed


def _split_field(field: str) -> tuple[str, str]:
    section, _, name = field.partition(".")
    cls = _SECTIONS.get(section)
    names = [f.name for f in dataclasses.fields(cls)] if cls else []
    if cls is None or name not in names:
        allowed = ", ".join(f"{s}.{f.name}" for s, c in _SECTIONS.items() for f in dataclasses.fields(c))
        raise ValueError(f"unknown field {field!r}: allowed fields are {allowed}")
    return section, name


def with_values(model: ModelConfig, train: TrainConfig,
                values: Mapping[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """(model, train) with dotted fields ("model.depth", "train.learning_rate")
    replaced; unknown fields and invalid values raise ``ValueError`` naming them."""
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for field, value in values.items():
        section, name = _split_field(field)
        changes[section][name] = value
    return (dataclasses.replace(model, **changes["model"]),
            dataclasses.replace(train, **changes["train"]))


def _check_seeds(seeds: Any) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"invalid seeds={seeds!r}: must be an integer >= 1")


def grid(model: ModelConfig = ModelConfig(), train: TrainConfig = TrainConfig(), *,
         vary: Mapping[str, Sequence[Any]] | None = None, seeds: int = 1,
         label: str = "") -> list[Run]:
    """The Cartesian product of ``vary`` (dotted field -> list of values) on top of
    (model, train), each point with seeds ``train.seed`` .. ``train.seed + seeds - 1``
    (seeds vary fastest). Unknown fields or empty value lists raise ``ValueError``."""
    _check_seeds(seeds)
    vary = dict(vary or {})
    for field, values in vary.items():
        _split_field(field)
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
            raise ValueError(f"invalid vary[{field!r}]={values!r}: must be a non-empty list of values")
    runs = []
    for point in itertools.product(*vary.values()):
        values = dict(zip(vary, point))
        m, t = with_values(model, train, values)
        for i in range(seeds):
            runs.append(Run(m, dataclasses.replace(t, seed=t.seed + i), label, tuple(values.items())))
    return runs


def variants(named: Mapping[str, Mapping[str, Any]], *, model: ModelConfig = ModelConfig(),
             train: TrainConfig = TrainConfig(), seeds: int = 1) -> list[Run]:
    """One labelled variant per entry of ``named`` (label -> {dotted field: value}),
    each with ``seeds`` seeds, e.g. ``{"ReLU + He": {"model.activation": "relu",
    "model.init": "he_normal"}}``."""
    if not named:
        raise ValueError("variants needs at least one named variant")
    return [run for label, values in named.items()
            for run in grid(model, train, vary={k: [v] for k, v in values.items()}, seeds=seeds,
                            label=label)]


def group_key(run: Run) -> tuple[ModelConfig, TrainConfig]:
    """What the compiled program of a run depends on; runs with equal keys train together."""
    return model_program(run.model), train_program(run.train)


def groups(runs: Sequence[Run]) -> list[list[int]]:
    """Indices of ``runs`` grouped by :func:`group_key`, groups in order of first appearance."""
    out: dict[Any, list[int]] = {}
    for i, r in enumerate(runs):
        out.setdefault(group_key(r), []).append(i)
    return list(out.values())


@dataclasses.dataclass
class RunResult:
    """The outcome of one run: its :class:`Run` fields, and

    status: "completed", "diverged", "interrupted" or "not_started" (a sweep
        interrupted before the run's group began);
    message: why it did not complete; history: its metrics records in order;
    final: the final metrics (as :attr:`vgrad.loop.FitResult.final`);
    measurements: [{"step": s, **measurement}] at the sweep's ``measure_at`` steps;
    group: index of its group; step_time_s: steady-state seconds per step of
        its group's program (all runs of the group at once).
    """

    index: int
    run: Run
    status: str
    message: str
    history: list[dict]
    final: dict
    measurements: list[dict]
    group: int
    step_time_s: float

    @property
    def model(self) -> ModelConfig:
        return self.run.model

    @property
    def train(self) -> TrainConfig:
        return self.run.train

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def label(self) -> str:
        return self.run.label

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a metric over training, e.g. "loss" or "test_accuracy"."""
        rows = [r for r in self.history if key in r]
        return np.asarray([r["step"] for r in rows]), np.asarray([r[key] for r in rows], float)


@dataclasses.dataclass
class SweepResult:
    """What :func:`run` returns: ``runs`` (one :class:`RunResult` per run, in grid
    order), ``groups`` (per group: its run indices, runs, steps, step and compile
    time) and the wall time."""

    runs: list[RunResult]
    groups: list[dict]
    wall_time_s: float

    def table(self) -> list[dict]:
        """One flat row per run: index, label, seed, the varied values, status,
        final metrics, steps, group and step time (``pandas.DataFrame(rows)``)."""
        rows = []
        for r in self.runs:
            final = r.final if r.status in ("completed", "diverged") else {}
            rows.append({"run": r.index, "label": r.label, "seed": r.seed, **dict(r.run.values),
                         "status": r.status,
                         **{k: final.get(k, math.nan) for k in
                            ("test_accuracy", "test_loss", "train_accuracy", "train_loss")},
                         "steps": r.final.get("step", 0), "group": r.group,
                         "step_time_s": r.step_time_s})
        return rows

    def by_label(self) -> dict[str, list[RunResult]]:
        """Runs grouped by label, in order of first appearance."""
        out: dict[str, list[RunResult]] = {}
        for r in self.runs:
            out.setdefault(r.label, []).append(r)
        return out

    def curves(self, runs: Sequence[RunResult], key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps (T,), values (S, T)) of metric ``key`` for several runs (e.g. the
        seeds of one label) on the union of their steps; a run that stopped early
        (diverged) has NaN after its last record."""
        steps = sorted({s for r in runs for s in r.curve(key)[0].tolist()})
        out = np.full((len(runs), len(steps)), np.nan)
        where = {s: i for i, s in enumerate(steps)}
        for row, r in zip(out, runs):
            s, v = r.curve(key)
            row[[where[t] for t in s.tolist()]] = v
        return np.asarray(steps), out

    @staticmethod
    def final_stats(runs: Sequence[RunResult], key: str) -> dict:
        """{"mean", "std", "values"} of ``final[key]`` over ``runs`` (NaN for runs
        that have no final value, e.g. interrupted ones)."""
        values = np.asarray([r.final.get(key, math.nan) if r.status in ("completed", "diverged")
                             else math.nan for r in runs], float)
        with np.errstate(invalid="ignore"):
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            std = float(np.nanstd(values)) if np.isfinite(values).any() else math.nan
        return {"mean": mean, "std": std, "values": values.tolist()}


def _group_config(runs: Sequence[Run], indices: Sequence[int], dataset: Any,
                  measure_at: Sequence[int]) -> dict:
    return vckpt.normalize_config({
        "runs": [{"index": i, "label": runs[i].label, "model": runs[i].model, "train": runs[i].train}
                 for i in indices],
        "dataset": vckpt.dataset_fingerprint(dataset), "measure_at": list(measure_at)})


def _load_finished(group_dir: Path, config: dict) -> dict | None:
    """The saved result of a finished group, if it is this group's."""
    path = group_dir / "result.json"
    if not path.exists():
        return None
    saved = io.read_json(path)
    if vckpt.config_differences(saved.get("config", {}), config):
        raise ValueError(f"cannot resume: {group_dir} holds the result of a different group "
                         "(the grid or the data changed); use a new run directory")
    saved["history"] = io.from_jsonable(io.read_jsonl(group_dir / "metrics.jsonl"))
    saved["measurements"] = io.from_jsonable(io.read_jsonl(group_dir / "measurements.jsonl"))
    saved["runs"] = io.from_jsonable(saved["runs"])
    return saved


def run(runs: Sequence[Run], dataset: Any, *, run_dir: Any = None, measure_at: Sequence[int] = (),
        measure_batch_size: int = 64, num_probes: int = 8, jacobians: bool = True,
        gradient_flow: bool = True,
        extra_measure: Callable[[Any, dict], Mapping[str, Any]] | None = None,
        progress: bool = True, log_every: int = 1, mesh: Any = None,
        checkpoint_every: int | None = None, resume: bool = False,
        steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH, writers: Sequence[Any] = ()) -> SweepResult:
    """Train every run of ``runs`` on ``dataset``; return a :class:`SweepResult`.

    measure_at: steps (0 = initialisation; a step past a run's length means its
        end) at which each run's gradient flow is measured on the first
        ``measure_batch_size`` training examples (see :mod:`vgrad.measure`;
        ``jacobians=False`` skips the Jacobian products, ``num_probes`` sets
        their probes; ``gradient_flow=False`` skips the gradient norms and
        activation statistics). extra_measure: ``f(model, variables) -> {name: value}``,
        called for each run (its own variables, no run axis) at the same steps;
        its entries join the run's measurements (e.g. eval-mode accuracy, unit
        percentiles, loss along the gradient).
    run_dir: where each group writes ``groups/<g>/``; None writes nothing.
    checkpoint_every: checkpoint every this many steps (default: a quarter of
        the run); needs ``run_dir``. resume: continue a sweep in ``run_dir``.
    mesh: a ``vgrad.parallel.data_mesh()``: the run axis of a group is sharded
        over its devices when the group's size is a multiple of the device
        count, else each run's batch is.
    progress: one progress bar over all steps of all groups.
    writers: TensorBoard / W&B mirrors (:func:`vgrad.writers.make_writers`): one
        backend run per sweep run (``run-NNNN``); the caller closes them.
    """
    from tqdm.auto import tqdm

    if not runs:
        raise ValueError("runs is empty: build a grid with vgrad.sweep.grid or variants")
    for i, r in enumerate(runs):
        if not isinstance(r, Run):
            raise TypeError(f"runs[{i}] is a {type(r).__name__}, not a vgrad.sweep.Run")
    run_dir = None if run_dir is None else Path(run_dir)
    if run_dir is not None and not resume and (run_dir / "groups").exists():
        raise ValueError(f"{run_dir} already holds a sweep; pass resume=True to continue it, or use "
                         "a new run directory")
    start = time.perf_counter()
    index_groups = groups(runs)
    lengths = {g: total_steps(runs[idx[0]].train, dataset.num_train) for g, idx in enumerate(index_groups)}
    measuring = dict(num_probes=num_probes, products=jacobians, flow=gradient_flow,
                     extra=extra_measure)  # make_measure's options
    x_measure = np.asarray(dataset.x_train[:measure_batch_size])
    y_measure = np.asarray(dataset.y_train[:measure_batch_size])
    results: list[RunResult | None] = [None] * len(runs)
    group_rows = []
    bar = tqdm(total=sum(lengths.values()), disable=not progress, desc="sweep", dynamic_ncols=True)
    with InterruptFlag(True) as interrupts:
        for g, indices in enumerate(index_groups):
            num_steps = lengths[g]
            at = sorted({min(int(s), num_steps) for s in measure_at})
            config = _group_config(runs, indices, dataset, at)
            group_dir = None if run_dir is None else run_dir / "groups" / str(g)
            saved = _load_finished(group_dir, config) if (group_dir is not None and resume) else None
            if saved is None and interrupts.signum is not None:
                break
            if saved is None:
                saved = _train_one_group(runs, indices, dataset, g, group_dir, config, at, x_measure,
                                         y_measure, measuring, bar, log_every, mesh,
                                         checkpoint_every, resume, steps_per_dispatch, num_steps,
                                         writers)
            else:
                bar.update(num_steps)
            group_rows.append({"group": g, "runs": list(indices), "steps": num_steps,
                               **{k: saved[k] for k in ("step_time_s", "compile_time_s", "status")}})
            _collect(results, runs, indices, g, saved)
            if saved["status"] == "interrupted":
                break
    bar.close()
    for i, r in enumerate(results):
        if r is None:
            results[i] = RunResult(i, runs[i], "not_started", "the sweep was interrupted before this "
                                   "run's group started", [], {}, [], -1, math.nan)
    return SweepResult(runs=results, groups=group_rows, wall_time_s=time.perf_counter() - start)


def _train_one_group(runs, indices, dataset, g, group_dir, config, at, x_measure, y_measure,
                     measuring, bar, log_every, mesh, checkpoint_every, resume,
                     steps_per_dispatch, num_steps, writers) -> dict:
    """Train group g; write and return its result (config, status, per-run outcomes)."""
    group_runs = [runs[i] for i in indices]
    models = {cfg: build(cfg) for cfg in dict.fromkeys(r.model for r in group_runs)}
    model = models[group_runs[0].model]
    specs = [RunSpec(models[r.model], r.train, (("run", i),)) for r, i in zip(group_runs, indices)]
    measure = make_measure(model, x_measure, y_measure, **measuring) if at else None
    if group_dir is not None and checkpoint_every is None:
        checkpoint_every = max(1, -(-num_steps // 4))
    can_resume = resume and group_dir is not None and bool(
        vckpt.committed_steps(vckpt.checkpoint_dir(group_dir)))
    label = group_runs[0].label or f"group {g}"
    out = train_group(model, specs, dataset, config=config, run_dir=group_dir, progress=bar,
                      log_every=log_every, mesh=mesh, resume=can_resume,
                      checkpoint_every=checkpoint_every if group_dir is not None else None,
                      keep_checkpoints=1, steps_per_dispatch=steps_per_dispatch, measure_at=at,
                      measure=measure, label=label, writers=writers)
    saved = {"config": config, "status": out.status, "step_time_s": out.step_time_s,
             "compile_time_s": out.compile_time_s,
             "runs": [dataclasses.asdict(o) for o in out.runs]}
    if group_dir is not None and out.status != "interrupted":
        io.write_json(group_dir / "result.json", saved)
        # A finished group is read back from result.json on resume; its checkpoints
        # (only ever needed to continue it) would cost disk in every study run.
        shutil.rmtree(vckpt.checkpoint_dir(group_dir), ignore_errors=True)
    saved["history"], saved["measurements"] = out.history, out.measurements
    return saved


def _collect(results: list, runs: Sequence[Run], indices: Sequence[int], g: int, saved: dict) -> None:
    """Split a group's records and measurements into per-run results."""
    for pos, i in enumerate(indices):
        outcome = saved["runs"][pos]
        history = [r for r in saved["history"] if r.get("run") == i]
        measurements = [{"step": m["step"], **m["runs"][pos]} for m in saved["measurements"]]
        results[i] = RunResult(i, runs[i], outcome["status"], outcome["message"], history,
                               outcome["final"], measurements, g, saved["step_time_s"])
