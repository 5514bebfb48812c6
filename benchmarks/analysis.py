"""Speed of ``vgrad.analysis.jacobian_products`` against the naive dense route.

    python -m benchmarks.analysis            # depth 100, width 256, batch 64 (minutes)
    python -m benchmarks.analysis --quick    # tiny, seconds

What is compared (one plain relu/he_normal MLP, no BatchNorm, float32):

* matrix-free: ``jacobian_products`` with k = 8 probes: every ||J_l||_F^2/n and
  ||P_l||_F^2/n from one backward VJP pass (an unbiased estimate).
* naive, whole batch: for l = L..1 form the dense n x n Jacobian J_l of the
  whole-batch map (n = batch * width) with ``jax.jacfwd`` and update
  P_{l-1} = P_l J_l (exact values). At the full size n = 16384, so J_l is
  1 GiB and each update an n^3 matrix product: this route is *measured on
  ``--naive-layers`` blocks* (default 1) and *extrapolated linearly in L*
  (every block costs the same). The table marks it as extrapolated.
* naive, per example: without BatchNorm the batch Jacobian is block diagonal,
  so the same products can be formed per example (B dense width x width
  Jacobians per block, batched matrix products). This is the best case for the
  dense route; it is measured in full over all L blocks.

Then ``jacobian_products`` is timed at depths 10, 100, 1000 to show its cost
growing linearly in depth. The matrix-free and per-example routes are timed
as medians of interleaved repeats (``benchmarks.common.interleaved_rates``) of
the compiled functions, synchronised with ``jax.block_until_ready``; the
whole-batch route is timed once. Compile times are measured separately by
ahead-of-time lowering and compilation (after ``jax.clear_caches()``).
Results: a markdown table on stdout and ``benchmarks/results/analysis.json``
(``analysis_quick.json`` with --quick, a smoke run that measures nothing).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import vgrad.models
from benchmarks import common
from vgrad.analysis import jacobians
from vgrad.config import ModelConfig


def _settings(quick: bool) -> dict:
    if quick:  # smoke sizes: keeps the code path alive, measures nothing
        return dict(depth=6, width=16, batch=4, num_probes=8, naive_layers=6,
                    depths=(6, 48), repeats=2, repeat_s=0.1)
    return dict(depth=100, width=256, batch=64, num_probes=8, naive_layers=1,
                depths=(10, 100, 1000), repeats=5, repeat_s=1.0)


def _model(depth: int, width: int, batch: int, seed: int = 0):
    cfg = ModelConfig(depth=depth, width=width, num_classes=10, activation="relu",
                      init="he_normal")
    model = vgrad.models.build(cfg)
    x = jax.random.normal(jax.random.key(seed), (batch, width))
    variables = jax.jit(model.init)(jax.random.key(seed + 1), x)
    return model, jax.block_until_ready(variables), x


def _compile(jitted, *args):
    jax.clear_caches()  # so that a repeated configuration is really compiled again
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def _calls(fn, *args):
    """fn(n) runs the compiled ``fn(*args)`` n times and blocks (for interleaved_rates)."""
    def run(n: int):
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
    return run


def matrix_free_fn(model, variables, x, num_probes: int):
    """The compiled ``jacobian_products`` computation and its compile time."""
    fn = jacobians._products_fn(jacobians._cache_key(jacobians._canonical_model(model)), True,
                                num_probes, True)
    key = jax.random.key(0)
    compiled, compile_s = _compile(fn, variables, x, key)
    return _calls(compiled, variables, x, key), compile_s


def per_example_fn(model, variables, x):
    """Block-diagonal dense route (valid without BatchNorm), all blocks: exact
    per-example P_l = J_L ... J_{l+1} for every l, and their mean squared singular values."""
    L = model.depth

    @jax.jit
    def run(variables, x):
        hs = model.hidden_states(variables, x, train=True)  # (L+1, B, W)

        def per_example_jac(l, h_b):  # h_b (W,) -> (W, W)
            f = lambda h: model.block_fn(variables, l, train=True)(h[None])[0]
            return jax.jacfwd(f)(h_b)

        def step(P, l):  # P (B, W, W) = per-example P_l
            J = jax.vmap(lambda h: per_example_jac(l, h))(hs[l - 1])
            P_new = jnp.einsum("bij,bjk->bik", P, J)
            return P_new, jnp.sum(P_new**2) / P_new.shape[0] / P_new.shape[1]

        B, W = hs.shape[1], hs.shape[2]
        P0 = jnp.broadcast_to(jnp.eye(W, dtype=hs.dtype), (B, W, W))
        _, sq = jax.lax.scan(step, P0, jnp.arange(L, 0, -1))
        return sq

    compiled, compile_s = _compile(run, variables, x)
    return _calls(compiled, variables, x), compile_s


def bench_naive_full(model, variables, x, layers: int) -> dict:
    """Whole-batch dense route, measured (once) on the top ``layers`` blocks."""
    hs = jax.jit(lambda v, x: model.hidden_states(v, x, train=True))(variables, x)
    n = hs[0].size

    @jax.jit
    def step(P, h_prev, l):
        J = jax.jacfwd(model.block_fn(variables, l, train=True))(h_prev).reshape(n, n)
        P_new = P @ J  # P_{l-1} = P_l J_l
        return P_new, jnp.sum(P_new**2) / n

    L = model.depth
    P = jnp.eye(n, dtype=jnp.float32)
    compiled, compile_s = _compile(step, P, hs[L - 1], jnp.asarray(L))
    jax.block_until_ready(P)
    t = time.perf_counter()
    for l in range(L, L - layers, -1):
        P, sq = compiled(P, hs[l - 1], jnp.asarray(l))
        jax.block_until_ready(sq)
    measured_s = time.perf_counter() - t
    del P
    return {"n": n, "layers_measured": layers, "measured_s": measured_s, "compile_s": compile_s,
            "per_layer_s": measured_s / layers, "extrapolated_s": measured_s / layers * L,
            "extrapolated": layers < L}


def _fmt_s(seconds: float) -> str:
    if seconds < 0:
        return "-" + _fmt_s(-seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def run(quick: bool = False, out_dir: Any = None, naive_layers: int | None = None) -> dict:
    s = _settings(quick)
    if naive_layers is not None:
        s["naive_layers"] = max(1, min(int(naive_layers), s["depth"]))
    info = common.machine_info()
    L, W, B, k = s["depth"], s["width"], s["batch"], s["num_probes"]

    model, variables, x = _model(L, W, B)
    free_fn, free_compile = matrix_free_fn(model, variables, x, k)
    per_ex_fn, per_ex_compile = per_example_fn(model, variables, x)
    rates = common.interleaved_rates({"matrix_free": free_fn, "per_example": per_ex_fn},
                                     repeats=s["repeats"], repeat_s=s["repeat_s"])
    free = {"run_s": 1 / rates["matrix_free"]["median"], "compile_s": free_compile,
            "rates_per_s": rates["matrix_free"]}
    per_ex = {"run_s": 1 / rates["per_example"]["median"], "compile_s": per_ex_compile,
              "rates_per_s": rates["per_example"]}
    full = bench_naive_full(model, variables, x, s["naive_layers"])
    del model, variables

    scaling = []
    for depth in s["depths"]:
        if depth == L:  # the configuration measured above
            scaling.append({"depth": depth, "run_s": free["run_s"],
                            "compile_s": free["compile_s"]})
            continue
        model, variables, x = _model(depth, W, B)
        fn, compile_s = matrix_free_fn(model, variables, x, k)
        r = common.interleaved_rates({"matrix_free": fn}, repeats=s["repeats"],
                                     repeat_s=s["repeat_s"])
        scaling.append({"depth": depth, "run_s": 1 / r["matrix_free"]["median"],
                        "compile_s": compile_s})
        del model, variables
    depths = np.array([r["depth"] for r in scaling], np.float64)
    times = np.array([r["run_s"] for r in scaling])
    per_block, fixed = np.polyfit(depths, times, 1)

    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "name": "analysis", "quick": quick, "machine": info, "settings": s,
        "matrix_free": free, "naive_per_example": per_ex, "naive_whole_batch": full,
        "speedup_vs_per_example": per_ex["run_s"] / free["run_s"],
        "speedup_vs_whole_batch": full["extrapolated_s"] / free["run_s"],
        "depth_scaling": scaling,
        "depth_fit": {"fixed_s": float(fixed), "per_block_s": float(per_block)},
    }
    result["markdown"] = markdown(result)
    common.save("analysis", result, out_dir)
    return result


def markdown(r: dict) -> str:
    s, free, per_ex, full = r["settings"], r["matrix_free"], r["naive_per_example"], \
        r["naive_whole_batch"]
    L, W, B, k = s["depth"], s["width"], s["batch"], s["num_probes"]
    full_how = (f"measured on {full['layers_measured']} of {L} blocks "
                f"({_fmt_s(full['measured_s'])}), x{L / full['layers_measured']:g} extrapolated"
                if full["extrapolated"] else "measured, all blocks")
    lines = [
        f"### Analysis: `jacobian_products` vs dense Jacobian products (relu MLP, depth {L}, "
        f"width {W}, batch {B}, n = numel(h) = {full['n']}, no BatchNorm)",
        "",
        "| method (every ‖J_l‖²/n and ‖P_l‖²/n, l = 0..L) | time | compile "
        "| matrix-free speedup | how |",
        "|---|---|---|---|---|",
        f"| matrix-free `jacobian_products`, k = {k} probes (estimate) | "
        f"{_fmt_s(free['run_s'])} | {_fmt_s(free['compile_s'])} | 1x | measured, all blocks |",
        f"| dense per-example Jacobians (exact; valid only without BatchNorm) | "
        f"{_fmt_s(per_ex['run_s'])} | {_fmt_s(per_ex['compile_s'])} | "
        f"{r['speedup_vs_per_example']:.1f}x | measured, all blocks |",
        f"| dense whole-batch Jacobians, n x n (exact) | {_fmt_s(full['extrapolated_s'])} | "
        f"{_fmt_s(full['compile_s'])} | {r['speedup_vs_whole_batch']:.0f}x | {full_how} |",
        "",
        "| depth | `jacobian_products` time | per block | compile |",
        "|---|---|---|---|",
    ]
    for row in r["depth_scaling"]:
        lines.append(f"| {row['depth']} | {_fmt_s(row['run_s'])} | "
                     f"{_fmt_s(row['run_s'] / row['depth'])} | {_fmt_s(row['compile_s'])} |")
    fit = r["depth_fit"]
    lines += [
        "",
        f"Least-squares fit: time = {_fmt_s(fit['fixed_s'])} + {_fmt_s(fit['per_block_s'])} "
        f"x depth. Matrix-free and per-example times are medians of interleaved repeats, "
        f"compile excluded; {common.machine_line(r['machine'])}."
        + (" Quick smoke run: not the measurement." if r["quick"] else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--naive-layers", type=int, default=None,
                        help="blocks on which the whole-batch dense route is measured "
                             "(default: 1 at full size, all with --quick)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    print(run(args.quick, args.out, args.naive_layers)["markdown"])


if __name__ == "__main__":
    main()
