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


def run_train(args: TrainArgs) -> dict:
    """Run ``vgrad train``: load data, fit, write config/metrics/results; return results."""
    from vgrad import data as vdata
    from vgrad import io
    from vgrad.models import build
    from vgrad.train import fit

    dataset = vdata.load_config(args.data)
    if dataset.num_classes != args.model.num_classes:
        raise ValueError(f"invalid model.num_classes={args.model.num_classes}: dataset "
                         f"{dataset.name!r} has {dataset.num_classes} classes")
    run_dir = io.new_run_dir(args.out_dir, "train", args.run_id)
    io.write_json(run_dir / "config.json", args)
    start = time.perf_counter()
    result = fit(build(args.model), args.train, dataset, run_dir=run_dir, seeds=args.seeds,
                 progress=args.progress, log_every=args.log_every)
    results = {"status": result.status, "final": result.final, "config": args,
               "seeds": [args.train.seed + i for i in range(args.seeds)],
               "wall_time_s": time.perf_counter() - start, "run_dir": str(run_dir)}
    io.write_json(run_dir / "results.json", results)
    final = result.final
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
    except ValueError as err:  # bad config values, unusable data: one clear line
        print(f"vgrad: error: {err}", file=sys.stderr)
        return 2
    return 1 if isinstance(result, dict) and result.get("status") not in (None, "completed") else 0


if __name__ == "__main__":
    sys.exit(main())
