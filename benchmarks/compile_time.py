"""Compile time against depth: vgrad's scanned blocks vs a Python-unrolled loop.

For each depth L the benchmark times, on the same BN + ReLU MLP (width 64,
batch 32) and the same train step (``vgrad.train.train_step_fn``):

* init: ``jax.jit(create_state)`` traced, compiled and run (parameters of all
  L blocks are created: inside one scan for the scanned model, by L block
  inits in a Python loop for the unrolled one);
* trace + lower: ``jax.jit(step).lower(state, batch)`` (Python tracing, grows
  with the number of traced blocks);
* compile: ``.compile()`` of the lowered step (XLA, grows with program size).

"scanned" is ``vgrad.models.build(cfg)`` (blocks under ``nn.scan``: one block
in the program whatever L is); "unrolled" is ``benchmarks.unrolled.UnrolledModel``
(``for l in range(L)``: L blocks in the program). The unrolled model is only
measured up to ``--unrolled-max-depth`` (default 100; --quick 30) because its
compile time grows quickly; deeper entries are left empty and said so.

    python -m benchmarks.compile_time [--quick] [--unrolled-max-depth N]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.unrolled import UnrolledModel
from vgrad.config import ModelConfig, TrainConfig
from vgrad.models import build
from vgrad.train import create_state, train_step_fn

WIDTH, BATCH, IN_DIM = 64, 32, 40


def measure(model: Any, train_cfg: TrainConfig, x: jax.Array, y: jax.Array) -> dict:
    """Seconds for init (trace+compile+run), step trace+lower, step compile."""
    jax.clear_caches()  # nothing carried over from the previous depth
    t0 = time.perf_counter()
    state = jax.jit(lambda key: create_state(model, train_cfg, key, x))(jax.random.key(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    step = jax.jit(train_step_fn(model, train_cfg), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, {"x": x, "y": y})
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # Run it once: a compiled program that does not run would be a poor benchmark.
    jax.block_until_ready(compiled(state, {"x": x, "y": y}))
    return {"init_s": init_s, "lower_s": lower_s, "compile_s": compile_s,
            "step_compile_total_s": lower_s + compile_s}


def same_function(depth: int, train_cfg: TrainConfig, x: jax.Array, y: jax.Array) -> float:
    """|first-step loss, scanned - unrolled| from the same (scanned-init) state."""
    cfg = ModelConfig(depth=depth, width=WIDTH, norm="batch", activation="relu")
    state = create_state(build(cfg), train_cfg, jax.random.key(0), x)
    losses = [float(jax.jit(train_step_fn(m, train_cfg))(state, {"x": x, "y": y})[1]["loss"])
              for m in (build(cfg), UnrolledModel(cfg))]
    return abs(losses[0] - losses[1])


def run(quick: bool = False, out_dir: Any = None, unrolled_max_depth: int | None = None) -> dict:
    info = common.machine_info()
    # Persistent compilation caches would time cache hits, not XLA.
    jax.config.update("jax_enable_compilation_cache", False)
    # --quick is a smoke run (keeps this file from rotting), not a measurement.
    depths = [2, 20] if quick else [10, 100, 1000]
    if unrolled_max_depth is None:
        unrolled_max_depth = 2 if quick else 100
    extra = [] if quick else [30]
    unrolled_depths = sorted({d for d in depths + extra if d <= unrolled_max_depth})
    repeats = 1 if quick else 3
    train_cfg = TrainConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9, batch_size=BATCH)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, IN_DIM)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, BATCH).astype(np.int32))

    rows: dict[str, dict[int, dict]] = {"scanned": {}, "unrolled": {}}
    for kind, kind_depths in (("scanned", depths), ("unrolled", unrolled_depths)):
        for depth in kind_depths:
            cfg = ModelConfig(depth=depth, width=WIDTH, norm="batch", activation="relu")
            model = build(cfg) if kind == "scanned" else UnrolledModel(cfg)
            # Deep unrolled programs take minutes each: one run is enough there.
            n = repeats if kind == "scanned" or depth <= 30 else 1
            runs = [measure(model, train_cfg, x, y) for _ in range(n)]
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            med["repeats"] = repeats
            rows[kind][depth] = med

    # The unrolled model computes the same function (same state in, same loss out).
    same = {depths[0]: same_function(depths[0], train_cfg, x, y)}
    scanned = rows["scanned"]
    shallow, deep = depths[0], depths[-1]
    ratio = scanned[deep]["step_compile_total_s"] / scanned[shallow]["step_compile_total_s"]
    init_ratio = scanned[deep]["init_s"] / scanned[shallow]["init_s"]
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "name": "compile_time", "quick": quick, "machine": info,
        "config": {"width": WIDTH, "batch": BATCH, "in_dim": IN_DIM, "norm": "batch",
                   "activation": "relu", "unrolled_max_depth": unrolled_max_depth},
        "results": {k: {str(d): v for d, v in r.items()} for k, r in rows.items()},
        "depths": depths,
        "scanned_compile_ratio_deep_vs_shallow": ratio,
        "scanned_init_ratio_deep_vs_shallow": init_ratio,
        "first_loss_abs_diff_scanned_vs_unrolled": {str(d): v for d, v in same.items()},
    }
    result["markdown"] = markdown(result)
    common.save("compile_time", result, out_dir)
    return result


def markdown(r: dict) -> str:
    res = r["results"]
    depths = r["depths"]
    all_depths = sorted({int(d) for k in res for d in res[k]})
    rows = []
    for d in all_depths:
        s, u = res["scanned"].get(str(d)), res["unrolled"].get(str(d))
        rows.append([d,
                     s and s["init_s"], s and s["lower_s"], s and s["compile_s"],
                     u and u["init_s"], u and u["lower_s"], u and u["compile_s"],
                     (u["step_compile_total_s"] / s["step_compile_total_s"]) if (u and s) else None])
    table = common.markdown_table(
        ["depth", "scanned init s", "scanned trace+lower s", "scanned compile s",
         "unrolled init s", "unrolled trace+lower s", "unrolled compile s",
         "unrolled / scanned (trace+lower+compile)"], rows)
    cap = r["config"]["unrolled_max_depth"]
    diffs = r["first_loss_abs_diff_scanned_vs_unrolled"]
    return "\n".join([
        f"### Compile time vs depth (BN + ReLU MLP, width {r['config']['width']}, "
        f"batch {r['config']['batch']}, train step)",
        "",
        table,
        "",
        f"Unrolled measured up to depth {cap} ('-': not measured, it grows too fast for this "
        f"benchmark's time budget). From the same state, scanned and unrolled first-step losses "
        f"agree to {max(diffs.values()):.1e} (depth {', '.join(diffs)}). Median of {res['scanned'][str(depths[0])]['repeats']} runs "
        "(1 for unrolled depth > 30), JAX caches cleared before each.",
        "",
        f"- scanned compile (trace+lower+compile) at depth {depths[-1]} <= 2x depth {depths[0]}: "
        f"{r['scanned_compile_ratio_deep_vs_shallow']:.2f}x -> "
        + (common.verdict(r['scanned_compile_ratio_deep_vs_shallow'], 2.0, higher_is_better=False)
           if not r["quick"] else "quick smoke run, not the target sizes")
        + f" (init: {r['scanned_init_ratio_deep_vs_shallow']:.2f}x)",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--unrolled-max-depth", type=int, default=None)
    args = parser.parse_args(argv)
    print(run(args.quick, args.out, args.unrolled_max_depth)["markdown"])


if __name__ == "__main__":
    main()
