"""Training throughput: vgrad's jitted train step against PyTorch eager, and
achieved GFLOP/s against the measured matmul peak, in one run.

The network is the same on both sides: stem Linear(W->W) -> BatchNorm -> ReLU,
L blocks Linear(W->W) -> BatchNorm -> ReLU, head Linear(W->10); He-normal
(truncated) kernels, zero biases, BatchNorm eps 1e-5 / momentum 0.9 (PyTorch
momentum 0.1), SGD with momentum 0.9 at lr 0.05, softmax cross-entropy. The
PyTorch model is built *from the JAX initial parameters*, and the benchmark
checks both compute the same loss before and after one step, so the two
columns time the same computation.

The JAX side is vgrad's own ``make_train_step`` (the code path ``fit`` uses),
on batches already on the device; the PyTorch side is the usual eager loop
(zero_grad, forward, backward, step) with ``torch.set_num_threads`` equal to
the threads XLA's CPU client uses (one per core). Steps/s are medians of
interleaved repeats after warm-up (see ``benchmarks.common``).

FLOPs: forward + backward of the dense layers, 6 * B * fan_in * fan_out per
layer (the BatchNorm / ReLU / optimizer elementwise work is not counted).

    python -m benchmarks.throughput [--quick]
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from vgrad.config import ModelConfig, TrainConfig
from vgrad.models import build
from vgrad.train import create_state, make_train_step

NUM_CLASSES = 10
NUM_BATCHES = 8  # distinct batches cycled through, all on device beforehand

CASES = [  # (name, depth, width, batch)
    ("d20-w128-b128", 20, 128, 128),
    ("d20-w512-b256", 20, 512, 256),
]
QUICK_CASES = [("d2-w32-b32", 2, 32, 32)]  # smoke size


def dense_flops_per_step(depth: int, width: int, batch: int, in_dim: int) -> float:
    """Forward + backward flops of the dense layers: 6 * B * fan_in * fan_out each."""
    fans = [(in_dim, width)] + [(width, width)] * depth + [(width, NUM_CLASSES)]
    return float(sum(6 * batch * i * o for i, o in fans))


def jax_threads() -> int:
    """Threads of XLA's CPU client: one per core it may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def make_configs(depth: int, width: int, batch: int) -> tuple[ModelConfig, TrainConfig]:
    model_cfg = ModelConfig(depth=depth, width=width, num_classes=NUM_CLASSES, activation="relu",
                            init="he_normal", norm="batch", bn_momentum=0.9, bn_epsilon=1e-5)
    train_cfg = TrainConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9, batch_size=batch)
    return model_cfg, train_cfg


def make_batches(width: int, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((NUM_BATCHES, batch, width)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, (NUM_BATCHES, batch)).astype(np.int32)
    return x, y


# ----------------------------------------------------------------------------
# PyTorch mirror
# ----------------------------------------------------------------------------


def torch_mirror(torch: Any, model_cfg: ModelConfig, params: Any, in_dim: int) -> Any:
    """nn.Sequential with the same layers and the same initial values as ``params``."""
    nn = torch.nn
    width, depth = model_cfg.width, model_cfg.depth

    def linear(kernel, bias):
        kernel, bias = np.asarray(kernel), np.asarray(bias)
        lin = nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
            lin.bias.copy_(torch.from_numpy(bias.copy()))
        return lin

    def bn(scale, bias):
        norm = nn.BatchNorm1d(width, eps=model_cfg.bn_epsilon, momentum=1 - model_cfg.bn_momentum)
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(np.asarray(scale).copy()))
            norm.bias.copy_(torch.from_numpy(np.asarray(bias).copy()))
        return norm

    stem = params["stem"]
    layers = [linear(stem["Dense_0"]["kernel"], stem["Dense_0"]["bias"]),
              bn(stem["BatchNorm_0"]["scale"], stem["BatchNorm_0"]["bias"]), nn.ReLU()]
    blocks = params["blocks"]["block"]["layer_0"]
    for l in range(depth):
        layers += [linear(blocks["Dense_0"]["kernel"][l], blocks["Dense_0"]["bias"][l]),
                   bn(blocks["BatchNorm_0"]["scale"][l], blocks["BatchNorm_0"]["bias"][l]),
                   nn.ReLU()]
    layers.append(linear(params["head"]["kernel"], params["head"]["bias"]))
    assert in_dim == stem["Dense_0"]["kernel"].shape[0]
    return nn.Sequential(*layers)


def torch_trainer(torch: Any, net: Any, train_cfg: TrainConfig):
    opt = torch.optim.SGD(net.parameters(), lr=train_cfg.learning_rate, momentum=train_cfg.momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


def matmul_peak_fn(n: int):
    """A jitted (n, n) @ (n, n) f32 matmul; returns (run(k), flops per call)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))

    def run(k: int) -> None:
        out = None
        for _ in range(k):
            out = mm(a, b)
        jax.block_until_ready(out)

    return run, 2.0 * n ** 3


def torch_matmul_fn(torch: Any, n: int):
    a, b = torch.randn(n, n), torch.randn(n, n)

    def run(k: int) -> None:
        for _ in range(k):
            a @ b

    return run


def run_case(name: str, depth: int, width: int, batch: int, *, repeats: int, repeat_s: float,
             peak_n: int, torch: Any) -> dict:
    model_cfg, train_cfg = make_configs(depth, width, batch)
    model = build(model_cfg)
    x_np, y_np = make_batches(width, batch)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    batches = [{"x": x[i], "y": y[i]} for i in range(NUM_BATCHES)]
    state = create_state(model, train_cfg, jax.random.key(0), x[0])
    params0 = jax.device_get(state.params)
    t0 = time.perf_counter()
    # The AOT-compiled make_train_step (donating the state): calling the jitted
    # function after .lower().compile() would compile it a second time.
    step = make_train_step(model, train_cfg).lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0

    # Same function check: loss at step 0 and after one update, both sides.
    jax_losses = []
    state, m = step(state, batches[0])
    jax_losses.append(float(m["loss"]))
    state, m = step(state, batches[1])
    jax_losses.append(float(m["loss"]))

    holder = {"state": state}

    def jax_run(k: int) -> None:
        s = holder["state"]
        for i in range(k):
            s, _ = step(s, batches[i % NUM_BATCHES])
        holder["state"] = jax.block_until_ready(s)

    def jax_run_synced(k: int) -> None:
        # What vgrad.train.fit does today: metrics fetched to the host every step.
        s = holder["state"]
        for i in range(k):
            s, metrics = step(s, batches[i % NUM_BATCHES])
            jax.device_get(metrics)
        holder["state"] = jax.block_until_ready(s)

    peak_run, peak_flops = matmul_peak_fn(peak_n)
    flops = dense_flops_per_step(depth, width, batch, width)
    fns = {"jax": jax_run, "jax_fit_loop": jax_run_synced, "jax_matmul_peak": peak_run}
    units = {"jax_matmul_peak": peak_flops / 1e9}
    torch_info = None
    if torch is not None:
        net = torch_mirror(torch, model_cfg, params0, width)
        tstep = torch_trainer(torch, net, train_cfg)
        tx = [torch.from_numpy(x_np[i]) for i in range(NUM_BATCHES)]
        ty = [torch.from_numpy(y_np[i].astype(np.int64)) for i in range(NUM_BATCHES)]
        torch_losses = [float(tstep(tx[0], ty[0]).detach()), float(tstep(tx[1], ty[1]).detach())]

        def torch_run(k: int) -> None:
            for i in range(k):
                tstep(tx[i % NUM_BATCHES], ty[i % NUM_BATCHES])

        threads = torch.get_num_threads()

        def torch_run_1thread(k: int) -> None:
            # With OMP_WAIT_POLICY=PASSIVE (see common.torch_or_none) a multi-threaded
            # eager step pays a wake-up at every parallel region; at small widths one
            # thread is faster. torch is credited with its better thread count.
            torch.set_num_threads(1)
            try:
                torch_run(k)
            finally:
                torch.set_num_threads(threads)

        fns["torch"] = torch_run
        fns["torch_1thread"] = torch_run_1thread
        fns["torch_matmul_peak"] = torch_matmul_fn(torch, peak_n)
        units["torch_matmul_peak"] = peak_flops / 1e9
        diffs = np.abs(np.subtract(torch_losses, jax_losses))
        torch_info = {"losses_first_two_steps": torch_losses,
                      "step0_abs_loss_diff": float(diffs[0]),  # same params, same batch
                      "step1_abs_loss_diff": float(diffs[1]),  # after one update on each side
                      "max_abs_loss_diff": float(diffs.max())}

    rates = common.interleaved_rates(fns, repeats=repeats, repeat_s=repeat_s, units_per_call=units)
    jax_sps = rates["jax"]["median"]
    out = {
        "case": name, "depth": depth, "width": width, "batch": batch, "in_dim": width,
        "dense_gflop_per_step": flops / 1e9,
        "compile_s": compile_s,
        "jax_losses_first_two_steps": jax_losses,
        "rates": rates,
        "jax_steps_per_s": jax_sps,
        "jax_fit_loop_steps_per_s": rates["jax_fit_loop"]["median"],
        "jax_gflops": jax_sps * flops / 1e9,
        "jax_matmul_peak_gflops": rates["jax_matmul_peak"]["median"],
        "jax_fraction_of_jax_peak": jax_sps * flops / 1e9 / rates["jax_matmul_peak"]["median"],
        "torch": torch_info,
    }
    if torch is not None:
        t_sps = max(rates["torch"]["median"], rates["torch_1thread"]["median"])
        out.update({
            "torch_threads_steps_per_s": rates["torch"]["median"],
            "torch_1thread_steps_per_s": rates["torch_1thread"]["median"],
            "torch_steps_per_s": t_sps,  # the better of the two thread settings
            "torch_gflops": t_sps * flops / 1e9,
            "torch_matmul_peak_gflops": rates["torch_matmul_peak"]["median"],
            "speedup_vs_torch": jax_sps / t_sps,
            "machine_peak_gflops": max(rates["torch_matmul_peak"]["median"],
                                       rates["jax_matmul_peak"]["median"]),
        })
        out["jax_fraction_of_machine_peak"] = out["jax_gflops"] / out["machine_peak_gflops"]
    return out


def run(quick: bool = False, out_dir: Any = None) -> dict:
    torch = common.torch_or_none()
    threads = jax_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    info = common.machine_info()
    repeats, repeat_s, peak_n = (2, 0.1, 256) if quick else (11, 1.0, 2048)
    cases = [run_case(name, d, w, b, repeats=repeats, repeat_s=repeat_s, peak_n=peak_n, torch=torch)
             for name, d, w, b in (QUICK_CASES if quick else CASES)]
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads_note = (f"threads: XLA CPU client {threads} (one per core), "
                    + (f"torch.set_num_threads({torch.get_num_threads()}), "
                       f"interop {torch.get_num_interop_threads()}" if torch is not None
                       else "PyTorch not installed: column skipped (pip install -e '.[bench]')"))
    result = {"name": "throughput", "quick": quick, "machine": info, "threads": threads_note,
              "cases": cases}
    result["markdown"] = markdown(result)
    common.save("throughput", result, out_dir)
    return result


def markdown(result: dict) -> str:
    rows = []
    for c in result["cases"]:
        rows.append([
            c["case"], c["jax_steps_per_s"], c["jax_fit_loop_steps_per_s"],
            c.get("torch_threads_steps_per_s"), c.get("torch_1thread_steps_per_s"),
            c.get("speedup_vs_torch"), c["jax_gflops"], c["jax_matmul_peak_gflops"],
            c["jax_fraction_of_jax_peak"], c.get("torch_gflops"), c.get("torch_matmul_peak_gflops"),
            c["compile_s"],
        ])
    table = common.markdown_table(
        ["case (depth-width-batch)", "vgrad steps/s", "vgrad fit-loop steps/s",
         "torch eager steps/s (all threads)", "torch eager steps/s (1 thread)",
         "vgrad / best torch", "vgrad GFLOP/s", "XLA matmul peak GFLOP/s", "vgrad / XLA peak",
         "torch GFLOP/s", "torch (MKL) matmul peak GFLOP/s", "vgrad compile s"], rows)
    small, large = result["cases"][0], result["cases"][-1]
    checks = []
    if small.get("torch") is not None:
        diffs = ", ".join(f"{c['case']}: {c['torch']['step0_abs_loss_diff']:.1e} / "
                          f"{c['torch']['step1_abs_loss_diff']:.1e}" for c in result["cases"])
        checks.append("Same network: |loss_vgrad - loss_torch| from identical initial parameters, "
                      f"at step 0 / after one SGD update: {diffs} (float32 rounding, amplified "
                      "through 20 BatchNorm layers by the update).")
    if result["quick"]:
        targets = ["- quick smoke run (reduced sizes): no target is evaluated"]
    else:
        speedup = small.get("speedup_vs_torch")
        frac = large["jax_fraction_of_jax_peak"]
        targets = [
            f"- vgrad >= 2x torch eager at {small['case']}: {_fmt(speedup)}x -> "
            + (common.verdict(speedup, 2.0) if speedup is not None else "torch absent"),
            f"- >= 75% of measured matmul peak at {large['case']}: {100 * frac:.0f}% of XLA's "
            f"peak -> {common.verdict(frac, 0.75)}"
            + (f"; {100 * large['jax_fraction_of_machine_peak']:.0f}% of the best matmul "
               "(max of XLA and torch/MKL)" if "jax_fraction_of_machine_peak" in large else ""),
        ]
    return "\n".join([
        "### Training throughput (BN + ReLU MLP, SGD momentum)",
        "",
        table,
        "",
        f"Medians of {len(small['rates']['jax']['rates'])} interleaved repeats; {result['threads']}. "
        "'fit-loop' = the same step with its metrics copied to the host every step, as "
        "`vgrad.train.fit` does. " + " ".join(checks),
        "",
        *targets,
    ])


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> None:
    common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
