"""Which activation function keeps gradients alive in a deep plain network?

Eight activations in the same depth-20, width-128 plain MLP, each with its
matching initialisation: sigmoid and tanh with Xavier (glorot_normal); ReLU,
Leaky ReLU (slope 0.01), PReLU (learnable per-unit slope, initialised at 0.25),
ELU and GELU with He (he_normal); SELU with LeCun (lecun_normal). All are
trained with the same optimiser and budget on MNIST-1D. At initialisation and
at several steps of training it measures, per layer, the gradient product
log10 ||P_l||_F^2 / n (P_l = dh^L/dh^l) and the weight-gradient norms
||dL/dW_l||, and the unit statistics: for sigmoid/tanh the fraction of
saturated units (phi'(z) < 5 % of its maximum), for the rectifier family the
fraction of units in the negative regime (z <= 0: zero gradient for ReLU, a
reduced one for the others). It reports test accuracy and loss curves and the
PReLU slopes learned per layer (from a second, identical fit of the PReLU
network: the sweep does not return parameters).

Data: MNIST-1D, 25,000 samples (20,000 train / 5,000 test), as in the main
study. Training: SGD, momentum 0.9, learning rate 0.02, batch 128, 1500 steps,
3 seeds.

    python -m experiments.activations                  # ~4 min on 2 CPU cores (3 seeds)
    python -m experiments.activations --quick          # seconds (tiny sizes)
    python -m experiments.activations --figure docs/figures/activations.png

Finding (default run, 3 seeds; 230 s on 2 shared CPU cores): PReLU is best
(77.6 +- 0.9 % test accuracy), then GELU 74.2, tanh 73.3, SELU 71.6, Leaky
ReLU 69.0, ReLU 66.8; sigmoid + Xavier stays at chance with ||P_0||^2/n =
10^-25 although none of its units saturate (sigma' <= 1/4 per layer does it);
ELU with He init starts exploding (10^1.3) and diverged in 2 of 3 seeds.
Against the usual story, tanh beats ReLU at this depth. PReLU's slopes fall
from 0.25 to ~0.18 in the first blocks and stay near 0.25 in the last ones.
``report.md`` has the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import numpy as np
from matplotlib.ticker import MaxNLocator

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.loop import fit
from vgrad.models import build
from vgrad.models.activations import PRELU_INIT_SLOPE, SATURATING
from vgrad.study import StudyArgs, markdown_table

NAME = "activations"
# activation -> (label, matching initialiser)
ACTIVATIONS = {
    "sigmoid": ("sigmoid (Xavier)", "glorot_normal"),
    "tanh": ("tanh (Xavier)", "glorot_normal"),
    "relu": ("ReLU (He)", "he_normal"),
    "leaky_relu": ("Leaky ReLU 0.01 (He)", "he_normal"),
    "prelu": ("PReLU (He)", "he_normal"),
    "elu": ("ELU (He)", "he_normal"),
    "selu": ("SELU (LeCun)", "lecun_normal"),
    "gelu": ("GELU (He)", "he_normal"),
}
CHANCE = 0.1


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Eight activations, each with its matching init, in one deep plain MLP."""

    depth: int = 20
    width: int = 128
    steps: int = 1500
    learning_rate: float = 0.02
    num_samples: int = 25000
    """MNIST-1D samples generated (80 % train, 20 % test)."""


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depth=4, width=16, steps=30, num_samples=5000, eval_every=10,
                    measure_at=[0, 10, 30], measure_batch_size=16,
                    activations=["sigmoid", "relu", "prelu"], seeds=args.num_seeds(3))
    steps = args.steps
    return dict(depth=args.depth, width=args.width, steps=steps, num_samples=args.num_samples,
                eval_every=50, measure_batch_size=64,
                measure_at=sorted({0, steps // 8, steps // 4, steps // 2, steps}),
                activations=list(ACTIVATIONS), seeds=args.num_seeds(3))


def train_config(args: Args) -> TrainConfig:
    s = sizes(args)
    return TrainConfig(steps=s["steps"], batch_size=128, learning_rate=args.learning_rate,
                       momentum=0.9, eval_every=s["eval_every"])


def model_config(args: Args, activation: str) -> ModelConfig:
    s = sizes(args)
    return ModelConfig(depth=s["depth"], width=s["width"], activation=activation,
                       init=ACTIVATIONS[activation][1])


def grid(args: Args) -> list[sweep.Run]:
    s = sizes(args)
    runs = []
    for act in s["activations"]:
        runs += sweep.grid(model_config(args, act), train_config(args), seeds=s["seeds"],
                           label=act)
    return runs








def unit_fraction_key(activation: str) -> str:
    """Which unit statistic describes an activation's lost gradient."""
    return "saturated_fraction" if activation in SATURATING else "dead_fraction"


def summarise(result: sweep.SweepResult) -> list[dict]:
    out = []
    for act, runs in result.by_label().items():
        steps = [m["step"] for m in runs[0].measurements]
        # A diverged run is frozen at its last good state; measurements after that
        # step describe no trained network, so they are left out (NaN).
        last = [r.final.get("step", math.inf) if r.status == "diverged" else math.inf
                for r in runs]
        per = lambda key: np.asarray([[m[key] if m["step"] <= stop else
                                       np.full(np.shape(m[key]), np.nan) for m in r.measurements]
                                      for r, stop in zip(runs, last)], float)
        frac_key = unit_fraction_key(act)
        acc = result.final_stats(runs, "test_accuracy")
        curve_steps, test_acc = result.curves(runs, "test_accuracy")
        loss_steps, loss = result.curves(runs, "loss")
        p = per("log10_product_sq_norms")                                    # (S, T, L+1)
        out.append({
            "activation": act, "name": ACTIVATIONS[act][0], "init": ACTIVATIONS[act][1],
            "seeds": [r.seed for r in runs], "status": [r.status for r in runs],
            "diverged_at_step": [r.final.get("step") if r.status == "diverged" else None
                                 for r in runs],
            "measure_steps": steps,
            "log10_product_sq_norms": p.tolist(),
            "log10_P0": p[:, :, 0].tolist(),                                  # (S, T)
            "log10_weight_grad_norms": plots.log10(per("weight_grad_norms")).tolist(),  # (S, T, L)
            "unit_fraction_kind": frac_key,
            "unit_fraction": per(frac_key).tolist(),                          # (S, T, L+1)
            "activation_std": per("activation_std").tolist(),
            "test_accuracy_mean": acc["mean"], "test_accuracy_std": acc["std"],
            "test_accuracy": acc["values"],
            "train_accuracy_mean": result.final_stats(runs, "train_accuracy")["mean"],
            "test_accuracy_curve": {"steps": curve_steps.tolist(), "values": test_acc.tolist()},
            "loss_curve": {"steps": loss_steps.tolist(), "values": loss.tolist()},
            "step_time_s": runs[0].step_time_s,
        })
    return out


def prelu_slopes(args: Args, dataset) -> dict | None:
    """Refit the PReLU network (same configs and seeds as in the sweep, so the same
    runs) and read its learned slopes: (S, L+1, width), index 0 = the stem."""
    s = sizes(args)
    if "prelu" not in s["activations"]:
        return None
    cfg = model_config(args, "prelu")
    result = fit(build(cfg), train_config(args), dataset, seeds=s["seeds"], progress=False)
    params = jax.device_get(result.state.params)
    stem = np.asarray(params["stem"]["prelu_slope"]).reshape(s["seeds"], 1, -1)
    blocks = np.asarray(params["blocks"]["block"]["layer_0"]["prelu_slope"])
    blocks = blocks.reshape(s["seeds"], cfg.depth, -1)
    slopes = np.concatenate([stem, blocks], axis=1)                            # (S, L+1, width)
    acc = np.asarray(result.final["test_accuracy"], float).reshape(-1)
    return {"slopes": slopes.tolist(), "initial_slope": PRELU_INIT_SLOPE,
            "mean_per_layer": slopes.mean(axis=(0, 2)).tolist(),
            "p10_per_layer": np.percentile(slopes, 10, axis=(0, 2)).tolist(),
            "p90_per_layer": np.percentile(slopes, 90, axis=(0, 2)).tolist(),
            "fraction_negative": float(np.mean(slopes < 0)),
            "refit_test_accuracy": acc.tolist(), "status": result.status}


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def figure_summary(acts: list[dict]):
    """The headline: test accuracy over training, and ||P_0||^2/n over training."""
    fig, axes = plots.figure(2, 1, width=5.4, height=4.0)
    # Activations whose product is many decades below the rest would squash every
    # other curve into a line: they are named at the bottom edge instead.
    lows = {a["activation"]: float(np.nanmin(np.where(np.isfinite(p := np.asarray(
        a["log10_P0"], float)), p, np.nan))) for a in acts}
    typical = np.median(list(lows.values()))
    off_scale = {k for k, v in lows.items() if v < typical - 6}
    for a in acts:
        color = plots.color(a["activation"])
        c = a["test_accuracy_curve"]
        plots.curve_band(axes[0, 0], c, label=display_name(a), color=color)
        if a["activation"] not in off_scale:
            plots.band(axes[0, 1], a["measure_steps"], a["log10_P0"], label=a["name"],
                       color=color, marker="o")
    ax = axes[0, 0]
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1),
           title="Test accuracy (mean, min-max over seeds)")
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    ax.legend(fontsize="x-small", loc="upper left", ncols=2)
    ax = axes[0, 1]
    ax.set(xlabel="training step",
           ylabel=r"$\|P_0\|_F^2/n$  ($P_0=\partial h^L/\partial h^0$)",
           title="First-to-last gradient product during training")
    ax.axhline(0, color="k", lw=0.8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, -2.5) - (1.2 if off_scale else 0), max(hi, 1.5))
    for i, a in enumerate(x for x in acts if x["activation"] in off_scale):
        p = np.asarray(a["log10_P0"], float)
        ax.annotate(f"↓ {a['name']}: off scale, $10^{{{np.nanmean(p[:, 0]):.0f}}}$ → "
                    f"$10^{{{np.nanmean(p[:, -1]):.0f}}}$", xy=(0.02, 0.03 + 0.07 * i),
                    xycoords="axes fraction", color=plots.color(a["activation"]),
                    fontsize="small")
    plots.power_of_ten_axis(ax)
    ax.legend(fontsize="x-small", loc="upper right", ncols=2)
    return fig


def figure_gradient_flow(acts: list[dict]):
    """Per measured step (columns): ||P_l||^2/n and ||dL/dW_l|| against layer."""
    steps = acts[0]["measure_steps"]
    fig, axes = plots.figure(len(steps), 2, width=3.4, height=3.2, sharey="row")
    for a in acts:
        color = plots.color(a["activation"])
        p = np.asarray(a["log10_product_sq_norms"], float)                # (S, T, L+1)
        w = np.asarray(a["log10_weight_grad_norms"], float)               # (S, T, L)
        w = np.where(np.isneginf(w), np.nan, w)
        for t in range(len(steps)):
            plots.band(axes[0, t], np.arange(p.shape[2]), p[:, t], color=color, label=a["name"])
            axes[0, t].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[1, t].xaxis.set_major_locator(MaxNLocator(integer=True))
            plots.band(axes[1, t], np.arange(1, w.shape[2] + 1), w[:, t], color=color)
    for t, step in enumerate(steps):
        axes[0, t].set_title("initialisation" if step == 0 else f"step {step}")
        axes[0, t].set_xlabel("layer l")
        axes[1, t].set_xlabel("block l")
        for ax in axes[:, t]:
            plots.power_of_ten_axis(ax)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(r"$\|P_l\|_F^2/n$,  $P_l=\partial h^L/\partial h^l$")
    axes[1, 0].set_ylabel(r"$\|\partial L/\partial W_l\|$ (batch of 64)")
    axes[0, -1].legend(fontsize="xx-small", loc="lower right")
    fig.suptitle("Gradient flow per layer, at initialisation and during training "
                 "(mean, min-max over seeds)", fontsize="medium")
    return fig


def figure_units(acts: list[dict]):
    """Heat maps layer x step of the saturated (sigmoid/tanh) or negative-regime fraction."""
    cols = min(4, len(acts))
    rows = math.ceil(len(acts) / cols)
    fig, axes = plots.figure(cols, rows, width=3.3, height=2.9)
    for ax, a in zip(axes.ravel(), acts):
        frac = plots.nanmean(np.asarray(a["unit_fraction"], float))            # (T, L+1)
        kind = ("saturated" if a["unit_fraction_kind"] == "saturated_fraction"
                else "z ≤ 0")
        plots.heatmap(ax, frac.T, x=a["measure_steps"], y=list(range(frac.shape[1])),
                      label=f"fraction {kind}", vmin=0, vmax=1, cmap="magma",
                      xlabel="training step", ylabel="layer l (0 = stem)")
        ax.set_title(a["name"], fontsize="small")
    for ax in axes.ravel()[len(acts):]:
        ax.axis("off")
    fig.suptitle("Units that pass little or no gradient: saturated (φ′ < 5 % of max, "
                 "sigmoid/tanh) or in the negative regime (z ≤ 0; zero gradient only for ReLU); "
                 "mean over seeds", fontsize="medium")
    return fig


def display_name(a: dict) -> str:
    """The legend label: the name, and how many seeds diverged."""
    n = a["status"].count("diverged")
    return a["name"] + (f" — {n} of {len(a['status'])} seeds diverged" if n else "")


def figure_curves(acts: list[dict]):
    fig, axes = plots.figure(2, 1, width=5.2)
    for a in acts:
        color = plots.color(a["activation"])
        plots.curve_band(axes[0, 0], a["loss_curve"], label=display_name(a), color=color)
        plots.curve_band(axes[0, 1], a["test_accuracy_curve"], label=display_name(a), color=color)
    # A diverging run's loss (up to 1e15 or more) would flatten every other curve:
    # the axis stops a little above the initial losses and says what it leaves out.
    first = [np.nanmax(np.asarray(a["loss_curve"]["values"], float)[:, :5])
             for a in acts if len(a["loss_curve"]["steps"])]
    top = 1.3 * float(np.median(first)) if first else None
    if top is not None and np.isfinite(top):
        axes[0, 0].set_ylim(0, top)
        above = [a for a in acts if len(a["loss_curve"]["steps"])
                 and np.nanmax(np.asarray(a["loss_curve"]["values"], float)) > top]
        for i, a in enumerate(above):
            peak = np.nanmax(np.asarray(a["loss_curve"]["values"], float))
            axes[0, 0].annotate(f"↑ {a['name']}: off scale (up to {peak:.2g})",
                                xy=(0.98, 0.95 - 0.07 * i), xycoords="axes fraction", ha="right", fontsize="small",
                                color=plots.color(a["activation"]))
    axes[0, 0].set(xlabel="training step", ylabel="training loss (batch, cross-entropy)",
                   title="Training loss")
    axes[0, 1].set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1),
                   title="Test accuracy (a diverged seed's curve stops)")
    axes[0, 1].legend(fontsize="x-small", ncols=2)
    return fig


def figure_prelu(prelu: dict):
    slopes = np.asarray(prelu["slopes"], float)                              # (S, L+1, width)
    layers = np.arange(slopes.shape[1])
    fig, axes = plots.figure(2, 1, width=5.0)
    ax = axes[0, 0]
    color = plots.color("prelu")
    plots.band(ax, layers, slopes.mean(axis=2), color=color, marker="o",
               label="mean over units (band: seeds)")
    ax.fill_between(layers, prelu["p10_per_layer"], prelu["p90_per_layer"], color=color,
                    alpha=0.12, lw=0, label="10–90 % of units")
    ax.axhline(prelu["initial_slope"], color="k", lw=0.8, ls="--", label="initial slope 0.25")
    ax.axhline(0, color="0.6", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer l (0 = stem)", ylabel="learned negative-side slope a",
           title="PReLU slopes after training, per layer")
    ax.legend(fontsize="x-small")
    ax = axes[0, 1]
    ax.hist(slopes.ravel(), bins=60, color=color, alpha=0.8)
    ax.axvline(prelu["initial_slope"], color="k", lw=0.8, ls="--")
    ax.set(xlabel="learned slope a (all layers, units, seeds)", ylabel="units",
           title="Distribution of learned slopes")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def conclusion(acts: list[dict], prelu: dict | None) -> str:
    """Two to four sentences from the measured numbers (nothing assumed)."""
    by_acc = sorted(acts, key=lambda a: -np.nan_to_num(a["test_accuracy_mean"], nan=-1))
    p0 = lambda a, t: float(np.nanmean(np.asarray(a["log10_P0"], float)[:, t]))
    best = by_acc[0]
    parts = [f"**{best['name']}** reaches the best test accuracy, "
             f"{100 * best['test_accuracy_mean']:.1f} ± {100 * best['test_accuracy_std']:.1f} %; "
             "then " + ", ".join(f"{a['name']} {100 * a['test_accuracy_mean']:.1f}"
                                 for a in by_acc[1:]) + " %."]
    parts.append("‖P_0‖²/n at initialisation → end of training: "
                 + ", ".join(f"{a['name']} 10^{p0(a, 0):.1f} → 10^{p0(a, -1):.1f}" for a in acts)
                 + ".")
    diverged = [a for a in acts if "diverged" in a["status"]]
    if diverged:
        parts.append("Diverged (counted with the accuracy of their last finite state): "
                     + "; ".join(
            f"{a['name']} in {a['status'].count('diverged')} of {len(a['status'])} seeds, at steps "
            + ", ".join(str(s + 1) for s in a["diverged_at_step"] if s is not None)
            + f" (‖P_0‖²/n = 10^{p0(a, 0):.1f} at init)" for a in diverged) + ".")
    # Where the usual story fails, say so.
    learned = [a for a in acts if a["test_accuracy_mean"] >= CHANCE + 0.15]
    for a in acts:
        if a["unit_fraction_kind"] == "saturated_fraction":
            sat0 = float(np.nanmean(np.asarray(a["unit_fraction"], float)[:, 0, 1:]))
            if p0(a, 0) < -3 and sat0 < 0.05:
                parts.append(f"{a['name']} loses its gradient without saturating: "
                             f"{100 * sat0:.1f} % of its units are saturated at initialisation, yet "
                             f"‖P_0‖²/n = 10^{p0(a, 0):.1f}, because σ′ ≤ 1/4 shrinks every layer's "
                             "Jacobian, not the saturation of the usual story.")
        if learned and a["test_accuracy_mean"] < CHANCE + 0.05 and p0(a, 0) > -2:
            parts.append(f"Contrary to the usual story, {a['name']} starts with a healthy product "
                         f"(10^{p0(a, 0):.1f}) and still does not learn.")
    relu = next((a for a in acts if a["activation"] == "relu"), None)
    if relu is not None:
        beat = [a for a in acts if a["unit_fraction_kind"] == "saturated_fraction"
                and a["test_accuracy_mean"] > relu["test_accuracy_mean"]
                + 2 * max(relu["test_accuracy_std"], a["test_accuracy_std"], 0.005)]
        for a in beat:
            parts.append(f"Contrary to the usual story, the saturating {a['name']} beats "
                         f"{relu['name']} at this depth ({100 * a['test_accuracy_mean']:.1f} vs "
                         f"{100 * relu['test_accuracy_mean']:.1f} %).")
    if prelu is not None:
        mean = np.asarray(prelu["mean_per_layer"], float)
        parts.append(f"PReLU's slopes moved from {prelu['initial_slope']} to a mean of "
                     f"{mean.mean():.3f} (layer means {mean.min():.3f} … {mean.max():.3f}; "
                     f"{100 * prelu['fraction_negative']:.1f} % negative).")
    return " ".join(parts)


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d", num_samples=size["num_samples"])
    runs = grid(args)
    result = s.sweep(runs, dataset, measure_at=size["measure_at"],
                     measure_batch_size=size["measure_batch_size"])
    acts = summarise(result)
    prelu = prelu_slopes(args, dataset) if not s.interrupted else None
    figures = {"summary": figure_summary(acts), "gradient_flow": figure_gradient_flow(acts),
               "units": figure_units(acts), "curves": figure_curves(acts)}
    if prelu is not None:
        figures["prelu_slopes"] = figure_prelu(prelu)
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "Activation functions and the vanishing gradient"
    rep.add("Setup", f"""
- Network: plain MLP, depth {size['depth']}, width {size['width']}; each activation with its
  matching initialisation: {', '.join(ACTIVATIONS[a][0] for a in size['activations'])}.
- Data: MNIST-1D, {size['num_samples']} samples ({dataset.num_train} train /
  {len(dataset.y_test)} test), standardised.
- Training: SGD, momentum 0.9, learning rate {args.learning_rate}, batch 128, {size['steps']}
  steps, {size['seeds']} seed(s); the same batches for every activation of a seed.
- Measured at steps {', '.join(map(str, size['measure_at']))} on one batch of
  {size['measure_batch_size']} training examples: ‖P_l‖²/n (8 probes), ‖∂L/∂W_l‖, unit
  statistics. PReLU slopes from a second fit of the PReLU network with the same configs and
  seeds (the sweep does not return parameters).
- {len(runs)} runs in {len(result.groups)} compiled programs.""")
    rows = []
    for a in acts:
        frac = np.asarray(a["unit_fraction"], float)
        rows.append({
            "activation": a["name"],
            "acc": f"{100 * a['test_accuracy_mean']:.1f} ± {100 * a['test_accuracy_std']:.1f}",
            "train": f"{100 * a['train_accuracy_mean']:.1f}",
            "p0i": f"{np.nanmean(np.asarray(a['log10_P0'], float)[:, 0]):.1f}",
            "p0f": f"{np.nanmean(np.asarray(a['log10_P0'], float)[:, -1]):.1f}",
            "kind": "saturated" if a["unit_fraction_kind"] == "saturated_fraction" else "z ≤ 0",
            "f0": f"{100 * np.nanmean(frac[:, 0, 1:]):.1f}",
            "f1": f"{100 * np.nanmean(frac[:, -1, 1:]):.1f}",
            "status": ", ".join(f"{a['status'].count(k)} {k}" for k in dict.fromkeys(a["status"]))})
    rep.add("Summary", markdown_table(rows, [
        ("activation (init)", "activation"), ("test accuracy %", "acc"),
        ("train accuracy %", "train"), ("log10 ‖P_0‖²/n at init", "p0i"),
        ("at the end", "p0f"), ("unit statistic", "kind"), ("% of block units at init", "f0"),
        ("at the end", "f1"), ("seeds", "status")]))
    rep.add("Conclusion", conclusion(acts, prelu))
    rep.add_figures(paths)
    return {"activations": acts, "prelu": prelu, "table": result.table(), "sizes": size,
            "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
