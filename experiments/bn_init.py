"""BatchNorm and the weight initialisation: does the scale of the initial weights still matter?

Deep plain MLPs (depth 20, width 64; tanh and ReLU; ``--activations`` adds
sigmoid) with and without BatchNorm, initialised with N(0, s^2) weights at
s = 0.001 ... 1 in half-decade steps (the naive init: the same s whatever the
fan-in; the stem and the output layer too) and with the named initialisers
LeCun, Xavier (glorot_normal), He and orthogonal (gain 1 for tanh, sqrt(2) for
ReLU), 3 seeds each. The init kind, its scale and the seed are per-run values
(initialisation happens before the step), so each (activation, norm) is one
compiled training program.

Measured at initialisation (one batch of 64, BatchNorm in training mode): the
gradient product log10 ||P_0||_F^2/n, P_0 = dh^L/dh^0 (built-in
``log10_product_sq_norms``, index 0), with the mean-field prediction of
``vgrad.analysis.theory.predicted_log_product_sq_norms`` for the networks
without BN (from the measured second moment of the stem output), and the std of
the logits. After training: the final test accuracy and how much each block's
Dense kernel grew, ||W_l(T)|| / ||W_l(0)|| (with BN a block is invariant to the
scale of its kernel, so an SGD step on it is effectively eta / ||W||^2). A run
*trains* when it did not diverge and reaches chance + 10 points (20 %) test
accuracy; an init trains when at least half its seeds do.

Data: MNIST-1D (4,000 train / 1,000 test). Training: SGD, momentum 0.9,
learning rate 0.02, batch 128, 400 steps.

    python -m experiments.bn_init            # ~4-8 min on 2 CPU cores (352-551 s, shared)
    python -m experiments.bn_init --quick    # ~15 s (tiny sizes)
    python -m experiments.bn_init --figure docs/figures/bn_init.png

The default run took 352-551 s of wall time on 2 CPU cores shared with other
jobs (load average 6-13; 202-213 s of CPU time).

Finding (default run, 3 seeds): BN turns networks that train at one N(0, s^2)
scale (tanh: s = 0.1 only) or at none (ReLU) into ones that train over 2
(tanh: 0.01-1) and 3 decades (ReLU: 0.001-1), and it makes ||P_0||^2/n the
same at every scale (10^1.8 for tanh, 10^3.5 for ReLU, against 10^-84 ...
10^13 and 10^-71 ... 10^30 without BN, where mean-field theory predicts 20 of
21 finite measurements within a decade; BN's own level is not 1: its gradient
grows with depth whatever s). But training is not insensitive to the scale:
with BN the test accuracy still runs from 19-21 % to 42-47 % across the
scales (best at s = 0.1). BN leaves two things to the scale, both measured
here: the unnormalised output layer (logit std 0.004 at s = 0.001, 5.5 at s = 1) and
the effective step eta/||W||^2 on the normalised kernels (they grow 14-23x
in training at s = 0.001 and not at all at s = 1). BN's epsilon breaks the
invariance at s = 0.001 (||P_0|| 0.4-0.6 decades lower). The named
initialisers train with and without BN (32-51 %). ``report.md`` has the
numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import matplotlib
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
import numpy as np

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad import trainable_range as tr
from vgrad.analysis import theory
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_init"
CHANCE = 0.1
TRAINS = CHANCE + 0.1  # final test accuracy from which a (non-diverged) run trains
FLAT = 1.0  # decades: a gradient product that changes less than this over the scales is flat
SPREAD_OK = 0.10  # accuracy spread over every init below which training is "insensitive"
ACT_NAMES = {"tanh": "tanh", "relu": "ReLU", "sigmoid": "sigmoid"}
NORMS = {"none": ("no BN", "baseline"), "batch": ("BN", "batchnorm")}
# Named initialisers: key -> (label, marker, ModelConfig overrides as a function of the activation).
NAMED = {
    "lecun": ("LeCun", "s", lambda act: {"model.init": "lecun_normal"}),
    "xavier": ("Xavier", "D", lambda act: {"model.init": "glorot_normal"}),
    "he": ("He", "^", lambda act: {"model.init": "he_normal"}),
    "orthogonal": ("orthogonal", "P", lambda act: {
        "model.init": "orthogonal", "model.weight_var": 2.0 if act == "relu" else 1.0}),
}
DEFAULT_SCALES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Init-scale sweep and named initialisers of deep MLPs with and without BatchNorm."""

    activations: tuple[str, ...] = ("tanh", "relu")
    """Activations to sweep (two compiled programs each)."""
    scales: tuple[float, ...] = DEFAULT_SCALES
    """Standard deviations s of the N(0, s^2) init."""
    named: tuple[str, ...] = tuple(NAMED)
    """Named initialisers to add."""
    depth: int = 20
    width: int = 64
    steps: int = 400
    learning_rate: float = 0.02
    batch_size: int = 128

    def validate(self) -> None:
        super().validate()
        unknown = [a for a in self.activations if a not in ACT_NAMES]
        if not self.activations or unknown:
            raise ValueError(f"invalid --activations={self.activations!r}: allowed values are "
                             + ", ".join(ACT_NAMES))
        if (not self.scales or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                   or not math.isfinite(v) or v <= 0 for v in self.scales)
                or len(set(self.scales)) != len(self.scales)):
            raise ValueError(f"invalid --scales={self.scales!r}: must be distinct finite "
                             "numbers > 0")
        unknown = [n for n in self.named if n not in NAMED]
        if unknown:
            raise ValueError(f"invalid --named={self.named!r}: allowed values are "
                             + ", ".join(NAMED))
        for name in ("depth", "width", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 "must be an integer >= 1")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"invalid --learning-rate={self.learning_rate!r}: must be a finite "
                             "number > 0")


def sizes(args: Args) -> dict:
    if args.quick:
        # Every init kind and scale compiles its own (small) init program: few of them.
        return dict(activations=("relu",), scales=(0.01, 1.0), named=(), depth=4,
                    width=16, steps=20, batch_size=32, measure_batch_size=16,
                    seeds=args.num_seeds(1))
    return dict(activations=tuple(a for a in ACT_NAMES if a in args.activations),
                scales=tuple(sorted(float(v) for v in args.scales)),
                named=tuple(n for n in NAMED if n in args.named), depth=args.depth,
                width=args.width, steps=args.steps, batch_size=args.batch_size,
                measure_batch_size=64, seeds=args.num_seeds(3))


def init_key(scale: float) -> str:
    return f"N(0, {scale:g}²)"


def grid(args: Args) -> list[sweep.Run]:
    """One run per (activation, norm, init, seed); label "<activation>|<norm>|<init key>"."""
    s = sizes(args)
    train = TrainConfig(steps=s["steps"], batch_size=s["batch_size"],
                        learning_rate=args.learning_rate, momentum=0.9, eval_every=s["steps"])
    runs = []
    for act in s["activations"]:
        for norm in NORMS:
            model = ModelConfig(depth=s["depth"], width=s["width"], activation=act, norm=norm)
            inits = {init_key(v): {"model.init": "normal", "model.init_std": v} for v in s["scales"]}
            inits |= {n: NAMED[n][2](act) for n in s["named"]}
            runs += sweep.variants({f"{act}|{norm}|{k}": v for k, v in inits.items()},
                                   model=model, train=train, seeds=s["seeds"])
    return runs


def _block_kernels(params: dict) -> list:
    """The Dense kernels of the blocks, each stacked over the L blocks: [(L, n, n), ...]."""
    leaves = jax.tree_util.tree_flatten_with_path(params["blocks"])[0]
    return [leaf for path, leaf in leaves if getattr(path[-1], "key", None) == "kernel"]


def ends_measure(x):
    """extra_measure: what BatchNorm does not normalise, for one run's variables:
    ``logit_std`` (the std of the logits on ``x`` (B, ...), BN in training mode),
    ``block_kernel_norms`` (L,) (Frobenius norm of each block's Dense kernel: with BN
    the block is invariant to it, and an SGD step on it is effectively eta / ||W||^2)
    and ``head_kernel_norm``. One jitted function per model."""
    x = jax.numpy.asarray(x)
    compiled = {}

    def measure(model, variables):
        logits = model.apply(variables, x, train=True)[0]
        kernels = _block_kernels(variables["params"])
        block = jax.numpy.sqrt(sum(jax.numpy.sum(k.reshape(k.shape[0], -1) ** 2, axis=1)
                                   for k in kernels))
        return logits.std(), block, jax.numpy.linalg.norm(variables["params"]["head"]["kernel"])

    def extra(model, variables) -> dict:
        if id(model) not in compiled:
            compiled[id(model)] = jax.jit(lambda v: measure(model, v))
        logit_std, block, head = compiled[id(model)](variables)
        return {"logit_std": float(logit_std), "block_kernel_norms": np.asarray(block).tolist(),
                "head_kernel_norm": float(head)}

    return extra


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def equivalent_std(cfg: ModelConfig) -> float:
    """The std of N(0, s^2) weights with the block kernels' variance under ``cfg.init``."""
    return math.sqrt(theory.effective_weight_var(cfg) / cfg.width)


def mean_field_log10_p0(cfg: ModelConfig, input_second_moment: float) -> float:
    """Mean-field log10 ||P_0||^2/n at init (NaN with BatchNorm: no prediction of this form)."""
    if cfg.norm != "none":
        return math.nan
    logs = theory.predicted_log_product_sq_norms(cfg, input_second_moment=input_second_moment)
    return float(logs[0] / math.log(10))


def summarise_cell(act: str, norm: str, key: str, runs: list[sweep.RunResult]) -> dict:
    """One (activation, norm, init): accuracy, divergence, measurements at init and end."""
    init = [r.measurements[0] for r in runs]
    final = [r.measurements[-1] for r in runs]
    cfg = runs[0].model
    diverged = [int(r.final["step"]) + 1 if r.status == "diverged" else None for r in runs]
    acc = [r.final.get("test_accuracy", math.nan) for r in runs]
    # Second moment of the stem output h^0 (index 0 of the activation statistics).
    h0_sq = float(np.mean([m["activation_mean"][0] ** 2 + m["activation_std"][0] ** 2
                           for m in init]))
    p0 = [m["log10_product_sq_norms"][0] if np.isfinite(m["loss"]) else math.nan for m in init]
    # Growth of the block kernels over training, ||W_l(T)|| / ||W_l(0)||, median over blocks;
    # a diverged run's end is its last good state, so it is left out.
    growth = [float(np.median(np.asarray(m1["block_kernel_norms"]) / np.asarray(m0["block_kernel_norms"])))
              if d is None and m1["step"] > 0 else math.nan
              for m0, m1, d in zip(init, final, diverged)]
    head_growth = [m1["head_kernel_norm"] / m0["head_kernel_norm"]
                   if d is None and m1["step"] > 0 else math.nan
                   for m0, m1, d in zip(init, final, diverged)]
    return {
        "activation": act, "norm": norm, "init": key,
        "named": key in NAMED, "scale": None if key in NAMED else cfg.init_std,
        "equivalent_std": equivalent_std(cfg), "seeds": [r.seed for r in runs],
        "status": [r.status for r in runs], "diverged_at_step": diverged,
        "test_accuracy": acc,
        "score": [CHANCE if d is not None else a for a, d in zip(acc, diverged)],
        "run_trains": tr.runs_train([acc], [[d is not None for d in diverged]],
                                    threshold=TRAINS)[0].tolist(),
        "log10_P0": p0, "log10_products": plots.nanmean(
            [m["log10_product_sq_norms"] for m in init]).tolist(),
        "mean_field_log10_P0": mean_field_log10_p0(cfg, h0_sq) if math.isfinite(h0_sq)
        else math.nan,
        "input_second_moment": h0_sq,
        "loss_at_init": [m["loss"] for m in init],
        "logit_std_at_init": [m["logit_std"] for m in init],
        "block_kernel_norm_at_init": [float(np.median(m["block_kernel_norms"])) for m in init],
        "block_kernel_growth": growth, "head_kernel_growth": head_growth,
    }


def summarise(result: sweep.SweepResult) -> list[dict]:
    cells = []
    for label, runs in result.by_label().items():
        act, norm, key = label.split("|")
        cells.append(summarise_cell(act, norm, key, runs))
    return cells


def _mean(values) -> float:
    v = np.asarray(values, float)
    return float(np.mean(v)) if v.size and np.isfinite(v).all() else math.nan


def scale_cells(cells: list[dict], act: str, norm: str) -> list[dict]:
    """The N(0, s^2) cells of (act, norm), by increasing scale."""
    return sorted([c for c in cells if c["activation"] == act and c["norm"] == norm
                   and not c["named"]], key=lambda c: c["scale"])


def named_cells(cells: list[dict], act: str, norm: str) -> list[dict]:
    return [c for c in cells if c["activation"] == act and c["norm"] == norm and c["named"]]


def trainable_scales(cells: list[dict], act: str, norm: str) -> dict:
    """Which init scales train: the largest unbroken range, its width in decades, how many."""
    sc = scale_cells(cells, act, norm)
    scales = [c["scale"] for c in sc]
    ok = tr.values_train([c["run_trains"] for c in sc])
    span = tr.contiguous_span(scales, ok)
    named = named_cells(cells, act, norm)
    named_ok = tr.values_train([c["run_trains"] for c in named]) if named else np.zeros(0, bool)
    return {"span": list(span), "decades": tr.span_decades(span), "count": int(ok.sum()),
            "of": len(sc), "all": bool(ok.all()), "trains": ok.tolist(),
            "named_trains": {c["init"]: bool(t) for c, t in zip(named, named_ok)}}


def p0_spread(cells: list[dict], act: str, norm: str) -> dict:
    """log10 ||P_0||^2/n at init over the scales: per scale (mean over seeds), its range,
    and the mean-field prediction."""
    sc = scale_cells(cells, act, norm)
    p0 = np.asarray([_mean(c["log10_P0"]) for c in sc])
    finite = p0[np.isfinite(p0)]
    return {"scales": [c["scale"] for c in sc], "log10_P0": p0.tolist(),
            "mean_field": [c["mean_field_log10_P0"] for c in sc],
            "min": float(finite.min()) if finite.size else math.nan,
            "max": float(finite.max()) if finite.size else math.nan,
            "non_finite": int((~np.isfinite(p0)).sum())}


def accuracy_spread(cells: list[dict], act: str, norm: str) -> tuple[float, float]:
    """(lowest, highest) mean test accuracy (diverged seeds at chance) over every init."""
    acc = [float(np.mean(c["score"])) for c in cells if c["activation"] == act and c["norm"] == norm]
    return min(acc), max(acc)


def _span_text(t: dict) -> str:
    if not np.isfinite(t["span"][0]):
        return f"no scale (0/{t['of']})"
    lo, hi = t["span"]
    if lo == hi:
        return f"s = {lo:g} only ({t['count']}/{t['of']} scales)"
    return f"s = {lo:g}–{hi:g} ({t['decades']:.1f} decades, {t['count']}/{t['of']} scales)"


def claim_insensitive(cells: list[dict], size: dict) -> dict:
    parts, holds, partly = [], [], []
    for act in size["activations"]:
        t = {n: trainable_scales(cells, act, n) for n in NORMS}
        spread = {n: accuracy_spread(cells, act, n) for n in NORMS}
        named = {n: sum(t[n]["named_trains"].values()) for n in NORMS}
        n_named = len(t["batch"]["named_trains"])
        parts.append(
            f"{ACT_NAMES[act]}: N(0, s²) trains at {_span_text(t['none'])} without BN and "
            f"{_span_text(t['batch'])} with BN"
            + (f"; named initialisers that train: {named['none']}/{n_named} without, "
               f"{named['batch']}/{n_named} with BN" if n_named else "")
            + f"; test accuracy over all inits {100 * spread['none'][0]:.0f}–"
              f"{100 * spread['none'][1]:.0f} % without, {100 * spread['batch'][0]:.0f}–"
              f"{100 * spread['batch'][1]:.0f} % with BN")
        bn_all = t["batch"]["all"] and named["batch"] == n_named
        if bn_all and spread["batch"][1] - spread["batch"][0] <= SPREAD_OK:
            holds.append(act)
        wider = (t["batch"]["count"] > t["none"]["count"]
                 or spread["batch"][1] - spread["batch"][0] < spread["none"][1] - spread["none"][0])
        if bn_all or wider:
            partly.append(act)
    acts = size["activations"]
    verdict = ("holds" if len(holds) == len(acts) else
               "holds partly" if partly else "does not hold here")
    return {"claim": "BN makes training insensitive to initialisation",
            "measured": "; ".join(parts) + f" (trains: test accuracy ≥ {100 * TRAINS:.0f} % "
                        "without divergence in at least half the seeds).",
            "verdict": verdict, "figure": "figures/summary.png"}


def claim_flat_product(cells: list[dict], size: dict) -> dict:
    parts, holds, partly = [], [], []
    for act in size["activations"]:
        none, bn = p0_spread(cells, act, "none"), p0_spread(cells, act, "batch")
        lo_s, hi_s = none["scales"][0], none["scales"][-1]
        under = (f", {none['non_finite']} scale(s) non-finite (float32 under/overflow)"
                 if none["non_finite"] else "")
        parts.append(f"{ACT_NAMES[act]}: log10 ‖P_0‖²/n from s = {lo_s:g} to {hi_s:g} spans "
                     f"{none['min']:.1f} … {none['max']:.1f} without BN{under}, "
                     f"{bn['min']:.1f} … {bn['max']:.1f} with BN")
        bn_range, none_range = bn["max"] - bn["min"], none["max"] - none["min"]
        if bn_range < FLAT and bn["non_finite"] == 0:
            holds.append(act)
        if bn_range < none_range / 10 or bn_range < FLAT:
            partly.append(act)
    acts = size["activations"]
    verdict = ("holds" if len(holds) == len(acts) else
               "holds partly" if partly else "does not hold here")
    return {"claim": "BN removes the dependence of the gradient product at initialisation on "
                     "the weight scale (BN's output is invariant to the scale of the weights "
                     "before it)",
            "measured": "; ".join(parts) + ".", "verdict": verdict,
            "figure": "figures/summary.png"}


def theory_agreement(cells: list[dict]) -> list[dict]:
    """Measured against mean-field log10 ||P_0||^2/n for every no-BN init with a finite
    measurement (mean over seeds)."""
    out = []
    for c in cells:
        if c["norm"] != "none":
            continue
        m = _mean(c["log10_P0"])
        out.append({"activation": c["activation"], "init": c["init"], "measured": m,
                    "predicted": c["mean_field_log10_P0"],
                    "difference": m - c["mean_field_log10_P0"] if np.isfinite(m) else math.nan})
    return out


def claim_mean_field(cells: list[dict]) -> dict:
    agree = theory_agreement(cells)
    ok = [a for a in agree if np.isfinite(a["difference"])]
    # Within a decade, or 10 % of the predicted log (deep products span tens of decades).
    close = [a for a in ok if abs(a["difference"]) <= max(1.0, 0.1 * abs(a["predicted"]))]
    worst = max(ok, key=lambda a: abs(a["difference"])) if ok else None
    verdict = ("holds" if ok and len(close) >= 0.9 * len(ok) else
               "holds partly" if ok and len(close) >= 0.5 * len(ok) else "does not hold here")
    measured = (f"{len(close)} of {len(ok)} finite no-BN measurements are within a decade (or "
                f"10 % of the log) of the prediction" + (
                    f"; the largest gap: {ACT_NAMES[worst['activation']]} {worst['init']}, "
                    f"10^{worst['measured']:.1f} measured against 10^{worst['predicted']:.1f}"
                    if worst else "") + f"; {len(agree) - len(ok)} non-finite (float32).")
    return {"claim": "Without BN the gradient product at initialisation follows mean-field "
                     "theory, ‖P_0‖²/n ≈ Π χ(q_l) (exponential in depth, set by the weight scale)",
            "measured": measured, "verdict": verdict, "figure": "figures/summary.png"}


def _fmt(v: float, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if np.isfinite(v) else "non-finite"


def table_rows(cells: list[dict]) -> list[dict]:
    rows = []
    for c in cells:
        s = np.asarray(c["score"], float)
        div = [d for d in c["diverged_at_step"] if d is not None]
        n = len(s)
        ok = sum(c["run_trains"])
        status = []
        if div:
            status.append(f"diverged at step {min(div)}" + (f" ({len(div)}/{n})" if n > 1 else ""))
        if n - ok - len(div):
            status.append("no learning" + (f" ({n - ok - len(div)}/{n})" if n > 1 else ""))
        rows.append({
            "network": f"{ACT_NAMES[c['activation']]}, {NORMS[c['norm']][0]}",
            "init": c["init"] + (f" (≈ s {c['equivalent_std']:.3g})" if c["named"] else ""),
            "acc": f"{100 * s.mean():.1f} ± {100 * s.std():.1f}", "trains": f"{ok}/{n}",
            "p0": _fmt(_mean(c["log10_P0"])),
            "mf": "–" if c["norm"] != "none" else _fmt(c["mean_field_log10_P0"]),
            "logits": f"{np.mean(c['logit_std_at_init']):.3g}",
            "growth": f"{np.nanmedian(c['block_kernel_growth']):.3g}"
            if np.isfinite(c["block_kernel_growth"]).any() else "–",
            "status": "; ".join(status) or "ok"})
    return rows


def conclusion(cells: list[dict], claims: list[dict], size: dict) -> str:
    """The claims, then what the numbers add: BN's own level of ||P_0||, where its
    invariance breaks (epsilon), and what BN leaves to the scale (the output layer, the
    effective step)."""
    text = " ".join(f"{c['claim']}: {c['verdict']}. {c['measured']}" for c in claims)
    levels, eps_notes, ends = [], [], []
    for act in size["activations"]:
        sc = scale_cells(cells, act, "batch")
        if not sc:
            continue
        p0 = np.asarray([_mean(c["log10_P0"]) for c in sc])
        level = float(np.nanmedian(p0))
        levels.append(f"10^{level:.1f} for {ACT_NAMES[act]}")
        off = [(c, v) for c, v in zip(sc, p0) if np.isfinite(v) and abs(v - level) > 0.2]
        if off:
            eps_notes.append(f"{ACT_NAMES[act]} " + ", ".join(
                f"10^{v:.1f} at s = {c['scale']:g}" for c, v in off))
        best = max(sc, key=lambda c: np.mean(c["score"]))
        lo, hi = sc[0], sc[-1]
        grow = lambda c: np.nanmedian(c["block_kernel_growth"]) \
            if np.isfinite(c["block_kernel_growth"]).any() else math.nan
        ends.append(
            f"{ACT_NAMES[act]} + BN: logit std at init {np.mean(lo['logit_std_at_init']):.2g} at "
            f"s = {lo['scale']:g} and {np.mean(hi['logit_std_at_init']):.2g} at s = {hi['scale']:g}; "
            f"block kernels grow {grow(lo):.3g}× and {grow(hi):.3g}× over training; best test "
            f"accuracy {100 * np.mean(best['score']):.0f} % at s = {best['scale']:g}, "
            f"{100 * np.mean(lo['score']):.0f} % and {100 * np.mean(hi['score']):.0f} % at the ends")
    if levels:
        text += (f" With BN, ‖P_0‖²/n at initialisation is not 1 either: {' and '.join(levels)} at "
                 f"depth {size['depth']}, whatever s — BN's own gradient growth with depth.")
    if eps_notes:
        text += (" The invariance is not exact at the smallest scales (" + "; ".join(eps_notes)
                 + f"), where the variance before BN, s² · width · q = "
                   f"{size['scales'][0] ** 2 * size['width']:.2g} q at s = {size['scales'][0]:g}, "
                   "approaches BN's ε = 1e-5.")
    if ends:
        text += (" What BN leaves to the scale: the output layer is not normalised (its logits "
                 "scale with s), and an SGD step on a kernel that BN makes scale-invariant is "
                 "effectively η/‖W‖², so small kernels take large effective steps (and grow) "
                 "while large ones hardly move — " + "; ".join(ends) + ".")
    return text


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _color(norm: str):
    return plots.color(NORMS[norm][1])


def _named_x(c: dict, k: int, n: int) -> float:
    """The x position of named init k of n: its equivalent std, nudged apart (they coincide
    for square layers: LeCun, Xavier and orthogonal gain 1 all have variance 1/width)."""
    return c["equivalent_std"] * 10 ** (0.05 * (k - (n - 1) / 2))


def figure_summary(cells: list[dict], size: dict):
    """Top: final test accuracy against the init scale; bottom: log10 ||P_0||^2/n at init,
    with the mean-field prediction (no BN). One column per activation; named initialisers
    as markers at their equivalent std."""
    acts = size["activations"]
    fig, axes = plots.figure(len(acts), 2, width=5.0, height=3.6)
    floor = {}
    for col, act in enumerate(acts):
        ax_acc, ax_p = axes[0, col], axes[1, col]
        # Non-finite measurements are drawn at a floor below everything drawn (measured or
        # predicted).
        finite = [v for c in cells if c["activation"] == act
                  for v in [*c["log10_P0"], c["mean_field_log10_P0"]] if np.isfinite(v)]
        floor[act] = min(finite) - 0.08 * (max(finite) - min(finite) + 1) if finite else -1
        for norm in NORMS:
            color = _color(norm)
            sc = scale_cells(cells, act, norm)
            x = np.asarray([c["scale"] for c in sc])
            score = 100 * np.asarray([c["score"] for c in sc], float)                # (V, S)
            plots.band(ax_acc, x, score.T, color=color, marker="o", label=NORMS[norm][0])
            div = np.asarray([any(d is not None for d in c["diverged_at_step"]) for c in sc])
            if div.any():
                ax_acc.plot(x[div], score[div].mean(1), "x", ms=11, mew=2.5, color=color, zorder=5)
            p0 = np.asarray([c["log10_P0"] for c in sc], float)                      # (V, S)
            plots.band(ax_p, x, np.where(np.isfinite(p0), p0, np.nan).T, color=color, marker="o")
            bad = ~np.isfinite(p0).all(1)
            if bad.any():  # float32 under/overflow: drawn at the bottom edge
                ax_p.plot(x[bad], np.full(bad.sum(), floor[act]), "v", ms=9, color=color,
                          markeredgecolor="k", zorder=5)
            if norm == "none":
                # Thick and pale under the measurement, which it should match.
                ax_p.plot(x, [c["mean_field_log10_P0"] for c in sc], color=color, lw=6,
                          alpha=0.3, zorder=1)
            named = named_cells(cells, act, norm)
            for k, c in enumerate(named):
                marker = NAMED[c["init"]][1]
                xn = _named_x(c, k, len(named))
                ax_acc.plot(xn, 100 * np.mean(c["score"]), marker, ms=8, color=color,
                            markeredgecolor="k", zorder=6)
                v = _mean(c["log10_P0"])
                ax_p.plot(xn, v if np.isfinite(v) else floor[act], marker, ms=8, color=color,
                          markeredgecolor="k", zorder=6)
        ax_acc.axhline(100 * CHANCE, color="0.5", lw=0.8, ls=":")
        ax_acc.axhline(100 * TRAINS, color="0.5", lw=0.8, ls="--")
        ax_acc.set(xscale="log", ylim=(0, None), title=f"{ACT_NAMES[act]}, depth {size['depth']}",
                   ylabel="final test accuracy %" if col == 0 else "")
        ax_p.set(xscale="log", xlabel="init std s of N(0, s²) weights\n(named inits: at the s "
                                      "with the same block-weight variance)",
                 ylabel=r"$\|P_0\|_F^2/n$ at initialisation" if col == 0 else "")
        plots.power_of_ten_axis(ax_p)
        ax_p.set_ylim(bottom=floor[act] - 0.04 * abs(floor[act]) - 1)
    handles = [Line2D([], [], color=_color(n), marker="o", label=NORMS[n][0]) for n in NORMS]
    handles += [Line2D([], [], color=_color("none"), lw=6, alpha=0.3, label="mean field (no BN)")]
    handles += [Line2D([], [], ls="none", marker=NAMED[n][1], color="0.6", markeredgecolor="k",
                       ms=8, label=NAMED[n][0]) for n in size["named"]]
    handles += [Line2D([], [], ls="none", marker="x", ms=9, mew=2.5, color="0.35",
                       label="a seed diverged (scored at chance)"),
                Line2D([], [], ls="none", marker="v", ms=8, color="0.6", markeredgecolor="k",
                       label="non-finite (float32)"),
                Line2D([], [], color="0.5", lw=0.8, ls="--", label=f"trains: {100 * TRAINS:.0f} %")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4 if len(acts) > 1 else 2,
               fontsize="small")
    return fig


def figure_products(cells: list[dict], size: dict):
    """log10 ||P_l||^2/n at init against layer l, one line per init scale; rows: no BN /
    BN, columns: activation."""
    acts = size["activations"]
    fig, axes = plots.figure(len(acts), 2, width=4.6, height=3.3)
    cmap = matplotlib.colormaps["viridis"]
    for col, act in enumerate(acts):
        for row, norm in enumerate(NORMS):
            ax = axes[row, col]
            sc = scale_cells(cells, act, norm)
            for i, c in enumerate(sc):
                v = np.asarray(c["log10_products"], float)
                ax.plot(np.arange(len(v)), np.where(np.isfinite(v), v, np.nan),
                        color=cmap(0.9 * i / max(1, len(sc) - 1)), lw=1.6, label=f"s = {c['scale']:g}")
            ax.set(title=f"{ACT_NAMES[act]}, {NORMS[norm][0]}", xlabel="layer l" if row else "",
                   ylabel=r"$\|P_l\|_F^2/n$ at init" if col == 0 else "")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            plots.power_of_ten_axis(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(8, len(labels)),
               fontsize="small")
    fig.suptitle("Gradient product from layer l to the last block at initialisation "
                 "(missing lines: non-finite in float32)", fontsize="medium")
    return fig


def figure_ends(cells: list[dict], size: dict):
    """What BN does not normalise: the logit std at init, and the growth of the block
    kernels in training (median over blocks), against the init scale."""
    acts = size["activations"]
    fig, axes = plots.figure(2, 1, width=4.8, height=3.6)
    for act, ls in zip(acts, ("-", "--", ":")):
        for norm in NORMS:
            sc = scale_cells(cells, act, norm)
            x = [c["scale"] for c in sc]
            label = f"{ACT_NAMES[act]}, {NORMS[norm][0]}"
            logit = plots.log10([c["logit_std_at_init"] for c in sc])
            plots.band(axes[0, 0], x, logit.T, color=_color(norm), linestyle=ls, marker="o",
                       label=label)
            growth = plots.log10([c["block_kernel_growth"] for c in sc])
            plots.band(axes[0, 1], x, growth.T, color=_color(norm), linestyle=ls, marker="o",
                       label=label)
    axes[0, 0].set(xscale="log", xlabel="init std s", ylabel="std of the logits at init",
                   title="Output scale at initialisation\n(missing: exactly 0 in float32)")
    axes[0, 1].set(xscale="log", xlabel="init std s",
                   ylabel=r"$\|W_l(T)\| \,/\, \|W_l(0)\|$",
                   title="Growth of the block kernels in training\n(median over blocks)")
    for ax in axes[0]:
        plots.power_of_ten_axis(ax)
        ax.axhline(0, color="0.6", lw=0.8, ls=":")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small",
               handlelength=3.5)
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    runs = grid(args)
    dataset = data.load("mnist1d")
    x_measure = dataset.x_train[:size["measure_batch_size"]]
    result = s.sweep(runs, dataset, measure_at=[0, size["steps"]],
                     measure_batch_size=size["measure_batch_size"],
                     extra_measure=ends_measure(x_measure), log_every=max(1, size["steps"] // 50))
    cells = summarise(result)
    claims = [claim_insensitive(cells, size), claim_flat_product(cells, size), claim_mean_field(cells)]
    paths = {"summary": s.save_figure(figure_summary(cells, size), "summary", headline=True),
             "products": s.save_figure(figure_products(cells, size), "products"),
             "ends": s.save_figure(figure_ends(cells, size), "ends")}
    text = conclusion(cells, claims, size)

    rep = s.report
    rep.title = "BatchNorm and the weight initialisation"
    named = ", ".join(NAMED[n][0] for n in size["named"])
    rep.add("Setup", f"""
- Networks: plain MLPs, depth {size['depth']}, width {size['width']},
  {', '.join(ACT_NAMES[a] for a in size['activations'])}; each without BatchNorm and with
  BatchNorm after every Dense (Dense → BN → activation, the stem included; the output Dense
  is not normalised).
- Initialisations: N(0, s²) for every weight (stem, blocks, output) at s =
  {', '.join(f'{v:g}' for v in size['scales'])}; named: {named or 'none'} (orthogonal with gain
  √2 for ReLU, 1 otherwise), placed on the s axis at the std with the same block-weight
  variance. Biases 0. {size['seeds']} seed(s) each.
- Training: SGD, momentum 0.9, learning rate {args.learning_rate}, batch
  {size['batch_size']}, {size['steps']} steps, MNIST-1D ({dataset.num_train} train /
  {len(dataset.y_test)} test). A run trains when it did not diverge and its final test
  accuracy is ≥ {100 * TRAINS:.0f} %; an init trains when at least half its seeds do; a
  diverged seed scores chance ({100 * CHANCE:.0f} %).
- At initialisation, on {size['measure_batch_size']} training examples (BN in training mode):
  ‖P_0‖²/n (8 random probes), the std of the logits, and the mean-field prediction
  (``theory.predicted_log_product_sq_norms`` from the measured second moment of the stem
  output) for the networks without BN. After training: ‖W_l(T)‖/‖W_l(0)‖ of each block's
  Dense kernel.
- {len(runs)} runs in {len(result.groups)} compiled training programs.""")
    rep.add("Summary", markdown_table(claims, [("claim", "claim"), ("verdict", "verdict"),
                                               ("measured", "measured")])
            + "\n\nPer initialisation (test accuracy: mean ± std over seeds; ‖P_0‖²/n at init: "
              "log10, mean over seeds; block kernel growth: ‖W_l(T)‖/‖W_l(0)‖, median over "
              "blocks and seeds):\n\n"
            + markdown_table(table_rows(cells), [
                ("network", "network"), ("init", "init"), ("test accuracy %", "acc"),
                ("seeds that train", "trains"), ("log10 ‖P_0‖²/n", "p0"), ("mean field", "mf"),
                ("logit std at init", "logits"), ("block kernel growth", "growth"),
                ("status", "status")]))
    rep.add("Conclusion", text)
    rep.add_figures(paths)
    return {"cells": cells, "claims": claims, "conclusion": text,
            "trainable_scales": {f"{a}|{n}": trainable_scales(cells, a, n)
                                 for a in size["activations"] for n in NORMS},
            "gradient_product_spread": {f"{a}|{n}": p0_spread(cells, a, n)
                                        for a in size["activations"] for n in NORMS},
            "theory_agreement": theory_agreement(cells), "table": result.table(),
            "sizes": size, "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
