"""Shared pieces of the benchmarks: the machine, interleaved timing, tables, results.

Timing on a shared machine: other processes come and go, so a benchmark that
measures A for a minute and then B for a minute compares two different
machines. Every benchmark here therefore *interleaves* what it compares
(A, B, A, B, ... in short repeats of ~``repeat_s`` seconds each), reports the
median rate of each and takes ratios of medians of the same run. The load
average before and after is recorded with the results so a reader can see how
busy the machine was.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_or_none() -> Any:
    """The torch module, or None when the optional ``bench`` extra is absent.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set already) before torch is first
    imported: with libgomp's default spin-waiting, an eager step on a machine
    where another process holds a core waits out a scheduler slice at every
    parallel region (measured here: 0.8-1.6 instead of ~5 steps/s at width 512).
    This favours torch on a busy machine; on an idle one PASSIVE costs a
    multi-threaded step at small widths a wake-up per parallel region (32
    instead of ~120 steps/s at width 128), which is why the throughput benchmark
    also times torch with one thread and credits torch with the better setting.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None
    return torch


def machine_info() -> dict:
    """What the numbers were measured on (goes into every JSON and summary.md)."""
    import jax
    import jaxlib

    devices = jax.devices()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    torch = torch_or_none()
    info["torch"] = torch.__version__ if torch is not None else None
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return info


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_line(info: dict) -> str:
    """One-line description for table captions."""
    torch = f", torch {info['torch']}" if info.get("torch") else ", torch absent"
    load = info.get("load_average")
    load = f", load avg {load[0]:.1f}" if load else ""
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; jax {info['jax']} "
            f"({info['backend']}, {info['devices']}){torch}{load}")


def interleaved_rates(fns: dict[str, Callable[[int], Any]], *, repeats: int, repeat_s: float,
                      warmup: int = 2, units_per_call: dict[str, float] | None = None) -> dict:
    """Rates (calls/s, times ``units_per_call``) of each ``fn(n)``, measured interleaved.

    ``fn(n)`` must run ``n`` calls and block until they are done. Each fn is
    warmed up, then calibrated so one repeat takes about ``repeat_s`` seconds;
    then the repeats of all fns alternate. Returns, per name, the median,
    best and all per-repeat rates, and the calls per repeat.
    """
    units_per_call = units_per_call or {}
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        fn(warmup)
        t0 = time.perf_counter()
        fn(1)
        one = max(time.perf_counter() - t0, 1e-6)
        # Calibrate on a few calls, not one: a single call is noisy.
        probe = max(1, min(50, int(0.2 * repeat_s / one)))
        t0 = time.perf_counter()
        fn(probe)
        per_call = (time.perf_counter() - t0) / probe
        calls[name] = max(1, int(round(repeat_s / per_call)))
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(calls[name])
            dt = time.perf_counter() - t0
            rates[name].append(units_per_call.get(name, 1.0) * calls[name] / dt)
    return {name: {"median": float(np.median(r)), "best": float(np.max(r)),
                   "rates": [float(v) for v in r], "calls_per_repeat": calls[name]}
            for name, r in rates.items()}


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "NOT met"


def results_path(name: str, quick: bool, out_dir: Path | str | None = None,
                 suffix: str = ".json") -> Path:
    """``<out_dir>/<name>.json``, or ``<name>_quick.json`` for a --quick smoke run
    (so a smoke run never overwrites the measurements quoted in the docs)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    return out_dir / f"{name}{'_quick' if quick else ''}{suffix}"


def save(name: str, result: dict, out_dir: Path | str | None = None) -> Path:
    """Atomically write ``result`` to :func:`results_path` (``result["quick"]`` picks the name)."""
    from vgrad.io import write_json

    return write_json(results_path(name, bool(result.get("quick")), out_dir), result)


def cli(run: Any, doc: str, argv: list[str] | None = None) -> None:
    """``python -m benchmarks.NAME [--quick] [--out DIR]`` for a module whose
    ``run(quick, out_dir)`` returns a dict with "markdown"."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a smoke run)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    print(run(args.quick, args.out)["markdown"])
