"""BatchNorm against no normalisation in one deep MLP: speed, accuracy, gradients and cost.

The classic comparison: a deep MLP (depth 20, width 64) with a saturating
activation (sigmoid, Xavier init: the vanishing case of Glorot & Bengio 2010)
and with ReLU (He init), each without and with BatchNorm after every Dense
layer (Dense -> BN -> activation), trained side by side on MNIST-1D at three
learning rates and three seeds. Per form it reports the test accuracy and loss
after every epoch, the epochs to reach a target test accuracy and the final
accuracy (at the form's best learning rate, chosen on the *training* accuracy);
the model summary (BN's extra gamma/beta parameters and running mean/var
statistics, counted from the variables); the per-block weight-gradient norms
and the Jacobian product ||P_l||^2/n at initialisation and after training; and
what BN costs: time per training step (the sweep's group step time, and an
interleaved micro-benchmark of one jitted step), time per evaluation step
(jitted ``apply(train=False)`` on 1,000 test examples), and the memory of the
compiled programs (XLA's buffer assignment on CPU:
``jit(f).lower(...).compile().memory_analysis()``) and their FLOPs.

Data: MNIST-1D, 25,000 samples (20,000 train / 5,000 test; the default
5,000-sample set overfits deep MLPs). Training: SGD, momentum 0.9, batch 128,
learning rates 0.01 / 0.03 / 0.1, 10 epochs (1,560 steps), 3 seeds; every form
of a seed sees the same batches.

    python -m experiments.bn_vs_none          # ~5 min on 2 shared CPU cores (282 s, load ~9)
    python -m experiments.bn_vs_none --quick  # seconds (tiny sizes)
    python -m experiments.bn_vs_none --figure docs/figures/bn_vs_none.png

The default run took 282 s wall and 139 s of CPU time while the machine ran
other jobs (load average ~9 on 2 cores).

Finding (default run): the depth-20 sigmoid network does not train at all
without BN (10 % at every learning rate; its first block's weight gradient is
10^-11.9 of its last block's at initialisation, ||P_0||^2/n = 10^-25) and reaches
72 % test accuracy with BN (40 % after 1.3 epochs). With ReLU + He, BN is *not*
better: at their best learning rates the network without BN ends higher (56 %
against 53 %) and both pass 40 % after 2 epochs; what BN buys is robustness to
the learning rate (51-53 % from 0.01 to 0.1, where the plain network falls to
11 %). BN's gradients are not flat either: in the ReLU network they *grow*
towards the input at initialisation (first/last block 10^1.6, ||P_0||^2/n =
10^3.4). BN adds 2 parameters (gamma, beta) and 2 running statistics per unit
and BN layer (2,688 each, 3 % of the 86k parameters), ~1.4-1.5x the time per
training step (1.3-1.6x in the sweep), ~2-2.7x the temporary memory (1.5-1.65x
in all) of the compiled training step, 1.06x its FLOPs, and ~1.05-1.08x the time
of an evaluation step. ``report.md`` has the measured numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
from matplotlib.ticker import MaxNLocator
import numpy as np

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.batchnorm import count_variables
from vgrad.config import ACTIVATIONS
from vgrad.models import build
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_vs_none"
CHANCE = 0.1
GRAD_DECADES = 2.0  # first/last block weight-gradient ratio beyond 10^-this: vanishing
SATURATING = ("sigmoid", "tanh", "hard_tanh", "softsign")
RELU_FAMILY = ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu")
NORMS = ("none", "batch")
NORM_COLOR = {"none": "baseline", "batch": "batchnorm"}
EVAL_EXAMPLES = 1000  # the training loop's evaluation batch (vgrad.loop.EVAL_BATCH_SIZE)
CHAIN = 5  # steps per timed call: dispatch overhead is spread over several steps


def init_for(activation: str) -> str:
    """The init that suits an activation: He for the ReLU family, Xavier (Glorot) otherwise."""
    return "he_normal" if activation in RELU_FAMILY else "glorot_normal"


def init_name(activation: str) -> str:
    return {"he_normal": "He", "glorot_normal": "Xavier"}[init_for(activation)] + " init"


def label(activation: str, norm: str) -> str:
    return f"{activation} + BN" if norm == "batch" else f"{activation}, no BN"


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """One deep MLP with and without BatchNorm, side by side."""

    activations: tuple[str, ...] = ("sigmoid", "relu")
    """Activations (each trained with and without BN: two compiled programs)."""
    depth: int = 20
    width: int = 64
    epochs: int = 10
    batch_size: int = 128
    learning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    """Learning rates of every form (values of one compiled program); each form is
    reported at the one with the best final training accuracy."""
    target: float = 0.4
    """Test accuracy whose first epoch is reported ("epochs to target")."""
    num_samples: int = 25000
    """MNIST-1D samples (80 % train, 20 % test)."""
    timing_repeats: int = 20
    """Repeats of the step-time micro-benchmark (the fastest is reported)."""

    def validate(self) -> None:
        super().validate()
        bad = [a for a in self.activations if a not in ACTIVATIONS]
        if not self.activations or bad:
            raise ValueError(f"invalid --activations={self.activations!r}: allowed values are "
                             + ", ".join(ACTIVATIONS))
        for name in ("depth", "width", "epochs", "batch_size", "timing_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 "must be an integer >= 1")
        if not self.learning_rates or any(not (isinstance(v, (int, float)) and math.isfinite(v)
                                               and v > 0) for v in self.learning_rates):
            raise ValueError(f"invalid --learning-rates={self.learning_rates!r}: "
                             "must be finite numbers > 0")
        if not (isinstance(self.target, (int, float)) and 0 < self.target < 1):
            raise ValueError(f"invalid --target={self.target!r}: must be a number in (0, 1)")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples < 500:
            raise ValueError(f"invalid --num-samples={self.num_samples!r}: must be an integer >= 500")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(activations=("sigmoid",), depth=8, width=16, epochs=2, batch_size=64,
                    learning_rates=(0.05,), target=args.target, num_samples=None,
                    seeds=args.num_seeds(1), timing_repeats=3)
    return dict(activations=tuple(dict.fromkeys(args.activations)), depth=args.depth,
                width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                learning_rates=tuple(sorted(set(args.learning_rates))), target=args.target,
                num_samples=args.num_samples, seeds=args.num_seeds(3),
                timing_repeats=args.timing_repeats)


def load_data(size: dict):
    """MNIST-1D: the default 4,000/1,000 set (--quick), else ``num_samples`` samples."""
    if size["num_samples"] is None:
        return data.load("mnist1d")
    return data.load("mnist1d", num_samples=size["num_samples"])


def model_config(size: dict, activation: str, norm: str) -> ModelConfig:
    return ModelConfig(depth=size["depth"], width=size["width"], activation=activation,
                       init=init_for(activation), norm=norm)


def train_config(size: dict, num_train: int) -> TrainConfig:
    # Evaluate on the test set at the end of every epoch: one test accuracy per epoch.
    per_epoch = data.steps_per_epoch(num_train, size["batch_size"])
    return TrainConfig(batch_size=size["batch_size"], epochs=size["epochs"], momentum=0.9,
                       learning_rate=size["learning_rates"][0], eval_every=per_epoch)


def grid(size: dict, num_train: int) -> list[sweep.Run]:
    """Per activation and norm one label (one compiled program), learning rates x seeds."""
    runs = []
    for act in size["activations"]:
        for norm in NORMS:
            runs += sweep.grid(model_config(size, act, norm), train_config(size, num_train),
                               vary={"train.learning_rate": list(size["learning_rates"])},
                               seeds=size["seeds"], label=label(act, norm))
    return runs


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def epochs_to(epochs: np.ndarray, curve: np.ndarray, threshold: float) -> float:
    """First epoch at which ``curve`` (one value per epoch) reaches ``threshold`` (inf if never)."""
    hit = np.flatnonzero(np.nan_to_num(curve, nan=-1.0) >= threshold)
    return float(epochs[hit[0]]) if hit.size else math.inf


def per_epoch_mean(steps: np.ndarray, values: np.ndarray, per_epoch: int, epochs: int) -> np.ndarray:
    """(S, T) per-step values -> (S, epochs): the mean over each epoch's steps (NaN-aware)."""
    out = np.full((values.shape[0], epochs), np.nan)
    for e in range(epochs):
        cols = (steps > e * per_epoch) & (steps <= (e + 1) * per_epoch)
        if cols.any():
            out[:, e] = plots.nanmean(values[:, cols], axis=1)
    return out


def _log_ratio(g: np.ndarray) -> np.ndarray:
    """log10 ||dL/dW_1|| / ||dL/dW_L|| per seed, from (S, L) log10 norms."""
    with np.errstate(invalid="ignore"):
        return g[:, 0] - g[:, -1]


def summarise(result: sweep.SweepResult, size: dict, num_train: int) -> list[dict]:
    """One entry per (activation, norm), at the learning rate with the best training accuracy."""
    per_epoch = data.steps_per_epoch(num_train, size["batch_size"])
    entries = []
    for name, runs in result.by_label().items():
        cfg = runs[0].model
        by_lr: dict[float, list] = {}
        for r in runs:
            by_lr.setdefault(r.train.learning_rate, []).append(r)
        per_lr = [{"learning_rate": lr,
                   "train_accuracy": result.final_stats(rs, "train_accuracy"),
                   "test_accuracy": result.final_stats(rs, "test_accuracy"),
                   "diverged": sum(r.status == "diverged" for r in rs)} for lr, rs in by_lr.items()]
        best = max(per_lr, key=lambda p: np.nan_to_num(p["train_accuracy"]["mean"], nan=-1.0))
        rs = by_lr[best["learning_rate"]]
        steps, test_acc = result.curves(rs, "test_accuracy")
        _, test_loss = result.curves(rs, "test_loss")
        loss_steps, loss = result.curves(rs, "loss")
        epochs = steps / per_epoch
        init = [r.measurements[0] for r in rs]
        final = [r.measurements[-1] for r in rs]
        wg_init = plots.log10([m["weight_grad_norms"] for m in init])
        wg_final = plots.log10([m["weight_grad_norms"] for m in final])
        prod_init = np.asarray([m["log10_product_sq_norms"] for m in init], float)
        prod_final = np.asarray([m["log10_product_sq_norms"] for m in final], float)
        entries.append({
            "label": name, "activation": cfg.activation, "init": cfg.init, "norm": cfg.norm,
            "seeds": [r.seed for r in rs], "status": [r.status for r in rs],
            "learning_rate": best["learning_rate"], "per_learning_rate": per_lr,
            "train_accuracy": best["train_accuracy"], "test_accuracy": best["test_accuracy"],
            "epochs": epochs.tolist(),
            "test_accuracy_curve": {"steps": epochs.tolist(), "values": test_acc.tolist()},
            "test_loss_curve": {"steps": epochs.tolist(), "values": test_loss.tolist()},
            "train_loss_curve": {"steps": list(range(1, size["epochs"] + 1)),
                                 "values": per_epoch_mean(loss_steps, loss, per_epoch,
                                                          size["epochs"]).tolist()},
            "epochs_to_target": [epochs_to(epochs, a, size["target"]) for a in test_acc],
            "log10_weight_grad_norms_init": plots.nanmean(wg_init).tolist(),
            "log10_weight_grad_norms_final": plots.nanmean(wg_final).tolist(),
            "log10_grad_ratio_init": _log_ratio(wg_init).tolist(),
            "log10_grad_ratio_final": _log_ratio(wg_final).tolist(),
            "log10_products_init": plots.nanmean(prod_init).tolist(),
            "log10_products_final": plots.nanmean(prod_final).tolist(),
            "final_measured_at_step": [m["step"] for m in final],
            "group_step_time_s": rs[0].step_time_s, "runs_per_group": len(runs),
        })
    return entries


def variable_summary(size: dict, x_example: np.ndarray) -> dict:
    """count_variables of each norm's model, from the shapes of ``build(cfg).init``'s
    variables (``jax.eval_shape``: nothing is computed; the activation does not change them)."""
    out = {}
    for norm in NORMS:
        model = build(model_config(size, size["activations"][0], norm))
        out[norm] = count_variables(jax.eval_shape(model.init, jax.random.key(0), x_example[:2]))
    return out


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", math.nan))


def _memory(compiled) -> dict:
    """Bytes of XLA's buffer assignment for one compiled program (CPU): arguments,
    outputs, temporaries, aliased bytes, and their sum less the aliased ones (an upper
    bound on the buffers the program holds at once)."""
    m = compiled.memory_analysis()
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def measure_costs(size: dict, dataset, repeats: int) -> dict:
    """Per activation and norm: seconds per training step (batch of the training size;
    fastest of ``repeats``, and the median) and per evaluation step
    (``apply(train=False)`` on 1,000 test examples), memory
    and FLOPs of both compiled programs. The forms of an activation are timed in turn
    (interleaved), so load from other processes falls on both alike."""
    import jax

    from vgrad.models import build
    from vgrad.steps import init_state, train_step_fn

    B = size["batch_size"]
    batch = {"x": np.asarray(dataset.x_train[:B]), "y": np.asarray(dataset.y_train[:B])}
    x_eval = np.asarray(dataset.x_test[:EVAL_EXAMPLES])
    train_cfg = TrainConfig(batch_size=B, steps=100, momentum=0.9)
    out = {}
    for act in size["activations"]:
        progs = {}
        for norm in NORMS:
            model = build(model_config(size, act, norm))
            state = init_state(model, train_cfg, batch["x"])  # jitted: one compile, not op by op
            train = jax.jit(train_step_fn(model, train_cfg)).lower(state, batch).compile()
            evaluate = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False)[0]).lower(
                state.variables, x_eval).compile()
            progs[norm] = (state, train, evaluate)

        def time_train(norm):
            state, train, _ = progs[norm]
            jax.block_until_ready(train(state, batch))
            t0 = time.perf_counter()
            for _ in range(CHAIN):
                state, metrics = train(state, batch)
            jax.block_until_ready((state, metrics))
            return (time.perf_counter() - t0) / CHAIN

        def time_eval(norm):
            state, _, evaluate = progs[norm]
            jax.block_until_ready(evaluate(state.variables, x_eval))
            t0 = time.perf_counter()
            for _ in range(CHAIN):
                logits = evaluate(state.variables, x_eval)
            jax.block_until_ready(logits)
            return (time.perf_counter() - t0) / CHAIN

        times = {norm: {"train": [], "eval": []} for norm in NORMS}
        for _ in range(repeats):
            for norm in NORMS:
                times[norm]["train"].append(time_train(norm))
                times[norm]["eval"].append(time_eval(norm))
        # The fastest repeat is the least disturbed by other processes (a shared machine
        # only ever adds time); the median is kept for reference.
        out[act] = {norm: {
            "train_step_s": float(np.min(times[norm]["train"])),
            "eval_step_s": float(np.min(times[norm]["eval"])),
            "train_step_median_s": float(np.median(times[norm]["train"])),
            "eval_step_median_s": float(np.median(times[norm]["eval"])),
            "train_memory": _memory(progs[norm][1]), "eval_memory": _memory(progs[norm][2]),
            "train_flops": _flops(progs[norm][1]), "eval_flops": _flops(progs[norm][2]),
        } for norm in NORMS}
    return out


def cost_ratios(costs: dict, entries: list[dict]) -> dict:
    """BN / no BN per activation: step times (micro-benchmark and sweep), memory, FLOPs."""
    group_time = {(e["activation"], e["norm"]): e["group_step_time_s"] for e in entries}
    out = {}
    for act, c in costs.items():
        bn, no = c["batch"], c["none"]
        out[act] = {
            "train_step_time": bn["train_step_s"] / no["train_step_s"],
            "eval_step_time": bn["eval_step_s"] / no["eval_step_s"],
            "sweep_step_time": group_time[(act, "batch")] / group_time[(act, "none")],
            "train_temp_memory": bn["train_memory"]["temp"] / no["train_memory"]["temp"],
            "train_total_memory": bn["train_memory"]["total"] / no["train_memory"]["total"],
            "eval_total_memory": bn["eval_memory"]["total"] / no["eval_memory"]["total"],
            "train_flops": bn["train_flops"] / no["train_flops"],
            "eval_flops": bn["eval_flops"] / no["eval_flops"],
        }
    return out


# ----------------------------------------------------------------------------
# claims
# ----------------------------------------------------------------------------


def _mean_epochs(values) -> float:
    v = np.asarray(values, float)
    return float(np.mean(v)) if np.isfinite(v).all() else math.inf


def _epochs_text(values) -> str:
    v = np.asarray(values, float)
    if not np.isfinite(v).any():
        return "never"
    text = f"{np.mean(v[np.isfinite(v)]):.1f}"
    return text + ("" if np.isfinite(v).all() else f" ({np.isfinite(v).sum()}/{v.size} seeds)")


def _when(values, size: dict) -> str:
    """"after 2.3 epochs", "after 4.0 epochs (2/3 seeds)" or "never within 10 epochs"."""
    v = np.asarray(values, float)
    if not np.isfinite(v).any():
        return f"never within {size['epochs']} epochs"
    text = f"after {np.mean(v[np.isfinite(v)]):.1f} epochs"
    return text + ("" if np.isfinite(v).all() else f" ({np.isfinite(v).sum()}/{v.size} seeds)")


def claim_convergence(entries: list[dict], size: dict) -> dict:
    """Per activation: does BN reach the target in fewer epochs, and end higher (test
    accuracy, each form at its own best learning rate)?"""
    by = {(e["activation"], e["norm"]): e for e in entries}
    parts, outcomes = [], []
    for act in size["activations"]:
        bn, no = by[(act, "batch")], by[(act, "none")]
        faster = _mean_epochs(bn["epochs_to_target"]) < _mean_epochs(no["epochs_to_target"])
        higher = bn["test_accuracy"]["mean"] > no["test_accuracy"]["mean"]
        outcomes.append((faster, higher))
        parts.append(f"{act}: {100 * size['target']:.0f} % test accuracy with BN "
                     f"{_when(bn['epochs_to_target'], size)}, without BN "
                     f"{_when(no['epochs_to_target'], size)}; BN ends at "
                     f"{100 * bn['test_accuracy']['mean']:.1f} % against "
                     f"{100 * no['test_accuracy']['mean']:.1f} % (best learning rates "
                     f"{bn['learning_rate']:g} / {no['learning_rate']:g})")
    verdict = ("holds" if all(f and h for f, h in outcomes) else
               "holds partly" if any(f or h for f, h in outcomes) else "does not hold here")
    return {"claim": "BN converges in fewer epochs to higher accuracy",
            "measured": "; ".join(parts) + ".", "verdict": verdict,
            "figure": "figures/summary.png"}


def claim_cost(ratios: dict) -> dict:
    parts, time_up, mem_up = [], [], []
    for act, r in ratios.items():
        time_up.append(r["train_step_time"] > 1.05)
        mem_up.append(r["train_temp_memory"] > 1.05)
        parts.append(f"{act}: ×{r['train_step_time']:.2f} time per training step "
                     f"(×{r['sweep_step_time']:.2f} in the sweep), ×{r['eval_step_time']:.2f} per "
                     f"evaluation step, ×{r['train_temp_memory']:.2f} temporary memory "
                     f"(×{r['train_total_memory']:.2f} in all) of the compiled training step, "
                     f"×{r['train_flops']:.2f} its FLOPs")
    verdict = ("holds" if all(time_up) and all(mem_up) else
               "holds partly" if any(time_up) or any(mem_up) else "does not hold here")
    return {"claim": "BN costs extra compute and memory",
            "measured": "BN / no BN — " + "; ".join(parts) + ".", "verdict": verdict,
            "figure": "figures/cost.png"}


def claim_gradients(entries: list[dict], size: dict) -> dict:
    by = {(e["activation"], e["norm"]): e for e in entries}
    saturating = [a for a in size["activations"] if a in SATURATING]
    acts = saturating or list(size["activations"])
    parts, verdicts = [], []
    for act in acts:
        bn, no = by[(act, "batch")], by[(act, "none")]
        r = {k: float(np.nanmean(e["log10_grad_ratio_init"])) for k, e in (("bn", bn), ("no", no))}
        rf = {k: float(np.nanmean(e["log10_grad_ratio_final"])) for k, e in (("bn", bn), ("no", no))}
        alive = r["bn"] > -GRAD_DECADES and rf["bn"] > -GRAD_DECADES
        vanished = r["no"] < -GRAD_DECADES
        verdicts.append("holds" if alive and vanished else "holds partly" if alive or
                        r["bn"] > r["no"] + GRAD_DECADES else "does not hold here")
        parts.append(f"{act} (depth {size['depth']}): ‖∂L/∂W_1‖/‖∂L/∂W_L‖ = 10^{r['no']:.1f} "
                     "without "
                     f"BN and 10^{r['bn']:.1f} with BN at initialisation, 10^{rf['no']:.1f} and "
                     f"10^{rf['bn']:.1f} after training")
    verdict = verdicts[0] if len(set(verdicts)) == 1 else "holds partly"
    what = "a deep saturating net" if saturating else f"a deep {acts[0]} net (no saturating one run)"
    return {"claim": f"BN keeps early layers' gradients alive in {what}",
            "measured": "; ".join(parts) + ".", "verdict": verdict,
            "figure": "figures/summary.png"}


def gradient_note(entries: list[dict], size: dict) -> str:
    """What BN does to the gradients of the non-saturating networks (e.g. ReLU), measured."""
    by = {(e["activation"], e["norm"]): e for e in entries}
    out = []
    for act in size["activations"]:
        if act in SATURATING:
            continue
        bn, no = by[(act, "batch")], by[(act, "none")]
        rb = float(np.nanmean(bn["log10_grad_ratio_init"]))
        rn = float(np.nanmean(no["log10_grad_ratio_init"]))
        pb, pn = bn["log10_products_init"][0], no["log10_products_init"][0]
        grows = ("grows towards the input" if rb > 0.5 else "stays flat" if rb > -0.5
                 else "shrinks towards the input")
        out.append(f"With {act} ({init_name(act)}), the gradient without BN is already healthy at "
                   f"initialisation (first/last block 10^{rn:.1f}, ‖P_0‖²/n = 10^{pn:.1f}); with BN it "
                   f"{grows} (10^{rb:.1f}, ‖P_0‖²/n = 10^{pb:.1f}): BN does not make gradients flat, "
                   "it removes the dependence on the weight scale and adds its own per-layer gain.")
    return " ".join(out)


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _style(e: dict) -> dict:
    return {"color": plots.color(NORM_COLOR[e["norm"]])}


def _acc_panel(ax, es: list[dict], size: dict, title: str) -> None:
    for e in es:
        plots.band(ax, e["epochs"], e["test_accuracy_curve"]["values"], marker="o",
                   label=f"{'BN' if e['norm'] == 'batch' else 'no BN'} (lr {e['learning_rate']:g})",
                   **_style(e))
    ax.axhline(size["target"], color="0.3", lw=0.8, ls="--")
    ax.text(0.98, size["target"] - 0.01, f"target {100 * size['target']:.0f} %", fontsize="x-small",
            color="0.3", ha="right", va="top", transform=ax.get_yaxis_transform())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    ax.set(title=title, xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    ax.legend(fontsize="x-small", loc="upper left")


def _grad_panel(ax, es: list[dict], title: str) -> None:
    for e in es:
        short = "BN" if e["norm"] == "batch" else "no BN"
        for key, ls, when in (("log10_weight_grad_norms_init", "-", "init"),
                              ("log10_weight_grad_norms_final", "--", "trained")):
            g = np.asarray(e[key], float)
            ax.plot(np.arange(1, len(g) + 1), g, ls=ls, lw=1.6, label=f"{short}, {when}", **_style(e))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="block l", ylabel=r"$\|\partial L/\partial W_l\|$")
    plots.power_of_ten_axis(ax)
    ax.legend(fontsize="x-small", ncol=2)


def _cost_panel(ax, ratios: dict) -> None:
    keys = [("train_step_time", "train step\ntime"), ("eval_step_time", "eval step\ntime"),
            ("train_temp_memory", "train temp\nmemory"), ("train_total_memory", "train total\nmemory"),
            ("train_flops", "train\nFLOPs")]
    acts = list(ratios)
    width = 0.8 / len(acts)
    for i, act in enumerate(acts):
        x = np.arange(len(keys)) + (i - (len(acts) - 1) / 2) * width
        vals = [ratios[act][k] for k, _ in keys]
        bars = ax.bar(x, vals, width, label=act, color=plots.color(act), alpha=0.85)
        ax.bar_label(bars, fmt="%.2f", fontsize="xx-small", padding=1)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(keys)), [t for _, t in keys], fontsize="x-small")
    ax.set(ylabel="BN / no BN", title="What BN costs (ratio; 1 = free)")
    ax.set_ylim(0, max(1.2, 1.15 * max(v for r in ratios.values() for v in r.values())))
    ax.legend(fontsize="x-small", loc="upper right")


def _lr_panel(ax, entries: list[dict], size: dict) -> None:
    styles = {a: s for a, s in zip(size["activations"], (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")))}
    for e in entries:
        lrs = [p["learning_rate"] for p in e["per_learning_rate"]]
        acc = [p["test_accuracy"]["mean"] for p in e["per_learning_rate"]]
        ls, marker = styles[e["activation"]]
        ax.plot(lrs, acc, marker=marker, ls=ls, label=e["label"], **_style(e))
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="learning rate", ylabel="final test accuracy", ylim=(0, 1),
           title="Learning-rate sensitivity (mean over seeds)")
    ax.legend(fontsize="x-small")


def figure_summary(entries: list[dict], ratios: dict, size: dict):
    acts = list(size["activations"])
    fig, axes = plots.figure(len(acts) + 1, 2, width=4.2, height=3.4)
    for j, act in enumerate(acts):
        es = [e for e in entries if e["activation"] == act]
        head = f"{act}, {init_name(act)}, depth {size['depth']}"
        _acc_panel(axes[0, j], es, size, f"{head}: test accuracy")
        _grad_panel(axes[1, j], es, f"{head}: weight gradients\n(solid: init; dashed: after training)")
    _cost_panel(axes[0, -1], ratios)
    _lr_panel(axes[1, -1], entries, size)
    fig.suptitle("BatchNorm against no normalisation (MNIST-1D)")
    return fig


def figure_curves(entries: list[dict], size: dict):
    acts = list(size["activations"])
    fig, axes = plots.figure(len(acts), 2, width=4.4, height=3.2)
    for j, act in enumerate(acts):
        for e in [e for e in entries if e["activation"] == act]:
            name = "BN" if e["norm"] == "batch" else "no BN"
            plots.curve_band(axes[0, j], e["test_loss_curve"], label=f"{name}, test", marker="o",
                             **_style(e))
            plots.curve_band(axes[0, j], e["train_loss_curve"], label=f"{name}, train (batch mean)",
                             linestyle="--", **_style(e))
            plots.curve_band(axes[1, j], e["test_accuracy_curve"], label=name, marker="o", **_style(e))
        axes[0, j].set(title=f"{act}: loss per epoch", xlabel="epoch", ylabel="cross-entropy")
        axes[1, j].set(title=f"{act}: test accuracy per epoch", xlabel="epoch", ylabel="accuracy",
                       ylim=(0, 1))
        axes[1, j].axhline(size["target"], color="0.3", lw=0.8, ls="--")
        for ax in axes[:, j]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, j].legend(fontsize="x-small")
        axes[1, j].legend(fontsize="x-small")
    return fig


def figure_products(entries: list[dict], size: dict):
    acts = list(size["activations"])
    fig, axes = plots.figure(len(acts), 1, width=4.6, height=3.4)
    for j, act in enumerate(acts):
        ax = axes[0, j]
        for e in [e for e in entries if e["activation"] == act]:
            name = "BN" if e["norm"] == "batch" else "no BN"
            for key, ls, when in (("log10_products_init", "-", "init"),
                                  ("log10_products_final", "--", "trained")):
                v = np.asarray(e[key], float)
                ax.plot(np.arange(len(v)), np.where(np.isfinite(v), v, np.nan), ls=ls, lw=1.6,
                        label=f"{name}, {when}", **_style(e))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=f"{act}: gradient product to the output", xlabel="layer l",
               ylabel=r"$\|P_l\|_F^2/n$, $P_l = \partial h^L/\partial h^l$")
        plots.power_of_ten_axis(ax)
        ax.legend(fontsize="x-small")
    return fig


def figure_cost(costs: dict):
    acts = list(costs)
    fig, axes = plots.figure(3, 1, width=4.0, height=3.3)
    x = np.arange(len(acts))
    w = 0.38
    for k, norm in enumerate(NORMS):
        name = "BN" if norm == "batch" else "no BN"
        off = (k - 0.5) * w
        col = plots.color(NORM_COLOR[norm])
        for ax, key in ((axes[0, 0], "train_step_s"), (axes[0, 1], "eval_step_s")):
            bars = ax.bar(x + off, [1e3 * costs[a][norm][key] for a in acts], w, color=col, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize="xx-small", padding=1)
        bottom = np.zeros(len(acts))
        for part, alpha in (("argument", 1.0), ("output", 0.6), ("temp", 0.3)):
            vals = np.asarray([costs[a][norm]["train_memory"][part] for a in acts], float) / 1e6
            axes[0, 2].bar(x + off, vals, w, bottom=bottom, color=col, alpha=alpha,
                           label=f"{name}: {part}", edgecolor="k", lw=0.4)
            bottom += vals
    axes[0, 0].set(ylabel="ms per training step", title="Training step (fastest repeat)")
    axes[0, 1].set(ylabel="ms per evaluation step", title=f"Evaluation step ({EVAL_EXAMPLES} examples)")
    axes[0, 2].set(ylabel="MB", title="Compiled training step: XLA buffers")
    axes[0, 2].set_ylim(0, 1.45 * axes[0, 2].get_ylim()[1])  # room for the legend
    for ax in axes[0]:
        ax.set_xticks(x, acts)
    axes[0, 0].legend(fontsize="x-small")
    axes[0, 1].legend(fontsize="x-small")
    axes[0, 2].legend(fontsize="xx-small", ncol=2, loc="upper left")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def _counts_rows(counts: dict) -> list[dict]:
    rows = []
    order = ["stem", "blocks", "head"]
    parts = sorted(counts["batch"], key=lambda p: (p == "total", order.index(p) if p in order else 3))
    for part in parts:
        no, bn = counts["none"].get(part, {"params": 0}), counts["batch"][part]
        rows.append({"part": part, "no_bn": no["params"], "bn": bn["params"],
                     "extra": bn["params"] - no["params"], "bn_params": bn["bn_params"],
                     "layers": bn["bn_layers"], "stats": bn["bn_stats"]})
    return rows


def summary_rows(entries: list[dict], size: dict) -> list[dict]:
    rows = []
    for e in entries:
        acc, tr = e["test_accuracy"], e["train_accuracy"]
        rows.append({
            "form": e["label"], "lr": f"{e['learning_rate']:g}",
            "test": f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}",
            "train": f"{100 * tr['mean']:.1f}",
            "to_target": _epochs_text(e["epochs_to_target"]),
            "ratio0": f"10^{np.nanmean(e['log10_grad_ratio_init']):.1f}",
            "ratio1": f"10^{np.nanmean(e['log10_grad_ratio_final']):.1f}",
            "p0": f"10^{e['log10_products_init'][0]:.1f}",
            "lrs": ", ".join(f"{p['learning_rate']:g}: {100 * p['test_accuracy']['mean']:.0f} %"
                             + (f" ({p['diverged']} div.)" if p["diverged"] else "")
                             for p in e["per_learning_rate"]),
        })
    return rows


def learning_rate_note(entries: list[dict], size: dict) -> str:
    """How much each form's final test accuracy depends on the learning rate, measured."""
    if len(size["learning_rates"]) < 2:
        return ""
    spans = []
    for e in entries:
        acc = [100 * p["test_accuracy"]["mean"] for p in e["per_learning_rate"]]
        spans.append(f"{e['label']} {min(acc):.0f}–{max(acc):.0f} %")
    lrs = size["learning_rates"]
    return (f"Across learning rates {lrs[0]:g}–{lrs[-1]:g} the final test accuracy spans: "
            + ", ".join(spans) + ".")


def against_the_usual_story(entries: list[dict], size: dict) -> str:
    """Activations for which BN, at each form's best learning rate, is not better, measured."""
    by = {(e["activation"], e["norm"]): e for e in entries}
    out = []
    for act in size["activations"]:
        bn, no = by[(act, "batch")], by[(act, "none")]
        diff = bn["test_accuracy"]["mean"] - no["test_accuracy"]["mean"]
        e_bn, e_no = _mean_epochs(bn["epochs_to_target"]), _mean_epochs(no["epochs_to_target"])
        if diff <= 0 or e_bn > e_no:
            pace = ("sooner" if e_bn < e_no else "later" if e_bn > e_no else
                    "no sooner" if math.isfinite(e_bn) else "never, nor without BN")
            worst = lambda e: min(p["test_accuracy"]["mean"] for p in e["per_learning_rate"])
            out.append(f"Against the usual story that BN trains faster and better: with {act} "
                       f"({init_name(act)}) BN ends {100 * diff:+.1f} points against no BN at their "
                       f"best learning rates and reaches {100 * size['target']:.0f} % {pace}; its "
                       f"worst learning rate gives {100 * worst(bn):.0f} % against "
                       f"{100 * worst(no):.0f} % without BN.")
    return " ".join(out)


def conclusion(claims: list[dict], entries: list[dict], size: dict) -> str:
    verdicts = "; ".join(f"“{c['claim']}”: {c['verdict']}" for c in claims)
    text = f"Measured verdicts — {verdicts}. " + " ".join(c["measured"] for c in claims)
    notes = [n for n in (against_the_usual_story(entries, size), gradient_note(entries, size),
                         learning_rate_note(entries, size)) if n]
    return " ".join([text, *notes])


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = load_data(size)
    runs = grid(size, dataset.num_train)
    steps = runs[0].train.epochs * data.steps_per_epoch(dataset.num_train, size["batch_size"])
    result = s.sweep(runs, dataset, measure_at=[0, steps], measure_batch_size=64, jacobians=True)
    entries = summarise(result, size, dataset.num_train)
    counts = variable_summary(size, np.asarray(dataset.x_train[:2]))
    costs = measure_costs(size, dataset, size["timing_repeats"])
    ratios = cost_ratios(costs, entries)
    claims = [claim_convergence(entries, size), claim_cost(ratios), claim_gradients(entries, size)]

    figures = {"summary": figure_summary(entries, ratios, size), "curves": figure_curves(entries, size),
               "products": figure_products(entries, size), "cost": figure_cost(costs)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary") for name, fig in figures.items()}

    rep = s.report
    rep.title = "BatchNorm against no normalisation: speed, accuracy, gradients and cost"
    rep.add("Setup", f"""
- Network: MLP, depth {size['depth']} blocks, width {size['width']}; activations
  {', '.join(f"{a} ({init_for(a)})" for a in size['activations'])}; each without BN and with BN
  after every Dense layer (Dense → BN → activation, stem included; BN momentum 0.9, ε 1e-5).
- Data: MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), standardised.
- Training: SGD, momentum 0.9, batch {size['batch_size']}, {size['epochs']} epochs ({steps} steps),
  learning rates {', '.join(f'{lr:g}' for lr in size['learning_rates'])}, {size['seeds']} seed(s);
  every form of a seed sees the same batches. Each form is shown at the learning rate with the
  best final *training* accuracy (evaluation mode, whole training set), so the test set does not
  choose it. Test accuracy after every epoch (BN in evaluation mode, running averages).
- Gradients: per-block weight-gradient norms and ‖P_l‖²/n (8 probes) on the first 64 training
  examples (BN in training mode) at initialisation and after training.
- Cost: the sweep's steady-state time per step of each group ({entries[0]['runs_per_group']} runs
  vmapped), and a micro-benchmark of one jitted training step (batch {size['batch_size']}, one run)
  and one jitted evaluation step (`apply(train=False)` on {EVAL_EXAMPLES} test examples):
  {size['timing_repeats']} repeats of {CHAIN} calls after warm-up, BN and no-BN interleaved: the
  fastest repeat (the machine is shared; other processes only add time; medians in results.json). Memory:
  `jax.jit(f).lower(...).compile().memory_analysis()` on CPU — the sizes of XLA's buffer assignment
  for the compiled program: arguments (params, optimiser state, batch), outputs, temporaries
  (intermediates, e.g. activations kept for the backward pass); "total" = arguments + outputs +
  temporaries − aliased, an upper bound on the buffers live at once (not a measured RSS peak).
  FLOPs: XLA's `cost_analysis()`.
- {len(runs)} runs in {len(result.groups)} compiled programs.""")
    rep.add("Summary", markdown_table(summary_rows(entries, size), [
        ("form", "form"), ("best lr", "lr"), ("test accuracy %", "test"), ("train accuracy %", "train"),
        (f"epochs to {100 * size['target']:.0f} % test", "to_target"),
        ("‖∂L/∂W_1‖/‖∂L/∂W_L‖ init", "ratio0"), ("after training", "ratio1"),
        ("‖P_0‖²/n init", "p0"), ("test accuracy per learning rate", "lrs")]))
    rep.add("Model summary", "Numbers in the variables of `build(cfg).init(...)` "
            "(`vgrad.batchnorm.count_variables`): BN adds γ (`scale`) and β (`bias`) per unit and "
            "BN layer to `params`, and a running `mean` and `var` per unit and BN layer to "
            "`batch_stats` (not learned, but carried, saved and used at evaluation).\n\n"
            + markdown_table(_counts_rows(counts), [
                ("part", "part"), ("params, no BN", "no_bn"), ("params, BN", "bn"),
                ("extra params", "extra"), ("of which γ/β", "bn_params"), ("BN layers", "layers"),
                ("running mean/var", "stats")]))
    group_time = {(e["activation"], e["norm"]): e["group_step_time_s"] for e in entries}
    rep.add("Cost", markdown_table([
        {"act": act, "norm": "BN" if norm == "batch" else "no BN",
         "train": f"{1e3 * c['train_step_s']:.3f}", "eval": f"{1e3 * c['eval_step_s']:.3f}",
         "sweep": f"{1e3 * group_time[(act, norm)]:.2f}",
         "mem": f"{c['train_memory']['temp'] / 1e6:.2f} / {c['train_memory']['total'] / 1e6:.2f}",
         "emem": f"{c['eval_memory']['temp'] / 1e6:.3f} / {c['eval_memory']['total'] / 1e6:.2f}",
         "flops": f"{c['train_flops'] / 1e6:.2f} / {c['eval_flops'] / 1e6:.2f}"}
        for act, per in costs.items() for norm, c in per.items()], [
        ("activation", "act"), ("form", "norm"), ("ms / training step", "train"),
        ("ms / evaluation step", "eval"), (f"ms / sweep step ({entries[0]['runs_per_group']} runs)", "sweep"),
        ("training step MB temp / total", "mem"), ("evaluation step MB temp / total", "emem"),
        ("MFLOPs train / eval", "flops")]))
    rep.add_claims(claims)
    text = conclusion(claims, entries, size)
    rep.add("Conclusion", text)
    rep.add_figures(paths)
    return {"entries": entries, "claims": claims, "conclusion": text, "variable_counts": counts,
            "costs": costs, "cost_ratios": ratios, "table": result.table(), "groups": result.groups,
            "sizes": size}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
