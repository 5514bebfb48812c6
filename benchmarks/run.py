"""Run every benchmark, print their tables, write results/<name>.json and results/summary.md.

(--quick writes <name>_quick.json and summary_quick.md, leaving the measurements alone.)

    python -m benchmarks.run            # the measurements quoted in the docs (~10 min on 2 cores)
    python -m benchmarks.run --quick    # smoke run at reduced sizes (< 1 min); the test suite runs it
    python -m benchmarks.run --only throughput seeds

Benchmarks: ``throughput`` (vgrad vs PyTorch eager, GFLOP/s vs matmul peak),
``seeds`` (vmapped vs sequential seeds), ``compile_time`` (scanned vs unrolled
blocks), and ``analysis`` (matrix-free analysis vs the dense route) when
``benchmarks/analysis.py`` exists. A benchmark module takes part by defining
``run(quick: bool = False, out_dir=None) -> dict`` that returns at least
``{"name": ..., "markdown": ...}`` and writes its own JSON; a module without
``run`` is run as ``python -m benchmarks.<name> [--quick] [--out JSON]`` and its
stdout is quoted (it writes its own JSON). PyTorch is optional (``pip install -e ".[bench]"``); without it the
torch columns are empty.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks import common

BENCHMARKS = ("throughput", "seeds", "sweep", "compile_time", "analysis")


def available(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def run_one(name: str, quick: bool, out_dir: Path) -> dict:
    module = importlib.import_module(f"benchmarks.{name}")
    if hasattr(module, "run"):
        result = module.run(quick=quick, out_dir=out_dir)
        if not isinstance(result, dict) or "markdown" not in result:
            raise TypeError(f"benchmarks.{name}.run must return a dict with a 'markdown' entry")
        return result
    # A command-line-only benchmark writes its own JSON; --out (a JSON path) is
    # passed only when the results go somewhere other than the default.
    cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if quick else [])
    if out_dir != common.RESULTS_DIR:
        cmd += ["--out", str(common.results_path(name, quick, out_dir))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return {"name": name, "quick": quick, "markdown": proc.stdout.strip()}


def summary_markdown(info: dict, sections: list[str], quick: bool, started: str,
                     elapsed_s: float) -> str:
    rows = [[k, v] for k, v in info.items()]
    return "\n".join([
        "# vgrad benchmarks",
        "",
        f"`python -m benchmarks.run{' --quick' if quick else ''}` — {started}, "
        f"{elapsed_s / 60:.1f} min."
        + (" **Quick smoke run at reduced sizes: these numbers are not the measurements.**"
           if quick else ""),
        "",
        "Machine: " + common.machine_line(info),
        "",
        common.markdown_table(["", "value"], rows),
        "",
        *[s + "\n" for s in sections],
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, < 1 minute")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out) if args.out else common.RESULTS_DIR
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    info = common.machine_info()
    sections, failed = [], []
    for name in args.only or BENCHMARKS:
        if not available(name):
            note = f"### {name}\n\nskipped: benchmarks/{name}.py is not there yet."
            print(note + "\n", flush=True)
            sections.append(note)
            continue
        t1 = time.perf_counter()
        try:
            result = run_one(name, args.quick, out_dir)
        except Exception:  # one broken benchmark must not hide the others' numbers
            failed.append(name)
            note = f"### {name}\n\nFAILED:\n\n```\n{traceback.format_exc()[-3000:]}\n```"
            print(note + "\n", file=sys.stderr, flush=True)
            sections.append(note)
            continue
        section = result["markdown"] + f"\n\n({name}: {time.perf_counter() - t1:.0f} s)"
        print(section + "\n", flush=True)
        sections.append(section)
    info["load_average_end"] = common.machine_info()["load_average"]
    from vgrad.io import atomic_write_text

    summary = summary_markdown(info, sections, args.quick, started, time.perf_counter() - t0)
    path = atomic_write_text(common.results_path("summary", args.quick, out_dir, ".md"), summary)
    print(f"wrote {path} and the JSON beside it ({(time.perf_counter() - t0) / 60:.1f} min)")
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
