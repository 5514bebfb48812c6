"""BatchNorm and the learning rate: how large a step, and over how wide a range, trains?

Deep plain MLPs (depth 16, width 64; ReLU with He init and tanh with Xavier
init; ``--activations`` adds sigmoid with Xavier) with and without BatchNorm,
trained with SGD (momentum 0.9) at learning rates from 0.001 to 10 in
half-decade steps (0.001, 0.003, 0.01, ..., 3, 10), 3 seeds each. The learning
rate and the seed are per-run values, so each (activation, norm) is one
compiled program for all of them.

A run *trains* when it did not diverge (no non-finite loss or gradient) and
its final test accuracy is at least chance + 10 points (20 %); a learning rate
trains when at least half of its seeds do. Reported per network: the largest
learning rate that trains, and the unbroken range of learning rates around the
best one whose mean test accuracy is within 5 points of the best ("trains
well"), in decades; a diverged seed counts as chance accuracy there. Diverged
runs are kept: marked on the figure, "diverged at step N" in the table.

Data: MNIST-1D (4,000 train / 1,000 test). Training: batch 128, 400 steps,
constant learning rate. The near-best range depends on that budget: at 0.001
every network is still far from converged after 400 steps.

    python -m experiments.bn_learning_rate            # ~2-3 min on 2 CPU cores (103-207 s, shared)
    python -m experiments.bn_learning_rate --quick    # ~10 s (tiny sizes)
    python -m experiments.bn_learning_rate --figure docs/figures/bn_learning_rate.png

The default run took 103-207 s of wall time on 2 CPU cores shared with other
jobs (load average 6-13; 71-76 s of CPU time).

Finding (default run, 3 seeds): BN raises the largest learning rate that
trains tenfold for both networks (ReLU and tanh: 0.1 without BN, 1 with BN).
The range that trains *well* (mean test accuracy within 5 points of the best)
widens less: ReLU 0.5 -> 1.5 decades, tanh 0.5 -> 1.0, so that claim holds
only partly here; and a higher usable learning rate is not a higher best one
(tanh: best at 0.03 without BN, 0.01 with BN; best accuracies 45.7 -> 47.2 %
for ReLU, 45.7 -> 48.7 % for tanh). Above the limit the networks fail
differently: ReLU without BN diverges (10 of 12 runs; non-finite loss at step
3 for learning rates >= 1), while tanh without BN and both BN networks keep a
finite loss and stop learning (chance accuracy). ``report.md`` has the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys

from matplotlib.lines import Line2D
import numpy as np

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad import trainable_range as tr
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_learning_rate"
CHANCE = 0.1
TRAINS = CHANCE + 0.1  # final test accuracy from which a (non-diverged) run trains
NEAR_BEST = 0.05  # "trains well": mean test accuracy within this of the best learning rate's
MUCH_HIGHER = 10.0  # a ratio of largest trainable learning rates from which "much higher" holds
WIDER_BY = 1.0  # decades by which BN's near-best range must be wider for the claim to hold
# activation -> (name in text, the initialiser it is paired with, its name)
NETWORKS = {"relu": ("ReLU", "he_normal", "He"), "tanh": ("tanh", "glorot_normal", "Xavier"),
            "sigmoid": ("sigmoid", "glorot_normal", "Xavier")}
# norm -> (name in text, colour key of vgrad.plots)
NORMS = {"none": ("no BN", "baseline"), "batch": ("BN", "batchnorm")}
LOSS_CAP = 1000.0  # loss-curve axes end here (a diverging loss passes any bound)
DEFAULT_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Learning-rate sweep of deep MLPs with and without BatchNorm."""

    activations: tuple[str, ...] = ("relu", "tanh")
    """Networks to sweep (relu: He init; tanh, sigmoid: Xavier init); two programs each."""
    learning_rates: tuple[float, ...] = DEFAULT_LEARNING_RATES
    curve_learning_rates: tuple[float, ...] = (0.01, 0.1, 1.0, 3.0)
    """Learning rates whose loss curves are drawn (each one of --learning-rates)."""
    depth: int = 16
    width: int = 64
    steps: int = 400
    batch_size: int = 128
    momentum: float = 0.9

    def validate(self) -> None:
        super().validate()
        unknown = [a for a in self.activations if a not in NETWORKS]
        if not self.activations or unknown:
            raise ValueError(f"invalid --activations={self.activations!r}: allowed values are "
                             + ", ".join(NETWORKS))
        lrs = self.learning_rates
        if (not lrs or any(isinstance(v, bool) or not isinstance(v, (int, float))
                           or not math.isfinite(v) or v <= 0 for v in lrs)):
            raise ValueError(f"invalid --learning-rates={lrs!r}: must be finite numbers > 0")
        if len(set(lrs)) != len(lrs):
            raise ValueError(f"invalid --learning-rates={lrs!r}: values must be distinct")
        missing = [v for v in self.curve_learning_rates if v not in lrs]
        if missing:
            raise ValueError(f"invalid --curve-learning-rates={self.curve_learning_rates!r}: "
                             f"{missing} not among --learning-rates")
        for name in ("depth", "width", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 "must be an integer >= 1")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"invalid --momentum={self.momentum!r}: must be in [0, 1)")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(activations=("relu",), learning_rates=(0.01, 0.1, 1.0, 10.0),
                    curve_learning_rates=(0.1, 10.0), depth=4, width=16, steps=30, batch_size=32,
                    seeds=args.num_seeds(1))
    return dict(activations=tuple(a for a in NETWORKS if a in args.activations),
                learning_rates=tuple(sorted(float(v) for v in args.learning_rates)),
                curve_learning_rates=tuple(sorted(float(v) for v in args.curve_learning_rates)),
                depth=args.depth, width=args.width, steps=args.steps, batch_size=args.batch_size,
                seeds=args.num_seeds(3))


def grid(args: Args) -> list[sweep.Run]:
    """One run per (activation, norm, learning rate, seed); label "<activation>|<norm>"."""
    s = sizes(args)
    train = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], momentum=args.momentum,
                        eval_every=s["steps"])
    runs = []
    for act in s["activations"]:
        for norm in NORMS:
            model = ModelConfig(depth=s["depth"], width=s["width"], activation=act,
                                init=NETWORKS[act][1], norm=norm)
            runs += sweep.grid(model, train, vary={"train.learning_rate": list(s["learning_rates"])},
                               seeds=s["seeds"], label=f"{act}|{norm}")
    return runs


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def diverged_at(r: sweep.RunResult) -> int | None:
    """The step at which a diverged run's loss or gradient became non-finite (None: it did not)."""
    # final["step"] of a diverged run is its last good step.
    return int(r.final["step"]) + 1 if r.status == "diverged" else None


def summarise(result: sweep.SweepResult, size: dict) -> list[dict]:
    """One entry per (activation, norm): per learning rate (V) and seed (S), the final test
    accuracy, divergence and training verdicts; the largest trainable learning rate, the
    near-best range, and the loss curves of the chosen learning rates."""
    lrs = list(size["learning_rates"])
    entries = []
    for label, runs in result.by_label().items():
        act, norm = label.split("|")
        cell = {lr: [r for r in runs if r.train.learning_rate == lr] for lr in lrs}
        acc = np.asarray([[r.final.get("test_accuracy", math.nan) for r in cell[lr]] for lr in lrs])
        loss = np.asarray([[r.final.get("train_loss", math.nan) for r in cell[lr]] for lr in lrs])
        div_at = [[diverged_at(r) for r in cell[lr]] for lr in lrs]
        diverged = np.asarray([[d is not None for d in row] for row in div_at])
        trains = tr.runs_train(acc, diverged, threshold=TRAINS)                     # (V, S)
        lr_trains = tr.values_train(trains)                                          # (V,)
        # A diverged seed produced no usable network: it scores chance.
        score = np.where(diverged, CHANCE, acc)                                       # (V, S)
        mean_score = plots.nanmean(score, axis=1)                                     # (V,)
        near = tr.near_best_span(lrs, mean_score, tolerance=NEAR_BEST)
        # (All NaN only when the sweep was interrupted before this network trained.)
        best = int(np.nanargmax(mean_score)) if np.isfinite(mean_score).any() else 0
        curves = {}
        for lr in size["curve_learning_rates"]:
            steps, values = result.curves(cell[lr], "loss")
            curves[str(lr)] = {"steps": steps.tolist(), "values": values.tolist(),
                               "diverged_at_step": [diverged_at(r) for r in cell[lr]]}
        entries.append({
            "activation": act, "norm": norm, "label": f"{NETWORKS[act][0]}, {NORMS[norm][0]}",
            "init": NETWORKS[act][1], "learning_rates": lrs,
            "seeds": [r.seed for r in cell[lrs[0]]],
            "test_accuracy": acc.tolist(), "train_loss": loss.tolist(),
            "diverged_at_step": div_at, "run_trains": trains.tolist(),
            "learning_rate_trains": lr_trains.tolist(),
            "score": score.tolist(), "mean_score": mean_score.tolist(),
            "best_learning_rate": lrs[best], "best_accuracy": float(mean_score[best]),
            "largest_trainable_learning_rate": tr.largest(lrs, lr_trains),
            "trainable_span": list(tr.contiguous_span(lrs, lr_trains)),
            "near_best_span": list(near), "near_best_decades": tr.span_decades(near),
            "loss_curves": curves, "step_time_s": runs[0].step_time_s,
        })
    return entries


def _pair(entries: list[dict], act: str) -> tuple[dict, dict]:
    """(no-BN entry, BN entry) of an activation."""
    by = {(e["activation"], e["norm"]): e for e in entries}
    return by[(act, "none")], by[(act, "batch")]


def _lr(v: float) -> str:
    return "none" if not np.isfinite(v) else f"{v:g}"


def learning_rate_ratio(entries: list[dict], act: str) -> float:
    """Largest trainable learning rate with BN / without (inf: only BN trains; NaN: BN never)."""
    none, bn = _pair(entries, act)
    a, b = none["largest_trainable_learning_rate"], bn["largest_trainable_learning_rate"]
    if not np.isfinite(b):
        return math.nan
    return math.inf if not np.isfinite(a) else b / a


def _ratio_text(r: float) -> str:
    if math.isinf(r):
        return "only BN trains"
    return "neither trains" if not np.isfinite(r) else f"×{r:.3g}"


def claim_higher_learning_rates(entries: list[dict], size: dict) -> dict:
    acts = size["activations"]
    ratios = {a: learning_rate_ratio(entries, a) for a in acts}
    parts = []
    for a in acts:
        none, bn = _pair(entries, a)
        parts.append(f"{NETWORKS[a][0]} {_lr(none['largest_trainable_learning_rate'])} without BN, "
                     f"{_lr(bn['largest_trainable_learning_rate'])} with BN "
                     f"({_ratio_text(ratios[a])})")
    much = [a for a in acts if ratios[a] >= MUCH_HIGHER]
    higher = [a for a in acts if ratios[a] > 1]
    verdict = ("holds" if len(much) == len(acts) else
               "holds partly" if higher else "does not hold here")
    return {"claim": "BN allows (much) higher learning rates",
            "measured": "Largest learning rate that trains (test accuracy ≥ "
                        f"{100 * TRAINS:.0f} %, no divergence, in at least half the seeds): "
                        + "; ".join(parts) + ".",
            "verdict": verdict, "figure": "figures/summary.png",
            "ratios": {a: ratios[a] for a in acts}}


def _trainable_text(e: dict) -> str:
    """The unbroken range of learning rates that train, with its width in decades."""
    lo, hi = e["trainable_span"]
    return "none" if not np.isfinite(lo) else \
        f"{lo:g}–{hi:g} ({tr.span_decades((lo, hi)):.1f} decades)"


def claim_wider_range(entries: list[dict], size: dict) -> dict:
    acts = size["activations"]
    parts, wider, much = [], [], []
    for a in acts:
        none, bn = _pair(entries, a)
        dn, db = none["near_best_decades"], bn["near_best_decades"]
        span = lambda e: f"{_lr(e['near_best_span'][0])}–{_lr(e['near_best_span'][1])}"
        parts.append(f"{NETWORKS[a][0]} {dn:.1f} decades without BN ({span(none)}, best "
                     f"{100 * none['best_accuracy']:.1f} %) against {db:.1f} with BN ({span(bn)}, "
                     f"best {100 * bn['best_accuracy']:.1f} %); the learning rates that train at "
                     f"all (smallest tried: {none['learning_rates'][0]:g}): {_trainable_text(none)} and "
                     f"{_trainable_text(bn)}")
        if np.isfinite(db) and (not np.isfinite(dn) or db > dn):
            wider.append(a)
        if np.isfinite(db) and (not np.isfinite(dn) or db >= dn + WIDER_BY):
            much.append(a)
    verdict = ("holds" if len(much) == len(acts) else
               "holds partly" if wider else "does not hold here")
    return {"claim": "BN networks train well over a wider range of learning rates",
            "measured": f"Range of learning rates around the best whose mean test accuracy is "
                        f"within {100 * NEAR_BEST:.0f} points of the best: " + "; ".join(parts) + ".",
            "verdict": verdict, "figure": "figures/summary.png"}


def _status(e: dict, v: int) -> str:
    div = [d for d in e["diverged_at_step"][v] if d is not None]
    n = len(e["diverged_at_step"][v])
    ok = sum(e["run_trains"][v])
    parts = []
    if div:
        parts.append(f"diverged at step {min(div)}" + (f" ({len(div)}/{n})" if n > 1 else ""))
    stuck = n - ok - len(div)
    if stuck:
        parts.append("no learning" + (f" ({stuck}/{n})" if n > 1 else ""))
    return "; ".join(parts) or "ok"


def table_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for e in entries:
        for v, lr in enumerate(e["learning_rates"]):
            s = np.asarray(e["score"][v], float)
            loss = np.asarray(e["train_loss"][v], float)
            finite = loss[np.isfinite(loss) & ~np.asarray([d is not None for d in
                                                            e["diverged_at_step"][v]])]
            rows.append({
                "network": e["label"], "lr": f"{lr:g}",
                "acc": f"{100 * np.mean(s):.1f} ± {100 * np.std(s):.1f}",
                "trains": f"{sum(e['run_trains'][v])}/{len(s)}",
                "loss": f"{np.median(finite):.3g}" if finite.size else "–",
                "status": _status(e, v),
            })
    return rows


def range_rows(entries: list[dict]) -> list[dict]:
    return [{"network": e["label"], "best": f"{e['best_learning_rate']:g}",
             "best_acc": f"{100 * e['best_accuracy']:.1f}",
             "largest": _lr(e["largest_trainable_learning_rate"]),
             "trainable": "none" if not np.isfinite(e["trainable_span"][0])
             else f"{e['trainable_span'][0]:g}–{e['trainable_span'][1]:g}",
             "near": "–" if not np.isfinite(e["near_best_decades"])
             else f"{e['near_best_span'][0]:g}–{e['near_best_span'][1]:g} "
                  f"({e['near_best_decades']:.1f})"} for e in entries]


def conclusion(entries: list[dict], claims: list[dict], size: dict) -> str:
    higher, wider = claims
    text = (f"{higher['measured']} Verdict: {higher['verdict']}. {wider['measured']} "
            f"Verdict: {wider['verdict']}.")
    # A higher usable learning rate is not a higher best one: say where the best moved.
    best = []
    for a in size["activations"]:
        none, bn = _pair(entries, a)
        best.append(f"{NETWORKS[a][0]} {none['best_learning_rate']:g} → "
                    f"{bn['best_learning_rate']:g} ({100 * none['best_accuracy']:.1f} → "
                    f"{100 * bn['best_accuracy']:.1f} % test accuracy)")
    text += " The best learning rate without → with BN: " + "; ".join(best) + "."
    # What happens above the largest trainable learning rate: divergence or no learning?
    notes, failure = [], {}
    for a in size["activations"]:
        for e in _pair(entries, a):
            top = e["largest_trainable_learning_rate"]
            above = [v for v, lr in enumerate(e["learning_rates"])
                     if not np.isfinite(top) or lr > top]
            if not above:
                notes.append(f"{e['label']} trains at every learning rate up to "
                             f"{e['learning_rates'][-1]:g}")
                continue
            div = [d is not None for v in above for d in e["diverged_at_step"][v]]
            loss = np.asarray([x for v in above for x, d in zip(e["train_loss"][v],
                                                                e["diverged_at_step"][v])
                               if d is None], float)
            failure.setdefault(e["norm"], []).append(np.mean(div))
            notes.append(f"{e['label']}: {sum(div)} of {len(div)} runs above {_lr(top)} diverge"
                         + (f", the others stay finite but below {100 * TRAINS:.0f} % (median final "
                            f"training loss {np.nanmedian(loss):.3g})" if loss.size else ""))
    text += " Above the largest trainable learning rate — " + "; ".join(notes) + "."
    if failure.get("batch") and failure.get("none") and \
            np.mean(failure["batch"]) < 0.5 <= np.mean(failure["none"]):
        text += (" So without BN a too-large step overflows (a non-finite loss), while with BN "
                 "it mostly does not: the loss stays finite but the network stops learning. "
                 "This fits BN's invariance to the scale of the weights before it (a large step "
                 "grows those weights, which shrinks the effective step) — not measured here.")
    return text


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _style(e: dict) -> dict:
    return {"color": plots.color(NORMS[e["norm"]][1])}


def figure_summary(entries: list[dict], size: dict):
    """Final test accuracy against learning rate, one panel per activation: mean over seeds
    (diverged seeds at chance) with the min-max band; x: a seed diverged; bars: the
    near-best range; triangles: the largest learning rate that trains."""
    acts = size["activations"]
    fig, axes = plots.figure(len(acts), 1, width=5.2, height=4.2)
    for col, act in enumerate(acts):
        ax = axes[0, col]
        pair = _pair(entries, act)
        for k, e in enumerate(pair):
            c = _style(e)["color"]
            lrs = np.asarray(e["learning_rates"])
            s = 100 * np.asarray(e["score"], float)                                  # (V, S)
            plots.band(ax, lrs, s.T, label=NORMS[e["norm"]][0], marker="o", **_style(e))
            div = np.asarray([any(d is not None for d in row) for row in e["diverged_at_step"]])
            if div.any():
                ax.plot(lrs[div], np.mean(s[div], 1), "x", ms=11, mew=2.5, color=c, zorder=5)
            lo, hi = e["near_best_span"]
            if np.isfinite(lo):
                # A strip below chance: one bar per norm (a single value gets a short bar).
                y = 6.5 - 3 * k
                ax.plot([lo / 10 ** 0.1, hi * 10 ** 0.1], [y, y], color=c, lw=6, alpha=0.6,
                        solid_capstyle="butt")
            top = e["largest_trainable_learning_rate"]
            if np.isfinite(top):
                v = e["learning_rates"].index(top)
                ax.plot([top], [np.mean(s[v])], "^", ms=12, color=c, markeredgecolor="k",
                        mew=1.2, zorder=6)
        ax.axhline(100 * CHANCE, color="0.5", lw=0.8, ls=":")
        ax.axhline(100 * TRAINS, color="0.5", lw=0.8, ls="--")
        ratio = learning_rate_ratio(entries, act)
        ax.set(xscale="log", xlabel="learning rate (SGD, momentum 0.9)",
               ylabel="final test accuracy %" if col == 0 else "",
               title=f"{NETWORKS[act][0]} + {NETWORKS[act][2]}, depth {size['depth']}: "
                     f"largest trainable lr {_ratio_text(ratio)} with BN")
        ax.set_ylim(0, max(100 * max(e["best_accuracy"] for e in pair) + 8, 35))
    # One legend for the symbols, below the panels.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    grey = "0.35"
    handles += [Line2D([], [], ls="none", marker="x", ms=9, mew=2.5, color=grey),
                Line2D([], [], color=grey, lw=6, alpha=0.6),
                Line2D([], [], ls="none", marker="^", ms=10, color=grey, markeredgecolor="k"),
                Line2D([], [], color="0.5", lw=0.8, ls="--"), Line2D([], [], color="0.5", lw=0.8, ls=":")]
    labels += ["a seed diverged (scored at chance)",
               f"lrs within {100 * NEAR_BEST:.0f} points of the best (bars)",
               "largest learning rate that trains", f"trains: {100 * TRAINS:.0f} %",
               f"chance: {100 * CHANCE:.0f} %"]
    fig.legend(handles, labels, loc="outside lower center", ncol=4 if len(acts) > 1 else 2,
               fontsize="small")
    return fig


def figure_loss_curves(entries: list[dict], size: dict):
    """Training loss (batch) against step for the chosen learning rates: rows = activation,
    columns = learning rate; x: where a seed diverged."""
    acts, lrs = size["activations"], size["curve_learning_rates"]
    fig, axes = plots.figure(len(lrs), len(acts), width=3.6, height=3.0)
    for row, act in enumerate(acts):
        for col, lr in enumerate(lrs):
            ax = axes[row, col]
            gone, top = [], 10.0
            for e in _pair(entries, act):
                c = e["loss_curves"][str(lr)]
                steps = np.asarray(c["steps"], float)
                values = np.asarray(c["values"], float)
                values = np.where(np.isfinite(values), values, np.nan)
                plots.band(ax, steps, values, label=e["label"], **_style(e))
                if np.isfinite(values).any():
                    top = max(top, float(np.nanmax(values)))
                for v, d in zip(values, c["diverged_at_step"]):
                    if d is not None:
                        ok = np.flatnonzero(np.isfinite(v))
                        if ok.size:
                            ax.plot(steps[ok[-1]], min(v[ok[-1]], LOSS_CAP), "x", ms=9, mew=2,
                                    **_style(e))
                        gone.append(f"{NORMS[e['norm']][0]}: diverged at step {d}")
            # Up to the largest loss drawn (capped: a diverging run passes any bound).
            ax.set(yscale="log", ylim=(0.5, min(2 * top, LOSS_CAP)),
                   title=f"{NETWORKS[act][0]}, lr {lr:g}",
                   xlabel="training step" if row == len(acts) - 1 else "")
            if col == 0:
                ax.set_ylabel("training loss (batch)")
            if gone:
                ax.text(0.97, 0.97, "\n".join(sorted(set(gone))), transform=ax.transAxes,
                        ha="right", va="top", fontsize="x-small", color="0.25")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, [l.split(", ")[-1] for l in labels], loc="outside lower center", ncol=2,
               fontsize="small")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    runs = grid(args)
    dataset = data.load("mnist1d")
    result = s.sweep(runs, dataset, log_every=max(1, size["steps"] // 100))
    entries = summarise(result, size)
    claims = [claim_higher_learning_rates(entries, size), claim_wider_range(entries, size)]
    paths = {"summary": s.save_figure(figure_summary(entries, size), "summary", headline=True),
             "loss_curves": s.save_figure(figure_loss_curves(entries, size), "loss_curves")}
    text = conclusion(entries, claims, size)

    rep = s.report
    rep.title = "BatchNorm and the learning rate"
    nets = ", ".join(f"{NETWORKS[a][0]} + {NETWORKS[a][2]} init" for a in size["activations"])
    rep.add("Setup", f"""
- Networks: plain MLPs, depth {size['depth']}, width {size['width']}: {nets}; each without
  BatchNorm and with BatchNorm after every Dense (Dense → BN → activation, the stem included).
- Learning rates: {', '.join(f'{v:g}' for v in size['learning_rates'])} (SGD, momentum
  {args.momentum}, constant), {size['seeds']} seed(s) each; batch {size['batch_size']},
  {size['steps']} steps; MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test).
- A run trains when it did not diverge and its final test accuracy is ≥ {100 * TRAINS:.0f} %
  (chance + 10 points); a learning rate trains when at least half its seeds do. "Near best":
  the unbroken range of learning rates around the best whose mean test accuracy (a diverged
  seed counting as chance, {100 * CHANCE:.0f} %) is within {100 * NEAR_BEST:.0f} points of the
  best; its width in decades.
- {len(runs)} runs in {len(result.groups)} compiled programs (the learning rate and the seed
  are values of one program per network).""")
    rep.add("Summary", markdown_table(range_rows(entries), [
        ("network", "network"), ("best lr", "best"), ("best test accuracy %", "best_acc"),
        ("largest lr that trains", "largest"), ("lrs that train", "trainable"),
        (f"within {100 * NEAR_BEST:.0f} points of best (decades)", "near")])
        + "\n\n" + markdown_table(
            [{**c, "claim": c["claim"]} for c in claims],
            [("claim", "claim"), ("verdict", "verdict"), ("measured", "measured")])
        + "\n\nPer learning rate (test accuracy: mean ± std over seeds, a diverged seed at "
          "chance; training loss: median over the seeds that did not diverge):\n\n"
        + markdown_table(table_rows(entries), [
            ("network", "network"), ("lr", "lr"), ("test accuracy %", "acc"),
            ("seeds that train", "trains"), ("final training loss", "loss"),
            ("status", "status")]))
    rep.add("Conclusion", text)
    rep.add_figures(paths)
    return {"entries": entries, "claims": claims, "conclusion": text, "table": result.table(),
            "sizes": size, "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
