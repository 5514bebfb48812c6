"""The main study: which fix for vanishing gradients helps, and how much?

One deep MLP (depth 20, width 128) is trained on MNIST-1D in eight forms, side
by side, with the same optimiser and budget: the vanishing baseline (sigmoid,
naive N(0, 0.01^2) init), a better activation alone (ReLU), a better
initialisation alone (Xavier), BatchNorm, residual connections (pre-activation
blocks), BN + residual, gradient clipping (global norm 1), and the best
combination (ReLU + He + BN + residual). For each form it reports the test
accuracy (mean +- std over seeds), accuracy and loss curves, log10 ||P_0||^2/n
(the first-to-last-layer gradient product) at initialisation and after
training, the per-layer weight-gradient norms over training (a heat map layer
x step), and the time per step.

Data: MNIST-1D from the ``mnist1d`` package's own generator with 25,000
samples (20,000 train / 5,000 test; the package's default 5,000-sample set is
too small for deep MLPs, which overfit it at ~50 % test accuracy).
Training: SGD, momentum 0.9, learning rate 0.02, batch 128, 800 steps, 3
seeds; every form of a seed starts from the same data order.

    python -m experiments.mitigations                  # ~2 min on 2 CPU cores (113 s idle)
    python -m experiments.mitigations --quick          # seconds (tiny sizes)
    python -m experiments.mitigations --figure docs/figures/mitigations.png

Finding (default run): the baseline and the single fixes that leave the
gradient product below ~10^-5 at initialisation (ReLU alone, Xavier alone,
clipping) do not learn at all; BatchNorm, residual connections and their
combination keep the product near 1 and train, and ReLU + He + BN + residual
is best. ``report.md`` has the measured numbers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import sys

import numpy as np
from matplotlib.patches import Patch

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.study import StudyArgs, markdown_table

NAME = "mitigations"
NAIVE = {"model.activation": "sigmoid", "model.init": "normal", "model.init_std": 0.01}
# label -> (colour key, what changes from the baseline)
TECHNIQUES = {
    "baseline: sigmoid, naive init": ("baseline", NAIVE),
    "ReLU (naive init)": ("activation", {**NAIVE, "model.activation": "relu"}),
    "Xavier init (sigmoid)": ("init", {**NAIVE, "model.init": "glorot_normal"}),
    "BatchNorm": ("batchnorm", {**NAIVE, "model.norm": "batch"}),
    "residual": ("residual", {**NAIVE, "model.residual": True}),
    "BN + residual": ("bn_residual", {**NAIVE, "model.norm": "batch", "model.residual": True}),
    "clipping (global norm 1)": ("clipping", {**NAIVE, "train.clip": "global_norm",
                                              "train.clip_value": 1.0}),
    "best: ReLU + He + BN + residual": ("best", {"model.activation": "relu",
                                                 "model.init": "he_normal", "model.norm": "batch",
                                                 "model.residual": True}),
}


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Train one deep network with and without each mitigation; compare."""

    depth: int = 20
    width: int = 128
    steps: int = 800
    learning_rate: float = 0.02
    num_samples: int = 25000
    """MNIST-1D samples generated (80 % train, 20 % test)."""


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depth=4, width=16, steps=40, num_samples=5000, eval_every=10, seeds=args.num_seeds(3))
    return dict(depth=args.depth, width=args.width, steps=args.steps, num_samples=args.num_samples,
                eval_every=50, seeds=args.num_seeds(3))


def grid(args: Args) -> list[sweep.Run]:
    s = sizes(args)
    model = ModelConfig(depth=s["depth"], width=s["width"])
    train = TrainConfig(steps=s["steps"], batch_size=128, learning_rate=args.learning_rate,
                        momentum=0.9, eval_every=s["eval_every"])
    return sweep.variants({label: values for label, (_, values) in TECHNIQUES.items()},
                          model=model, train=train, seeds=s["seeds"])


def summarise(result: sweep.SweepResult, steps: int) -> list[dict]:
    """Per technique: accuracy statistics, curves, gradient products, step time."""
    techniques = []
    for label, runs in result.by_label().items():
        key = TECHNIQUES[label][0]
        init = np.asarray([r.measurements[0]["log10_product_sq_norms"] for r in runs])
        final = np.asarray([r.measurements[-1]["log10_product_sq_norms"] for r in runs])
        acc = result.final_stats(runs, "test_accuracy")
        curve_steps, test_acc = result.curves(runs, "test_accuracy")
        loss_steps, loss = result.curves(runs, "loss")
        grad_steps, grads = _block_grad_norms(runs)
        techniques.append({
            "name": label, "color_key": key, "seeds": [r.seed for r in runs],
            "status": [r.status for r in runs],
            "test_accuracy_mean": acc["mean"], "test_accuracy_std": acc["std"],
            "test_accuracy": acc["values"],
            "train_accuracy_mean": result.final_stats(runs, "train_accuracy")["mean"],
            "log_product_sq_norms_init": init.mean(0).tolist(),
            "log_product_sq_norms_final": final.mean(0).tolist(),
            "log10_P0_init": init[:, 0].tolist(), "log10_P0_final": final[:, 0].tolist(),
            "step_time_s": runs[0].step_time_s,
            "test_accuracy_curve": {"steps": curve_steps.tolist(), "values": test_acc.tolist()},
            "loss_curve": {"steps": loss_steps.tolist(), "values": loss.tolist()},
            "log10_block_grad_norms": {"steps": grad_steps.tolist(), "values": grads.tolist()},
        })
    return techniques


def _block_grad_norms(runs: list[sweep.RunResult], points: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Per-block weight-gradient norms over training, log10, mean over seeds:
    (steps (T,), values (T, L)) at up to ``points`` evenly spaced steps."""
    rows = [[r for r in run.history if "block_grad_norms" in r] for run in runs]
    steps = [r["step"] for r in rows[0]]
    take = np.unique(np.linspace(0, len(steps) - 1, min(points, len(steps))).round().astype(int))
    values = np.full((len(runs), len(take), len(rows[0][0]["block_grad_norms"])), np.nan)
    for i, run_rows in enumerate(rows):
        by_step = {r["step"]: r["block_grad_norms"] for r in run_rows}
        for j, t in enumerate(take):
            if steps[t] in by_step:
                values[i, j] = np.log10(np.maximum(by_step[steps[t]], 1e-45))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(steps)[take], np.nanmean(values, 0)


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def figure_summary(techniques: list[dict]):
    """The headline: test accuracy over training, and log10 ||P_0||^2/n at init vs after."""
    fig, axes = plots.figure(2, 1, width=5.6, height=4.0)
    ax = axes[0, 0]
    for t in techniques:
        c = t["test_accuracy_curve"]
        plots.band(ax, c["steps"], c["values"], label=t["name"], color=plots.color(t["color_key"]))
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(0.1, color="0.6", lw=0.8, ls=":")
    ax.set_title("Test accuracy (mean, min-max over seeds)")
    ax.legend(fontsize="x-small", loc="upper left")
    ax = axes[0, 1]
    y = np.arange(len(techniques))[::-1]
    init = np.asarray([np.mean(t["log10_P0_init"]) for t in techniques])
    final = np.asarray([np.mean(t["log10_P0_final"]) for t in techniques])
    low = min(v for v in np.concatenate([init, final]) if np.isfinite(v)) - 8
    colors = [plots.color(t["color_key"]) for t in techniques]
    for offset, values, style in ((0.2, init, {}), (-0.2, final, {"alpha": 0.45, "hatch": "//"})):
        shown = np.where(np.isfinite(values), values, low)  # -inf: the product is exactly 0
        ax.barh(y + offset, shown, height=0.38, color=colors, **style)
        for yi, v, w in zip(y + offset, values, shown):
            if np.isfinite(v):
                ax.text(w + (1 if w >= 0 else -1), yi, f"{v:.1f}".replace("-0.0", "0.0"),
                        va="center", fontsize="x-small", ha="left" if w >= 0 else "right")
            else:  # inside the bar, from its far end
                ax.text(w + 1, yi, "−∞: P = 0 (every unit dead)", va="center", fontsize="x-small")
    ax.legend(handles=[Patch(color="0.4", label="at initialisation"),
                       Patch(facecolor="0.4", alpha=0.45, hatch="//", label="after training")],
              fontsize="x-small", loc="lower left")
    ax.set_xlim(low - 14, max(8.0, np.nanmax(np.where(np.isfinite(init), init, 0)) + 8))
    ax.set_yticks(y, [t["name"] for t in techniques], fontsize="small")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(r"$\log_{10}\,\|P_0\|_F^2/n$   ($P_0 = \partial h^L/\partial h^0$)")
    ax.set_title("Gradient product, first to last layer (mean of seeds)")
    return fig


def figure_curves(techniques: list[dict]):
    fig, axes = plots.figure(2, 1, width=5.2)
    for t in techniques:
        color = plots.color(t["color_key"])
        c = t["loss_curve"]
        plots.band(axes[0, 0], c["steps"], c["values"], label=t["name"], color=color)
        c = t["test_accuracy_curve"]
        plots.band(axes[0, 1], c["steps"], c["values"], label=t["name"], color=color)
    axes[0, 0].set(xlabel="training step", ylabel="training loss (batch)", yscale="log",
                   title="Training loss")
    axes[0, 1].set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="Test accuracy")
    axes[0, 1].legend(fontsize="x-small")
    return fig


def figure_products(techniques: list[dict]):
    fig, axes = plots.figure(2, 1, width=5.2, sharey=True)
    for ax, key, title in ((axes[0, 0], "log_product_sq_norms_init", "At initialisation"),
                           (axes[0, 1], "log_product_sq_norms_final", "After training")):
        for i, t in enumerate(techniques):
            values = t[key]
            # Forms with the same initial weights overlap at init: dashes keep both visible.
            ax.plot(np.arange(len(values)), values, color=plots.color(t["color_key"]),
                    label=t["name"], lw=1.8, ls=("-", "--", ":")[i % 3])
        ax.set_xlabel("layer l")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title)
        plots.power_of_ten_axis(ax)
    axes[0, 0].set_ylabel(r"$\|P_l\|_F^2/n$,  $P_l = \partial h^L/\partial h^l$ (mean of seeds)")
    axes[0, 1].legend(fontsize="x-small")
    return fig


def figure_heatmaps(techniques: list[dict]):
    cols = 4
    rows = math.ceil(len(techniques) / cols)
    fig, axes = plots.figure(cols, rows, width=3.6, height=3.0)
    finite = np.concatenate([np.asarray(t["log10_block_grad_norms"]["values"], float).ravel()
                             for t in techniques])
    finite = finite[np.isfinite(finite)]
    vmin, vmax = (np.percentile(finite, 1), np.percentile(finite, 99)) if finite.size else (None, None)
    for ax, t in zip(axes.ravel(), techniques):
        g = t["log10_block_grad_norms"]
        values = np.asarray(g["values"], float).T  # (L, T)
        plots.heatmap(ax, values, x=g["steps"], y=list(range(1, values.shape[0] + 1)),
                      label=r"$\log_{10}\|\partial L/\partial W_l\|$", vmin=vmin, vmax=vmax,
                      xlabel="training step", ylabel="block l")
        ax.set_title(t["name"], fontsize="small")
    for ax in axes.ravel()[len(techniques):]:
        ax.axis("off")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def conclusion(techniques: list[dict], chance: float = 0.1) -> str:
    """Two or three sentences from the measured numbers (nothing assumed)."""
    by_acc = sorted(techniques, key=lambda t: -np.nan_to_num(t["test_accuracy_mean"], nan=-1))
    stuck = [t for t in techniques if t["test_accuracy_mean"] < chance + 0.05]
    trained = [t for t in techniques if t not in stuck]
    best, base = by_acc[0], techniques[0]
    p0 = lambda t: float(np.mean(t["log10_P0_init"]))
    parts = [f"**{best['name']}** is best at {100 * best['test_accuracy_mean']:.1f} ± "
             f"{100 * best['test_accuracy_std']:.1f} % test accuracy, against "
             f"{100 * base['test_accuracy_mean']:.1f} % for the baseline."]
    if stuck:
        parts.append(f"{len(stuck)} of {len(techniques)} forms stay at chance: "
                     + ", ".join(f"{t['name']} (‖P_0‖²/n = 10^{p0(t):.0f} at init)" for t in stuck) + ".")
    if stuck and trained:
        if max(map(p0, stuck)) < min(map(p0, trained)):
            parts.append(f"Every form that trains starts with ‖P_0‖²/n ≥ 10^{min(map(p0, trained)):.1f}, "
                         "every one that does not below it: here the gradient product at "
                         "initialisation separates the networks that learn from those that do not.")
        else:
            healthy = [t["name"] for t in stuck if p0(t) >= min(map(p0, trained))]
            parts.append("The gradient product at initialisation does not tell the two apart: "
                         + ", ".join(healthy) + " start(s) with a product as large as a form that "
                         "trains, yet do(es) not learn in this budget.")
    return " ".join(parts)


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d", num_samples=size["num_samples"])
    runs = grid(args)
    result = s.sweep(runs, dataset, measure_at=[0, size["steps"]], measure_batch_size=64)
    techniques = summarise(result, size["steps"])
    figures = {
        "summary": figure_summary(techniques), "curves": figure_curves(techniques),
        "products": figure_products(techniques), "grad_heatmaps": figure_heatmaps(techniques)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "Which fix for vanishing gradients helps, and how much?"
    rep.add("Setup", f"""
- Network: MLP, depth {size['depth']} (hidden blocks), width {size['width']}; pre-activation residual
  blocks where residual; BatchNorm in training mode for the measurements.
- Data: MNIST-1D, {size['num_samples']} samples generated by the `mnist1d` package
  ({dataset.num_train} train / {len(dataset.y_test)} test), standardised.
- Training: SGD, momentum 0.9, learning rate {args.learning_rate}, batch 128, {size['steps']} steps,
  {size['seeds']} seed(s) per form; every form of a seed sees the same batches.
- Measured: test accuracy every {size['eval_every']} steps; ||P_l||²/n (8 random probes, one batch
  of 64) at initialisation and at the end; per-block weight-gradient norms at every step.
- {len(runs)} runs in {len(result.groups)} compiled programs (a form's seeds are vmapped in one
  program; forms that differ only in their initialiser share it).""")
    rows = [{"form": t["name"],
             "acc": f"{100 * t['test_accuracy_mean']:.1f} ± {100 * t['test_accuracy_std']:.1f}",
             "train": f"{100 * t['train_accuracy_mean']:.1f}",
             "p0i": f"{np.mean(t['log10_P0_init']):.1f}", "p0f": f"{np.mean(t['log10_P0_final']):.1f}",
             "ms": f"{1e3 * t['step_time_s']:.1f}"} for t in techniques]
    rep.add("Summary", markdown_table(rows, [
        ("form", "form"), ("test accuracy %", "acc"), ("train accuracy %", "train"),
        ("log10 ‖P_0‖²/n at init", "p0i"), ("after training", "p0f"),
        (f"ms per step ({size['seeds']} seeds at once)", "ms")]))
    rep.add("Conclusion", conclusion(techniques))
    rep.add_figures(paths)
    return {"techniques": techniques, "table": result.table(), "sizes": size,
            "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
