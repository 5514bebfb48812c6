"""Gradient clipping: what it changes in per-layer gradients and in training, and what it cannot fix.

Three kinds of clipping, each at a tight and a loose threshold, against no
clipping, in two deep MLPs where the gradient product across layers is far
from 1 at initialisation:

* **exploding**: plain ReLU + BatchNorm, He init, depth 30, width 64 (the
  gradient explosion of deep BatchNorm networks: ||P_0||^2/n ~ 10^5);
* **vanishing**: sigmoid, naive N(0, 0.01^2) init, depth 20, width 64
  (||P_0||^2/n ~ 10^-68).

Clipping kinds (``TrainConfig.clip``): by global norm (rescale the whole
gradient so ||g||_2 <= c), by value (clamp every entry to [-c, c]) and adaptive
(AGC, Brock et al. 2021: every unit's gradient to ||g_unit|| <= lambda ||w_unit||).
For each it measures the per-block update at step 0 (the clipped gradient,
computed with the engine's own optimiser), the gradient product
log10 ||P_l||_F^2/n at initialisation and after training, the relative weight
change of every block, and the training and test accuracy over training.

Data: MNIST-1D (4,000 train / 1,000 test). Training: SGD, momentum 0.9,
learning rate 0.1, batch 128, 400 steps, 3 seeds.

    python -m experiments.clipping                  # ~1.5 min on 2 CPU cores (71-112 s measured)
    python -m experiments.clipping --quick          # ~15 s (tiny sizes)
    python -m experiments.clipping --figure docs/figures/clipping.png

Finding (default run): clipping cannot make a vanishing gradient larger. In the
sigmoid network (||P_0||^2/n = 10^-68) no clipping enlarges any block's update
and every form stays at chance. Where gradients explode (plain ReLU + BN, depth 30,
||P_0||^2/n = 10^5.2, first block's gradient 10^2.5 x the last's) global-norm
clipping keeps that ratio (it scales all blocks alike) while value clipping and
AGC flatten it to 10^0.0-10^0.9; value clipping at 0.01 trains best (48 %
against 30 % unclipped), global norm 1 hardly helps (32 %). Clipping acts on the
update, not on the Jacobians: the gradient product is the same at initialisation
and after training within 2-3 decades of the unclipped network's. ``report.md``
has the measured numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import numpy as np
from matplotlib.ticker import MaxNLocator

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.models import build
from vgrad.study import StudyArgs, markdown_table
from vgrad.train import block_norms, cross_entropy, make_optimizer

NAME = "clipping"
CHANCE = 0.1
# setting -> (description, base model overrides)
SETTINGS = {
    "exploding": ("plain ReLU + BatchNorm, He init",
                  dict(activation="relu", init="he_normal", norm="batch")),
    "vanishing": ("sigmoid, naive N(0, 0.01²) init",
                  dict(activation="sigmoid", init="normal", init_std=0.01)),
}
KIND_NAMES = {"none": "no clipping", "global_norm": "global norm", "value": "value", "agc": "AGC"}
# Colours: no clipping is the baseline; global-norm clipping is the "clipping" technique of
# every study (mitigations uses it); the other two kinds get stable colours of their own
# (``plots.color`` of these names: olive and pink, distinct from every technique used here).
KIND_COLORS = {"none": "baseline", "global_norm": "clipping", "value": "clip_value",
               "agc": "clipping (agc)"}


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Clipping by global norm, by value and adaptive, where gradients explode and where they vanish."""

    exploding_depth: int = 30
    vanishing_depth: int = 20
    width: int = 64
    steps: int = 400
    learning_rate: float = 0.1
    global_norm: tuple[float, ...] = (1.0, 10.0)
    """Thresholds c of clipping by global norm (||g|| <= c)."""
    value: tuple[float, ...] = (0.01, 0.1)
    """Thresholds c of clipping by value (|g_i| <= c)."""
    agc: tuple[float, ...] = (0.01, 0.1)
    """Factors lambda of adaptive clipping (||g_unit|| <= lambda ||w_unit||)."""

    def validate(self) -> None:
        super().validate()
        for name in ("exploding_depth", "vanishing_depth", "width", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: must be an integer >= 1")
        for name in ("global_norm", "value", "agc"):
            values = getattr(self, name)
            if not values or any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)
                                 for v in values):
                raise ValueError(f"invalid --{name.replace('_', '-')}={values!r}: must be numbers > 0")


def sizes(args: Args) -> dict:
    thresholds = {"none": (1.0,), "global_norm": tuple(args.global_norm), "value": tuple(args.value),
                  "agc": tuple(args.agc)}
    if args.quick:
        # Three programs only: the vanishing setting, unclipped, by global norm and AGC.
        return dict(settings=("vanishing",), depths={"vanishing": 8}, width=16, steps=30,
                    eval_every=10, seeds=args.num_seeds(3), batch_size=64,
                    thresholds={"none": (1.0,), "global_norm": (1.0,), "agc": (0.01,)})
    return dict(settings=tuple(SETTINGS),
                depths={"exploding": args.exploding_depth, "vanishing": args.vanishing_depth},
                width=args.width, steps=args.steps, eval_every=50, seeds=args.num_seeds(3),
                batch_size=128, thresholds=thresholds)


def label(kind: str, value: float) -> str:
    if kind == "none":
        return "no clipping"
    symbol = {"global_norm": "‖g‖ ≤", "value": "|gᵢ| ≤", "agc": "λ ="}[kind]
    return f"{KIND_NAMES[kind]} {symbol} {value:g}"


def model_config(setting: str, size: dict) -> ModelConfig:
    return ModelConfig(depth=size["depths"][setting], width=size["width"], **SETTINGS[setting][1])


def grid(args: Args) -> list[sweep.Run]:
    """Runs labelled "<setting> | <clipping label>"; one compiled program per (setting, kind)."""
    s = sizes(args)
    runs = []
    for setting in s["settings"]:
        model = model_config(setting, s)
        for kind, values in s["thresholds"].items():
            train = TrainConfig(steps=s["steps"], batch_size=s["batch_size"],
                                learning_rate=args.learning_rate, momentum=0.9, clip=kind,
                                eval_every=s["eval_every"])
            for value in values:
                runs += sweep.grid(model, dataclasses.replace(train, clip_value=value),
                                   seeds=s["seeds"], label=f"{setting} | {label(kind, value)}")
    return runs


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------






def step0_updates(cfg: ModelConfig, thresholds: dict, seeds: list[int], x, y) -> dict:
    """Per-block norms of the gradient and of every clipping's update at initialisation.

    The update is what the engine's optimiser (``vgrad.train.make_optimizer``, clipping
    first) makes of the gradient of one batch with learning rate 1 and no momentum: the
    clipped gradient. Variables are drawn from ``jax.random.key(seed)``, as the sweep's.
    One jitted program for all seeds and clippings.
    Returns {"raw": (S, L), label: (S, L), ...} of log10 norms (-inf: exactly 0).
    """
    model = build(cfg)
    x, y = jax.numpy.asarray(x), jax.numpy.asarray(y)
    optimisers = {label(kind, value): make_optimizer(TrainConfig(clip=kind, clip_value=value,
                                                                 learning_rate=1.0, momentum=0.0))
                  for kind, values in thresholds.items() if kind != "none" for value in values}

    def loss(params, stats):
        logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True)
        return cross_entropy(logits, y)

    def one_seed(key):
        variables = model.init(key, x)
        params = variables["params"]
        grads = jax.grad(loss)(params, variables["batch_stats"])
        out = {"raw": block_norms(grads)}
        for name, tx in optimisers.items():
            updates, _ = tx.update(grads, tx.init(params), params)
            out[name] = block_norms(updates)
        return out

    keys = jax.numpy.stack([jax.random.key(seed) for seed in seeds])
    norms = jax.device_get(jax.jit(jax.vmap(one_seed))(keys))
    return {k: plots.log10(v) for k, v in norms.items()}


def summarise(result: sweep.SweepResult, size: dict, step0: dict) -> dict:
    """Per setting: per clipping form, accuracy, curves, products, weight changes."""
    out = {}
    for setting in size["settings"]:
        forms = []
        for name, runs in result.by_label().items():
            if not name.startswith(setting + " | "):
                continue
            form = name.split(" | ", 1)[1]
            kind, value = runs[0].train.clip, runs[0].train.clip_value
            init = np.asarray([r.measurements[0]["log10_product_sq_norms"] for r in runs], float)
            final = np.asarray([r.measurements[-1]["log10_product_sq_norms"] for r in runs], float)
            change = plots.log10([r.measurements[-1]["relative_weight_change"] for r in runs])
            acc_steps, test_acc = result.curves(runs, "test_accuracy")
            loss_steps, loss = result.curves(runs, "loss")
            clipped = np.asarray(step0[setting].get(form, step0[setting]["raw"]))
            raw = np.asarray(step0[setting]["raw"])
            with np.errstate(invalid="ignore"):
                factor = np.where(np.isfinite(raw), clipped - raw, np.nan)
            forms.append({
                "form": form, "kind": kind, "clip_value": None if kind == "none" else value,
                "color_key": KIND_COLORS[kind], "seeds": [r.seed for r in runs],
                "status": [r.status for r in runs],
                "diverged_at_step": [r.final.get("step") if r.status == "diverged" else None
                                     for r in runs],
                "train_accuracy": result.final_stats(runs, "train_accuracy"),
                "test_accuracy": result.final_stats(runs, "test_accuracy"),
                "log10_P0_init": init[:, 0].tolist(), "log10_P0_final": final[:, 0].tolist(),
                "log10_products_init": plots.nanmean(init).tolist(),
                "log10_products_final": plots.nanmean(final).tolist(),
                "log10_step0_update_norms": plots.nanmean(clipped).tolist(),
                "log10_step0_update_norms_per_seed": np.asarray(clipped).tolist(),
                # log10 (clipped / raw) per block, per seed: <= 0 by construction of clipping.
                # A gradient that underflowed to exactly 0 stays 0 (factor NaN there).
                "log10_step0_clip_factor": factor.tolist(),
                "step0_zero_blocks": int(np.min(np.sum(~np.isfinite(np.asarray(clipped)), 1))),
                "step0_zero_blocks_unclipped": int(np.min(np.sum(~np.isfinite(raw), 1))),
                "log10_step0_first_nonzero_update": [
                    float(row[np.isfinite(row)][0]) if np.isfinite(row).any() else math.nan
                    for row in np.asarray(clipped)],
                "log10_step0_first_over_last": (np.asarray(clipped)[:, 0]
                                                - np.asarray(clipped)[:, -1]).tolist(),
                "log10_relative_weight_change": plots.nanmean(change).tolist(),
                "log10_first_block_weight_change": change[:, 0].tolist(),
                "log10_weight_grad_norms_init_measured": plots.nanmean(
                    plots.log10([r.measurements[0]["weight_grad_norms"] for r in runs])).tolist(),
                "test_accuracy_curve": {"steps": acc_steps.tolist(), "values": test_acc.tolist()},
                "loss_curve": {"steps": loss_steps.tolist(), "values": loss.tolist()},
                "step_time_s": runs[0].step_time_s,
            })
        out[setting] = {"description": SETTINGS[setting][0], "model": SETTINGS[setting][1],
                        "depth": size["depths"][setting],
                        "log10_step0_gradient_norms": plots.nanmean(step0[setting]["raw"]).tolist(),
                        "forms": forms}
    return out


def _acc(f: dict) -> float:
    return f["train_accuracy"]["mean"]


def _x(log10_value: float) -> str:
    """A factor written as ×value."""
    return f"×{10 ** log10_value:.2g}" if np.isfinite(log10_value) else "×0"


def details(settings: dict) -> str:
    """One paragraph per setting, from the measured numbers."""
    parts = []
    va, ex = settings.get("vanishing"), settings.get("exploding")
    if va:
        base, clipped = va["forms"][0], va["forms"][1:]
        p0 = np.mean(base["log10_P0_init"])
        factors = np.concatenate([np.ravel(f["log10_step0_clip_factor"]) for f in clipped]) \
            if clipped else np.zeros(1)
        largest = float(np.nanmax(factors)) if np.isfinite(factors).any() else 0.0
        zero = base["step0_zero_blocks_unclipped"]
        after = [float(np.mean(f["log10_P0_final"])) for f in va["forms"]]
        moved = [float(np.mean(f["log10_first_block_weight_change"])) for f in va["forms"]]
        best = max(va["forms"], key=_acc)
        helped = [f for f in clipped if _acc(f) > max(_acc(base), CHANCE) + 0.05]
        text = (f"**Vanishing (sigmoid, naive init, depth {va['depth']}):** ‖P_0‖²/n = 10^{p0:.0f} at "
                f"initialisation, 10^{min(after):.0f} to 10^{max(after):.0f} after training with or "
                f"without clipping. Clipping only scales gradients down: no block's step-0 update is "
                f"larger than the unclipped gradient (largest factor {_x(largest)})")
        if zero:
            text += (f", and the gradients of the first {zero} blocks are exactly 0 in float32 "
                     "(underflow) with every clipping")
        text += (f"; block 1's weights move by 10^{min(moved):.0f} to 10^{max(moved):.0f} of their norm in "
                 f"{'all forms' if clipped else 'training'}, and the best form ({best['form']}) ends at "
                 f"{100 * _acc(best):.0f} % training accuracy (unclipped: {100 * _acc(base):.0f} %). ")
        text += ("Clipping cannot make a vanishing gradient larger, so it does not fix this network."
                 if not helped else
                 f"Yet {', '.join(f['form'] for f in helped)} train(s) better, through the layers whose "
                 "gradient did not vanish.")
        parts.append(text)
    if ex:
        base = ex["forms"][0]
        p0 = np.mean(base["log10_P0_init"])
        ratio = lambda f: float(np.mean(f["log10_step0_first_over_last"]))
        moved = lambda f: float(np.mean(f["log10_first_block_weight_change"]))
        best = max(ex["forms"], key=_acc)
        gn = [f for f in ex["forms"] if f["kind"] == "global_norm"]
        flat = [f for f in ex["forms"] if f["kind"] in ("value", "agc")]
        after = [float(np.mean(f["log10_P0_final"])) for f in ex["forms"]]
        text = (f"**Exploding (plain ReLU + BN, depth {ex['depth']}):** ‖P_0‖²/n = 10^{p0:.1f} at "
                f"initialisation, and the first block's step-0 gradient is 10^{ratio(base):.1f} times the "
                "last block's. ")
        if gn:
            text += (f"Global-norm clipping scales all blocks alike (the ratio stays "
                     f"{', '.join(f'10^{ratio(f):.1f}' for f in gn)})")
        if flat:
            text += ((", while " if gn else "") + "value clipping and AGC cap the largest gradients and "
                     "flatten the profile (ratio " + ", ".join(f"10^{ratio(f):.1f}" for f in flat) + ")")
        text += (f". Training accuracy {100 * _acc(base):.0f} ± {100 * base['train_accuracy']['std']:.0f} % "
                 "without clipping; " + ", ".join(f"{f['form']} {100 * _acc(f):.0f} %" for f in ex["forms"][1:])
                 + f". Without clipping block 1's weights end {10 ** moved(base):.2g}× their initial norm "
                   f"away from it, with {best['form']} {10 ** moved(best):.2g}×; the product ‖P_0‖²/n "
                   f"after training is 10^{min(after):.1f} to 10^{max(after):.1f} in every form, with or "
                   "without clipping.")
        div = [f["form"] for f in ex["forms"] if any(d is not None for d in f["diverged_at_step"])]
        if div:
            text += f" Diverged: {', '.join(div)}."
        parts.append(text)
    return "\n\n".join(parts)


def conclusion(settings: dict) -> str:
    """Two or three sentences from the measured numbers (nothing assumed)."""
    parts = []
    va, ex = settings.get("vanishing"), settings.get("exploding")
    if va:
        base, clipped = va["forms"][0], va["forms"][1:]
        factors = np.concatenate([np.ravel(f["log10_step0_clip_factor"]) for f in clipped]) \
            if clipped else np.zeros(1)
        largest = float(np.nanmax(factors)) if np.isfinite(factors).any() else 0.0
        zero = base["step0_zero_blocks_unclipped"]
        helped = [f for f in clipped if _acc(f) > max(_acc(base), CHANCE) + 0.05]
        accs = [_acc(f) for f in clipped] or [_acc(base)]
        text = (("Clipping cannot make a vanishing gradient larger: " if largest <= 1e-6 else
                 "Here a clipped update is larger than its gradient: ")
                + f"in the sigmoid network with naive init (‖P_0‖²/n = "
                f"10^{np.mean(base['log10_P0_init']):.0f}) no block's update is enlarged by any clipping "
                f"(largest factor {_x(largest)})"
                + (f", the first {zero} blocks' gradients are exactly 0 with or without it" if zero else "")
                + f", and the clipped networks end at {_range(accs)} % training accuracy against "
                  f"{100 * _acc(base):.0f} % unclipped"
                + ("." if not helped else f" ({', '.join(f['form'] for f in helped)} train better, "
                                          "through the layers whose gradient did not vanish)."))
        parts.append(text)
    if ex:
        base = ex["forms"][0]
        ratio = lambda f: float(np.mean(f["log10_step0_first_over_last"]))
        best = max(ex["forms"], key=_acc)
        gn = [f for f in ex["forms"] if f["kind"] == "global_norm"]
        flat = [f for f in ex["forms"] if f["kind"] in ("value", "agc")]
        text = (f"Where gradients explode (plain ReLU + BN, depth {ex['depth']}: ‖P_0‖²/n = "
                f"10^{np.mean(base['log10_P0_init']):.1f}, first block's gradient 10^{ratio(base):.1f} × "
                "the last block's)")
        shape = []
        if gn:
            shape.append("global-norm clipping scales all blocks alike (ratio stays "
                         f"{_decades([ratio(f) for f in gn])})")
        if flat:
            shape.append("value clipping and AGC flatten the profile (ratio "
                         f"{_decades([ratio(f) for f in flat])})")
        text += " " + " while ".join(shape) + "; "
        text += (f"{best['form']} trains best, {100 * _acc(best):.0f} % against {100 * _acc(base):.0f} % "
                 "unclipped." if best is not base else
                 f"no clipping beats the unclipped network ({100 * _acc(base):.0f} %).")
        parts.append(text)
    finals = []
    for name, st in settings.items():
        unclipped = float(np.mean(st["forms"][0]["log10_P0_final"]))
        clipped = [float(np.mean(f["log10_P0_final"])) for f in st["forms"][1:]]
        finals.append(f"10^{unclipped:.1f} unclipped against {_decades(clipped)} clipped ({name})")
    parts.append("Clipping acts on the update, not on the Jacobians: the gradient product at "
                 "initialisation is the same with every clipping, and after training ‖P_0‖²/n is "
                 + "; ".join(finals) + ".")
    return " ".join(parts)


def _range(values) -> str:
    """Percentages: "48" or "40–48"."""
    v = [100 * x for x in values if np.isfinite(x)]
    if not v:
        return "–"
    lo, hi = f"{min(v):.0f}", f"{max(v):.0f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _decades(log10_values) -> str:
    """log10 values as "10^a" or "10^a to 10^b"."""
    v = [x for x in log10_values if np.isfinite(x)]
    if not v:
        return "–"
    lo, hi = f"10^{min(v):.1f}", f"10^{max(v):.1f}"
    return lo if lo == hi else f"{lo} to {hi}"


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _style(f: dict, forms: list[dict]) -> dict:
    same_kind = [g for g in forms if g["kind"] == f["kind"]]
    dashes = ["-", "--", ":", "-."][same_kind.index(f) % 4]
    return {"color": plots.color(f["color_key"]), "linestyle": dashes}


def figure_summary(settings: dict):
    """Headline: per-block update at step 0, training curves and the product after training,
    one row per setting."""
    fig, axes = plots.figure(3, len(settings), width=4.8, height=3.6)
    for row, (setting, s) in enumerate(settings.items()):
        forms = s["forms"]
        ax = axes[row, 0]
        L = s["depth"]
        for f in forms:
            v = np.asarray(f["log10_step0_update_norms"], float)
            ax.plot(np.arange(1, L + 1), v, label=f["form"], lw=1.6, **_style(f, forms))
        zero = forms[0]["step0_zero_blocks_unclipped"]
        if zero:
            ax.axvspan(0.5, zero + 0.5, color="0.9", zorder=0)
            ax.text(0.03, 0.5, f"blocks 1–{zero}:\ngradient exactly 0\n(float32 underflow)\n"
                    "with every clipping;\nthe other blocks:\nall forms overlap",
                    transform=ax.transAxes, fontsize="x-small", va="center", color="0.3")
        ax.set(xlabel="block l", title=f"{setting}: update of each block at step 0")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(r"$\|\mathrm{clip}(\partial L/\partial W_l)\|$")
        plots.power_of_ten_axis(ax)
        ax = axes[row, 1]
        for f in forms:
            c = f["test_accuracy_curve"]
            plots.band(ax, c["steps"], c["values"], label=f["form"], **_style(f, forms))
        ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
        ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1),
               title=f"{setting}: test accuracy (mean, min-max)")
        ax = axes[row, 2]
        ax.plot(np.arange(L + 1), forms[0]["log10_products_init"], color="k", lw=2.5, alpha=0.35,
                label="at initialisation (all forms)")
        for f in forms:
            ax.plot(np.arange(L + 1), f["log10_products_final"], lw=1.4, **_style(f, forms))
        ax.set(xlabel="layer l", title=f"{setting}: gradient product after training")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(r"$\|P_l\|_F^2/n$, $P_l=\partial h^L/\partial h^l$")
        plots.power_of_ten_axis(ax)
        ax.legend(fontsize="x-small", loc="lower right" if setting == "vanishing" else "best")
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(7, len(labels)), fontsize="small")
    return fig




def figure_training(settings: dict):
    """Loss curves and the relative weight change of every block after training."""
    fig, axes = plots.figure(2, len(settings), width=5.2, height=3.6)
    for row, (setting, s) in enumerate(settings.items()):
        forms = s["forms"]
        for f in forms:
            c = f["loss_curve"]
            plots.band(axes[row, 0], c["steps"], plots.smoothed(c["values"], 10), label=f["form"],
                       **_style(f, forms))
            v = np.asarray(f["log10_relative_weight_change"], float)
            axes[row, 1].plot(np.arange(1, len(v) + 1), v, label=f["form"], **_style(f, forms))
        axes[row, 0].set(xlabel="training step", ylabel="training loss (batch, 10-step mean)",
                         title=f"{setting}: training loss")
        axes[row, 1].set(xlabel="block l", title=f"{setting}: how far each block moved")
        axes[row, 1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[row, 1].set_ylabel(r"$\|W_l(T) - W_l(0)\| / \|W_l(0)\|$")
        plots.power_of_ten_axis(axes[row, 1])
    axes[0, 1].legend(fontsize="x-small")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def _log_cell(values, zero: str = "−∞ (exactly 0)") -> str:
    """Mean of log10 values for a table; ``zero`` where every value is log10(0)."""
    v = np.asarray(values, float)
    if np.isneginf(v).all():
        return zero
    return f"{np.mean(v):.1f}"


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d")
    runs = grid(args)
    measure_batch = 64
    result = s.sweep(runs, dataset, measure_at=[0, size["steps"]], measure_batch_size=measure_batch)
    x, y = np.asarray(dataset.x_train[:measure_batch]), np.asarray(dataset.y_train[:measure_batch])
    seeds = sorted({r.seed for r in runs})
    step0 = {setting: step0_updates(model_config(setting, size), size["thresholds"], seeds, x, y)
             for setting in size["settings"]}
    settings = summarise(result, size, step0)
    figures = {"summary": figure_summary(settings), "training": figure_training(settings)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "Gradient clipping where gradients explode and where they vanish"
    rep.add("Setup", f"""
- Settings: {'; '.join(f"{k}: {SETTINGS[k][0]}, depth {size['depths'][k]}" for k in size['settings'])};
  MLPs of width {size['width']}.
- Clipping (first in the optimiser, on the raw gradient): none; by global norm
  {', '.join(f'{v:g}' for v in size['thresholds'].get('global_norm', ()))}; by value
  {', '.join(f'{v:g}' for v in size['thresholds'].get('value', ()))}; adaptive (AGC) λ =
  {', '.join(f'{v:g}' for v in size['thresholds'].get('agc', ()))}.
- Data: MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test). Training: SGD, momentum 0.9,
  learning rate {args.learning_rate}, batch {size['batch_size']}, {size['steps']} steps, {size['seeds']}
  seed(s); every form of a seed starts from the same weights and sees the same batches.
- Measured: the per-block update at step 0 (the clipped gradient of the first {measure_batch} training
  examples, through the engine's optimiser with learning rate 1 and no momentum), ‖P_l‖²/n and the
  relative weight change of every block at initialisation and after training, accuracy every
  {size['eval_every']} steps.
- {len(runs)} runs in {len(result.groups)} compiled programs.""")
    for setting, st in settings.items():
        rows = [{"form": f["form"].replace("|", "\\|"),  # a bare | would end the table cell
                 "train": f"{100 * f['train_accuracy']['mean']:.1f} ± {100 * f['train_accuracy']['std']:.1f}",
                 "test": f"{100 * f['test_accuracy']['mean']:.1f}",
                 "p0i": f"{np.mean(f['log10_P0_init']):.1f}", "p0f": f"{np.mean(f['log10_P0_final']):.1f}",
                 "u1": _log_cell(np.asarray(f['log10_step0_update_norms_per_seed'])[:, 0]),
                 "zero": f"{f['step0_zero_blocks']}",
                 "ratio": _log_cell(f['log10_step0_first_over_last'], "−∞ (block 1: 0)"),
                 "moved": f"{np.mean(f['log10_first_block_weight_change']):.1f}",
                 "status": (lambda d: f"diverged at step {min(d)}" if d else "ok")(
                     [x for x in f["diverged_at_step"] if x is not None])} for f in st["forms"]]
        rep.add(f"Summary: {setting} ({SETTINGS[setting][0]}, depth {st['depth']})",
                markdown_table(rows, [
                    ("form", "form"), ("train accuracy %", "train"), ("test accuracy %", "test"),
                    ("log10 ‖P_0‖²/n at init", "p0i"), ("after training", "p0f"),
                    ("log10 ‖update of block 1‖ at step 0", "u1"),
                    ("blocks with a zero update at step 0", "zero"),
                    ("log10 block 1 / block L update", "ratio"),
                    ("log10 relative change of block 1", "moved"), ("status", "status")]))
    text = conclusion(settings)
    rep.add("Conclusion", text)
    rep.add("Details", details(settings))
    rep.add_figures(paths)
    return {"settings": settings, "conclusion": text, "table": result.table(), "sizes": size,
            "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
