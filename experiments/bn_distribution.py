"""BatchNorm and the input distribution of a sigmoid (Ioffe & Szegedy 2015, Fig. 1).

The experiment of the original BatchNorm paper: a sigmoid MLP with 3 hidden
layers of 100 units (stem + 2 blocks; Xavier init), trained with plain SGD
(momentum 0, batch 60) without and with BatchNorm after every Dense layer.
At 41 evenly spaced steps the 15th, 50th and 85th percentiles, over a fixed
batch of 1000 test inputs, of every unit's input to the last hidden layer's
sigmoid (the pre-activation; with BN the value after BN, i.e. what the sigmoid
sees) are recorded through the sweep's ``extra_measure`` hook, next to the
test-accuracy curve. Panel (a) of the headline figure is the test accuracy,
(b, c) the percentile bands of three units without and with BN, (d) the drift
of the median over training in units of the 15-85 % spread, for every unit and
learning rate. The paper used MNIST, 50,000 steps and one learning rate; here
MNIST-1D (4000 train / 1000 test), 5000 steps and learning rates 0.1-10.

With BN and batch statistics the mean and standard deviation of a unit over the
fixed batch are its learned beta and gamma *by construction*; the percentiles
add the shape. So the drift with BN measures how far beta/gamma (and the
shape) move, and the table also gives the evaluation-mode value (running
averages), which starts un-normalised (running mean 0, variance 1).

    python -m experiments.bn_distribution           # ~2-3 min on 2 CPU cores (153 s measured, shared, load ~11)
    python -m experiments.bn_distribution --quick   # seconds (tiny sizes)
    python -m experiments.bn_distribution --figure docs/figures/bn_distribution.png

Finding (default run, 3 seeds): BN trains faster, 1000 steps to 49 % test
accuracy at its fastest learning rate (1) against 3750 for the network without
BN at its fastest (3; lr 10 is worse), best final test accuracy 68.4 % against
53.4 %. It stabilises the sigmoid's input only partly. At lr 1 the median of a
unit moves by 0.52 of its 15-85 % spread over training with BN and by 1.78
without (the spread changes by x10^0.46 and x10^1.45; without BN most of the
movement is in the first few hundred steps), but BN's drift grows with the
learning rate, 0.06 at lr 0.1 to 1.02 at lr 3 (no BN 1.22) and 1.95 at lr 10;
in the second half of training BN's drift is the smaller one at every learning
rate (0.04-0.25 against 0.23-0.36). ``report.md`` has the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import numpy as np
from matplotlib import colormaps

from vgrad import ModelConfig, TrainConfig, data, models, plots, study, sweep
from vgrad.config import INITS, without_init
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_distribution"
PERCENTILES = (15.0, 50.0, 85.0)
# label -> (colour key, ModelConfig overrides)
FORMS = {"no BN": ("baseline", {}), "BN": ("batchnorm", {"model.norm": "batch"})}
CHANCE = 0.1
LEARNS = 0.05  # best test accuracy above chance + this: the form learns
TARGET_FRACTION = 0.9  # "speed" target: this fraction of the way from chance to the lower best accuracy
STABLE_FACTOR = 2.0  # BN "stabilises" when its median drift is at most 1/this of no BN's
FASTER_FACTOR = 2.0  # BN "trains faster" when it reaches the target in at most 1/this of the steps
UNIT_COLORS = ("#1f77b4", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """A 3-hidden-layer sigmoid MLP without and with BatchNorm: last-layer input percentiles."""

    learning_rates: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    """Plain-SGD learning rates, each trained without and with BN (one program per form)."""
    learning_rate: float = 1.0
    """The learning rate of the figure's panels (a)-(c) (added to --learning-rates if missing)."""
    steps: int = 5000
    batch_size: int = 60
    hidden_layers: int = 3
    """Hidden layers of the MLP (the stem and hidden_layers - 1 blocks), at least 2."""
    width: int = 100
    init: str = "glorot_normal"
    measure_points: int = 41
    """Evenly spaced steps (0 and the last included) at which percentiles and test accuracy are taken."""
    probe_examples: int = 1000
    """The fixed batch: this many test inputs."""
    units: int = 3
    """Units of the last hidden layer drawn in the percentile panels (the first ones)."""

    def validate(self) -> None:
        super().validate()
        rates = (*self.learning_rates, self.learning_rate)
        if not self.learning_rates or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                          or not math.isfinite(v) or v <= 0 for v in rates):
            raise ValueError(f"invalid --learning-rates={self.learning_rates!r} / --learning-rate="
                             f"{self.learning_rate!r}: must be finite numbers > 0")
        for name, low in (("steps", 1), ("batch_size", 1), ("hidden_layers", 2), ("width", 1),
                          ("measure_points", 3), ("probe_examples", 2), ("units", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 f"must be an integer >= {low}")
        if self.units > self.width:
            raise ValueError(f"invalid --units={self.units}: at most --width={self.width}")
        if self.init not in INITS:
            raise ValueError(f"invalid --init={self.init!r}: allowed values are " + ", ".join(INITS))


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(learning_rates=(1.0,), learning_rate=1.0, steps=60, batch_size=60,
                    hidden_layers=3, width=32, measure_points=7, probe_examples=200, units=2,
                    seeds=args.num_seeds(3))
    rates = tuple(sorted({float(v) for v in (*args.learning_rates, args.learning_rate)}))
    return dict(learning_rates=rates, learning_rate=float(args.learning_rate), steps=args.steps,
                batch_size=args.batch_size, hidden_layers=args.hidden_layers, width=args.width,
                measure_points=args.measure_points, probe_examples=args.probe_examples,
                units=args.units, seeds=args.num_seeds(3))


def measure_steps(size: dict) -> list[int]:
    """``measure_points`` evenly spaced steps from 0 to the last."""
    return sorted({int(round(s)) for s in np.linspace(0, size["steps"], size["measure_points"])})


def grid(args: Args) -> list[sweep.Run]:
    """One run per (form, learning rate, seed), labelled with the form; forms share a program."""
    s = sizes(args)
    model = ModelConfig(depth=s["hidden_layers"] - 1, width=s["width"], activation="sigmoid",
                        init=args.init)
    eval_every = max(1, s["steps"] // (s["measure_points"] - 1))
    train = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], learning_rate=1.0,
                        momentum=0.0, eval_every=eval_every)
    runs = []
    for form, (_, overrides) in FORMS.items():
        vary = {**{k: [v] for k, v in overrides.items()}, "train.learning_rate": list(s["learning_rates"])}
        runs += sweep.grid(model=model, train=train, vary=vary, seeds=s["seeds"], label=form)
    return runs


# ----------------------------------------------------------------------------
# the measurement: the input of the last hidden layer's activation
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _preactivation_fn(cfg: ModelConfig):
    """Jitted variables, x (B, D) -> {"train", "eval"}: (B, width) each, the last block's
    pre-activation with batch statistics and with running averages (one compile for both).

    The model's hidden states give the last block's input h^{L-1}; the same block
    of the *linear* twin of the model (same parameters and batch statistics, the
    activation replaced by the identity) maps it to Dense -> [BN], i.e. the
    sigmoid's input."""
    model = models.build(cfg)
    linear = models.build(dataclasses.replace(cfg, activation="linear"))

    def one(variables, x, train):
        hs = model.hidden_states(variables, x, train=train)
        return linear.block_fn(variables, cfg.depth, train=train)(hs[cfg.depth - 1])

    return jax.jit(lambda variables, x: {"train": one(variables, x, True),
                                         "eval": one(variables, x, False)})


def last_preactivations(model, variables: dict, x) -> dict[str, np.ndarray]:
    """{"train", "eval"}: (B, width) input of the last hidden layer's activation for inputs
    x (B, D).

    With BatchNorm, "train" normalises with the statistics of x itself (what a training
    step on the batch x would feed the activation), "eval" with the running averages
    (without BN the two are equal). ``model`` is a ``vgrad.models.build`` model with
    plain blocks and depth >= 1 (the last hidden layer is a block, not the stem)."""
    cfg = model.cfg
    if cfg.residual:
        raise ValueError("last_preactivations: plain blocks only (a residual block has two "
                         "activations)")
    out = _preactivation_fn(without_init(cfg))(variables, x)
    return {k: np.asarray(v) for k, v in out.items()}


def make_extra_measure(x_fixed: np.ndarray):
    """The sweep's ``extra_measure``: per run, the 15/50/85th percentiles over ``x_fixed``
    of every unit's pre-activation, with batch statistics ("preact_percentiles_train")
    and running averages ("preact_percentiles_eval"), each (3, width)."""
    def extra(model, variables):
        z = last_preactivations(model, variables, x_fixed)
        return {f"preact_percentiles_{mode}": np.percentile(z[mode], PERCENTILES, axis=0)
                for mode in ("train", "eval")}

    return extra


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def drift(percentiles, steps, since: int = 0) -> np.ndarray:
    """Per unit: (max - min over the measured steps >= ``since`` of the median) / (mean over
    those steps of the 15-85 % spread). percentiles (..., T, 3, U), steps (T,) -> (..., U).

    1 means the median wandered over one typical spread: the next layer sees the bulk of
    its input move by its own width."""
    p = np.asarray(percentiles, float)
    keep = np.asarray(steps) >= since
    median, spread = p[..., keep, 1, :], p[..., keep, 2, :] - p[..., keep, 0, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (median.max(-2) - median.min(-2)) / spread.mean(-2)


def spread_change(percentiles, steps, since: int = 0) -> np.ndarray:
    """Per unit: log10(max / min over the measured steps >= ``since`` of the 15-85 % spread),
    (..., T, 3, U) -> (..., U)."""
    p = np.asarray(percentiles, float)
    spread = (p[..., 2, :] - p[..., 0, :])[..., np.asarray(steps) >= since, :]
    return plots.log10(spread.max(-2) / spread.min(-2))


def steps_to(steps, curve, threshold: float) -> float:
    """First step at which ``curve`` reaches ``threshold`` (NaN if never)."""
    hit = np.flatnonzero(np.nan_to_num(np.asarray(curve, float), nan=-1.0) >= threshold)
    return float(np.asarray(steps)[hit[0]]) if hit.size else math.nan


def summarise(result: sweep.SweepResult, size: dict) -> list[dict]:
    """One entry per (form, learning rate) with every number the figures, table and claims use."""
    entries = []
    half = size["steps"] // 2
    for form, runs in result.by_label().items():
        for lr in size["learning_rates"]:
            rs = [r for r in runs if r.train.learning_rate == lr]
            steps = np.asarray([m["step"] for m in rs[0].measurements])
            per_mode = {}
            for mode in ("train", "eval"):
                # (S, T, 3, U); a diverged run's frozen state is measured as it is.
                p = np.asarray([[m[f"preact_percentiles_{mode}"] for m in r.measurements] for r in rs],
                               float)
                per_mode[mode] = {
                    "drift": drift(p, steps).tolist(),
                    "late_drift": drift(p, steps, since=half).tolist(),
                    "log10_spread_change": spread_change(p, steps).tolist(),
                    "late_log10_spread_change": spread_change(p, steps, since=half).tolist(),
                    "percentiles_shown": p[:, :, :, :size["units"]].tolist(),
                }
            acc_steps, acc = result.curves(rs, "test_accuracy")
            entries.append({
                "form": form, "learning_rate": lr, "color_key": FORMS[form][0],
                "seeds": [r.seed for r in rs], "status": [r.status for r in rs],
                "measure_steps": steps.tolist(), "train_mode": per_mode["train"],
                "eval_mode": per_mode["eval"],
                "test_accuracy": result.final_stats(rs, "test_accuracy"),
                "test_accuracy_curve": {"steps": acc_steps.tolist(), "values": acc.tolist()},
            })
    add_speed(entries)
    return entries


def add_speed(entries: list[dict]) -> None:
    """The speed target: TARGET_FRACTION of the way from chance to the lower of the two forms'
    best final test accuracies (over learning rates), so each form reaches it at its best lr;
    NaN when that lower accuracy is within LEARNS of chance (one form does not learn).
    Each entry gets ``target`` and ``steps_to_target`` of its seed-mean test-accuracy curve."""
    best = [max((e["test_accuracy"]["mean"] for e in entries if e["form"] == f
                 and np.isfinite(e["test_accuracy"]["mean"])), default=math.nan) for f in FORMS]
    low = min(best)
    target = CHANCE + TARGET_FRACTION * (low - CHANCE) if low > CHANCE + LEARNS else math.nan
    for e in entries:
        c = e["test_accuracy_curve"]
        e["target"] = target
        e["steps_to_target"] = steps_to(c["steps"], plots.nanmean(c["values"]), target) \
            if np.isfinite(target) else math.nan


def median_of(values) -> float:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def entry(entries: list[dict], form: str, lr: float) -> dict | None:
    return next((e for e in entries if e["form"] == form and e["learning_rate"] == lr), None)


def table_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for e in entries:
        acc = e["test_accuracy"]
        t, ev = e["train_mode"], e["eval_mode"]
        rows.append({
            "form": e["form"], "lr": f"{e['learning_rate']:g}",
            "test": f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}",
            "speed": "never" if not np.isfinite(e["steps_to_target"]) else f"{e['steps_to_target']:.0f}",
            "drift": f"{median_of(t['drift']):.2f}", "late": f"{median_of(t['late_drift']):.2f}",
            "spread": f"{median_of(t['log10_spread_change']):.2f}",
            "drift_eval": f"{median_of(ev['drift']):.2f}",
            "late_eval": f"{median_of(ev['late_drift']):.2f}",
            "status": ", ".join(sorted(set(e["status"]))),
        })
    return rows


# ----------------------------------------------------------------------------
# claims and conclusion
# ----------------------------------------------------------------------------


def claim_stable(entries: list[dict], size: dict) -> dict:
    """BN against no BN: median (over units and seeds) drift of the median, at every lr."""
    parts, ratios = [], []
    for lr in size["learning_rates"]:
        bn, none = entry(entries, "BN", lr), entry(entries, "no BN", lr)
        if bn is None or none is None:
            continue
        a, b = median_of(bn["train_mode"]["drift"]), median_of(none["train_mode"]["drift"])
        la, lb = median_of(bn["train_mode"]["late_drift"]), median_of(none["train_mode"]["late_drift"])
        sa = median_of(bn["train_mode"]["log10_spread_change"])
        sb = median_of(none["train_mode"]["log10_spread_change"])
        ratios.append(b / a if a > 0 else math.inf)
        parts.append(f"lr {lr:g}: drift {a:.2f} with BN vs {b:.2f} without (second half "
                     f"{la:.2f} vs {lb:.2f}), spread changing ×10^{sa:.2f} vs ×10^{sb:.2f}")
    r = np.asarray(ratios, float)
    verdict = ("holds" if r.size and np.all(r >= STABLE_FACTOR) else
               "holds partly" if r.size and np.any(r > 1) else "does not hold here")
    units = size["width"]
    return {"claim": "BN stabilises each layer's input distribution (less internal covariate shift)",
            "measured": f"Drift of the median of the last hidden layer's sigmoid input over "
                        f"{size['steps']} steps, in units of its mean 15-85 % spread, and the change "
                        f"of that spread (max/min), median over {units} units × {size['seeds']} "
                        f"seed(s), BN with batch statistics; 'holds' = BN's drift at most "
                        f"1/{STABLE_FACTOR:g} of no BN's at every lr: " + "; ".join(parts) + ".",
            "verdict": verdict, "figure": "figures/summary.png"}


def claim_faster(entries: list[dict], size: dict) -> dict:
    """Steps to reach the target test accuracy: each form at its fastest lr, and at the shared lr."""
    best_acc = {f: max(e["test_accuracy"]["mean"] for e in entries if e["form"] == f) for f in FORMS}
    accuracies = (f"best final test accuracy BN {100 * best_acc['BN']:.1f} %, no BN "
                  f"{100 * best_acc['no BN']:.1f} %")
    target = entries[0]["target"]
    base = {"claim": "BN trains faster in this setting", "figure": "figures/summary.png"}
    if not np.isfinite(target):  # one form stays near chance: no common target
        learns = {f: best_acc[f] > CHANCE + LEARNS for f in FORMS}
        verdict = "holds" if learns["BN"] and not learns["no BN"] else "does not hold here"
        return {**base, "verdict": verdict,
                "measured": f"No common speed target: {accuracies} (chance {100 * CHANCE:.0f} %) "
                            f"after {size['steps']} steps."}

    def fastest(form):
        es = [e for e in entries if e["form"] == form and np.isfinite(e["steps_to_target"])]
        return min(es, key=lambda e: e["steps_to_target"]) if es else None

    def speed(e):
        return e["steps_to_target"] if e is not None and np.isfinite(e["steps_to_target"]) else math.inf

    def words(e, lr=True):
        if e is None or not np.isfinite(e["steps_to_target"]):
            return "never"
        return f"{e['steps_to_target']:.0f} steps" + (f" (lr {e['learning_rate']:g})" if lr else "")

    quick = {f: fastest(f) for f in FORMS}
    shared = {f: entry(entries, f, size["learning_rate"]) for f in FORMS}
    ratio = speed(quick["no BN"]) / speed(quick["BN"])  # > 1: BN faster
    ratio_shared = speed(shared["no BN"]) / speed(shared["BN"])
    if ratio >= FASTER_FACTOR and ratio_shared >= FASTER_FACTOR and best_acc["BN"] >= best_acc["no BN"]:
        verdict = "holds"
    elif ratio > 1 or ratio_shared > 1:
        verdict = "holds partly"
    else:
        verdict = "does not hold here"
    return {**base, "verdict": verdict,
            "measured": f"Steps to {100 * target:.1f} % test accuracy ({100 * TARGET_FRACTION:.0f} % of "
                        f"the way from chance to the lower of the two best final accuracies), each "
                        f"form at its fastest learning rate: BN {words(quick['BN'])}, no BN "
                        f"{words(quick['no BN'])}; at lr {size['learning_rate']:g}: BN "
                        f"{words(shared['BN'], False)}, no BN {words(shared['no BN'], False)}; {accuracies}."}


def conclusion(entries: list[dict], claims: list[dict], size: dict) -> str:
    """A paragraph from the measured numbers (nothing assumed)."""
    lr = size["learning_rate"]
    bn, none = entry(entries, "BN", lr), entry(entries, "no BN", lr)
    d = lambda e, k="drift", m="train_mode": median_of(e[m][k])
    sp = lambda e: median_of(e["train_mode"]["log10_spread_change"])
    stable, faster = claims
    rates = size["learning_rates"]
    pairs = [(r, entry(entries, "BN", r), entry(entries, "no BN", r)) for r in rates]
    late_wins = sum(d(b, "late_drift") < d(n, "late_drift") for _, b, n in pairs)
    text = (f"At learning rate {lr:g} (panels b, c) the median of a last-layer sigmoid input moves over "
            f"{size['steps']} steps by {d(none):.2f} of its 15–85 % spread without BN and by "
            f"{d(bn):.2f} with BN (median over units and seeds), and the spread itself changes by "
            f"×10^{sp(none):.2f} without and ×10^{sp(bn):.2f} with BN; in the second half of training "
            f"the drift is {d(none, 'late_drift'):.2f} without and {d(bn, 'late_drift'):.2f} with BN. ")
    if len(rates) > 1:
        text += (f"BN's drift grows with the learning rate, from {d(pairs[0][1]):.2f} at lr "
                 f"{rates[0]:g} to {d(pairs[-1][1]):.2f} at lr {rates[-1]:g} (no BN: "
                 f"{d(pairs[0][2]):.2f} to {d(pairs[-1][2]):.2f}); in the second half of training "
                 f"BN's drift is the smaller one at {late_wins} of {len(rates)} learning rates. ")
    text += (f"The claim that BN stabilises the layer's input distribution {stable['verdict']} "
             f"(criterion: BN's drift at most 1/{STABLE_FACTOR:g} of no BN's at every learning rate). "
             f"With running averages (evaluation mode) the BN network's input moves by "
             f"{d(bn, 'drift', 'eval_mode'):.2f} over the run (the running statistics start at 0 and "
             f"1) and {d(bn, 'late_drift', 'eval_mode'):.2f} in the second half. "
             "Caveat: with batch statistics the mean and standard deviation of a BN unit over the "
             "fixed batch are its β and γ by construction, so a small drift with BN says that β and "
             "γ (and the shape) move little, not that the Dense output before BN is stable. ")
    text += f"Speed: BN trains faster — {faster['verdict']}. {faster['measured']}"
    return text


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _percentile_panel(ax, e: dict, size: dict, title: str) -> None:
    """15/50/85th percentiles of the first units (seed 0) against step."""
    steps = np.asarray(e["measure_steps"])
    p = np.asarray(e["train_mode"]["percentiles_shown"], float)[0]  # (T, 3, units)
    for u in range(p.shape[-1]):
        c = UNIT_COLORS[u % len(UNIT_COLORS)]
        ax.fill_between(steps, p[:, 0, u], p[:, 2, u], color=c, alpha=0.15, lw=0)
        ax.plot(steps, p[:, 1, u], color=c, lw=1.8, label=f"unit {u + 1}")
        ax.plot(steps, p[:, 0, u], color=c, lw=0.7)
        ax.plot(steps, p[:, 2, u], color=c, lw=0.7)
    ax.set(xlabel="training step", ylabel="input of the sigmoid", title=title)
    ax.legend(fontsize="x-small", loc="best")


def figure_summary(entries: list[dict], size: dict):
    lr = size["learning_rate"]
    fig, axes = plots.figure(4, 1, width=4.1, height=3.5)
    ax = axes[0, 0]
    for form in FORMS:
        e = entry(entries, form, lr)
        plots.curve_band(ax, e["test_accuracy_curve"], label=f"{form}, lr {lr:g}",
                         color=plots.color(FORMS[form][0]))
        es = [x for x in entries if x["form"] == form]
        best = max(es, key=lambda x: x["test_accuracy"]["mean"])
        if best["learning_rate"] != lr:
            plots.curve_band(ax, best["test_accuracy_curve"], label=f"{form}, lr {best['learning_rate']:g} (best)",
                             color=plots.color(FORMS[form][0]), linestyle="--")
    if np.isfinite(entries[0]["target"]):
        ax.axhline(entries[0]["target"], color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="training step", ylabel="test accuracy (dotted: speed target)",
           title="(a) test accuracy",
           ylim=(0, None))
    ax.legend(fontsize="x-small", loc="lower right")
    _percentile_panel(axes[0, 1], entry(entries, "no BN", lr), size,
                      f"(b) without BN, lr {lr:g}\n15/50/85th percentiles")
    _percentile_panel(axes[0, 2], entry(entries, "BN", lr), size,
                      f"(c) with BN (after BN), lr {lr:g}\n15/50/85th percentiles")
    ax = axes[0, 3]
    for form in FORMS:
        es = sorted([e for e in entries if e["form"] == form], key=lambda e: e["learning_rate"])
        x = [e["learning_rate"] for e in es]
        for key, style, what in (("drift", "-", "whole run"), ("late_drift", "--", "second half")):
            vals = [np.asarray(e["train_mode"][key], float).ravel() for e in es]
            mid = [median_of(v) for v in vals]
            lo = [np.nanpercentile(v, 25) for v in vals]
            hi = [np.nanpercentile(v, 75) for v in vals]
            c = plots.color(FORMS[form][0])
            ax.plot(x, plots.log10(mid), style, color=c, marker="o", label=f"{form}, {what}")
            if key == "drift":
                ax.fill_between(x, plots.log10(lo), plots.log10(hi), color=c, alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="drift of the median / 15-85 % spread",
           title="(d) drift of each unit's median\n(median, IQR over units × seeds)")
    plots.power_of_ten_axis(ax)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Sigmoid MLP, {size['hidden_layers']} hidden layers of {size['width']}: input of the "
                 f"last hidden layer's sigmoid over training (MNIST-1D, SGD, batch {size['batch_size']})")
    return fig


def figure_all_rates(entries: list[dict], size: dict):
    """Test accuracy at every learning rate, one panel per form."""
    fig, axes = plots.figure(len(FORMS), 1, width=4.6, height=3.4, sharey=True)
    rates = size["learning_rates"]
    top = max(float(np.nanmax(e["test_accuracy_curve"]["values"])) for e in entries
              if np.isfinite(e["test_accuracy_curve"]["values"]).any())
    for col, form in enumerate(FORMS):
        ax = axes[0, col]
        for i, lr in enumerate(rates):
            e = entry(entries, form, lr)
            plots.curve_band(ax, e["test_accuracy_curve"], label=f"lr {lr:g}",
                             color=_shade(i, len(rates)))
        if np.isfinite(entries[0]["target"]):
            ax.axhline(entries[0]["target"], color="0.6", lw=0.8, ls=":")
        ax.set(title=form, xlabel="training step", ylim=(0, min(1.0, top + 0.05)))
        ax.legend(fontsize="x-small", loc="lower right")
    axes[0, 0].set_ylabel("test accuracy (dotted: speed target)")
    return fig


def _shade(i: int, n: int):
    return colormaps["viridis"](0.9 * i / max(1, n - 1))


def figure_units(entries: list[dict], size: dict):
    """Per-unit drift at the shared learning rate: batch statistics and running averages."""
    lr = size["learning_rate"]
    fig, axes = plots.figure(2, 1, width=4.6, height=3.4, sharey=True)
    for col, (mode, title) in enumerate((("train_mode", "BN with batch statistics"),
                                         ("eval_mode", "BN with running averages"))):
        ax = axes[0, col]
        values = {f: plots.log10(np.asarray(entry(entries, f, lr)[mode]["drift"], float).ravel())
                  for f in FORMS}
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        bins = np.linspace(finite.min() - 0.05, finite.max() + 0.05, 30) if finite.size else 10
        for f, v in values.items():
            ax.hist(v[np.isfinite(v)], bins=bins, color=plots.color(FORMS[f][0]), alpha=0.6,
                    label=f)
        ax.set(xlabel="drift of the median / 15-85 % spread", title=f"lr {lr:g}, {title}")
        plots.power_of_ten_axis(ax, "x")
        ax.legend(fontsize="x-small")
    axes[0, 0].set_ylabel("units (all seeds)")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d")
    runs = grid(args)
    x_fixed = np.asarray(dataset.x_test[:size["probe_examples"]])
    result = s.sweep(runs, dataset, measure_at=measure_steps(size), measure_batch_size=64,
                     jacobians=False, extra_measure=make_extra_measure(x_fixed))
    entries = summarise(result, size)
    claims = [claim_stable(entries, size), claim_faster(entries, size)]
    figures = {"summary": figure_summary(entries, size), "units": figure_units(entries, size),
               "learning_rates": figure_all_rates(entries, size)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "BatchNorm and the input distribution of a sigmoid (Ioffe & Szegedy 2015, Fig. 1)"
    rep.add("Setup", f"""
- Network: sigmoid MLP, {size['hidden_layers']} hidden layers of {size['width']} units (stem and
  {size['hidden_layers'] - 1} plain blocks), {args.init} init; without BN, and with BatchNorm after
  every Dense layer (Dense → BN → sigmoid).
- Data: MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), standardised (the paper:
  MNIST).
- Training: plain SGD (momentum 0), batch {size['batch_size']}, {size['steps']} steps, learning rates
  {', '.join(f'{lr:g}' for lr in size['learning_rates'])}, {size['seeds']} seed(s) per form and lr.
- Measured at {size['measure_points']} evenly spaced steps: over a fixed batch of the first
  {size['probe_examples']} test inputs, the 15th/50th/85th percentiles of each unit's input to the last
  hidden layer's sigmoid (Dense → [BN] output; BN with the fixed batch's statistics, and with the
  running averages); the test accuracy (BN with running averages) at the same steps.
- Drift (per unit) = (max − min over the measured steps of the median) / (mean 15–85 % spread over
  those steps); "second half": steps ≥ {size['steps'] // 2}. Spread change = log10(max / min
  spread). Table values: median over units and seeds.
- Speed: steps until the seed-mean test accuracy first reaches {100 * entries[0]['target']:.1f} %
  ({100 * TARGET_FRACTION:.0f} % of the way from chance to the lower of the two forms' best final
  accuracies; NaN: one form does not learn).
- {len(runs)} runs in {len(result.groups)} compiled programs.""")
    rep.add("Summary", markdown_table(table_rows(entries), [
        ("form", "form"), ("lr", "lr"), ("final test accuracy %", "test"),
        ("steps to target", "speed"), ("drift", "drift"), ("drift, 2nd half", "late"),
        ("log10 spread change", "spread"), ("drift, eval mode", "drift_eval"),
        ("eval mode, 2nd half", "late_eval"), ("status", "status")]))
    text = conclusion(entries, claims, size)
    rep.add("Conclusion", text)
    rep.add_claims(claims)
    rep.add_figures(paths)
    return {"entries": entries, "claims": claims, "conclusion": text, "table": result.table(),
            "sizes": size, "measure_steps": measure_steps(size), "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
