"""How does the gradient depend on depth? Measured against mean-field theory.

Plain MLPs (width 128) at depths 2, 5, 10, 20, 50 and 100 in four classic
forms: sigmoid with the naive N(0, 0.01^2) init, tanh with Xavier
(glorot_normal), ReLU with Xavier and ReLU with He. At initialisation it
measures, per layer, log10 ||P_l||_F^2 / n (P_l = dh^L/dh^l, the mean squared
singular value of the gradient product) and the per-block gradient norms
(||dL/dh^l|| and ||dL/dW_l||), each next to the mean-field prediction
(``vgrad.analysis.theory.predicted_log_product_sq_norms``, propagated from the
measured second moment of the stem output; for ||dL/dh^l|| the prediction is
||dL/dh^L|| * sqrt(predicted ||P_l||^2/n)). It then plots the first-to-last
ratio ||P_0||^2/n against depth, trains every network briefly (SGD, momentum
0.9, learning rate 0.01, batch 128, 300 steps on MNIST-1D 4000/1000) and
shows how far from the output the weights still moved: the relative weight
change ||W_l(T) - W_l(0)|| / ||W_l(0)|| per block, as a heat map depth x
distance from the output.

    python -m experiments.depth                        # ~4 min on 2 CPU cores (2 seeds)
    python -m experiments.depth --quick                # seconds (tiny sizes)
    python -m experiments.depth --figure docs/figures/depth.png

Finding (default run, 2 seeds; 246 s on 2 shared CPU cores): the gradient
product decays geometrically with depth as mean-field theory says, 3.10
decades per block for naive sigmoid (10^-310 at depth 100; predicted 3.10)
and 0.31 for ReLU + Xavier (10^-31; predicted 0.30), polynomially for tanh +
Xavier (10^-1.4 at depth 100), not at all for ReLU + He; measurement and
prediction agree within 0.17 decade up to depth 20 and 0.53 at depth 50-100
(finite width). In 300 steps only the last 2 of 100 blocks of naive sigmoid
and ReLU + Xavier moved by more than 10^-3; ReLU + He moved everywhere but
still stays at chance at depth 100 (it learns up to depth 50): a healthy
product at initialisation is not enough. ``report.md`` has the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import NullLocator

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.analysis import theory
from vgrad.study import StudyArgs, markdown_table

NAME = "depth"
# label -> (colour key, marker, ModelConfig overrides)
VARIANTS = {
    "sigmoid, naive N(0, 0.01²)": ("sigmoid", "o", {"model.activation": "sigmoid",
                                                    "model.init": "normal",
                                                    "model.init_std": 0.01}),
    "tanh, Xavier": ("tanh", "o", {"model.activation": "tanh", "model.init": "glorot_normal"}),
    "ReLU, Xavier": ("relu", "s", {"model.activation": "relu", "model.init": "glorot_normal"}),
    "ReLU, He": ("relu", "o", {"model.activation": "relu", "model.init": "he_normal"}),
}
# Relative weight changes and gradient norms below this (including exact zeros:
# a float32 gradient that underflowed) are drawn at this floor.
LOG10_FLOOR = -12.0
CHANCE = 0.1


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Gradient products against depth, measured and predicted; where training moves weights."""

    depths: tuple[int, ...] = (2, 5, 10, 20, 50, 100)
    width: int = 128
    steps: int = 300
    learning_rate: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not self.depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                  for d in self.depths):
            raise ValueError(f"invalid --depths={self.depths!r}: must be integers >= 1")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depths=(2, 6), width=16, steps=20, eval_every=10, measure_batch_size=16,
                    variants=["sigmoid, naive N(0, 0.01²)", "ReLU, He"],
                    seeds=args.num_seeds(2))
    return dict(depths=tuple(sorted(set(args.depths))), width=args.width, steps=args.steps,
                eval_every=50, measure_batch_size=64, variants=list(VARIANTS),
                seeds=args.num_seeds(2))


def grid(args: Args) -> list[sweep.Run]:
    s = sizes(args)
    train = TrainConfig(steps=s["steps"], batch_size=128, learning_rate=args.learning_rate,
                        momentum=0.9, eval_every=s["eval_every"])
    runs = []
    for depth in s["depths"]:
        runs += sweep.variants({v: VARIANTS[v][2] for v in s["variants"]},
                               model=ModelConfig(depth=depth, width=s["width"]), train=train,
                               seeds=s["seeds"])
    return runs


def summarise(result: sweep.SweepResult) -> list[dict]:
    """One entry per (variant, depth): measured and predicted curves at init,
    relative weight change and accuracy after training."""
    cells: dict[tuple[str, int], list[sweep.RunResult]] = {}
    for r in result.runs:
        cells.setdefault((r.label, r.model.depth), []).append(r)
    out = []
    for (label, depth), runs in cells.items():
        init = [r.measurements[0] for r in runs]
        final = [r.measurements[-1] for r in runs]
        assert all(m["step"] == 0 for m in init)
        log10_p = np.asarray([m["log10_product_sq_norms"] for m in init])          # (S, L+1)
        # Second moment of the stem output h^0 on the measurement batch (index 0 of
        # the activation statistics is the stem layer, whose output is h^0).
        h0_sq = [m["activation_mean"][0] ** 2 + m["activation_std"][0] ** 2 for m in init]
        cfg = runs[0].model
        predicted = theory.predicted_log_product_sq_norms(
            cfg, input_second_moment=float(np.mean(h0_sq))) / math.log(10)           # (L+1,)
        hidden = plots.log10([m["hidden_grad_norms"] for m in init])                      # (S, L+1)
        # Mean field: E||g P_l||^2 = ||g||^2 ||P_l||_F^2 / n for g = dL/dh^L.
        hidden_predicted = hidden[:, -1:] + 0.5 * predicted[None]
        weight = plots.log10([m["weight_grad_norms"] for m in init])                      # (S, L)
        change = plots.log10([m["relative_weight_change"] for m in final])                # (S, L)
        curve_steps, test_acc = result.curves(runs, "test_accuracy")
        acc = result.final_stats(runs, "test_accuracy")
        with np.errstate(invalid="ignore"):
            weight_ratio = weight[:, 0] - weight[:, -1]
        out.append({
            "variant": label, "depth": depth, "width": cfg.width, "color_key": VARIANTS[label][0],
            "seeds": [r.seed for r in runs], "status": [r.status for r in runs],
            "input_second_moment": float(np.mean(h0_sq)),
            "log10_product_sq_norms": log10_p.tolist(),
            "theory_log10_product_sq_norms": predicted.tolist(),
            "log10_P0": log10_p[:, 0].tolist(), "theory_log10_P0": float(predicted[0]),
            "log10_hidden_grad_norms": hidden.tolist(),
            "theory_log10_hidden_grad_norms": hidden_predicted.tolist(),
            "log10_weight_grad_norms": weight.tolist(),
            "log10_weight_grad_ratio_first_last": weight_ratio.tolist(),
            "log10_relative_weight_change": change.tolist(),
            "final_step": final[0]["step"],
            "test_accuracy_mean": acc["mean"], "test_accuracy_std": acc["std"],
            "test_accuracy": acc["values"],
            "test_accuracy_curve": {"steps": curve_steps.tolist(), "values": test_acc.tolist()},
        })
    return out


def by_variant(cells: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in cells:
        out.setdefault(c["variant"], []).append(c)
    for v in out.values():
        v.sort(key=lambda c: c["depth"])
    return out


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _min_span(ax, decades: float = 2.0) -> None:
    """Widen a log10-valued y axis to at least ``decades``, so that power-of-ten
    ticks stay on integers when the curves are nearly flat."""
    lo, hi = ax.get_ylim()
    if hi - lo < decades:
        mid = 0.5 * (lo + hi)
        ax.set_ylim(mid - decades / 2, mid + decades / 2)


def _depth_axis(ax, depths) -> None:
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_locator(NullLocator())


def _depth_colors(depths):
    cmap = colormaps["viridis"]
    return {d: cmap(0.9 * i / max(1, len(depths) - 1)) for i, d in enumerate(sorted(depths))}


def figure_layers(cells: list[dict]):
    """Per variant (columns): ||P_l||^2/n, ||dL/dh^l|| and ||dL/dW_l|| against layer
    at initialisation, one curve per depth; dashed: mean-field prediction."""
    variants = by_variant(cells)
    depths = sorted({c["depth"] for c in cells})
    colors = _depth_colors(depths)
    fig, axes = plots.figure(len(variants), 3, width=4.0, height=3.3)
    rows = (("log10_product_sq_norms", "theory_log10_product_sq_norms",
             r"$\|P_l\|_F^2/n$,  $P_l=\partial h^L/\partial h^l$"),
            ("log10_hidden_grad_norms", "theory_log10_hidden_grad_norms",
             r"$\|\partial L/\partial h^l\|$ (batch of 64)"),
            ("log10_weight_grad_norms", None, r"$\|\partial L/\partial W_l\|$ (block $l$)"))
    for col, (label, vcells) in enumerate(variants.items()):
        for row, (key, theory_key, ylabel) in enumerate(rows):
            ax = axes[row, col]
            for c in vcells:
                values = np.asarray(c[key], float)
                x = np.arange(values.shape[1]) + (1 if key == "log10_weight_grad_norms" else 0)
                shown = np.where(np.isneginf(values), np.nan, values)  # 0 = float32 underflow
                plots.band(ax, x, shown, color=colors[c["depth"]],
                           label=f"L = {c['depth']}" if row == 0 else None)
                if theory_key is not None:
                    t = np.asarray(c[theory_key], float).reshape(-1, len(x))
                    ax.plot(x, plots.nanmean(t), color=colors[c["depth"]], ls="--", lw=1.0)
            _min_span(ax)
            plots.power_of_ten_axis(ax)
            ax.set_xlabel("block l" if key == "log10_weight_grad_norms" else "layer l")
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(label)
    axes[0, 0].legend(fontsize="x-small", title="depth", title_fontsize="x-small",
                      loc="lower right")
    fig.suptitle("At initialisation: solid = measured (mean, min-max over seeds), "
                 "dashed = mean-field prediction; gaps = exactly 0 in float32", fontsize="medium")
    return fig


def figure_ratio(cells: list[dict]):
    """The headline: ||P_0||^2/n against depth (measured and predicted), the
    first-to-last weight-gradient ratio, and test accuracy after short training."""
    variants = by_variant(cells)
    fig, axes = plots.figure(3, 1, width=4.6, height=3.9)
    for label, vcells in variants.items():
        key, marker, _ = VARIANTS[label]
        color = plots.color(key)
        depths = [c["depth"] for c in vcells]
        p0 = np.asarray([c["log10_P0"] for c in vcells]).T                       # (S, D)
        plots.band(axes[0, 0], depths, p0, color=color, marker=marker, label=label)
        axes[0, 0].plot(depths, [c["theory_log10_P0"] for c in vcells], color=color, ls="--",
                        lw=1.0)
        ratio = np.asarray([c["log10_weight_grad_ratio_first_last"] for c in vcells], float).T
        finite = np.where(np.isfinite(ratio), ratio, np.nan)
        plots.band(axes[0, 1], depths, finite, color=color, marker=marker, label=label)
        under = [d for d, col in zip(depths, ratio.T) if np.any(np.isneginf(col))]
        if under:  # the first block's gradient is exactly 0 in float32
            axes[0, 1].plot(under, [-46] * len(under), ls="none", marker="v", color=color, ms=7)
        acc = np.asarray([c["test_accuracy"] for c in vcells]).T
        plots.band(axes[0, 2], depths, acc, color=color, marker=marker, label=label)
    all_depths = sorted({c["depth"] for c in cells})
    ax = axes[0, 0]
    ax.set(xlabel="depth L (blocks)",
           ylabel=r"$\|P_0\|_F^2/n$  ($P_0=\partial h^L/\partial h^0$)",
           title="First-to-last gradient product at init\n(dashed: mean-field prediction)")
    plots.power_of_ten_axis(ax)
    ax.legend(fontsize="x-small", loc="lower left")
    ax = axes[0, 1]
    ax.set(xlabel="depth L (blocks)",
           ylabel=r"$\|\partial L/\partial W_1\| \,/\, \|\partial L/\partial W_L\|$",
           title="First- to last-block weight gradient at init\n"
                 r"($\blacktriangledown$: first block's gradient is exactly 0 in float32)")
    plots.power_of_ten_axis(ax)
    ax = axes[0, 2]
    steps = cells[0]["final_step"]
    ax.set(xlabel="depth L (blocks)", ylabel="test accuracy", ylim=(0, 1),
           title=f"Test accuracy after {steps} steps")
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    for ax in axes[0]:
        _depth_axis(ax, all_depths)
        ax.grid(alpha=0.3)
    return fig


def figure_weight_change(cells: list[dict]):
    """Heat maps depth x distance from the output of log10 relative weight change."""
    variants = by_variant(cells)
    max_depth = max(c["depth"] for c in cells)
    fig, axes = plots.figure(2, math.ceil(len(variants) / 2), width=5.2, height=3.2)
    values_all = np.concatenate([np.asarray(c["log10_relative_weight_change"], float).ravel()
                                 for c in cells])
    finite = values_all[np.isfinite(values_all)]
    vmax = float(np.max(finite)) if finite.size else 0.0
    vmin = max(LOG10_FLOOR, float(np.min(finite)) if finite.size else LOG10_FLOOR)
    for ax, (label, vcells) in zip(axes.ravel(), variants.items()):
        grid = np.full((len(vcells), max_depth), np.nan)
        for i, c in enumerate(vcells):
            change = plots.nanmean(np.asarray(c["log10_relative_weight_change"], float))   # (L,)
            change = np.maximum(np.where(np.isneginf(change), LOG10_FLOOR, change), vmin)
            grid[i, :c["depth"]] = change[::-1]  # column k = block L - k
        plots.heatmap(ax, grid, x=list(range(max_depth)), y=[c["depth"] for c in vcells],
                      label=r"$\log_{10}\,\|W_l(T)-W_l(0)\|/\|W_l(0)\|$", vmin=vmin, vmax=vmax,
                      xlabel="blocks from the output (L − l)", ylabel="depth L")
        step = 20 if max_depth > 40 else (5 if max_depth > 10 else 1)
        ticks = range(0, max_depth, step)
        ax.set_xticks(np.asarray(ticks) + 0.5, [str(k) for k in ticks])
        ax.set_title(label, fontsize="medium")
    for ax in axes.ravel()[len(variants):]:
        ax.axis("off")
    steps = cells[0]["final_step"]
    zeros = bool(np.any(np.isneginf(values_all)))
    fig.suptitle(f"How far from the output the weights moved in {steps} steps (mean of seeds; "
                 "grey: no such block" + (f"; exactly 0 shown at $10^{{{vmin:.0f}}}$)" if zeros
                                          else ")"), fontsize="medium")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def decades_per_layer(vcells: list[dict], key: str) -> float:
    """Least-squares slope of log10 ||P_0||^2/n against depth (decades per block)."""
    depths = np.asarray([c["depth"] for c in vcells], float)
    values = np.asarray([np.mean(c[key]) for c in vcells], float)
    if len(depths) < 2:
        return math.nan
    return float(np.polyfit(depths, values, 1)[0])


def agreement(cells: list[dict], shallow: int = 20) -> dict:
    """Largest |measured - predicted| of log10 ||P_0||^2/n (mean over seeds): overall,
    per variant, and separately for depths <= ``shallow`` and deeper (where
    finite-width corrections, of order depth / width, grow)."""
    err = lambda c: abs(float(np.mean(c["log10_P0"])) - c["theory_log10_P0"])
    per = {label: max(map(err, vcells)) for label, vcells in by_variant(cells).items()}
    upto = [err(c) for c in cells if c["depth"] <= shallow]
    beyond = [err(c) for c in cells if c["depth"] > shallow]
    return {"max_abs_error_decades": max(per.values()), "per_variant": per,
            "shallow_depth": shallow,
            "max_abs_error_up_to_shallow": max(upto) if upto else math.nan,
            "max_abs_error_deeper": max(beyond) if beyond else math.nan}


def blocks_moved(cell: dict, threshold: float = -3.0) -> int:
    """How many blocks, counted from the output, moved by more than 10^threshold
    (relative, mean over seeds) before the first one that did not."""
    change = plots.nanmean(np.asarray(cell["log10_relative_weight_change"], float))[::-1]
    below = np.flatnonzero(~(change > threshold))
    return int(below[0]) if below.size else len(change)


def conclusion(cells: list[dict], steps: int) -> str:
    """Two or three sentences from the measured numbers (nothing assumed)."""
    variants = by_variant(cells)
    deepest = max(c["depth"] for c in cells)
    parts = []
    slopes = []
    for label, vcells in variants.items():
        last = vcells[-1]
        slopes.append(f"{label}: {-decades_per_layer(vcells, 'log10_P0'):.2f} decades per block "
                      f"(predicted {-decades_per_layer(vcells, 'theory_log10_P0'):.2f}; "
                      f"‖P_0‖²/n = 10^{np.mean(last['log10_P0']):.1f} at depth {last['depth']}, "
                      f"predicted 10^{last['theory_log10_P0']:.1f})")
    agree = agreement(cells)
    text = ("The first-to-last gradient product falls with depth at " + "; ".join(slopes)
            + "; mean-field theory propagated from the measured stem output is within "
            f"{agree['max_abs_error_decades']:.2f} decade of every measurement")
    if math.isfinite(agree["max_abs_error_up_to_shallow"]) and math.isfinite(
            agree["max_abs_error_deeper"]):
        text += (f" ({agree['max_abs_error_up_to_shallow']:.2f} up to depth "
                 f"{agree['shallow_depth']}, {agree['max_abs_error_deeper']:.2f} deeper, where "
                 f"finite-width corrections of order depth/width = "
                 f"{deepest}/{cells[0]['width']} grow)")
    parts.append(text + ".")
    # Training: how far from the output the deepest networks moved, and how deep they learn.
    learned = lambda c: c["test_accuracy_mean"] > CHANCE + 0.15
    moved = [f"{label} {blocks_moved(vcells[-1])} of {vcells[-1]['depth']}"
             for label, vcells in variants.items()]
    reach = []
    for label, vcells in variants.items():
        ok = [c["depth"] for c in vcells if learned(c)]
        reach.append(f"{label} {'up to depth ' + str(max(ok)) if ok else 'at no depth'}")
    parts.append(f"In {steps} steps, the blocks that moved by more than 10^-3 of their initial "
                 "norm, counted from the output of the deepest networks, were " + ", ".join(moved)
                 + f"; the networks learn (test accuracy > {100 * (CHANCE + 0.15):.0f} %) "
                 + ", ".join(reach) + ".")
    # Where the gradient product at init and learning disagree, say so.
    for label, vcells in variants.items():
        shallower_learned = [c for c in vcells if learned(c)]
        for c in vcells:
            healthy = np.mean(c["log10_P0"]) > -2
            if (healthy and c["test_accuracy_mean"] < CHANCE + 0.05 and shallower_learned
                    and min(x["depth"] for x in shallower_learned) < c["depth"]):
                parts.append(f"Contrary to the usual story, {label} keeps ‖P_0‖²/n at "
                             f"10^{np.mean(c['log10_P0']):.1f} at depth {c['depth']} and still "
                             f"stays at chance ({100 * c['test_accuracy_mean']:.1f} %), while "
                             f"at depth {max(x['depth'] for x in shallower_learned)} it learns: a "
                             "healthy gradient product at initialisation is not enough.")
                break
        for c in vcells:
            if np.mean(c["log10_P0"]) < -10 and learned(c):
                parts.append(f"Contrary to the usual story, {label} learns at depth {c['depth']} "
                             f"({100 * c['test_accuracy_mean']:.0f} %) although ‖P_0‖²/n = "
                             f"10^{np.mean(c['log10_P0']):.0f}: the blocks near the output train "
                             "alone.")
                break
    return " ".join(parts)


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d")
    runs = grid(args)
    result = s.sweep(runs, dataset, measure_at=[0, size["steps"]],
                     measure_batch_size=size["measure_batch_size"])
    cells = summarise(result)
    figures = {"ratio": figure_ratio(cells), "layers": figure_layers(cells),
               "weight_change": figure_weight_change(cells)}
    paths = {name: s.save_figure(fig, name, headline=name == "ratio")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "Gradients against depth: measured and mean-field"
    rep.add("Setup", f"""
- Networks: plain MLPs (Dense -> activation blocks), width {size['width']}, depths
  {', '.join(map(str, size['depths']))}; variants: {', '.join(size['variants'])}.
- Measured at initialisation on one batch of {size['measure_batch_size']} MNIST-1D training
  examples: log10 ‖P_l‖²/n (8 random probes), ‖∂L/∂h^l‖, ‖∂L/∂W_l‖. Mean-field prediction:
  `theory.predicted_log_product_sq_norms` with the measured second moment of the stem output.
- Training: SGD, momentum 0.9, learning rate {args.learning_rate}, batch 128, {size['steps']}
  steps on MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), {size['seeds']}
  seed(s); relative weight change ‖W_l(T) − W_l(0)‖/‖W_l(0)‖ per block at the end.
- {len(runs)} runs in {len(result.groups)} compiled programs.""")
    rows = [{"variant": c["variant"], "depth": c["depth"],
             "p0": f"{np.mean(c['log10_P0']):.2f}", "theory": f"{c['theory_log10_P0']:.2f}",
             "ratio": f"{plots.nanmean(np.asarray(c['log10_weight_grad_ratio_first_last'], float)):.1f}"
             .replace("nan", "0 (underflow)").replace("-inf", "0 (underflow)"),
             "first": f"{plots.nanmean(np.asarray(c['log10_relative_weight_change'], float))[0]:.1f}",
             "acc": f"{100 * c['test_accuracy_mean']:.1f} ± {100 * c['test_accuracy_std']:.1f}"}
            for c in sorted(cells, key=lambda c: (list(VARIANTS).index(c["variant"]), c["depth"]))]
    rep.add("Summary", markdown_table(rows, [
        ("variant", "variant"), ("depth", "depth"), ("log10 ‖P_0‖²/n measured", "p0"),
        ("mean-field", "theory"), ("log10 ‖∂L/∂W_1‖/‖∂L/∂W_L‖", "ratio"),
        ("log10 rel. change of block 1", "first"), ("test accuracy %", "acc")]))
    rep.add("Conclusion", conclusion(cells, size["steps"]))
    rep.add_figures(paths)
    return {"cells": cells, "agreement": agreement(cells),
            "decades_per_block": {label: {"measured": -decades_per_layer(v, "log10_P0"),
                                          "theory": -decades_per_layer(v, "theory_log10_P0")}
                                  for label, v in by_variant(cells).items()},
            "table": result.table(), "sizes": size, "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
