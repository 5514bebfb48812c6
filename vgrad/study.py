"""What every study shares: its command line, run directory, results and report.

A study module in ``experiments/`` declares its arguments (a frozen dataclass
extending :class:`StudyArgs`) and a function ``body(study) -> results`` that
trains its grid with :meth:`Study.sweep`, draws figures with
:meth:`Study.save_figure` and fills :attr:`Study.report`. :func:`main` does
the rest, the same way for every study::

    python -m experiments.NAME [--quick] [--seeds N] [--out DIR] [--run-id ID] [--resume]

writes ``<out>/<study>/<run-id>/``:

* ``config.json``: the arguments;
* ``results.json``: every number behind every figure (what ``body`` returns),
  plus the study name, status, wall time and machine;
* ``figures/*.png`` and ``report.md``: what was run, the figures, the summary
  table, the measured conclusion, the machine and the wall time;
* ``sweep*/``: the engine's per-group records and checkpoints, so an
  interrupted study continues with ``--resume`` (same ``--run-id``).

The run directory is locked for the life of the study (one process at a
time); bad arguments are one line ``vgrad: error: ...`` (exit 2) before
anything is written; a study interrupted by Ctrl-C keeps every finished
group's results on disk and exits 1.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tyro

from vgrad import io, plots
from vgrad import sweep as vsweep
from vgrad.writers import make_writers


# What a study may conclude about a claim (results["claims"][i]["verdict"]).
VERDICTS = ("holds", "holds partly", "does not hold here")


@dataclasses.dataclass(frozen=True)
class StudyArgs:
    """Arguments every study takes (a study's own Args extend this)."""

    quick: bool = False
    """Tiny sizes: the same code in seconds (what the test suite runs)."""
    seeds: int | None = None
    """Seeds per configuration (default: the study's own; 1 with --quick)."""
    out: str = "runs"
    """Root directory: the study writes <out>/<study>/<run-id>/."""
    run_id: str | None = None
    """Name of the run directory (default: a timestamp)."""
    resume: bool = False
    """Continue an interrupted study (needs --run-id): finished groups are read back."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: str | None = None
    """Also write every run's per-layer metrics as TensorBoard event files under this directory."""
    wandb_project: str | None = None
    """Also log every run's per-layer metrics to this Weights & Biases project."""
    figure: str | None = None
    """Also copy the study's headline figure here (e.g. docs/figures/<study>.png)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag for a bad value (called before
        anything is written; not in ``__post_init__``, so the command line reports
        it as one line instead of the parser's box)."""
        if self.seeds is not None and (isinstance(self.seeds, bool) or not isinstance(self.seeds, int)
                                       or self.seeds < 1):
            raise ValueError(f"invalid --seeds={self.seeds!r}: must be an integer >= 1")
        if self.run_id is not None:
            io.check_run_id(self.run_id, field="--run-id")
        if self.resume and not self.run_id:
            raise ValueError("invalid --resume without --run-id: name the study run to continue")

    def num_seeds(self, default: int) -> int:
        """The number of seeds: ``--seeds``, else 1 with ``--quick``, else ``default``."""
        return self.seeds if self.seeds is not None else (1 if self.quick else default)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str | Callable[[dict], Any]]],
                   ) -> str:
    """A Markdown table: one row per dict, ``columns`` = (header, key or row -> text)."""
    def cell(row: dict, get: str | Callable) -> str:
        value = get(row) if callable(get) else row.get(get, "")
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, g) for _, g in columns) + " |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Report:
    """The parts of ``report.md``, in order: headed sections of Markdown."""

    title: str
    sections: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, heading: str, markdown: str) -> None:
        self.sections.append((heading, markdown.strip()))

    def add_claims(self, claims: Sequence[dict]) -> None:
        """A "Claims" section: one line per claim (a dict with "claim", "verdict",
        one of :data:`VERDICTS`, and "measured")."""
        self.add("Claims", "\n".join(f"- **{c['claim']}** — {c['verdict']}. {c['measured']}"
                                      for c in claims))

    def add_figures(self, paths: dict[str, str]) -> None:
        """A "Figures" section: each figure (name -> path relative to the run directory,
        as :meth:`Study.save_figure` returns it)."""
        self.add("Figures", "\n\n".join(f"![{name}]({path})" for name, path in paths.items()))

    def render(self) -> str:
        parts = [f"# {self.title}\n"]
        parts += [f"## {heading}\n\n{body}\n" for heading, body in self.sections]
        return "\n".join(parts)


class Study:
    """One run of a study: its arguments, directory, report and figures."""

    def __init__(self, name: str, args: StudyArgs, run_dir: Path, command: str):
        self.name, self.args, self.run_dir, self.command = name, args, run_dir, command
        self.report = Report(name)
        self.figures: list[str] = []
        self.started = time.perf_counter()
        self.interrupted = False
        self.trained = False  # set once training starts: later errors are failures, not bad input

    def save_figure(self, fig: Any, name: str, *, headline: bool = False) -> str:
        """Save ``fig`` as ``figures/<name>.png``; returns the path relative to the run
        directory. The ``headline`` figure is also copied to ``--figure`` when given."""
        rel = f"figures/{name}.png"
        plots.save(fig, self.run_dir / rel)
        self.figures.append(rel)
        if headline and self.args.figure:
            shutil.copyfile(self.run_dir / rel, self.args.figure)
        return rel

    def sweep(self, runs: Sequence[vsweep.Run], dataset: Any, *, name: str = "sweep",
              **kwargs: Any) -> vsweep.SweepResult:
        """Train ``runs`` with :func:`vgrad.sweep.run` into ``<run-dir>/<name>/``
        (resumable); notes an interruption so :func:`main` reports it."""
        kwargs.setdefault("progress", self.args.progress)
        writers = make_writers(tensorboard=self.args.tensorboard and Path(self.args.tensorboard) / name,
                               wandb_project=self.args.wandb_project,
                               group=f"{self.name}/{self.run_dir.name}/{name}", config=self.args)
        try:
            self.trained = True
            result = vsweep.run(runs, dataset, run_dir=self.run_dir / name, resume=self.args.resume,
                                writers=writers, **kwargs)
        finally:
            for writer in writers:
                writer.close()
        if any(r.status in ("interrupted", "not_started") for r in result.runs):
            self.interrupted = True
        return result

    def machine(self) -> str:
        import jax

        return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                f"JAX {jax.__version__} on {jax.default_backend()} "
                f"({jax.device_count()} device{'s' * (jax.device_count() > 1)})")


class _BadInput(Exception):
    """Carries a ValueError found while a study built its grid (nothing trained yet)."""


def _run_body(name: str, args: StudyArgs, study: Study, body: Callable[[Study], dict]) -> dict:
    """``body(study)``. A ValueError before training starts is bad input (config.json is
    taken back); any other error is recorded in results.json ("failed"): an environment
    failure is re-raised as it is, a bug as a RuntimeError with the traceback."""
    try:
        return body(study)
    except Exception as err:
        if isinstance(err, ValueError) and not study.trained and not io.is_environment_error(err):
            if not args.resume:
                (study.run_dir / "config.json").unlink(missing_ok=True)
            raise _BadInput() from err
        io.write_failure(study.run_dir, err, {"study": name, "config": args})
        if io.is_environment_error(err):
            raise
        raise RuntimeError(f"study {name} failed: {io.describe_error(err)}") from err


def run_study(name: str, args: StudyArgs, body: Callable[[Study], dict], *,
              command: str | None = None) -> dict:
    """Run ``body`` in a fresh (or resumed) ``<out>/<name>/<run-id>/`` and write
    config.json, results.json and report.md; returns the results."""
    args.validate()
    run_dir = io.run_dir_path(args.out, name, args.run_id)
    if args.resume and not run_dir.is_dir():
        raise ValueError(f"invalid --run-id={args.run_id!r}: cannot resume, {run_dir} does not exist")
    if not args.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ValueError(f"invalid --run-id={args.run_id!r}: {run_dir} already holds a study run; "
                         "add --resume to continue it, or choose another --run-id")
    command = command or "python -m experiments." + name + " " + " ".join(sys.argv[1:])
    # The directories this call creates (run_dir and missing parents), deepest first.
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    try:
        with io.run_dir_lock(run_dir):
            io.write_json(run_dir / "config.json", args)
            study = Study(name, args, run_dir, command.strip())
            results = _run_body(name, args, study, body)
            wall = time.perf_counter() - study.started
            status = "interrupted" if study.interrupted else "completed"
            results = {"study": name, "status": status, **results, "config": args,
                       "run_dir": str(run_dir), "wall_time_s": wall,
                       "environment": io.environment_info()}
            study.report.add("Run", f"`{study.command}` — {status}, {wall:.0f} s wall time on "
                                    f"{study.machine()}.")
            io.write_json(run_dir / "results.json", results)
            io.atomic_write_text(run_dir / "report.md", study.report.render())
    except _BadInput as bad:
        for d in created:  # nothing ran: leave no trace, not even an empty directory
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise bad.__cause__ from None
    return results


def main(name: str, args_type: type, body: Callable[[Study], dict],
         argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Parse ``argv`` into ``args_type`` and run the study; print where it wrote.

    Exit status: 0 completed, 1 interrupted, 2 bad arguments (one line
    ``vgrad: error: ...``, nothing written), 3 an environment failure (disk,
    permissions) after which results.json says "failed".
    """
    try:
        args = tyro.cli(args_type, args=argv, description=description)
        results = run_study(name, args, body)
    except (ValueError, OSError) as err:
        # orbax reports a full disk or a permission error as a ValueError: the
        # environment, not the input (exit 3, results.json says "failed").
        failed = io.is_environment_error(err)
        print(f"vgrad: error: {io.describe_error(err) if failed else err}", file=sys.stderr)
        return io.EXIT_CODES["failed"] if failed else io.EXIT_CODES["bad_input"]
    except KeyboardInterrupt:  # before training started (the sweep handles it during training)
        print(f"vgrad: {name} interrupted before training; nothing was trained", file=sys.stderr)
        return io.EXIT_CODES["interrupted"]
    print(f"{name}: {results['status']} in {results['wall_time_s']:.0f} s; wrote {results['run_dir']}"
          f"/report.md")
    return 0 if results["status"] == "completed" else 1
