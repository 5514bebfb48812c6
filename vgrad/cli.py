"""The ``vgrad`` console script: ``vgrad train ...`` and ``vgrad analyze ...``.

Every config field is a flag, e.g.
``vgrad train --model.depth 200 --model.residual True --model.norm batch``
(``vgrad train --help`` lists them all). Parsing is done by tyro from the
config dataclasses themselves, so the CLI never drifts from the Python API;
validation errors name the field, the value and the allowed values.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import tyro

from vgrad.config import DataConfig, ModelConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Train one model (or several seeds of it) and write runs/train/<run-id>/."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    seeds: int = 1
    """Train seeds train.seed .. train.seed+seeds-1 at once (vmapped)."""
    out_dir: str = "runs"
    run_id: str | None = None
    """Name of the run directory (default: a timestamp)."""
    log_every: int = 1
    """Write a train record to metrics.jsonl every this many steps."""
    progress: bool = True
    data_parallel: bool = False
    """Shard the batch (or, when seeds is a multiple of the device count, the seeds) over all
    devices with jax.sharding; multi-host jobs are initialised from the usual environment."""
    resume: bool = False
    """Continue the run out_dir/train/<run_id> from its latest checkpoint; needs --run-id and
    the run's original config (repeat the original command and add --resume True)."""
    checkpoint_every: int | None = 0
    """Checkpoint every this many steps as well as at the end of every epoch and of the run;
    0: only at epoch ends and the end; None: never (an interrupted run still saves one)."""
    keep_checkpoints: int = 3
    """Keep the last this many checkpoints."""

    def __post_init__(self) -> None:
        for name, minimum in (("seeds", 1), ("log_every", 1), ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"invalid {name}={value!r}: must be an integer >= {minimum}")
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ValueError(f"invalid checkpoint_every={every!r}: must be an integer >= 0 "
                             "(0: at epoch ends only) or None (no periodic checkpoints)")
        if not isinstance(self.resume, bool):
            raise ValueError(f"invalid resume={self.resume!r}: must be True or False")
        if self.resume and not self.run_id:
            raise ValueError("invalid resume=True without run_id: --resume continues an existing run, "
                             "name it with --run-id (its directory is <out-dir>/train/<run-id>)")


_RUN_FILES = ("metrics.jsonl", "results.json", "checkpoints")


def _load_dataset(cfg: DataConfig):
    from vgrad import data as vdata

    try:
        return vdata.load_config(cfg)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        # A missing file is a bad input like any other: one clear line, no traceback.
        raise ValueError(f"cannot load dataset {cfg.name!r} (data.path={cfg.path!r}): {err}") from err


def run_train(args: TrainArgs) -> dict:
    """Run ``vgrad train``: load data, fit, write config/metrics/results; return results.

    results.json: status ("completed", "diverged" or "interrupted"), message,
    final metrics, the config, seeds, the environment (package versions, JAX
    backend and devices), wall time, and checkpoint/resume information. Every
    file is written atomically. Bad input raises ValueError before the run
    directory is touched.
    """
    from vgrad import io
    from vgrad.models import build
    from vgrad.train import check_run, fit

    dataset = _load_dataset(args.data)
    if dataset.num_classes != args.model.num_classes:
        raise ValueError(f"invalid model.num_classes={args.model.num_classes}: dataset "
                         f"{dataset.name!r} has {dataset.num_classes} classes")
    model = build(args.model)
    check_run(model, args.train, dataset, seeds=args.seeds)
    mesh = None
    if args.data_parallel:
        from vgrad import parallel

        parallel.maybe_initialize_distributed()
        mesh = parallel.data_mesh()
        parallel.check_batch_divisible(mesh, args.train.batch_size, args.seeds)

    run_dir = Path(args.out_dir) / "train" / args.run_id if args.run_id else None
    if args.resume:
        if not run_dir.is_dir():
            raise ValueError(f"invalid run_id={args.run_id!r}: cannot resume, {run_dir} does not exist")
    elif run_dir is not None and any((run_dir / f).exists() for f in _RUN_FILES):
        raise ValueError(f"invalid run_id={args.run_id!r}: {run_dir} already holds a run; add "
                         "--resume True to continue it, or choose another --run-id")
    run_dir = io.new_run_dir(args.out_dir, "train", args.run_id)
    if not (args.resume and (run_dir / "config.json").exists()):
        io.write_json(run_dir / "config.json", args)  # a resumed run keeps its original config.json
    start = time.perf_counter()
    result = fit(model, args.train, dataset, run_dir=run_dir, seeds=args.seeds,
                 progress=args.progress, log_every=args.log_every, mesh=mesh,
                 checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                 resume=args.resume, run_config={"data": args.data})
    results = {"status": result.status, "message": result.message, "final": result.final,
               "config": args, "seed": args.train.seed,
               "seeds": [args.train.seed + i for i in range(args.seeds)],
               "resumed_from_step": result.resumed_from, "checkpoint_steps": result.checkpoint_steps,
               "wall_time_s": time.perf_counter() - start, "run_dir": str(run_dir),
               "environment": io.environment_info()}
    io.write_json(run_dir / "results.json", results)
    final = result.final
    if result.status == "interrupted":
        print(f"interrupted at step {final['step']}: {result.message}\nwrote {run_dir}")
    else:
        print(f"{result.status}: {final['step']} steps in {results['wall_time_s']:.1f}s | "
              f"test accuracy {final['test_accuracy']} | test loss {final['test_loss']} | "
              f"train accuracy {final['train_accuracy']}\nwrote {run_dir}")
    return results


def main(argv: list[str] | None = None) -> int:
    from vgrad.analysis.command import AnalyzeArgs, analyze

    commands = {"train": (TrainArgs, run_train), "analyze": (AnalyzeArgs, analyze)}
    try:
        args = tyro.extras.subcommand_cli_from_dict(
            {name: cls for name, (cls, _) in commands.items()}, args=argv,
            config=(tyro.conf.FlagConversionOff,))
        runner = next(run for cls, run in commands.values() if isinstance(args, cls))
        result = runner(args)
    except (ValueError, OSError) as err:  # bad config values, missing/unusable data: one clear line
        print(f"vgrad: error: {err}", file=sys.stderr)
        return 2
    return 1 if isinstance(result, dict) and result.get("status") not in (None, "completed") else 0


if __name__ == "__main__":
    sys.exit(main())
