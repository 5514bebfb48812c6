"""Seed-parallel training: N vmapped seeds in one compiled step against N
sequential single-seed runs, same total examples.

Model: depth-10, width-64 ReLU MLP (He init, no normalisation), SGD momentum,
batch 128 per seed, 40 input features, 10 classes. The vmapped side is
``jax.jit(jax.vmap(vgrad.train.train_step_fn(...)), donate_argnums=0)`` on a
seed-stacked state, each seed with its own batch (its own data order), i.e.
what ``fit(seeds=N)`` runs; the sequential side is ``make_train_step`` (one
compilation, shared) called for seed 0's steps, then seed 1's, and so on.
Throughput is in seed-steps per second (one seed taking one optimiser step),
median of interleaved repeats, compile excluded and reported separately.

    python -m benchmarks.seeds [--quick]
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from vgrad.config import ModelConfig, TrainConfig
from vgrad.models import build
from vgrad.train import create_state, make_train_step, seed_keys, train_step_fn

IN_DIM, NUM_CLASSES, NUM_BATCHES = 40, 10, 4


def run(quick: bool = False, out_dir: Any = None, seeds: int = 16, depth: int = 10,
        width: int = 64, batch: int = 128) -> dict:
    if quick:  # smoke sizes: keeps the code path alive, measures nothing
        seeds, depth, width, batch = 4, 2, 16, 16
    info = common.machine_info()
    model_cfg = ModelConfig(depth=depth, width=width, num_classes=NUM_CLASSES, activation="relu",
                            init="he_normal")
    train_cfg = TrainConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9, batch_size=batch)
    model = build(model_cfg)
    rng = np.random.default_rng(0)
    # Per seed, its own batches: (NUM_BATCHES, N, B, D).
    x = jnp.asarray(rng.standard_normal((NUM_BATCHES, seeds, batch, IN_DIM)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, (NUM_BATCHES, seeds, batch)).astype(np.int32))
    stacked_batches = [{"x": x[i], "y": y[i]} for i in range(NUM_BATCHES)]
    seed_batches = [[{"x": x[i, s], "y": y[i, s]} for i in range(NUM_BATCHES)] for s in range(seeds)]

    step_fn = train_step_fn(model, train_cfg)
    init = lambda key: create_state(model, train_cfg, key, x[0, 0])

    vinit = jax.jit(jax.vmap(init))
    t0 = time.perf_counter()
    stacked = jax.block_until_ready(vinit(seed_keys(train_cfg, seeds)))
    init_vmapped_s = time.perf_counter() - t0  # includes compiling the init
    t0 = time.perf_counter()
    # Run the AOT-compiled executables below: a later jit call would compile again.
    vstep = jax.jit(jax.vmap(step_fn), donate_argnums=0).lower(stacked, stacked_batches[0]).compile()
    compile_vmapped_s = time.perf_counter() - t0

    init_one = jax.jit(init)  # one compilation, reused by every seed
    t0 = time.perf_counter()
    singles = jax.block_until_ready([init_one(jax.random.key(train_cfg.seed + s))
                                     for s in range(seeds)])
    init_sequential_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step = make_train_step(model, train_cfg).lower(singles[0], seed_batches[0][0]).compile()
    compile_single_s = time.perf_counter() - t0

    # The vmapped step computes what the single steps compute (seed 0, first step).
    _, vm = vstep(vinit(seed_keys(train_cfg, seeds)), stacked_batches[0])
    _, sm = step(init_one(jax.random.key(train_cfg.seed)), seed_batches[0][0])
    loss_diff = float(abs(float(vm["loss"][0]) - float(sm["loss"])))

    holder = {"stacked": stacked, "singles": singles}

    def vmapped(k: int) -> None:
        s = holder["stacked"]
        for i in range(k):
            s, _ = vstep(s, stacked_batches[i % NUM_BATCHES])
        holder["stacked"] = jax.block_until_ready(s)

    def sequential(k: int) -> None:
        # k steps of every seed, one seed after the other: N x k seed-steps.
        for seed in range(seeds):
            s = holder["singles"][seed]
            for i in range(k):
                s, _ = step(s, seed_batches[seed][i % NUM_BATCHES])
            holder["singles"][seed] = jax.block_until_ready(s)

    repeats, repeat_s = (2, 0.1) if quick else (11, 1.0)
    rates = common.interleaved_rates({"vmapped": vmapped, "sequential": sequential},
                                     repeats=repeats, repeat_s=repeat_s,
                                     units_per_call={"vmapped": seeds, "sequential": seeds})
    speedup = rates["vmapped"]["median"] / rates["sequential"]["median"]
    runs = end_to_end_runs(model, train_cfg, seeds, steps=4 if quick else 60, batch=batch)
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "name": "seeds", "quick": quick, "machine": info,
        "config": {"seeds": seeds, "depth": depth, "width": width, "batch": batch,
                   "in_dim": IN_DIM, "norm": "none", "activation": "relu"},
        "rates": rates,
        "vmapped_seed_steps_per_s": rates["vmapped"]["median"],
        "sequential_seed_steps_per_s": rates["sequential"]["median"],
        "speedup": speedup,
        "compile_vmapped_s": compile_vmapped_s, "compile_single_s": compile_single_s,
        "init_vmapped_s": init_vmapped_s, "init_sequential_s": init_sequential_s,
        "seed0_step0_loss_abs_diff": loss_diff,
        "end_to_end": runs,
    }
    result["markdown"] = markdown(result)
    common.save("seeds", result, out_dir)
    return result


def end_to_end_runs(model: Any, train_cfg: TrainConfig, seeds: int, *, steps: int,
                    batch: int) -> dict:
    """Whole runs as a researcher launches them: ``fit(seeds=N)`` once against
    ``fit()`` N times (data order, per-step host metrics, evaluation, results),
    each after one warm-up run so that compilation (cached by fit) is excluded."""
    from vgrad import data
    from vgrad.loop import fit

    ds = data.load("synthetic", dim=IN_DIM, num_classes=NUM_CLASSES, num_train=batch * 8,
                   num_test=batch)
    cfg = dataclasses.replace(train_cfg, steps=steps)

    def timed(fn) -> float:
        fn()  # warm-up: compiles (fit caches its jitted functions per config)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    vmapped_s = timed(lambda: fit(model, cfg, ds, seeds=seeds, progress=False))
    sequential_s = timed(lambda: [fit(model, dataclasses.replace(cfg, seed=s), ds, progress=False)
                                  for s in range(seeds)])
    return {"steps": steps, "vmapped_s": vmapped_s, "sequential_s": sequential_s,
            "speedup": sequential_s / vmapped_s}


def markdown(r: dict) -> str:
    c = r["config"]
    table = common.markdown_table(
        ["", "seed-steps/s", "examples/s", "compile s", "init s (all seeds)"],
        [[f"{c['seeds']} seeds vmapped (one step)", r["vmapped_seed_steps_per_s"],
          r["vmapped_seed_steps_per_s"] * c["batch"], r["compile_vmapped_s"], r["init_vmapped_s"]],
         [f"{c['seeds']} sequential runs", r["sequential_seed_steps_per_s"],
          r["sequential_seed_steps_per_s"] * c["batch"], r["compile_single_s"],
          r["init_sequential_s"]],
         ["ratio vmapped / sequential", r["speedup"], r["speedup"], None, None]])
    e = r["end_to_end"]
    runs_table = common.markdown_table(
        ["whole runs (fit, compile excluded)", "wall s", "ratio"],
        [[f"fit(seeds={c['seeds']}), {e['steps']} steps", e["vmapped_s"], e["speedup"]],
         [f"{c['seeds']} x fit(), {e['steps']} steps each", e["sequential_s"], 1.0]])
    return "\n".join([
        f"### Seeds: {c['seeds']} vmapped seeds vs {c['seeds']} sequential runs "
        f"(depth {c['depth']}, width {c['width']}, batch {c['batch']} per seed, ReLU MLP, SGD momentum)",
        "",
        table,
        "",
        f"Medians of {len(r['rates']['vmapped']['rates'])} interleaved repeats, compile excluded. "
        f"Seed 0's loss in the vmapped step equals the single run's to {r['seed0_step0_loss_abs_diff']:.1e}.",
        "",
        runs_table,
        "",
        f"- {c['seeds']} vmapped seeds >= 8x {c['seeds']} sequential runs: {r['speedup']:.1f}x -> "
        + ("quick smoke run, not the target sizes" if r["quick"] else common.verdict(r["speedup"], 8.0)),
        f"- whole runs, fit(seeds={c['seeds']}) vs {c['seeds']} x fit(): {e['speedup']:.1f}x -> "
        + ("quick smoke run, not the target sizes" if r["quick"] else common.verdict(e["speedup"], 8.0)),
    ])


def main(argv: list[str] | None = None) -> None:
    common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
