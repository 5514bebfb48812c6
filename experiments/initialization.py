"""Which weight initialisation keeps signals and gradients alive, for which activation?

Eight initialisations of the same depth-20, width-128 plain MLP, for sigmoid,
tanh and ReLU: the naive N(0, s^2) at s = 0.01, 0.1 and 1 (whatever the
fan-in), the old uniform default U[+-1/sqrt(fan_in)], LeCun, Xavier
(glorot_normal), He and orthogonal (gain 1 for sigmoid and tanh, sqrt(2) for
ReLU). At initialisation it measures the forward activation spread per layer
(std of the post-activation units) and the backward gradient norms per block;
it trains every network (SGD, momentum 0.9, learning rate 0.02, batch 128,
600 steps, MNIST-1D 20,000/5,000) and compares the training curves, with the
classic example side by side: a deep sigmoid MLP with the naive
N(0, 0.01^2) init against ReLU with He init.

Dynamical isometry (no training): the full singular-value spectrum of the
end-to-end Jacobian dh^L/dh^0 (``vgrad.analysis.jacobian_spectrum``, dense, on
a batch of 4 inputs of a width-128 network) at depths 4, 16 and 64, for
orthogonal against Gaussian weights with linear, tanh (sigma_w^2 = 1, the
critical point) and ReLU (He scale) units.

    python -m experiments.initialization               # ~3-5 min on 2 CPU cores (2 seeds)
    python -m experiments.initialization --quick       # seconds (tiny sizes)
    python -m experiments.initialization --figure docs/figures/initialization.png

Finding (default run, 2 seeds; 184-287 s on 2 CPU cores): the classic
example holds: ReLU + He reaches 49.3 % test accuracy (30 % by step 100)
while the naive sigmoid network, whose first block's weight gradient at init
is 10^-31.3 (against 10^0.3 for ReLU + He), stays at chance. The textbook pairings are not the
best here: sigmoid learns only with N(0, 1) (25 %; every fan-in-scaled init
leaves it at chance with ||P_0||^2/n <= 10^-20), tanh trains best with He
(65.5 % against 56.3 % with Xavier), and the old uniform default leaves all
three activations at chance. At depth 64 the singular values of dh^L/dh^0
span 0.00 decades (orthogonal linear), 0.52 (orthogonal tanh, shrinking) and
~4.5 for Gaussian tanh and for ReLU with either He or orthogonal weights:
dynamical isometry is within reach of tanh, not of ReLU. ``report.md`` has
the numbers.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.analysis import jacobian_spectrum
from vgrad.models import build
from vgrad.study import StudyArgs, markdown_table

NAME = "initialization"
ACTIVATIONS = ("sigmoid", "tanh", "relu")
ACT_NAMES = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "ReLU"}
# init key -> (label, ModelConfig overrides (a function of the activation), colour)
INITS = {
    "normal_0.01": ("N(0, 0.01²)", lambda act: {"model.init": "normal", "model.init_std": 0.01},
                    "#c7e9c0"),
    "normal_0.1": ("N(0, 0.1²)", lambda act: {"model.init": "normal", "model.init_std": 0.1},
                   "#74c476"),
    "normal_1": ("N(0, 1)", lambda act: {"model.init": "normal", "model.init_std": 1.0},
                 "#005a32"),
    "uniform": ("U[±1/√fan_in] (old default)", lambda act: {"model.init": "uniform"}, "#bcbd22"),
    "lecun": ("LeCun", lambda act: {"model.init": "lecun_normal"}, "#9467bd"),
    "xavier": ("Xavier", lambda act: {"model.init": "glorot_normal"}, "#17becf"),
    "he": ("He", lambda act: {"model.init": "he_normal"}, "#1f77b4"),
    "orthogonal": ("orthogonal", lambda act: {"model.init": "orthogonal",
                                              "model.weight_var": 2.0 if act == "relu" else 1.0},
                   "#d62728"),
}
# Spectrum variants: label -> (activation, ModelConfig overrides, linestyle).
SPECTRUM_VARIANTS = {
    "linear, orthogonal": ("linear", {"init": "orthogonal", "weight_var": 1.0}, "-"),
    "linear, Gaussian σ_w²=1": ("linear", {"init": "variance_scaling", "weight_var": 1.0}, "--"),
    "tanh, orthogonal": ("tanh", {"init": "orthogonal", "weight_var": 1.0}, "-"),
    "tanh, Gaussian σ_w²=1": ("tanh", {"init": "variance_scaling", "weight_var": 1.0}, "--"),
    "ReLU, orthogonal ×√2": ("relu", {"init": "orthogonal", "weight_var": 2.0}, "-"),
    "ReLU, He (Gaussian)": ("relu", {"init": "he_normal"}, "--"),
}
CLASSIC = (("sigmoid", "normal_0.01"), ("relu", "he"))
# The initialiser each activation is usually paired with.
TEXTBOOK = {"sigmoid": "xavier", "tanh": "xavier", "relu": "he"}
CHANCE = 0.1
# Singular values below this fraction of the largest are float32 round-off.
SV_RESOLUTION = 1e-6


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Initialisations x activations: signal and gradient at init, spectra, training."""

    depth: int = 20
    width: int = 128
    steps: int = 600
    learning_rate: float = 0.02
    num_samples: int = 25000
    """MNIST-1D samples generated (80 % train, 20 % test)."""
    spectrum_depths: tuple[int, ...] = (4, 16, 64)


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depth=4, width=16, steps=30, num_samples=5000, eval_every=10,
                    measure_batch_size=16, activations=("sigmoid", "relu"),
                # Every initialiser compiles its own init program (~1 s): few here.
                inits=["normal_0.01", "he", "orthogonal"],
                    spectrum_depths=(4,), spectrum_width=16, spectrum_batch=2,
                    spectrum_variants=["linear, orthogonal", "ReLU, He (Gaussian)"],
                    seeds=args.num_seeds(2))
    return dict(depth=args.depth, width=args.width, steps=args.steps,
                num_samples=args.num_samples, eval_every=50, measure_batch_size=64,
                activations=ACTIVATIONS, inits=list(INITS),
                spectrum_depths=tuple(sorted(set(args.spectrum_depths))),
                spectrum_width=128, spectrum_batch=4, spectrum_variants=list(SPECTRUM_VARIANTS),
                seeds=args.num_seeds(2))


def grid(args: Args) -> list[sweep.Run]:
    s = sizes(args)
    train = TrainConfig(steps=s["steps"], batch_size=128, learning_rate=args.learning_rate,
                        momentum=0.9, eval_every=s["eval_every"])
    runs = []
    for act in s["activations"]:
        model = ModelConfig(depth=s["depth"], width=s["width"], activation=act)
        runs += sweep.variants({f"{act}|{key}": INITS[key][1](act) for key in s["inits"]},
                               model=model, train=train, seeds=s["seeds"])
    return runs








def steps_to(steps, values, threshold: float) -> float | None:
    """First evaluated step at which the mean accuracy over seeds reaches ``threshold``."""
    mean = plots.nanmean(values)
    hit = np.flatnonzero(mean >= threshold)
    return float(np.asarray(steps)[hit[0]]) if hit.size else None


def summarise(result: sweep.SweepResult) -> list[dict]:
    out = []
    for label, runs in result.by_label().items():
        act, key = label.split("|")
        init = [r.measurements[0] for r in runs]
        assert all(m["step"] == 0 for m in init)
        stat = lambda k: np.asarray([m[k] for m in init], float)
        acc = result.final_stats(runs, "test_accuracy")
        curve_steps, test_acc = result.curves(runs, "test_accuracy")
        loss_steps, loss = result.curves(runs, "loss")
        out.append({
            "activation": act, "init": key, "name": INITS[key][0],
            "config": dataclasses.asdict(runs[0].model),
            "seeds": [r.seed for r in runs], "status": [r.status for r in runs],
            "activation_std": stat("activation_std").tolist(),                 # (S, L+1)
            "log10_activation_std": plots.log10(stat("activation_std")).tolist(),
            "saturated_fraction": stat("saturated_fraction").tolist(),
            "dead_fraction": stat("dead_fraction").tolist(),
            "log10_weight_grad_norms": plots.log10(stat("weight_grad_norms")).tolist(),   # (S, L)
            "log10_hidden_grad_norms": plots.log10(stat("hidden_grad_norms")).tolist(),   # (S, L+1)
            "log10_product_sq_norms": stat("log10_product_sq_norms").tolist(),       # (S, L+1)
            "log10_P0": stat("log10_product_sq_norms")[:, 0].tolist(),
            "test_accuracy_mean": acc["mean"], "test_accuracy_std": acc["std"],
            "test_accuracy": acc["values"],
            "train_loss_final": result.final_stats(runs, "train_loss")["mean"],
            "test_accuracy_curve": {"steps": curve_steps.tolist(), "values": test_acc.tolist()},
            "loss_curve": {"steps": loss_steps.tolist(), "values": loss.tolist()},
        })
    return out


def spectra(args: Args, dataset) -> list[dict]:
    """Singular values of dh^L/dh^0 of freshly initialised networks (no training)."""
    s = sizes(args)
    x = np.asarray(dataset.x_train[:s["spectrum_batch"]])
    out = []
    for label in s["spectrum_variants"]:
        act, overrides, _ = SPECTRUM_VARIANTS[label]
        for depth in s["spectrum_depths"]:
            cfg = ModelConfig(depth=depth, width=s["spectrum_width"], activation=act, **overrides)
            model = build(cfg)
            svs = []
            for seed in range(s["seeds"]):
                variables = model.init(jax.random.key(seed), x)
                svs.append(jacobian_spectrum(model, variables, x, train=False))
            svs = np.stack(svs)                                               # (S, n)
            out.append({"variant": label, "activation": act, "depth": depth,
                        **spectrum_stats(svs), "singular_values": svs.tolist()})
    return out


def spectrum_stats(svs: np.ndarray) -> dict:
    """Spread of a spectrum, over all seeds' singular values: mean squared
    singular value, the largest, and the 10-90 % range of log10 s (in decades)."""
    flat = svs.ravel()
    top = float(flat.max())
    resolved = flat[flat > SV_RESOLUTION * top]
    log10 = np.log10(resolved)
    return {"mean_sq_sv": float(np.mean(flat ** 2)), "max_sv": top,
            "p10_p90_decades": float(np.percentile(log10, 90) - np.percentile(log10, 10)),
            "fraction_within_2x": float(np.mean((flat >= 0.5) & (flat <= 2.0))),
            "fraction_unresolved": float(np.mean(flat <= SV_RESOLUTION * top))}


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _by(cells: list[dict]) -> dict[tuple[str, str], dict]:
    return {(c["activation"], c["init"]): c for c in cells}


def figure_classic(cells: list[dict]):
    """The headline: naive sigmoid against ReLU + He, side by side."""
    cell = _by(cells)
    pair = [cell[k] for k in CLASSIC if k in cell]
    fig, axes = plots.figure(3, 1, width=4.6, height=3.8)
    for c in pair:
        color = plots.color(c["activation"])
        label = f"{ACT_NAMES[c['activation']]}, {c['name']}"
        w = np.asarray(c["log10_weight_grad_norms"], float)
        plots.band(axes[0, 0], np.arange(1, w.shape[1] + 1), np.where(np.isneginf(w), np.nan, w),
                   color=color, label=label, marker="o")
        zero = np.flatnonzero(np.all(np.isneginf(w), axis=0)) + 1
        if zero.size:  # the gradient underflowed to exactly 0 in float32
            axes[0, 0].text(0.03, 0.55, f"{label}:\nblocks {zero[0]}–{zero[-1]} get exactly 0\n"
                            "(float32 underflow)", transform=axes[0, 0].transAxes,
                            fontsize="x-small", color=color)
        curve = c["loss_curve"]
        plots.curve_band(axes[0, 1], curve, color=color, label=label)
        curve = c["test_accuracy_curve"]
        plots.curve_band(axes[0, 2], curve, color=color,
                   label=f"{label}: {100 * c['test_accuracy_mean']:.1f} % at the end")
    ax = axes[0, 0]
    ax.set(xlabel="block l", ylabel=r"$\|\partial L/\partial W_l\|$ at initialisation",
           title="Gradient per block at initialisation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plots.power_of_ten_axis(ax)
    ax.legend(fontsize="x-small")
    axes[0, 1].set(xlabel="training step", ylabel="training loss (batch, cross-entropy)",
                   title="Training loss")
    ax = axes[0, 2]
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1),
           title="Test accuracy (mean, min-max over seeds)")
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    ax.legend(fontsize="x-small", loc="upper left")
    depth = len(pair[0]["log10_weight_grad_norms"][0]) if pair else 0
    fig.suptitle(f"The classic example: a depth-{depth} sigmoid MLP with the naive init "
                 "against ReLU with He init", fontsize="medium")
    return fig


def figure_forward_backward(cells: list[dict], activations):
    """Columns: activations; rows: forward activation std per layer, backward
    weight-gradient norm per block, both at initialisation; one line per init."""
    cell = _by(cells)
    fig, axes = plots.figure(len(activations), 2, width=4.3, height=3.4)
    for col, act in enumerate(activations):
        for key, (label, _, color) in INITS.items():
            c = cell.get((act, key))
            if c is None:
                continue
            a = np.asarray(c["log10_activation_std"], float)
            plots.band(axes[0, col], np.arange(a.shape[1]), np.where(np.isfinite(a), a, np.nan),
                       color=color, label=label)
            w = np.asarray(c["log10_weight_grad_norms"], float)
            plots.band(axes[1, col], np.arange(1, w.shape[1] + 1),
                       np.where(np.isfinite(w), w, np.nan), color=color, label=label)
        axes[0, col].set_title(ACT_NAMES[act])
        axes[0, col].set_xlabel("layer l (0 = stem)")
        axes[1, col].set_xlabel("block l")
        for ax in axes[:, col]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            plots.power_of_ten_axis(ax)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("forward: std of the units' outputs")
    axes[1, 0].set_ylabel(r"backward: $\|\partial L/\partial W_l\|$")
    keys = [k for k in INITS if any((a, k) in cell for a in activations)]
    fig.legend(handles=[Line2D([], [], color=INITS[k][2], lw=1.8, label=INITS[k][0]) for k in keys],
               loc="outside lower center", ncols=min(len(keys), 8), fontsize="x-small")
    fig.suptitle("At initialisation (mean, min-max over seeds; gaps: 0 or non-finite in float32)",
                 fontsize="medium")
    return fig


def figure_curves(cells: list[dict], activations):
    cell = _by(cells)
    fig, axes = plots.figure(len(activations), 1, width=4.3, height=3.6, sharey=True)
    for col, act in enumerate(activations):
        ax = axes[0, col]
        diverged = []
        for key, (label, _, color) in INITS.items():
            c = cell.get((act, key))
            if c is None:
                continue
            plots.curve_band(ax, c["test_accuracy_curve"], color=color, label=label)
            if "diverged" in c["status"]:
                diverged.append(label)
        if diverged:
            ax.text(0.98, 0.97, "diverged: " + ", ".join(diverged), transform=ax.transAxes,
                    ha="right", va="top", fontsize="x-small", color="0.3")
        ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
        ax.set(title=ACT_NAMES[act], xlabel="training step", ylim=(0, 1))
    axes[0, 0].set_ylabel("test accuracy")
    keys = [k for k in INITS if any((a, k) in cell for a in activations)]
    handles = [Line2D([], [], color=INITS[k][2], lw=1.8, label=INITS[k][0]) for k in keys]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(keys), 8),
               fontsize="x-small")
    fig.suptitle("Test accuracy over training, per initialisation (mean, min-max over seeds; a "
                 "diverged run stops where it diverged)", fontsize="medium")
    return fig


def figure_accuracy(cells: list[dict], activations):
    cell = _by(cells)
    keys = [k for k in INITS if any((a, k) in cell for a in activations)]
    values = np.asarray([[cell[(a, k)]["test_accuracy_mean"] if (a, k) in cell else np.nan
                          for k in keys] for a in activations])
    fig, axes = plots.figure(1, 1, width=8.5, height=2.2 + 0.45 * len(activations))
    ax = axes[0, 0]
    plots.heatmap(ax, values, x=[INITS[k][0] for k in keys], y=[ACT_NAMES[a] for a in activations],
                  label="final test accuracy", vmin=0, vmax=1, cmap="viridis")
    ax.invert_yaxis()  # first activation on top, as in the table
    ax.set_xticks(np.arange(len(keys)) + 0.5, [INITS[k][0] for k in keys], rotation=25,
                  ha="right", fontsize="small")
    for i, a in enumerate(activations):
        for j, k in enumerate(keys):
            v = values[i, j]
            status = cell[(a, k)]["status"] if (a, k) in cell else []
            text = "–" if not np.isfinite(v) else f"{100 * v:.0f}%"
            if "diverged" in status:
                text += f"\n({status.count('diverged')}/{len(status)} diverged)"
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize="small",
                    color="white" if not np.isfinite(v) or v < 0.6 else "black")
    ax.set_title("Final test accuracy (mean over seeds; a diverged run counts with its last "
                 "finite state)", fontsize="medium")
    return fig


def figure_spectrum(spec: list[dict]):
    depths = sorted({s["depth"] for s in spec})
    deepest = depths[-1]
    fig, axes = plots.figure(2, 1, width=5.4, height=3.9)
    ax = axes[0, 0]
    for s in spec:
        if s["depth"] != deepest:
            continue
        act, _, ls = SPECTRUM_VARIANTS[s["variant"]]
        sv = np.asarray(s["singular_values"], float).ravel()
        sv = np.sort(sv[sv > SV_RESOLUTION * sv.max()])
        # Empirical distribution: fraction of singular values <= s.
        ax.plot(np.log10(sv), np.arange(1, sv.size + 1) / sv.size, color=plots.color(act), ls=ls,
                lw=1.8, label=s["variant"])
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set(xlabel="singular value s of $\\partial h^L/\\partial h^0$",
           ylabel="fraction of singular values ≤ s",
           title=f"Spectrum of the end-to-end Jacobian at init, depth {deepest}")
    plots.power_of_ten_axis(ax, "x")
    ax.legend(fontsize="x-small", loc="upper left")
    ax = axes[0, 1]
    for label in dict.fromkeys(s["variant"] for s in spec):
        rows = sorted((s for s in spec if s["variant"] == label), key=lambda s: s["depth"])
        act, _, ls = SPECTRUM_VARIANTS[label]
        ax.plot([s["depth"] for s in rows], [s["p10_p90_decades"] for s in rows],
                color=plots.color(act), ls=ls, marker="o", label=label)
    ax.set(xscale="log", xlabel="depth L (blocks)",
           ylabel="spread: 10–90 % range of log10 s (decades)",
           title="Spread of the singular values against depth")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def classic_summary(cells: list[dict]) -> dict | None:
    cell = _by(cells)
    if not all(k in cell for k in CLASSIC):
        return None
    naive, he = (cell[k] for k in CLASSIC)
    best = max(naive["test_accuracy_mean"], he["test_accuracy_mean"])
    threshold = CHANCE + 0.5 * (best - CHANCE)
    out = {"threshold": threshold}
    for name, c in (("sigmoid_naive", naive), ("relu_he", he)):
        curve = c["test_accuracy_curve"]
        out[name] = {"final_test_accuracy": c["test_accuracy_mean"],
                     "steps_to_threshold": steps_to(curve["steps"], curve["values"], threshold),
                     "log10_first_block_grad": float(plots.nanmean(
                         np.asarray(c["log10_weight_grad_norms"], float)[:, 0])),
                     "log10_P0": float(np.mean(c["log10_P0"]))}
    return out


def conclusion(cells: list[dict], classic: dict | None, spec: list[dict], activations) -> str:
    cell = _by(cells)
    parts = []
    if classic is not None:
        n, h = classic["sigmoid_naive"], classic["relu_he"]
        when = lambda r: ("never" if r["steps_to_threshold"] is None
                          else f"at step {r['steps_to_threshold']:.0f}")
        grad = lambda r: ("exactly 0 in float32 (underflow)"
                          if not np.isfinite(r["log10_first_block_grad"])
                          else f"10^{r['log10_first_block_grad']:.1f}")
        parts.append(f"The classic example: ReLU + He ends at "
                     f"{100 * h['final_test_accuracy']:.1f} % "
                     f"test accuracy and reaches {100 * classic['threshold']:.0f} % {when(h)}; the "
                     f"naive sigmoid network ends at {100 * n['final_test_accuracy']:.1f} % and "
                     f"reaches it {when(n)} (its first block's gradient at init is "
                     f"{grad(n)}, against {grad(h)}).")
    best = []
    for act in activations:
        cs = [c for c in cells if c["activation"] == act]
        top = max(cs, key=lambda c: np.nan_to_num(c["test_accuracy_mean"], nan=-1))
        chance = [c["name"] + (" (diverged)" if "diverged" in c["status"] else "")
                  for c in cs if not np.nan_to_num(c["test_accuracy_mean"]) > CHANCE + 0.05]
        best.append(f"{ACT_NAMES[act]} best with {top['name']} "
                    f"({100 * top['test_accuracy_mean']:.1f} %)"
                    + (f", at chance with {', '.join(chance)}" if chance else ""))
    parts.append("After training: " + "; ".join(best) + ".")
    # Where the textbook pairing loses, say so.
    for act, textbook in TEXTBOOK.items():
        cs = [c for c in cells if c["activation"] == act]
        ref = cell.get((act, textbook))
        if not cs or ref is None:
            continue
        top = max(cs, key=lambda c: np.nan_to_num(c["test_accuracy_mean"], nan=-1))
        margin = 2 * max(top["test_accuracy_std"], ref["test_accuracy_std"], 0.005)
        if top is not ref and top["test_accuracy_mean"] > ref["test_accuracy_mean"] + margin:
            parts.append(f"Contrary to the textbook pairing, {ACT_NAMES[act]} trains best with "
                         f"{top['name']} ({100 * top['test_accuracy_mean']:.1f} %, ‖P_0‖²/n = "
                         f"10^{np.mean(top['log10_P0']):.1f} at init), not with "
                         f"{ref['name']} ({100 * ref['test_accuracy_mean']:.1f} %, "
                         f"10^{np.mean(ref['log10_P0']):.1f}).")
    if spec:
        deepest = max(s["depth"] for s in spec)
        at = {s["variant"]: s for s in spec if s["depth"] == deepest}
        t_orth, t_gauss = at.get("tanh, orthogonal"), at.get("tanh, Gaussian σ_w²=1")
        r_orth, r_he = at.get("ReLU, orthogonal ×√2"), at.get("ReLU, He (Gaussian)")
        l_orth = at.get("linear, orthogonal")
        if t_orth and t_gauss and r_orth and r_he and l_orth:
            parts.append(
                f"At depth {deepest} the singular values of ∂h^L/∂h^0 (10–90 % range) span "
                f"{l_orth['p10_p90_decades']:.2f} decades for orthogonal linear blocks, "
                f"{t_orth['p10_p90_decades']:.2f} for orthogonal tanh (mean s² "
                f"{t_orth['mean_sq_sv']:.2g}: well conditioned but shrinking) against "
                f"{t_gauss['p10_p90_decades']:.2f} for Gaussian tanh, and "
                f"{r_orth['p10_p90_decades']:.2f} / {r_he['p10_p90_decades']:.2f} for ReLU with "
                "orthogonal / Gaussian He weights"
                + (": dynamical isometry is within reach of tanh, not of ReLU."
                   if (t_gauss["p10_p90_decades"] - t_orth["p10_p90_decades"])
                   > 2 * max(r_he["p10_p90_decades"] - r_orth["p10_p90_decades"], 0.05) else "."))
        else:
            parts.append(f"At depth {deepest} the singular values of ∂h^L/∂h^0 span "
                         + ", ".join(f"{v['p10_p90_decades']:.2f} decades ({k})"
                                     for k, v in at.items()) + " (10–90 % range).")
        tanh_orth, tanh_x = cell.get(("tanh", "orthogonal")), cell.get(("tanh", "xavier"))
        if tanh_orth and tanh_x:
            diff = tanh_orth["test_accuracy_mean"] - tanh_x["test_accuracy_mean"]
            if diff < 0.02:
                parts.append(f"In training, tanh with orthogonal weights is not better than with "
                             f"Xavier ({100 * tanh_orth['test_accuracy_mean']:.1f} % vs "
                             f"{100 * tanh_x['test_accuracy_mean']:.1f} %): at depth "
                             f"{len(tanh_x['log10_weight_grad_norms'][0])} the better-conditioned "
                             "Jacobian does not buy accuracy in this budget.")
    return " ".join(parts)


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d", num_samples=size["num_samples"])
    runs = grid(args)
    result = s.sweep(runs, dataset, measure_at=[0], measure_batch_size=size["measure_batch_size"])
    cells = summarise(result)
    spec = spectra(args, dataset)
    classic = classic_summary(cells)
    acts = size["activations"]
    figures = {"classic": figure_classic(cells),
               "forward_backward": figure_forward_backward(cells, acts),
               "curves": figure_curves(cells, acts), "accuracy": figure_accuracy(cells, acts),
               "spectrum": figure_spectrum(spec)}
    paths = {name: s.save_figure(fig, name, headline=name == "classic")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "Weight initialisation: signal, gradient, spectrum and training"
    rep.add("Setup", f"""
- Network: plain MLP, depth {size['depth']}, width {size['width']}; activations
  {', '.join(acts)}; initialisations {', '.join(v[0] for v in INITS.values())}
  (orthogonal with gain √2 for ReLU, 1 otherwise; the stem and head use the same initialiser).
- Measured at initialisation on one batch of {size['measure_batch_size']} training examples:
  std of every layer's outputs, ‖∂L/∂W_l‖, ‖P_l‖²/n.
- Training: SGD, momentum 0.9, learning rate {args.learning_rate}, batch 128, {size['steps']}
  steps on MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), {size['seeds']}
  seed(s). {len(runs)} runs in {len(result.groups)} compiled programs (initialisers are values
  of one program).
- Spectra: every singular value of ∂h^L/∂h^0 (dense Jacobian of the whole-batch map, batch of
  {size['spectrum_batch']}, width {size['spectrum_width']}, {size['seeds']} initialisation(s)),
  depths {', '.join(map(str, size['spectrum_depths']))}; values below {SV_RESOLUTION:g} × the
  largest are float32 round-off and left out of the spread.""")
    rows = [{"act": c["activation"], "init": c["name"],
             "std": f"{plots.nanmean(np.asarray(c['activation_std'], float))[0]:.2g} → "
                    f"{plots.nanmean(np.asarray(c['activation_std'], float))[-1]:.2g}",
             "p0": f"{np.mean(c['log10_P0']):.1f}",
             "acc": f"{100 * np.nan_to_num(c['test_accuracy_mean']):.1f} ± "
                    f"{100 * np.nan_to_num(c['test_accuracy_std']):.1f}",
             "status": ", ".join(sorted(set(c["status"])))} for c in cells]
    rep.add("Summary", markdown_table(rows, [
        ("activation", "act"), ("init", "init"), ("unit std, stem → last block", "std"),
        ("log10 ‖P_0‖²/n at init", "p0"), ("test accuracy %", "acc"), ("status", "status")]))
    spec_rows = [{"variant": x["variant"], "depth": x["depth"], "msv": f"{x['mean_sq_sv']:.3g}",
                  "max": f"{x['max_sv']:.3g}", "spread": f"{x['p10_p90_decades']:.3f}",
                  "within": f"{100 * x['fraction_within_2x']:.0f}"} for x in spec]
    rep.add("Spectra", markdown_table(spec_rows, [
        ("variant", "variant"), ("depth", "depth"), ("mean s²", "msv"), ("largest s", "max"),
        ("10–90 % range of log10 s (decades)", "spread"), ("% of s in [1/2, 2]", "within")]))
    rep.add("Conclusion", conclusion(cells, classic, spec, acts))
    rep.add_figures(paths)
    return {"cells": cells, "classic": classic,
            "spectra": spec, "table": result.table(), "sizes": size, "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
