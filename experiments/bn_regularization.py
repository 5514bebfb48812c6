"""Does BatchNorm regularise? The train–test gap with and without BN, with and without weight decay.

A wide ReLU MLP (He init, depth 2, width 256, no dropout) is trained on the
first 1,000 of MNIST-1D's training examples, long enough to fit them (1,500
steps of batch 64, ~96 epochs; 100 % training accuracy after ~150 steps),
without normalisation and with BatchNorm, each with weight decay 0, 1e-3 and
1e-2 (SGD, momentum 0.9, learning rate 0.05; weight decay added to the
gradient, on every parameter; the weight decays are values of one compiled
program per norm). Over 3 seeds it measures the training accuracy on the whole
training set and the test accuracy on the 1,000 test examples (BatchNorm with
its running averages, ``train=False``), their gap and the test loss, at the end
and at 13 log-spaced steps (``extra_measure``) for the curves.

The usual story (Ioffe & Szegedy 2015) is that the noise of the batch
statistics gives BatchNorm a mild regularising effect, so a BN network
overfits less; weight decay is the classic explicit regulariser. With
BatchNorm, weight decay on the weights before a BN layer cannot shrink the
function (BN undoes their scale); it raises the effective learning rate
instead (van Laarhoven 2017; Zhang et al. 2019).

    python -m experiments.bn_regularization             # ~1.5 min on 2 idle CPU cores (93 s and
                                                        # 154 s measured on a machine shared at load
                                                        # average 8-11; 62 s CPU)
    python -m experiments.bn_regularization --quick     # ~12 s (256 examples, width 64, 120 steps)

Finding (default run): every network without weight decay fits its 1,000
examples (100 %); BatchNorm shrinks the train–test gap from 56.2 to 51.8
points (−4.4 ± 1.5, test accuracy 43.8 → 48.2 %) and the test loss from 3.25 to
2.45: a mild regularising effect, as the usual story says. Weight decay 1e-2
does more without BN (gap −10.1 ± 0.6, test 51.6 %, the best network); with
BN it shrinks the gap by 6.0 points only by lowering the training accuracy to
93 % (test 46.8 %, below BN without weight decay). ``report.md`` has the
numbers of a run.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import matplotlib
import numpy as np

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_regularization"
MNIST1D_TRAIN = 4000  # training examples of data.load("mnist1d")
# norm -> (label, colour key)
NORMS = {"none": ("no normalisation", "baseline"), "batch": ("BatchNorm", "batchnorm"),
         "layer": ("LayerNorm", "layernorm")}
FITS = 0.97  # training accuracy from which a network counts as having fitted its training set
MILD = 0.01  # a gap change below one point is no effect


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """The train–test gap of an MLP with and without BatchNorm and weight decay (small training set)."""

    train_examples: int = 1000
    """Training examples (the first of MNIST-1D's 4,000); the test set is all 1,000."""
    norms: tuple[str, ...] = ("none", "batch")
    weight_decays: tuple[float, ...] = (0.0, 1e-3, 1e-2)
    """Weight decays of every norm (values of one compiled program)."""
    depth: int = 2
    width: int = 256
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 0.05
    curve_points: int = 12
    """Points of the train and test accuracy curves (whole sets, eval mode), log-spaced in steps."""

    def validate(self) -> None:
        super().validate()
        for name in ("train_examples", "depth", "width", "steps", "batch_size", "curve_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 "must be an integer >= 1")
        if self.train_examples > MNIST1D_TRAIN or self.batch_size > self.train_examples:
            raise ValueError(f"invalid --train-examples={self.train_examples!r} with --batch-size="
                             f"{self.batch_size!r}: need batch size <= training examples <= "
                             f"{MNIST1D_TRAIN}")
        unknown = [n for n in self.norms if n not in NORMS]
        if not self.norms or unknown or "batch" not in self.norms:
            raise ValueError(f"invalid --norms={self.norms!r}: allowed values are "
                             + ", ".join(NORMS) + " ('batch' is required)")
        if not self.weight_decays or any(isinstance(w, bool) or not isinstance(w, (int, float))
                                         or not math.isfinite(w) or w < 0
                                         for w in self.weight_decays):
            raise ValueError(f"invalid --weight-decays={self.weight_decays!r}: must be finite "
                             "numbers >= 0")
        if 0.0 not in [float(w) for w in self.weight_decays]:
            raise ValueError(f"invalid --weight-decays={self.weight_decays!r}: must include 0 "
                             "(the networks without weight decay are the comparison)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"invalid --learning-rate={self.learning_rate!r}: must be a finite "
                             "number > 0")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(train_examples=256, norms=("none", "batch"), weight_decays=(0.0, 1e-2),
                    depth=1, width=64, steps=120, batch_size=32, curve_points=4,
                    seeds=args.num_seeds(3))
    return dict(train_examples=args.train_examples, norms=tuple(n for n in NORMS if n in args.norms),
                weight_decays=tuple(sorted({float(w) for w in args.weight_decays})),
                depth=args.depth, width=args.width, steps=args.steps, batch_size=args.batch_size,
                curve_points=args.curve_points, seeds=args.num_seeds(3))


def grid(args: Args) -> list[sweep.Run]:
    """One run per (norm, weight decay, seed); label "<norm> @ wd=<value>"."""
    s = sizes(args)
    model = ModelConfig(depth=s["depth"], width=s["width"], activation="relu", init="he_normal")
    train = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], learning_rate=args.learning_rate,
                        momentum=0.9, eval_every=s["steps"])  # curves: from the measurements
    return sweep.variants({f"{norm} @ wd={wd:g}": {"model.norm": norm, "train.weight_decay": wd}
                           for norm in s["norms"] for wd in s["weight_decays"]},
                          model=model, train=train, seeds=s["seeds"])


def measure_steps(size: dict) -> list[int]:
    """The steps of the curves: 0, then ``curve_points`` log-spaced steps up to the end
    (the training set is fitted early; the curves show that and the long tail after it)."""
    first = min(10, size["steps"])
    log = np.geomspace(first, size["steps"], size["curve_points"])
    return sorted({0, *(int(round(s)) for s in log), size["steps"]})


def accuracy_measure(dataset: data.Dataset):
    """``extra_measure``: accuracy and loss of a run on the whole training and test sets,
    BatchNorm with its running averages (what the user gets), one jitted program per model."""
    compiled: dict = {}
    x_train, y_train = jax.numpy.asarray(dataset.x_train), jax.numpy.asarray(dataset.y_train)
    x_test, y_test = jax.numpy.asarray(dataset.x_test), jax.numpy.asarray(dataset.y_test)

    def extra(model, variables) -> dict:
        if model.cfg not in compiled:
            def metrics(v, x, y):
                logits, _ = model.apply(v, x, train=False)
                logp = jax.nn.log_softmax(logits)
                return (jax.numpy.mean(jax.numpy.argmax(logits, -1) == y),
                        -jax.numpy.mean(jax.numpy.take_along_axis(logp, y[:, None], -1)))
            compiled[model.cfg] = jax.jit(metrics)
        f = compiled[model.cfg]
        train_acc, train_loss = f(variables, x_train, y_train)
        test_acc, test_loss = f(variables, x_test, y_test)
        return {"full_train_accuracy": float(train_acc), "full_train_loss": float(train_loss),
                "full_test_accuracy": float(test_acc), "full_test_loss": float(test_loss)}

    return extra


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def summarise(result: sweep.SweepResult) -> list[dict]:
    """One entry per (norm, weight decay) with the final numbers (per seed) and the curves."""
    entries = []
    for label, runs in result.by_label().items():
        norm = label.split(" @ ")[0]
        wd = runs[0].train.weight_decay
        train = result.final_stats(runs, "train_accuracy")
        test = result.final_stats(runs, "test_accuracy")
        gap = np.asarray(train["values"]) - np.asarray(test["values"])
        steps = [m["step"] for m in runs[0].measurements]
        curve = lambda key: [[m[key] for m in r.measurements] for r in runs]
        entries.append({
            "norm": norm, "label": NORMS[norm][0], "color_key": NORMS[norm][1], "weight_decay": wd,
            "seeds": [r.seed for r in runs], "status": [r.status for r in runs],
            "train_accuracy": train, "test_accuracy": test,
            "gap": {"mean": float(np.mean(gap)), "std": float(np.std(gap)), "values": gap.tolist()},
            "test_loss": result.final_stats(runs, "test_loss"),
            "train_loss": result.final_stats(runs, "train_loss"),
            "curves": {"steps": steps, "train_accuracy": curve("full_train_accuracy"),
                       "test_accuracy": curve("full_test_accuracy"),
                       "train_loss": curve("full_train_loss"), "test_loss": curve("full_test_loss")},
        })
    return entries


def _entry(entries: list[dict], norm: str, wd: float) -> dict:
    (e,) = [e for e in entries if e["norm"] == norm and e["weight_decay"] == wd]
    return e


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _se(e: dict, key: str) -> float:
    """Standard error of the seed mean of ``key``."""
    v = np.asarray(e[key]["values"], float)
    return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def _change(a: dict, b: dict, key: str = "gap") -> tuple[float, float]:
    """(mean of b - mean of a, its standard error) for ``key`` over seeds."""
    return b[key]["mean"] - a[key]["mean"], math.hypot(_se(a, key), _se(b, key))


def _pm(change: float, se: float) -> str:
    """A change in points with its standard error (none with one seed)."""
    return f"{100 * change:+.1f}" + (f" ± {100 * se:.1f}" if se > 0 else "")


def best_weight_decay(entries: list[dict], norm: str) -> float:
    """The weight decay (> 0) with the best mean test accuracy of ``norm``."""
    wds = [e for e in entries if e["norm"] == norm and e["weight_decay"] > 0]
    return max(wds, key=lambda e: e["test_accuracy"]["mean"])["weight_decay"] if wds else math.nan


def claims(entries: list[dict], size: dict) -> list[dict]:
    base, bn = _entry(entries, "none", 0.0) if "none" in size["norms"] else None, \
        _entry(entries, "batch", 0.0)
    out = []
    if base is None:
        return out
    d_gap, se = _change(base, bn)
    d_test, _ = _change(base, bn, "test_accuracy")
    fitted = min(base["train_accuracy"]["mean"], bn["train_accuracy"]["mean"]) >= FITS
    if d_gap < -max(MILD, 2 * se):
        verdict = "holds" if fitted else "holds partly"
    elif d_gap < 0:
        verdict = "holds partly"
    else:
        verdict = "does not hold here"
    out.append({
        "claim": "BN has a mild regularising effect (smaller train–test gap)",
        "measured": (f"Without weight decay the gap is {_pts(base['gap']['mean'])} points without "
                     f"normalisation ({_pts(base['train_accuracy']['mean'])} % train, "
                     f"{_pts(base['test_accuracy']['mean'])} % test) and {_pts(bn['gap']['mean'])} "
                     f"with BatchNorm ({_pts(bn['train_accuracy']['mean'])} % train, "
                     f"{_pts(bn['test_accuracy']['mean'])} % test): a change of {_pm(d_gap, se)} "
                     f"points (test accuracy {d_test * 100:+.1f})."
                     + ("" if fitted else " Not every network fitted its training set.")),
        "verdict": verdict, "figure": "figures/summary.png"})
    wd = best_weight_decay(entries, "none")
    if np.isfinite(wd):
        with_wd = _entry(entries, "none", wd)
        d_wd, se_wd = _change(base, with_wd)
        d_wd_test, _ = _change(base, with_wd, "test_accuracy")
        # Weight decay regularises more than BN: a larger reduction of the gap, beyond the noise.
        if d_wd < d_gap - max(MILD, 2 * math.hypot(se, se_wd)):
            verdict = "holds"
        elif d_wd < d_gap:
            verdict = "holds partly"
        else:
            verdict = "does not hold here"
        out.append({
            "claim": "BN's regularising effect is milder than weight decay's",
            "measured": (f"Weight decay {wd:g} (the best for the network without normalisation) "
                         f"changes its gap by {_pm(d_wd, se_wd)} points (test "
                         f"accuracy {d_wd_test * 100:+.1f}); BatchNorm changes it by "
                         f"{_pm(d_gap, se)} (test accuracy {d_test * 100:+.1f})."),
            "verdict": verdict, "figure": "figures/summary.png"})
    return out


def conclusion(entries: list[dict], size: dict) -> str:
    wds = size["weight_decays"]
    parts = []
    for norm in size["norms"]:
        es = [_entry(entries, norm, wd) for wd in wds]
        parts.append(f"{NORMS[norm][0]}: " + ", ".join(
            f"wd {e['weight_decay']:g} → train {_pts(e['train_accuracy']['mean'])} %, test "
            f"{_pts(e['test_accuracy']['mean'])} % (gap {_pts(e['gap']['mean'])}, test loss "
            f"{e['test_loss']['mean']:.2f})" for e in es))
    text = (f"After {size['steps']} steps on {size['train_examples']} examples — "
            + "; ".join(parts) + ". ")
    best = max(entries, key=lambda e: e["test_accuracy"]["mean"])
    text += (f"The best test accuracy is {NORMS[best['norm']][0]} with weight decay "
             f"{best['weight_decay']:g} ({_pts(best['test_accuracy']['mean'])} %). ")
    if "none" in size["norms"]:
        base, bn = _entry(entries, "none", 0.0), _entry(entries, "batch", 0.0)
        d_gap, se = _change(base, bn)
        text += (f"BatchNorm alone changes the gap by {_pm(d_gap, se)} points"
                 + (" — no regularising effect measurable here, against the usual story"
                    if d_gap > -max(MILD, 2 * se)
                    else " — a regularising effect, as the usual story has it")
                 + ". ")
        wd = best_weight_decay(entries, "none")
        if np.isfinite(wd):
            d_wd, se_wd = _change(base, _entry(entries, "none", wd))
            text += f"Weight decay {wd:g} alone changes it by {_pm(d_wd, se_wd)}. "
        bn_wd = [_entry(entries, "batch", w) for w in wds if w > 0]
        if bn_wd:
            changes = [_change(bn, e) for e in bn_wd]
            text += ("With BatchNorm, weight decay " + ", ".join(
                f"{e['weight_decay']:g} changes the gap by {_pm(d, se)} points (test accuracy "
                f"{_pm(_change(bn, e, 'test_accuracy')[0], 0)})"
                for e, (d, se) in zip(bn_wd, changes)))
            if np.isfinite(wd) and min(d for d, _ in changes) > d_wd:
                text += (" — less than without normalisation (the usual explanation: on the "
                         "weights before a BN layer weight decay cannot shrink the function, BN "
                         "undoes their scale; it raises the effective learning rate instead, van "
                         "Laarhoven 2017)")
            text += ". "
            # A gap can also shrink because the training set is no longer fitted.
            underfit = [e for e in entries if e["weight_decay"] > 0 and
                        e["train_accuracy"]["mean"] < FITS and e["test_accuracy"]["mean"] <
                        _entry(entries, e["norm"], 0.0)["test_accuracy"]["mean"]]
            if underfit:
                text += ("Where the gap shrinks with a lower test accuracy ("
                         + ", ".join(f"{e['label']} with weight decay {e['weight_decay']:g}: "
                                     f"{_pts(e['train_accuracy']['mean'])} % train"
                                     for e in underfit)
                         + "), it is the training accuracy that fell, not generalisation that "
                           "improved. ")
    return text.strip()


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _wd_axis(ax, wds) -> None:
    ax.set_xticks(range(len(wds)), ["0" if w == 0 else f"{w:g}" for w in wds])
    ax.set_xlabel("weight decay")
    ax.set_xlim(-0.4, len(wds) - 0.6)


def figure_summary(entries: list[dict], size: dict):
    """Train and test accuracy, gap and test loss against weight decay, per norm (mean ± std)."""
    wds = size["weight_decays"]
    fig, axes = plots.figure(3, 1, width=4.0, height=3.5)
    n = len(size["norms"])
    for i, norm in enumerate(size["norms"]):
        es = [_entry(entries, norm, wd) for wd in wds]
        x = np.arange(len(wds)) + 0.08 * (i - (n - 1) / 2)  # side by side, not on top
        c = plots.color(NORMS[norm][1])
        for key, style, label in (("train_accuracy", "--", "train"), ("test_accuracy", "-", "test")):
            axes[0, 0].errorbar(x, [100 * e[key]["mean"] for e in es],
                                yerr=[100 * e[key]["std"] for e in es], color=c, ls=style,
                                marker="o", mfc="white" if key == "train_accuracy" else c,
                                capsize=3, label=f"{NORMS[norm][0]}, {label}")
        axes[0, 1].errorbar(x, [100 * e["gap"]["mean"] for e in es],
                            yerr=[100 * e["gap"]["std"] for e in es], color=c, marker="o",
                            capsize=3, label=NORMS[norm][0])
        axes[0, 2].errorbar(x, [e["test_loss"]["mean"] for e in es],
                            yerr=[e["test_loss"]["std"] for e in es], color=c, marker="o",
                            capsize=3, label=NORMS[norm][0])
    titles = ("Accuracy (whole sets, BN: running averages)", "Train − test accuracy gap",
              "Test loss")
    ylabels = ("accuracy %", "gap (points)", "test cross-entropy")
    for ax, title, ylabel in zip(axes[0], titles, ylabels):
        _wd_axis(ax, wds)
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"MLP {size['depth']}×{size['width']}, {size['train_examples']} training examples, "
                 f"{size['steps']} steps, no dropout (mean ± std over {size['seeds']} seeds)",
                 fontsize="medium")
    return fig


def figure_curves(entries: list[dict], size: dict):
    """Train (dashed) and test (solid) accuracy, and test loss, over training; one column per norm."""
    wds = size["weight_decays"]
    fig, axes = plots.figure(len(size["norms"]), 2, width=4.4, height=3.2, sharey="row")
    shades = matplotlib.colormaps["plasma"]
    for col, norm in enumerate(size["norms"]):
        for i, wd in enumerate(wds):
            e = _entry(entries, norm, wd)
            c = e["curves"]
            color = shades(0.8 * i / max(1, len(wds) - 1))
            label = f"wd {wd:g}"
            plots.band(axes[0, col], c["steps"], 100 * np.asarray(c["train_accuracy"], float),
                       color=color, linestyle="--")
            plots.band(axes[0, col], c["steps"], 100 * np.asarray(c["test_accuracy"], float),
                       color=color, label=label)
            plots.band(axes[1, col], c["steps"], c["test_loss"], color=color, label=label)
        axes[0, col].set_title(f"{NORMS[norm][0]}: train (dashed) and test accuracy",
                               fontsize="medium")
        axes[1, col].set_title(f"{NORMS[norm][0]}: test loss", fontsize="medium")
        axes[1, col].set_xlabel("training step")
        for ax in axes[:, col]:
            ax.set_xscale("log")  # log-spaced measurements; step 0 (chance) is off the axis
        axes[0, col].legend(fontsize="x-small", loc="lower right")
    axes[0, 0].set_ylabel("accuracy % (whole set)")
    axes[1, 0].set_ylabel("test cross-entropy")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def table_rows(entries: list[dict]) -> list[dict]:
    fmt = lambda s, scale=100, d=1: f"{scale * s['mean']:.{d}f} ± {scale * s['std']:.{d}f}"
    return [{"norm": e["label"], "wd": f"{e['weight_decay']:g}", "train": fmt(e["train_accuracy"]),
             "test": fmt(e["test_accuracy"]), "gap": fmt(e["gap"]),
             "loss": fmt(e["test_loss"], 1, 3), "train_loss": fmt(e["train_loss"], 1, 4),
             "status": ", ".join(sorted(set(e["status"])))} for e in entries]


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    full = data.load("mnist1d")
    n = size["train_examples"]
    dataset = dataclasses.replace(full, x_train=full.x_train[:n], y_train=full.y_train[:n])
    runs = grid(args)
    result = s.sweep(runs, dataset, measure_at=measure_steps(size), jacobians=False,
                     extra_measure=accuracy_measure(dataset), log_every=max(1, size["steps"] // 200))
    entries = summarise(result)
    claim_list = claims(entries, size)
    text = conclusion(entries, size)
    figures = {"summary": figure_summary(entries, size), "curves": figure_curves(entries, size)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "Does BatchNorm regularise? Train–test gap with and without BN and weight decay"
    epochs = size["steps"] * size["batch_size"] / n
    rep.add("Setup", f"""
- Network: ReLU MLP, He init, depth {size['depth']}, width {size['width']}, no dropout; Dense →
  [norm] → ReLU blocks, norm = {', '.join(NORMS[k][0] for k in size['norms'])}.
- Data: the first {n} of MNIST-1D's {full.num_train} training examples (standardised with the
  statistics of all {full.num_train}); test: all {dataset.num_test} test examples.
- Training: SGD, momentum 0.9, learning rate {args.learning_rate}, batch {size['batch_size']},
  {size['steps']} steps (~{epochs:.0f} epochs); weight decay
  {', '.join(f'{w:g}' for w in size['weight_decays'])} (added to the gradient of every parameter,
  BN's scale and shift included), a value of one compiled program per norm; {size['seeds']}
  seed(s) each.
- Measured on the whole training and test sets, BatchNorm with its running averages
  (``train=False``): accuracy, gap = train − test accuracy, cross-entropy; at the end and at
  {len(measure_steps(size))} log-spaced steps for the curves. {len(runs)} runs in {len(result.groups)}
  compiled programs.""")
    rep.add("Summary", markdown_table(table_rows(entries), [
        ("norm", "norm"), ("weight decay", "wd"), ("train %", "train"), ("test %", "test"),
        ("gap (points)", "gap"), ("test loss", "loss"), ("train loss", "train_loss"),
        ("status", "status")]) + "\n\nmean ± std over seeds.")
    rep.add("Conclusion", text)
    rep.add_claims(claim_list)
    rep.add_figures(paths)
    return {"entries": entries, "claims": claim_list, "conclusion": text, "table": result.table(),
            "sizes": size, "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
