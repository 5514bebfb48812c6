"""BatchNorm in training and in evaluation: batch statistics against running averages.

In training mode BatchNorm normalises with the statistics of the current batch;
in evaluation mode with running averages r <- m r + (1 - m) batch_stat kept
during training. This study measures what the difference does to test
accuracy, for BN momenta m = 0.9 / 0.99 / 0.999 (each a separate compiled
program: the momentum is a model field) and batch sizes 8 / 32 / 256, at
log-spaced steps through training (the sweep's ``extra_measure`` hook):

* "batch statistics": the network in training mode on test batches of the
  training batch size (the test set in a fixed random order, full batches);
* "running averages": evaluation mode, the running mean/var of the run;
* "population (precise BN)": evaluation mode after
  ``vgrad.batchnorm.recompute_batch_stats`` replaced the running averages by
  the population statistics of the current weights over the training set
  (forwarded in training mode in batches of the training batch size; mean =
  E[batch mean], var = E[batch var] + Var[batch mean]);

all on the same test examples, plus how far the running averages are from the
population statistics (mean |log10 running var / population var| over units
and layers).

Network: ReLU MLP (He init), depth 10, width 64, BN after every Dense layer.
Data: MNIST-1D, 25,000 samples (20,000 train / 5,000 test). Training: SGD,
momentum 0.9, learning rate 0.02, the same number of steps (2,000) at every
batch size -- the running average's horizon 1/(1 - m) is counted in steps --,
2 seeds.

    python -m experiments.bn_train_eval          # ~5 min on 2 shared CPU cores (312 s, load ~10)
    python -m experiments.bn_train_eval --quick  # seconds (tiny sizes)
    python -m experiments.bn_train_eval --figure docs/figures/bn_train_eval.png

The default run took 312 s wall and 111 s of CPU time while the machine ran
other jobs (load average 8-13 on 2 cores).

Finding (default run): the two modes differ by 7.5 points of test accuracy on
average (up to 45). With BN momentum 0.9 the running averages track the
population statistics (within a point) and evaluation mode is the *more*
accurate one, by 10.3 / 5.6 / 2.3 points at batch 8 / 32 / 256: a small test
batch's own statistics are noisy, so the discrepancy is worst at small batch
sizes, but in the opposite direction from the usual story. Slow running averages
lag behind the changing weights: with m = 0.99 evaluation mode loses up to 24
points at step 100 (gone by step 1,000), with m = 0.999 up to 46 points, and
still 11-29 points after 2,000 steps.
Recomputing population statistics recovers all of that lag (evaluation
accuracy then within a point of m = 0.9's at every momentum) but cannot close
the batch-statistics part. ``report.md`` has the measured numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.batchnorm import batchnorm_paths, recompute_batch_stats
from vgrad.models import build
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_train_eval"
CHANCE = 0.1
GAP = 0.01  # an accuracy difference below one point counts as no difference
VAR_EPS = 1e-5  # BN's epsilon: added to both variances, so dead units do not dominate the error
MODES = {"batch": "batch statistics (train mode)", "running": "running averages (eval mode)",
         "precise": "population statistics (precise BN)"}
MODE_STYLE = {"batch": ("#2ca02c", "-"), "running": ("#d62728", "--"), "precise": ("#1f77b4", ":")}


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Test accuracy with batch statistics, running averages and recomputed population statistics."""

    batch_sizes: tuple[int, ...] = (8, 32, 256)
    momenta: tuple[float, ...] = (0.9, 0.99, 0.999)
    """BatchNorm momenta m of the running averages (each one compiled program)."""
    depth: int = 10
    width: int = 64
    steps: int = 2000
    """Training steps, the same at every batch size."""
    learning_rate: float = 0.02
    num_samples: int = 25000
    """MNIST-1D samples (80 % train, 20 % test)."""

    def validate(self) -> None:
        super().validate()
        values = self.batch_sizes
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in values):
            raise ValueError(f"invalid --batch-sizes={values!r}: must be integers >= 2 "
                             "(batch statistics of one example are undefined)")
        if not self.momenta or any(not (isinstance(m, (int, float)) and 0 <= m < 1) for m in self.momenta):
            raise ValueError(f"invalid --momenta={self.momenta!r}: must be numbers in [0, 1)")
        for name in ("depth", "width", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name}={value!r}: must be an integer >= 1")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"invalid --learning-rate={self.learning_rate!r}: must be a finite number > 0")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples < 500:
            raise ValueError(f"invalid --num-samples={self.num_samples!r}: must be an integer >= 500")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(batch_sizes=(16,), momenta=(0.9, 0.999), depth=4, width=16, steps=40,
                    learning_rate=args.learning_rate, num_samples=None, seeds=args.num_seeds(1))
    return dict(batch_sizes=tuple(sorted(set(args.batch_sizes))),
                momenta=tuple(sorted(set(float(m) for m in args.momenta))), depth=args.depth,
                width=args.width, steps=args.steps, learning_rate=args.learning_rate,
                num_samples=args.num_samples, seeds=args.num_seeds(2))


def measure_steps(steps: int) -> list[int]:
    """0, then steps at half-decade spacing (10, 30, 100, 300, ...), and the last step."""
    points = {0, steps}
    k = 1.0
    while 10 ** k < steps:
        points.add(int(round(10 ** k, -int(math.floor(k)))))  # 10, 30, 100, 300, ...
        k += 0.5
    return sorted(p for p in points if p <= steps)


def label(batch_size: int, momentum: float) -> str:
    return f"batch {batch_size}, m={momentum:g}"


def grid(size: dict, batch_size: int) -> list[sweep.Run]:
    """The runs of one batch size: one label (one compiled program) per momentum."""
    model = ModelConfig(depth=size["depth"], width=size["width"], activation="relu",
                        init="he_normal", norm="batch")
    train = TrainConfig(batch_size=batch_size, steps=size["steps"], momentum=0.9,
                        learning_rate=size["learning_rate"], eval_every=size["steps"])
    return sweep.variants({label(batch_size, m): {"model.bn_momentum": m} for m in size["momenta"]},
                          model=model, train=train, seeds=size["seeds"])


# ----------------------------------------------------------------------------
# measurements (the extra_measure hook)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _evaluators(cfg: ModelConfig):
    """Jitted (accuracy, loss) of a model like ``cfg``: evaluation mode on (N, ...) inputs,
    and training mode on (K, B, ...) batches (each normalised with its own statistics)."""
    model = build(cfg)

    def scores(logits, y):
        return (jnp.mean(jnp.argmax(logits, -1) == y),
                jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)))

    @jax.jit
    def running(variables, x, y):
        return scores(model.apply(variables, x, train=False)[0], y)

    @jax.jit
    def batch(variables, x_KxB, y_KxB):
        logits = jax.lax.map(lambda xb: model.apply(variables, xb, train=True)[0], x_KxB)
        return scores(logits.reshape(-1, logits.shape[-1]), y_KxB.reshape(-1))

    return running, batch


def stat_errors(running: dict, population: dict) -> dict:
    """How far running averages are from population statistics, over every unit of every
    BatchNorm layer: mean |log10 var_run / var_pop| and mean |mean_run - mean_pop| / sqrt(var_pop)."""
    log_var, mean_err = [], []
    for path in batchnorm_paths(population):
        r, p = running, population
        for key in path:
            r, p = r[key], p[key]
        var_p = np.asarray(p["var"], np.float64) + VAR_EPS
        var_r = np.asarray(r["var"], np.float64) + VAR_EPS
        log_var.append(np.abs(np.log10(var_r / var_p)).ravel())
        mean_err.append((np.abs(np.asarray(r["mean"], np.float64) - np.asarray(p["mean"], np.float64))
                         / np.sqrt(var_p)).ravel())
    return {"running_var_log10_error": float(np.mean(np.concatenate(log_var))),
            "running_mean_error": float(np.mean(np.concatenate(mean_err)))}


def make_extra(batch_size: int, x_pop: np.ndarray, x_test: np.ndarray, y_test: np.ndarray):
    """The extra_measure hook of one batch size: accuracies and losses of the three modes on
    the same K * batch_size test examples, and the running averages' errors."""
    k = len(y_test) // batch_size
    x_eval, y_eval = x_test[:k * batch_size], y_test[:k * batch_size]
    x_KxB = x_eval.reshape(k, batch_size, *x_eval.shape[1:])
    y_KxB = y_eval.reshape(k, batch_size)

    def extra(model, variables):
        # Logits do not depend on the momentum (only the running-average update does):
        # one compiled evaluator for every momentum.
        running, batch = _evaluators(dataclasses.replace(model.cfg, bn_momentum=0.0))
        population = recompute_batch_stats(model, variables, x_pop, batch_size=batch_size)
        out = {}
        for mode, (acc, loss) in (("batch", batch(variables, x_KxB, y_KxB)),
                                  ("running", running(variables, x_eval, y_eval)),
                                  ("precise", running(population, x_eval, y_eval))):
            out[f"acc_{mode}"], out[f"loss_{mode}"] = float(acc), float(loss)
        out.update(stat_errors(variables["batch_stats"], population["batch_stats"]))
        return out

    return extra, len(y_eval)


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def summarise(result: sweep.SweepResult, batch_size: int, num_eval: int) -> list[dict]:
    """One entry per (batch size, momentum): the three accuracies (S, T) at the measured
    steps, and the train/eval gap split into its two parts:
    gap_running = batch - running = (batch - precise) + (precise - running),
    i.e. batch-statistics noise ("gap_precise") plus the lag of the running averages
    behind the current weights ("lag", what recomputing the statistics recovers)."""
    entries = []
    for name, runs in result.by_label().items():
        steps = [m["step"] for m in runs[0].measurements]
        curve = lambda key: [[m[key] for m in r.measurements] for r in runs]
        acc = {mode: np.asarray(curve(f"acc_{mode}"), float) for mode in MODES}
        entries.append({
            "label": name, "batch_size": batch_size, "momentum": runs[0].model.bn_momentum,
            "seeds": [r.seed for r in runs], "status": [r.status for r in runs],
            "steps": steps, "num_eval_examples": num_eval,
            "accuracy": {mode: a.tolist() for mode, a in acc.items()},
            "loss": {mode: curve(f"loss_{mode}") for mode in MODES},
            "gap_running": (acc["batch"] - acc["running"]).tolist(),
            "gap_precise": (acc["batch"] - acc["precise"]).tolist(),
            "lag": (acc["precise"] - acc["running"]).tolist(),
            "running_var_log10_error": curve("running_var_log10_error"),
            "running_mean_error": curve("running_mean_error"),
            "final_test_accuracy_eval_mode": result.final_stats(runs, "test_accuracy"),
            "step_time_s": runs[0].step_time_s,
        })
    return entries


def _mean(values) -> float:
    v = np.asarray(values, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def seed_mean(e: dict, key: str) -> np.ndarray:
    """(T,) mean over seeds of a per-seed curve (S, T)."""
    return plots.nanmean(np.asarray(e[key], float), axis=0)


def gap_at(e: dict, key: str, index: int) -> float:
    """Mean over seeds of a gap (e.g. batch-statistics accuracy minus running-average
    accuracy) at measurement ``index``."""
    return float(seed_mean(e, key)[index])


def early_indices(e: dict, steps: int) -> list[int]:
    """Measurements early in training: after initialisation (where every mode is at chance)
    and up to a tenth of the run, or the first one after initialisation if none is."""
    after = [i for i, s in enumerate(e["steps"]) if s > 0]
    early = [i for i in after if e["steps"][i] <= steps / 10]
    return early or after[:1]


def _pts(v: float) -> str:
    return f"{100 * v:+.1f}"


def claim_differs(entries: list[dict]) -> dict:
    gaps = [(abs(g), g, e, i) for e in entries for i, g in enumerate(seed_mean(e, "gap_running")) if i > 0]
    mean_gap = _mean([a for a, *_ in gaps])
    _, worst, w_e, w_i = max(gaps, key=lambda t: t[0]) if gaps else (0, math.nan, entries[0], 0)
    final = [gap_at(e, "gap_running", -1) for e in entries]
    eval_better = sum(g < -GAP for g in final)
    train_better = sum(g > GAP for g in final)
    verdict = ("holds" if mean_gap > GAP else "holds partly" if gaps and abs(worst) > GAP
               else "does not hold here")
    measured = (f"Test accuracy with batch statistics minus with running averages, over every batch "
                f"size, momentum and measured step after initialisation: mean |gap| "
                f"{100 * mean_gap:.1f} points, largest {_pts(worst)} ({w_e['label']}, step "
                f"{w_e['steps'][w_i]}); at the end of training {_pts(min(final))} to {_pts(max(final))} "
                f"points: evaluation mode is the more accurate in {eval_better} of {len(final)} "
                f"settings, training mode in {train_better}.")
    return {"claim": "BN behaves differently in training (batch statistics) and evaluation "
                     "(running averages)", "measured": measured, "verdict": verdict,
            "figure": "figures/summary.png"}


def claim_small_and_early(entries: list[dict], size: dict) -> dict:
    bs = sorted({e["batch_size"] for e in entries})
    m_fast = min(e["momentum"] for e in entries)  # least lag: the batch-size effect shows alone
    fast = {e["batch_size"]: e for e in entries if e["momentum"] == m_fast}
    total_end = {b: abs(gap_at(fast[b], "gap_running", -1)) for b in bs}
    noise_end = {b: _mean([gap_at(e, "gap_precise", -1) for e in entries if e["batch_size"] == b])
                 for b in bs}
    small = (len(bs) > 1 and total_end[bs[0]] == max(total_end.values())
             and abs(noise_end[bs[0]]) == max(abs(v) for v in noise_end.values())
             and total_end[bs[0]] > total_end[bs[-1]] + GAP)
    # Early: the largest |gap| over the early measurements against the gap at the end.
    early = []
    for e in entries:
        g = seed_mean(e, "gap_running")
        idx = early_indices(e, size["steps"])
        i = max(idx, key=lambda k: abs(g[k]))
        early.append((abs(g[i]) > abs(g[-1]) + GAP, g[i], e["steps"][i], g[-1], e))
    n_early = sum(t[0] for t in early)
    early_holds = n_early > len(early) / 2
    verdict = ("holds" if small and early_holds else
               "holds partly" if small or (n_early and early_holds) or n_early else "does not hold here")
    if len(bs) > 1:
        small_text = (f"At the end of training, batch − running accuracy at m = {m_fast:g} (the fastest "
                      "running average): "
                      + ", ".join(f"batch {b}: {_pts(gap_at(fast[b], 'gap_running', -1))}" for b in bs)
                      + " points; batch − population statistics (no running-average lag, the same "
                        "at every momentum): " + ", ".join(f"{_pts(noise_end[b])}" for b in bs)
                      + " points — largest at the smallest batch"
                      + (", and negative: evaluation mode is the more accurate one, because a small "
                         "test batch's statistics are noisy" if noise_end[bs[0]] < -GAP else "")
                      + ("" if small else " (not the largest at the smallest batch: the small-batch "
                                          "part does not hold here)") + ". ")
    else:
        small_text = f"Only batch size {bs[0]} was run, so the batch-size part is not measured. "
    best = max(early, key=lambda t: abs(t[1]) - abs(t[3]))
    early_ms = sorted({t[4]["momentum"] for t in early if t[0]})
    # How much of the early gaps is the running averages' lag (recovered by population stats).
    lag_early = _mean([gap_at(t[4], "lag", t[4]["steps"].index(t[2])) for t in early if t[0]])
    grows = [t for t in early if t[4]["momentum"] == m_fast and abs(t[3]) > abs(t[1]) + GAP]
    last_early = max(entries[0]["steps"][i] for i in early_indices(entries[0], size["steps"]))
    early_text = (f"Early in training (steps ≤ {last_early}) the gap exceeds its value "
                  f"at the end in {n_early} of {len(early)} settings"
                  + (f" (m = {', '.join(f'{m:g}' for m in early_ms)}; most: {best[4]['label']}, "
                     f"{_pts(best[1])} points at step {best[2]} against {_pts(best[3])} at the end; "
                     f"there, population statistics give {_pts(lag_early)} points of evaluation "
                     "accuracy over the running averages on average: the averages lag behind the "
                     "changing weights)"
                     if n_early else "")
                  + (f"; with the fastest average (m = {m_fast:g}) the gap instead grows as the network "
                     f"learns in {len(grows)} of {len(fast)} batch sizes" if grows else "") + ".")
    return {"claim": "the discrepancy is worst at small batch sizes and early in training",
            "measured": small_text + early_text, "verdict": verdict, "figure": "figures/gaps.png"}


def claim_precise(entries: list[dict]) -> dict:
    pairs = [(abs(gap_at(e, "gap_running", i)), abs(gap_at(e, "gap_precise", i)), e, i)
             for e in entries for i in range(1, len(e["steps"]))]
    big = [p for p in pairs if p[0] > GAP]  # where there is a gap to close
    closed = [p for p in big if p[1] <= GAP]
    reduced = [p for p in big if p[1] < p[0]]
    final_r = _mean([abs(gap_at(e, "gap_running", -1)) for e in entries])
    final_p = _mean([abs(gap_at(e, "gap_precise", -1)) for e in entries])
    lag_end = [(gap_at(e, "lag", -1), e) for e in entries]
    most = max(lag_end, key=lambda t: t[0])
    bs = sorted({e["batch_size"] for e in entries})
    noise = {b: _mean([gap_at(e, "gap_precise", -1) for e in entries if e["batch_size"] == b]) for b in bs}
    if not big:
        verdict = "does not hold here"
        head = "No setting has a gap of more than one point to close"
    else:
        verdict = ("holds" if len(closed) >= 0.8 * len(big) else
                   "holds partly" if len(reduced) > len(big) / 2 else "does not hold here")
        head = (f"Of the {len(big)} (setting, step) points with a train/eval gap > {100 * GAP:.0f} point, "
                f"recomputed population statistics bring it within {100 * GAP:.0f} point in "
                f"{len(closed)} and reduce it in {len(reduced)}")
    measured = (f"{head}. At the end of training the mean |gap| is {100 * final_r:.1f} points with "
                f"running averages and {100 * final_p:.1f} with population statistics; they recover "
                f"up to {_pts(most[0])} points of evaluation accuracy ({most[1]['label']}), i.e. the "
                "running averages' lag. What remains is batch statistics against population "
                "statistics (" + ", ".join(f"batch {b}: {_pts(noise[b])}" for b in bs)
                + " points), which no recomputation of the evaluation statistics can close.")
    return {"claim": "recomputing population statistics closes the gap", "measured": measured,
            "verdict": verdict, "figure": "figures/summary.png"}


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _x(steps) -> np.ndarray:
    """Steps on a log axis: step 0 drawn at 1 (labelled "init")."""
    return np.maximum(np.asarray(steps, float), 1.0)


def _log_steps(ax, size: dict) -> None:
    ax.set_xscale("log")
    ax.set_xlim(0.8, size["steps"] * 1.25)


def figure_summary(entries: list[dict], size: dict):
    """Rows: momenta; columns: batch sizes; the three accuracies over training."""
    bs, ms = list(size["batch_sizes"]), list(size["momenta"])
    # At least ~7 inches wide in all, so the title and legend fit with a single batch size.
    fig, axes = plots.figure(len(bs), len(ms), width=max(3.4, 7.0 / len(bs)), height=2.6, sharey=True)
    by = {(e["batch_size"], e["momentum"]): e for e in entries}
    for i, m in enumerate(ms):
        for j, b in enumerate(bs):
            ax, e = axes[i, j], by[(b, m)]
            for mode, text in MODES.items():
                color, ls = MODE_STYLE[mode]
                plots.band(ax, _x(e["steps"]), e["accuracy"][mode], label=text, color=color,
                           linestyle=ls, marker=".")
            ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
            _log_steps(ax, size)
            ax.set_ylim(0, 1)
            ax.set_title(f"batch {b}, BN momentum {m:g}", fontsize="small")
            if i == len(ms) - 1:
                ax.set_xlabel("training step (init at 1)")
            if j == 0:
                ax.set_ylabel("test accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize="small")
    fig.suptitle("BatchNorm: test accuracy in training mode, evaluation mode\nand with recomputed "
                 "population statistics")
    return fig


def figure_gaps(entries: list[dict], size: dict):
    """The train/eval gap over training (one line per setting) and its two parts, and the
    running averages' error against the population statistics."""
    fig, axes = plots.figure(4, 1, width=3.9, height=3.5)
    bs = list(size["batch_sizes"])
    cmap = plots.plt.get_cmap("viridis")
    colors = {b: cmap(0.85 * i / max(1, len(bs) - 1)) for i, b in enumerate(bs)}
    styles = dict(zip(size["momenta"], ("-", "--", ":", "-.")))
    panels = (("gap_running", "train − eval gap:\nbatch stats − running averages"),
              ("gap_precise", "batch-statistics noise:\nbatch stats − population stats"),
              ("lag", "running-average lag:\npopulation stats − running averages"))
    for e in entries:
        kw = dict(color=colors[e["batch_size"]], linestyle=styles[e["momentum"]], marker=".")
        for ax, (key, _) in zip(axes[0], panels):
            plots.band(ax, _x(e["steps"]), 100 * np.asarray(e[key], float), label=e["label"], **kw)
        plots.band(axes[0, 3], _x(e["steps"]), plots.log10(e["running_var_log10_error"]), **kw)
    lo = min(ax.get_ylim()[0] for ax in axes[0, :3])
    hi = max(ax.get_ylim()[1] for ax in axes[0, :3])
    for ax, (_, title) in zip(axes[0], panels):
        ax.axhline(0, color="k", lw=0.6)
        ax.axhspan(-100 * GAP, 100 * GAP, color="0.9", zorder=0)
        ax.set(title=title, xlabel="training step (init at 1)", ylim=(lo, hi))
        ax.title.set_fontsize("small")
        _log_steps(ax, size)
    axes[0, 0].set_ylabel("test accuracy difference (points)")
    axes[0, 1].text(0.03, 0.03, "the same for every momentum:\ntraining never reads the running "
                    "averages", transform=axes[0, 1].transAxes, fontsize="xx-small", color="0.3")
    ax = axes[0, 3]
    ax.set(title="running averages vs population:\n"
           + r"mean $|\log_{10}\, \sigma^2_{run} / \sigma^2_{pop}|$",
           xlabel="training step (init at 1)")
    ax.title.set_fontsize("small")
    _log_steps(ax, size)
    plots.power_of_ten_axis(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(bs),
               fontsize="x-small")
    return fig


def figure_final(entries: list[dict], size: dict):
    """Accuracy of the three modes at the end of training, per setting."""
    fig, axes = plots.figure(1, 1, width=max(6.0, 0.9 * len(entries) + 1.5), height=3.6)
    ax = axes[0, 0]
    x = np.arange(len(entries))
    w = 0.27
    for k, (mode, text) in enumerate(MODES.items()):
        vals = [100 * _mean(np.asarray(e["accuracy"][mode], float)[:, -1]) for e in entries]
        bars = ax.bar(x + (k - 1) * w, vals, w, label=text, color=MODE_STYLE[mode][0])
        ax.bar_label(bars, fmt="%.0f", fontsize="xx-small", padding=1)
    ax.set_xticks(x, [e["label"].replace(", ", "\n") for e in entries], fontsize="x-small")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100),
           title=f"After {size['steps']} steps (mean over seeds)")
    ax.legend(fontsize="x-small", loc="upper left", ncol=3)
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def table_rows(entries: list[dict], steps: int) -> list[dict]:
    rows = []
    for e in entries:
        fin = {mode: 100 * _mean(np.asarray(e["accuracy"][mode], float)[:, -1]) for mode in MODES}
        g = seed_mean(e, "gap_running")
        i = max(early_indices(e, steps), key=lambda k: abs(g[k]))
        rows.append({
            "setting": e["label"], "batch": f"{fin['batch']:.1f}", "running": f"{fin['running']:.1f}",
            "precise": f"{fin['precise']:.1f}",
            "gap_end": f"{100 * gap_at(e, 'gap_running', -1):+.1f}",
            "gap_early": f"{100 * gap_at(e, 'gap_running', i):+.1f} (step {e['steps'][i]})",
            "gap_precise": f"{100 * gap_at(e, 'gap_precise', -1):+.1f}",
            "lag": f"{100 * gap_at(e, 'lag', -1):+.1f}",
            "var_err": f"{_mean(np.asarray(e['running_var_log10_error'], float)[:, -1]):.3f}",
        })
    return rows


def against_the_usual_story(entries: list[dict]) -> str:
    """Where the measurement contradicts "evaluation mode loses accuracy to the train/eval
    discrepancy", measured: settings whose converged-statistics evaluation beats training mode."""
    bs = sorted({e["batch_size"] for e in entries})
    noise = {b: _mean([gap_at(e, "gap_precise", -1) for e in entries if e["batch_size"] == b]) for b in bs}
    better = [b for b in bs if noise[b] < -GAP]
    if not better:
        return ""
    m_fast = min(e["momentum"] for e in entries)
    fast_current = all(abs(gap_at(e, "lag", -1)) <= GAP for e in entries if e["momentum"] == m_fast)
    return ("Against the usual story that the discrepancy costs evaluation accuracy: with "
            "up-to-date statistics (population statistics"
            + (f", or running averages with m = {m_fast:g}" if fast_current else "")
            + ") the network is *more* accurate in evaluation mode "
            f"than with batch statistics at batch size{'s' * (len(better) > 1)} "
            + ", ".join(map(str, better))
            + "; what costs evaluation accuracy here is only running averages that lag behind the "
              "weights (slow momentum, early in training).")


def conclusion(claims: list[dict], entries: list[dict]) -> str:
    text = ("Measured verdicts — " + "; ".join(f"“{c['claim']}”: {c['verdict']}" for c in claims)
            + ". " + " ".join(c["measured"] for c in claims))
    note = against_the_usual_story(entries)
    return text + (" " + note if note else "")


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = (data.load("mnist1d") if size["num_samples"] is None
               else data.load("mnist1d", num_samples=size["num_samples"]))
    # Fixed random orders: the population statistics see random batches (as training
    # does), and so do the batch-statistics test batches.
    x_pop = np.asarray(dataset.x_train)[np.random.default_rng(0).permutation(dataset.num_train)]
    order = np.random.default_rng(1).permutation(len(dataset.y_test))
    x_test, y_test = np.asarray(dataset.x_test)[order], np.asarray(dataset.y_test)[order]
    at = measure_steps(size["steps"])
    too_big = [b for b in size["batch_sizes"] if b > min(len(y_test), dataset.num_train)]
    if too_big:  # checked before anything trains: a bad argument, not a failed study
        raise ValueError(f"invalid --batch-sizes={size['batch_sizes']!r}: {too_big} exceed the "
                         f"{len(y_test)} test / {dataset.num_train} training examples")
    entries, groups, table = [], [], []
    num_runs = 0
    for b in size["batch_sizes"]:
        runs = grid(size, b)
        num_runs += len(runs)
        extra, num_eval = make_extra(b, x_pop, x_test, y_test)
        result = s.sweep(runs, dataset, name=f"sweep_batch{b}", measure_at=at, measure_batch_size=64,
                         jacobians=False, gradient_flow=False, extra_measure=extra)
        entries += summarise(result, b, num_eval)
        groups += [{**g, "batch_size": b} for g in result.groups]
        table += [{**row, "batch_size": b} for row in result.table()]
    claims = [claim_differs(entries), claim_small_and_early(entries, size), claim_precise(entries)]

    figures = {"summary": figure_summary(entries, size), "gaps": figure_gaps(entries, size),
               "final": figure_final(entries, size)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary") for name, fig in figures.items()}

    horizons = ", ".join(f"{1 / (1 - m):.0f}" for m in size["momenta"])
    epochs = {b: size["steps"] * b / dataset.num_train for b in size["batch_sizes"]}
    small, large = size["batch_sizes"][0], size["batch_sizes"][-1]
    rep = s.report
    rep.title = "BatchNorm in training and in evaluation: batch statistics against running averages"
    rep.add("Setup", f"""
- Network: ReLU MLP (He init), depth {size['depth']}, width {size['width']}, BN (ε 1e-5) after every
  Dense layer; BN momenta {', '.join(f'{m:g}' for m in size['momenta'])} (running average
  r ← m·r + (1 − m)·batch statistic; horizon 1/(1 − m) = {horizons} steps).
- Data: MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), standardised.
- Training: SGD, momentum 0.9, learning rate {size['learning_rate']:g}, {size['steps']} steps at every
  batch size ({', '.join(map(str, size['batch_sizes']))}), {size['seeds']} seed(s). Equal steps, not
  equal data: batch {small} sees {epochs[small]:.2g} epochs, batch {large} {epochs[large]:.2g}, so the
  small-batch networks are less trained (compare the gaps, not the accuracies, across batch sizes).
- Measured at steps {', '.join(map(str, at))} (sweep `extra_measure`), on the same test examples
  (the test set in a fixed random order, cut to full batches of the training batch size:
  {', '.join(f"{e['num_eval_examples']}" for e in entries[::len(size['momenta'])])} examples):
  test accuracy with **batch statistics** (training mode, batches of the training batch size),
  with the **running averages** (evaluation mode), and with **population statistics** recomputed
  from the current weights over the {dataset.num_train} training examples in training-mode batches of
  the training batch size (`vgrad.batchnorm.recompute_batch_stats`: mean = E[batch mean],
  var = E[batch var] + Var[batch mean]; "precise BN"); and the mean |log10 σ²_run/σ²_pop| over all
  units of all BN layers.
- {num_runs} runs in {len(groups)} compiled programs.""")
    rep.add("Summary", markdown_table(table_rows(entries, size["steps"]), [
        ("setting", "setting"), ("acc. batch stats %", "batch"), ("acc. running %", "running"),
        ("acc. population %", "precise"), ("gap batch − running, end", "gap_end"),
        ("largest gap early in training", "gap_early"), ("batch − population, end", "gap_precise"),
        ("population − running, end", "lag"),
        ("|log10 σ²_run/σ²_pop|, end", "var_err")])
        + "\n\nAccuracies at the end of training, mean over seeds; gaps in points.")
    rep.add_claims(claims)
    text = conclusion(claims, entries)
    rep.add("Conclusion", text)
    rep.add_figures(paths)
    return {"entries": entries, "claims": claims, "conclusion": text, "measure_steps": at,
            "table": table, "groups": groups, "sizes": size}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
