"""The signal-propagation phase diagram: which (depth, sigma_w^2) tanh networks train?

Tanh MLPs (width 64) with weights N(0, sigma_w^2 / fan_in) and biases
N(0, sigma_b^2 = 0.05) (``init="variance_scaling"``) over a grid of depth
(4 to 100) x sigma_w^2 (0.5 to 4), each trained for a short fixed budget; a
heat map of the final training accuracy with the mean-field correlation depth
scale xi_c (``vgrad.analysis.theory.correlation_depth_scale``) overlaid as the
curve 6 xi_c. Published result to compare with (Schoenholz et al. 2017, "Deep
Information Propagation", Fig. 5): networks train up to a depth of about
6 xi_c, and deepest at the critical sigma_w^2 (the order-to-chaos transition,
1.76 for tanh at sigma_b^2 = 0.05). The study reports how well the measured
trainable region (training accuracy >= 20 %, chance 10 %) follows 6 xi_c.

All sigma_w^2 of one depth share one compiled training program (the weight
variance is an init-only value); the engine still compiles the initialisation
once per (depth, sigma_w^2), which is most of this study's run time.

Data: MNIST-1D (4,000 train / 1,000 test). Training: SGD, momentum 0.9,
learning rate min(0.01, 0.2 / L) (the summed update of L layers grows with L),
batch 128, 400 steps, 1 seed per cell.

    python -m experiments.trainability              # ~4 min on 2 CPU cores (240 s measured)
    python -m experiments.trainability --quick      # ~15 s (tiny sizes)
    python -m experiments.trainability --figure docs/figures/trainability.png

Finding (default run): the trainable region follows 6 xi_c, as Schoenholz et
al. report: 70 of 80 cells (88 %) lie on the side of L = 6 xi_c that theory
predicts, the deepest trainable depth is 0.90 x 6 xi_c (median over the
sigma_w^2 where 6 xi_c is inside the grid; 0.51-1.47), and the only depth-100
network that trains in 400 steps is at sigma_w^2 = 1.75, next to the critical
1.76. ``report.md`` has the measured numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings

import matplotlib
import numpy as np

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.analysis import theory
from vgrad.study import StudyArgs, markdown_table

NAME = "trainability"
CHANCE = 0.1
XI_MULTIPLE = 6.0  # Schoenholz et al.: trainable up to about 6 xi_c


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Depth x sigma_w^2 phase diagram of tanh networks against 6 xi_c."""

    depths: tuple[int, ...] = (4, 8, 16, 24, 32, 48, 64, 100)
    weight_vars: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
    """sigma_w^2 values (weights N(0, sigma_w^2 / fan_in))."""
    bias_var: float = 0.05
    width: int = 64
    steps: int = 400
    max_learning_rate: float = 0.01
    learning_rate_depth: float = 0.2
    """Learning rate = min(max_learning_rate, learning_rate_depth / L)."""
    threshold: float = 0.2
    """A cell is trainable when its final training accuracy reaches this (chance 0.1)."""
    figure: str | None = None
    """Also copy the heat map here (e.g. docs/figures/trainability.png)."""

    def validate(self) -> None:
        super().validate()
        if not self.depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                  for d in self.depths):
            raise ValueError(f"invalid --depths={self.depths!r}: must be integers >= 1")
        if not self.weight_vars or any(not (math.isfinite(w) and w > 0) for w in self.weight_vars):
            raise ValueError(f"invalid --weight-vars={self.weight_vars!r}: must be numbers > 0")
        if not (math.isfinite(self.bias_var) and self.bias_var >= 0):
            raise ValueError(f"invalid --bias-var={self.bias_var!r}: must be a number >= 0")
        for name in ("width", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name}={value!r}: must be an integer >= 1")
        for name in ("max_learning_rate", "learning_rate_depth"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: must be a number > 0")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depths=(3, 12), weight_vars=(0.5, 1.75, 4.0), width=16, steps=30,
                    seeds=args.num_seeds(1), batch_size=64)
    return dict(depths=tuple(sorted(set(args.depths))), weight_vars=tuple(sorted(set(args.weight_vars))),
                width=args.width, steps=args.steps, seeds=args.num_seeds(1), batch_size=128)


def learning_rate(args: Args, depth: int) -> float:
    return min(args.max_learning_rate, args.learning_rate_depth / depth)


def grid(args: Args) -> list[sweep.Run]:
    """One group per depth; all sigma_w^2 (and seeds) of a depth share its program."""
    s = sizes(args)
    runs = []
    for depth in s["depths"]:
        model = ModelConfig(depth=depth, width=s["width"], activation="tanh", init="variance_scaling",
                            bias_var=args.bias_var)
        train = TrainConfig(steps=s["steps"], batch_size=s["batch_size"],
                            learning_rate=learning_rate(args, depth), momentum=0.9,
                            eval_every=s["steps"])
        runs += sweep.grid(model, train, vary={"model.weight_var": list(s["weight_vars"])},
                           seeds=s["seeds"], label=f"depth {depth}")
    return runs


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def accuracy_grid(result: sweep.SweepResult, size: dict, key: str) -> np.ndarray:
    """(depths, weight_vars, seeds) final ``key`` per cell (NaN for a run without one)."""
    depths, ws = list(size["depths"]), list(size["weight_vars"])
    out = np.full((len(depths), len(ws), size["seeds"]), np.nan)
    counts = np.zeros((len(depths), len(ws)), int)
    for r in result.runs:
        i, j = depths.index(r.model.depth), ws.index(r.model.weight_var)
        if r.status in ("completed", "diverged"):
            out[i, j, counts[i, j]] = r.final.get(key, math.nan)
        counts[i, j] += 1
    return out


def theory_curves(weight_vars, bias_var: float, fine: int = 241) -> dict:
    """xi_c (and chi_1's gradient depth scale) on the grid and on a fine sigma_w^2 grid."""
    lo, hi = min(weight_vars), max(weight_vars)
    fine_w = np.unique(np.concatenate([np.linspace(lo, hi, fine), np.asarray(weight_vars, float)]))
    fp = theory.correlation_fixed_point("tanh", fine_w, bias_var)
    on_grid = theory.correlation_fixed_point("tanh", np.asarray(weight_vars, float), bias_var)
    # The transition (xi_c -> inf): the largest xi_c of the fine grid, refined on a grid
    # of 64 points between its neighbours.
    i = int(np.argmax(np.where(np.isfinite(fp.xi_c), fp.xi_c, np.inf)))
    local = np.linspace(fine_w[max(i - 1, 0)], fine_w[min(i + 1, len(fine_w) - 1)], 64)
    local_xi = theory.correlation_fixed_point("tanh", local, bias_var).xi_c
    critical = float(local[np.argmax(np.where(np.isfinite(local_xi), local_xi, np.inf))])
    return {"weight_vars": fine_w.tolist(), "xi_c": fp.xi_c.tolist(), "chi_c": fp.chi_c.tolist(),
            "c_star": fp.c_star.tolist(), "q_star": fp.q_star.tolist(),
            "grid_xi_c": on_grid.xi_c.tolist(), "grid_chi_c": on_grid.chi_c.tolist(),
            "critical_weight_var": critical}


def trainable_depths(acc: np.ndarray, depths, threshold: float) -> list[float]:
    """Per sigma_w^2: the deepest depth whose mean accuracy reaches ``threshold`` (NaN: none)."""
    mean = np.nanmean(acc, -1) if acc.ndim == 3 else acc
    out = []
    for j in range(mean.shape[1]):
        ok = [d for i, d in enumerate(depths) if mean[i, j] >= threshold]
        out.append(float(max(ok)) if ok else math.nan)
    return out


def agreement(acc_mean: np.ndarray, depths, xi_c, threshold: float) -> dict:
    """How the measured trainable cells match L <= 6 xi_c: the fraction of cells on the
    same side, and which way the disagreements go."""
    depths = np.asarray(depths, float)[:, None]
    predicted = depths <= XI_MULTIPLE * np.asarray(xi_c, float)[None, :]
    measured = acc_mean >= threshold
    return {"cells": int(measured.size), "agree": int((predicted == measured).sum()),
            "fraction": float((predicted == measured).mean()),
            "trainable_beyond_6xi": int((measured & ~predicted).sum()),
            "untrainable_within_6xi": int((~measured & predicted).sum()),
            "predicted_trainable": predicted.astype(int).tolist(),
            "measured_trainable": measured.astype(int).tolist()}


def _beyond_grid(depths, ws, acc_mean, xi, threshold: float) -> str:
    """Where 6 xi_c exceeds the deepest network: does that network train?"""
    deepest = max(depths)
    cols = [j for j in range(len(ws)) if XI_MULTIPLE * xi[j] >= deepest]
    if not cols:
        return ""
    i = list(depths).index(deepest)
    ok = [j for j in cols if acc_mean[i, j] >= threshold]
    bad = [j for j in cols if j not in ok]
    say = lambda js: ", ".join(f"{ws[j]:g} ({100 * acc_mean[i, j]:.0f} %)" for j in js)
    return (f" Where 6 ξ_c exceeds depth {deepest} (σ_w² = {', '.join(f'{ws[j]:g}' for j in cols)}), "
            f"depth {deepest} trains at " + (say(ok) if ok else "none of them")
            + (f" and not at {say(bad)}" if bad else "") + ".")


def conclusion(depths, ws, acc_mean, max_depth, th: dict, agree: dict, threshold: float,
               size: dict) -> str:
    xi = np.asarray(th["grid_xi_c"], float)
    parts = []
    finite = [j for j, d in enumerate(max_depth) if np.isfinite(d)]
    if finite:
        best_d = max(max_depth[j] for j in finite)
        deepest = [ws[j] for j in finite if max_depth[j] == best_d]
        crit = th["critical_weight_var"]
        near = min(ws, key=lambda w: abs(w - crit))
        parts.append(
            f"The deepest trainable networks (depth {best_d:.0f}, training accuracy ≥ "
            f"{100 * threshold:.0f} % after {size['steps']} steps) have σ_w² = "
            + ", ".join(f"{w:g}" for w in deepest)
            + f"; mean-field criticality is at σ_w² = {crit:.2f} ("
            + ("deepest at criticality, as Schoenholz et al. report" if near in deepest
               else "the measured optimum is off criticality") + ").")
    else:
        parts.append(f"No cell reaches {100 * threshold:.0f} % training accuracy in {size['steps']} steps.")
    parts.append(
        f"{agree['agree']} of {agree['cells']} cells ({100 * agree['fraction']:.0f} %) lie on the side of "
        f"L = 6 ξ_c that theory predicts; {agree['untrainable_within_6xi']} cells within 6 ξ_c do not "
        f"train and {agree['trainable_beyond_6xi']} beyond it do.")
    ratios = [max_depth[j] / (XI_MULTIPLE * xi[j]) for j in finite
              if np.isfinite(xi[j]) and XI_MULTIPLE * xi[j] < max(depths)]
    if ratios:
        parts.append(
            f"Where 6 ξ_c lies inside the depth grid, the deepest trainable depth is "
            f"{np.median(ratios):.2f} × 6 ξ_c (median over {len(ratios)} σ_w²; range "
            f"{min(ratios):.2f}–{max(ratios):.2f})"
            + (": the measured region follows 6 ξ_c." if 0.5 <= np.median(ratios) <= 2
               else ": with this short budget the trainable region is "
                    + ("narrower" if np.median(ratios) < 0.5 else "wider")
                    + " than 6 ξ_c, unlike the published result.")
            + _beyond_grid(depths, ws, acc_mean, xi, threshold))
    return " ".join(parts)


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _positions(values, grid) -> np.ndarray:
    """Cell-centre coordinates of ``values`` on a heat-map axis whose cells are ``grid``
    (log-interpolated for depths, linear for sigma_w^2)."""
    return np.interp(values, grid, np.arange(len(grid)) + 0.5, left=np.nan, right=np.nan)


def figure_phase(depths, ws, acc_mean, max_depth, th: dict, threshold: float, size: dict):
    fig, axes = plots.figure(2, 1, width=5.6, height=4.4)
    ax = axes[0, 0]
    plots.heatmap(ax, acc_mean, x=[f"{w:g}" for w in ws], y=list(depths), vmin=CHANCE, vmax=max(
        0.2, float(np.nanmax(acc_mean))), label=f"training accuracy after {size['steps']} steps",
        xlabel=r"weight variance $\sigma_w^2$", ylabel="depth L", cmap="magma")
    ax.set_xticks(np.arange(len(ws)) + 0.5, [f"{w:g}" for w in ws])
    fine_w = np.asarray(th["weight_vars"])
    six_xi = XI_MULTIPLE * np.asarray(th["xi_c"], float)
    x = _positions(fine_w, np.asarray(ws, float))
    log_d = np.log(np.asarray(depths, float))
    top = len(depths)
    # Depth -> row coordinate, log-interpolated between cell centres (and beyond them up to
    # the grid's edges); the curve stops where 6 xi_c leaves the grid.
    rows = np.arange(len(depths)) + 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        log_xi = np.log(six_xi)
        slope_lo = (rows[1] - rows[0]) / (log_d[1] - log_d[0]) if len(depths) > 1 else 1.0
        slope_hi = (rows[-1] - rows[-2]) / (log_d[-1] - log_d[-2]) if len(depths) > 1 else 1.0
        y = np.interp(log_xi, log_d, rows)
        y = np.where(log_xi < log_d[0], rows[0] + slope_lo * (log_xi - log_d[0]), y)
        y = np.where(log_xi > log_d[-1], rows[-1] + slope_hi * (log_xi - log_d[-1]), y)
    y = np.where((y >= 0) & (y <= top), y, np.nan)
    ax.plot(x, y, color="#00e5ff", lw=2.2, label=r"$6\,\xi_c$ (mean field)")
    crit = _positions([th["critical_weight_var"]], np.asarray(ws, float))[0]
    ax.axvline(crit, color="#00e5ff", lw=1, ls="--",
               label=rf"critical $\sigma_w^2$ = {th['critical_weight_var']:.2f}")
    ax.set_ylim(0, top)
    ax.set_title(r"Tanh networks, $\sigma_b^2$" + f" = {size['bias_var']:g}, width {size['width']}")
    ax.legend(loc="upper left", fontsize="small", framealpha=0.85)
    ax = axes[0, 1]
    ax.plot(fine_w, np.minimum(six_xi, 1e4), color="#00838f", lw=2, label=r"$6\,\xi_c$ (mean field)")
    md = np.asarray(max_depth, float)
    ax.plot(ws, md, "o-", color=plots.color("tanh"), label=f"deepest trainable depth (accuracy ≥ "
            f"{100 * threshold:.0f} %)")
    none = ~np.isfinite(md)
    if none.any():
        ax.plot(np.asarray(ws)[none], np.full(none.sum(), min(depths) / 1.6), "v", color="0.4",
                label=f"none trainable (depth ≥ {min(depths)})")
    ax.axhline(max(depths), color="0.6", lw=0.8, ls=":")
    ax.text(ws[0], max(depths) * 1.05, "deepest network tried", fontsize="x-small", color="0.4")
    ax.set_yscale("log")
    ax.set_ylim(min(depths) / 2.2, max(depths) * 20)
    ax.set(xlabel=r"weight variance $\sigma_w^2$", ylabel="depth L",
           title=r"Measured trainable depth against $6\,\xi_c$")
    ax.legend(fontsize="small", loc="upper left")
    return fig


def figure_slices(depths, ws, acc: np.ndarray, threshold: float):
    """Training accuracy against depth for every sigma_w^2 (mean, min-max over seeds)."""
    fig, axes = plots.figure(1, 1, width=6.0, height=4.2)
    ax = axes[0, 0]
    cmap = matplotlib.colormaps["viridis"]
    for j, w in enumerate(ws):
        color = cmap(0.92 * j / max(1, len(ws) - 1))
        plots.band(ax, depths, acc[:, j, :].T, label=rf"$\sigma_w^2$ = {w:g}", color=color,
                   marker="o")
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    ax.axhline(threshold, color="k", lw=0.8, ls="--")
    ax.text(depths[-1], threshold + 0.01, "trainable ", ha="right", va="bottom", fontsize="x-small")
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.set(xlabel="depth L", ylabel="training accuracy (whole training set)", ylim=(0, 1),
           title="Training accuracy against depth, per σ_w²")
    ax.legend(fontsize="x-small", ncol=2)
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = {**sizes(args), "bias_var": args.bias_var}
    dataset = data.load("mnist1d")
    runs = grid(args)
    result = s.sweep(runs, dataset)
    depths, ws = list(size["depths"]), list(size["weight_vars"])
    train_acc = accuracy_grid(result, size, "train_accuracy")
    test_acc = accuracy_grid(result, size, "test_accuracy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        acc_mean = np.nanmean(train_acc, -1)
    th = theory_curves(ws, args.bias_var)
    max_depth = trainable_depths(train_acc, depths, args.threshold)
    agree = agreement(acc_mean, depths, th["grid_xi_c"], args.threshold)
    figures = {"phase_diagram": figure_phase(depths, ws, acc_mean, max_depth, th, args.threshold, size),
               "accuracy_vs_depth": figure_slices(depths, ws, train_acc, args.threshold)}
    paths = {name: s.save_figure(fig, name, headline=name == "phase_diagram")
             for name, fig in figures.items()}
    text = conclusion(depths, ws, acc_mean, max_depth, th, agree, args.threshold, size)

    rep = s.report
    rep.title = "Signal propagation and trainability: depth × σ_w² against 6 ξ_c"
    rep.add("Setup", f"""
- Network: tanh MLP, width {size['width']}, weights N(0, σ_w²/fan_in), biases N(0, {args.bias_var:g});
  depths {', '.join(map(str, depths))}; σ_w² {', '.join(f'{w:g}' for w in ws)}.
- Data: MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), standardised.
- Training: SGD, momentum 0.9, batch {size['batch_size']}, {size['steps']} steps, learning rate
  min({args.max_learning_rate:g}, {args.learning_rate_depth:g}/L), {size['seeds']} seed(s) per cell.
- Trainable: final training accuracy (whole training set) ≥ {100 * args.threshold:.0f} %.
- Theory: ξ_c = −1/log χ_c from ``vgrad.analysis.theory.correlation_fixed_point`` (Gaussian
  quadrature, wide-network limit); the critical σ_w² is where ξ_c diverges.
- {len(runs)} runs in {len(result.groups)} compiled training programs (one per depth).""")
    rows = [{"w": f"{w:g}", "xi": f"{th['grid_xi_c'][j]:.1f}",
             "six": f"{XI_MULTIPLE * th['grid_xi_c'][j]:.0f}",
             "chi": f"{th['grid_chi_c'][j]:.3f}",
             "max": "none" if not np.isfinite(max_depth[j]) else f"{max_depth[j]:.0f}",
             **{f"d{d}": f"{100 * acc_mean[i, j]:.0f}" for i, d in enumerate(depths)}}
            for j, w in enumerate(ws)]
    rep.add("Summary", "Training accuracy (%) per σ_w² (rows) and depth (columns), with the "
            "mean-field depth scale and the deepest trainable depth.\n\n" + markdown_table(rows, [
                ("σ_w²", "w"), ("χ_c", "chi"), ("ξ_c", "xi"), ("6 ξ_c", "six"),
                ("deepest trainable", "max"), *[(f"L={d}", f"d{d}") for d in depths]]))
    rep.add("Conclusion", text)
    rep.add_figures(paths)
    return {"depths": depths, "weight_vars": ws, "bias_var": args.bias_var,
            "learning_rates": {str(d): learning_rate(args, d) for d in depths},
            "train_accuracy": train_acc.tolist(), "test_accuracy": test_acc.tolist(),
            "train_accuracy_mean": acc_mean.tolist(), "threshold": args.threshold,
            "deepest_trainable_depth": max_depth, "theory": th,
            "six_xi_c": (XI_MULTIPLE * np.asarray(th["grid_xi_c"], float)).tolist(),
            "agreement": agree, "conclusion": text, "table": result.table(), "sizes": size,
            "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
