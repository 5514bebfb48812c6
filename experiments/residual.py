"""Residual connections: gradient products, trainability and the degradation of plain networks.

ReLU MLPs (He init, width 32) at depths 10, 50, 200 and 1000 in six forms:
plain (Dense -> ReLU), plain + BatchNorm, pre-activation residual blocks
h + alpha F(h) with branch scale alpha = 1, 1/sqrt(L) and a learnable scalar
initialised at 0, and BatchNorm + residual with alpha = 1 (the pre-activation
ResNet); ``--forms`` adds BatchNorm + residual with alpha = 1/sqrt(L) and
learnable-from-zero (one more compiled program per depth each). For every form and depth it
measures the gradient product log10 ||P_l||_F^2/n, P_l = dh^L/dh^l, at
initialisation and after training (with the mean-field prediction of
``vgrad.analysis.theory`` for the forms without normalisation), whether and how
fast the network trains (training accuracy on the whole training set, steps to
30 % batch accuracy), and the per-block weight-gradient norms of the plain
BatchNorm networks, to say what their degradation is: He et al. (2016) report
that their degrading plain networks had BatchNorm and healthy gradient norms,
so that degradation is not a vanishing-gradient problem.

Data: MNIST-1D (4,000 train / 1,000 test). Training: SGD, momentum 0.9,
learning rate 0.01, batch 128, 300 steps (depth 1000: 60 steps, the point is
whether it trains at all), 3 seeds; every form of a seed sees the same batches.

    python -m experiments.residual                  # ~6 min on 2 CPU cores (346-398 s measured)
    python -m experiments.residual --quick          # ~20 s (tiny sizes)
    python -m experiments.residual --figure docs/figures/residual.png

Finding (default run): residual networks with alpha = 1/sqrt(L) or a learned
alpha from 0 keep ||P_0||^2/n at 10^0.4 / 10^0 at every depth up to 1000, as
mean-field theory predicts, and train at every depth (54-55 % training accuracy
at depth 200; 33-34 % at depth 1000 after 60 steps), while the plain networks
degrade from 46-48 % at depth 10 to chance at depth 200. The degrading plain BN
networks do not have vanishing gradients: their gradients *explode* at
initialisation (first/last block 10^4.3 at depth 50, 10^17.8 at depth 200,
which diverges at step 1), against He et al.'s "healthy norms"; during training
at depth 50 the ratio is a healthy 10^-0.1, yet the network stays at 12 %.
Plain networks without BN vanish at finite width (10^-32 at depth 1000, width
32, where mean field says 10^0); alpha = 1 without BN grows as 2^L and overflows
float32 by depth 1000; BN + residual alpha = 1 drops from 61 % (depth 10) to
41 % (depth 200). ``report.md`` has the measured numbers.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import matplotlib
import numpy as np

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.analysis import theory
from vgrad.study import StudyArgs, markdown_table

NAME = "residual"
CHANCE = 0.1
TRAINS = CHANCE + 0.1  # training accuracy above this: the network trains
SPEED_THRESHOLD = 0.3  # "how fast": steps until the smoothed batch accuracy reaches this
GRAD_DECADES = 2.0  # first / last block weight-gradient ratio beyond 10^+-this: exploding / vanishing
RES = {"model.residual": True}
BN = {"model.norm": "batch"}
# label -> (colour key, line style, overrides of the ReLU + He base network)
FORMS = {
    "plain": ("baseline", "-", {}),
    "plain + BN": ("batchnorm", "-", BN),
    "residual α=1": ("residual", "-", {**RES, "model.residual_scale": 1.0}),
    "residual α=1/√L": ("residual", "--", {**RES, "model.residual_scale": "inv_sqrt_depth"}),
    "residual α=0, learned": ("residual", ":", {**RES, "model.residual_scale": "learnable_zero"}),
    "BN + residual α=1": ("bn_residual", "-", {**BN, **RES, "model.residual_scale": 1.0}),
    "BN + residual α=1/√L": ("bn_residual", "--", {**BN, **RES,
                                                    "model.residual_scale": "inv_sqrt_depth"}),
    "BN + residual α=0, learned": ("bn_residual", ":", {**BN, **RES,
                                                        "model.residual_scale": "learnable_zero"}),
}
# The default forms: every residual scale without BatchNorm, and the standard BN ResNet
# (α = 1); --forms adds the BN + residual α=1/√L and α=0 forms (two groups per depth).
DEFAULT_FORMS = ("plain", "plain + BN", "residual α=1", "residual α=1/√L", "residual α=0, learned",
                 "BN + residual α=1")
QUICK_FORMS = ("plain + BN", "residual α=1/√L")


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Plain against residual networks from depth 10 to 1000, without and with BatchNorm."""

    depths: tuple[int, ...] = (10, 50, 200, 1000)
    forms: tuple[str, ...] = DEFAULT_FORMS
    """Which forms to train (each is one compiled program per depth)."""
    width: int = 32
    steps: int = 300
    """Training steps of every depth below --short-depth."""
    short_steps: int = 60
    """Training steps of the depths >= --short-depth (does it train at all?)."""
    short_depth: int = 1000
    learning_rate: float = 0.01
    batch_size: int = 128

    def validate(self) -> None:
        super().validate()
        if not self.depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                  for d in self.depths):
            raise ValueError(f"invalid --depths={self.depths!r}: must be integers >= 1")
        unknown = [f for f in self.forms if f not in FORMS]
        if not self.forms or unknown:
            raise ValueError(f"invalid --forms={self.forms!r}: allowed forms are "
                             + ", ".join(repr(f) for f in FORMS))
        for name in ("width", "steps", "short_steps", "short_depth", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 "must be an integer >= 1")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depths=(12,), width=16, steps=20, short_steps=10, short_depth=1000,
                    forms=QUICK_FORMS, seeds=args.num_seeds(3), batch_size=32)
    return dict(depths=tuple(sorted(set(args.depths))), width=args.width, steps=args.steps,
                short_steps=args.short_steps, short_depth=args.short_depth,
                forms=tuple(f for f in FORMS if f in args.forms), seeds=args.num_seeds(3),
                batch_size=args.batch_size)


def budget(size: dict, depth: int) -> int:
    return size["short_steps"] if depth >= size["short_depth"] else size["steps"]


def grid(args: Args, depths: list[int] | None = None) -> list[sweep.Run]:
    """One labelled run per (form, depth, seed); label "<form> @ <depth>"."""
    s = sizes(args)
    runs = []
    for depth in s["depths"] if depths is None else depths:
        model = ModelConfig(depth=depth, width=s["width"], activation="relu", init="he_normal")
        steps = budget(s, depth)
        train = TrainConfig(steps=steps, batch_size=s["batch_size"], learning_rate=args.learning_rate,
                            momentum=0.9, eval_every=steps)
        runs += sweep.variants({f"{form} @ {depth}": FORMS[form][2] for form in s["forms"]},
                               model=model, train=train, seeds=s["seeds"])
    return runs


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------








def steps_to(steps: np.ndarray, curve: np.ndarray, threshold: float) -> float:
    """First step at which ``curve`` reaches ``threshold`` (NaN if never)."""
    hit = np.flatnonzero(np.nan_to_num(curve, nan=-1.0) >= threshold)
    return float(steps[hit[0]]) if hit.size else math.nan


def mean_field(cfg: ModelConfig) -> list[float] | None:
    """log10 ||P_l||^2/n predicted by mean-field theory (ReLU: input-independent), or None
    (BatchNorm has no prediction of this form)."""
    try:
        return (theory.predicted_log_product_sq_norms(cfg) / math.log(10)).tolist()
    except ValueError:
        return None


def summarise(result: sweep.SweepResult, size: dict) -> list[dict]:
    """One entry per (form, depth) with everything the figures and the report use."""
    entries = []
    for label, runs in result.by_label().items():
        form, depth = label.rsplit(" @ ", 1)
        depth = int(depth)
        key, style, _ = FORMS[form]
        init = [r.measurements[0] for r in runs]
        final = [r.measurements[-1] for r in runs]
        # A non-finite loss means the forward pass overflowed float32: the product estimate
        # of that network is meaningless, so it is recorded as NaN.
        products_init = np.asarray([m["log10_product_sq_norms"] if np.isfinite(m["loss"])
                                    else [math.nan] * (depth + 1) for m in init], float)
        # Not measured after training (short-budget depths): NaN.
        # A diverged run is measured at its last good state, not after training: left out.
        products_final = np.asarray([m["log10_product_sq_norms"] if m["step"] > 0
                                     and np.isfinite(m["loss"]) and r.status != "diverged"
                                     else [math.nan] * (depth + 1) for m, r in zip(final, runs)],
                                    float)
        moved = plots.log10([m["relative_weight_change"] if m["step"] > 0 else [math.nan] * depth
                        for m in final])
        wgrad_init = plots.log10([m["weight_grad_norms"] for m in init])  # (S, L); inf/NaN: overflow
        acc_steps, acc = result.curves(runs, "accuracy")
        loss_steps, loss = result.curves(runs, "loss")
        window = max(5, len(acc_steps) // 15)
        acc_smooth = plots.smoothed(acc, window)
        # First / last block weight-gradient norm over training (log10), per seed.
        ratio_steps, ratios = _grad_ratio_curves(result, runs)
        diverged = [r.final.get("step") if r.status == "diverged" else None for r in runs]
        entries.append({
            "form": form, "depth": depth, "color_key": key, "linestyle": style,
            "steps": budget(size, depth), "seeds": [r.seed for r in runs],
            "status": [r.status for r in runs], "diverged_at_step": diverged,
            "train_accuracy": result.final_stats(runs, "train_accuracy"),
            "test_accuracy": result.final_stats(runs, "test_accuracy"),
            "final_batch_accuracy": [float(a[np.isfinite(a)][-1]) if np.isfinite(a).any() else math.nan
                                     for a in acc_smooth],
            "steps_to_threshold": [steps_to(acc_steps, a, SPEED_THRESHOLD) for a in acc_smooth],
            "log10_P0_init": products_init[:, 0].tolist(),
            "log10_P0_final": products_final[:, 0].tolist(),
            "log10_products_init": plots.nanmean(products_init).tolist(),
            "log10_products_final": plots.nanmean(products_final).tolist(),
            "mean_field_log10_products": mean_field(runs[0].model),
            "log10_weight_grad_norms_init": plots.nanmean(wgrad_init).tolist(),
            "log10_relative_weight_change_final": plots.nanmean(moved).tolist(),
            "log10_first_block_weight_change": moved[:, 0].tolist(),
            "log10_last_block_weight_change": moved[:, -1].tolist(),
            "forward_overflow_at_init": [not np.isfinite(m["loss"]) for m in init],
            "measured_after_training": all(m["step"] > 0 for m in final),
            "log10_grad_ratio_init": _difference(wgrad_init[:, 0], wgrad_init[:, -1]).tolist(),
            "log10_grad_ratio_train_median": [float(np.nanmedian(r)) if np.isfinite(r).any()
                                              else math.nan for r in ratios],
            "grad_ratio_curve": {"steps": ratio_steps.tolist(), "values": ratios.tolist()},
            "batch_accuracy_curve": {"steps": acc_steps.tolist(), "values": acc_smooth.tolist(),
                                     "smoothing_window": window},
            "loss_curve": {"steps": loss_steps.tolist(), "values": loss.tolist()},
            "step_time_s": runs[0].step_time_s,
        })
    return entries


def _difference(a, b) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.asarray(a, float) - np.asarray(b, float)


def _grad_ratio_curves(result: sweep.SweepResult, runs: list) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T,), log10 ||dL/dW_1|| / ||dL/dW_L|| (S, T)) from every step's block gradient norms."""
    steps = sorted({h["step"] for r in runs for h in r.history if "block_grad_norms" in h})
    where = {s: i for i, s in enumerate(steps)}
    out = np.full((len(runs), len(steps)), np.nan)
    for row, r in zip(out, runs):
        for h in r.history:
            if "block_grad_norms" in h:
                g = np.asarray(h["block_grad_norms"], float)
                with np.errstate(divide="ignore", invalid="ignore"):
                    row[where[h["step"]]] = np.log10(g[0] / g[-1])
    return np.asarray(steps), out


def table_rows(entries: list[dict]) -> list[dict]:
    def fmt(values, digits=1):
        v = np.asarray(values, float)
        if not np.isfinite(v).any():
            return "overflow"
        return f"{np.nanmean(np.where(np.isfinite(v), v, np.nan)):.{digits}f}" + \
            ("*" if not np.isfinite(v).all() else "")

    rows = []
    for e in entries:
        acc = e["train_accuracy"]
        div = [d for d in e["diverged_at_step"] if d is not None]
        speed = np.asarray(e["steps_to_threshold"], float)
        rows.append({
            "form": e["form"], "depth": e["depth"], "steps": e["steps"],
            "train": f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}",
            "speed": (f"{np.nanmean(speed):.0f}" + (f" ({np.isfinite(speed).sum()}/{speed.size})"
                                                     if not np.isfinite(speed).all() else ""))
            if np.isfinite(speed).any() else "never",
            "p0": fmt(e["log10_P0_init"]),
            "mf": "–" if e["mean_field_log10_products"] is None
            else f"{e['mean_field_log10_products'][0]:.1f}",
            "p0f": fmt(e["log10_P0_final"]) if e["measured_after_training"] else "not measured",
            "ratio": fmt(e["log10_grad_ratio_init"]),
            "status": f"diverged at step {min(div)}" if div else "ok",
        })
    return rows


def _mean(values) -> float:
    v = np.asarray(values, float)
    return float(np.mean(v)) if v.size else math.nan


def gradient_verdict(log10_ratio: float) -> str:
    if not np.isfinite(log10_ratio):
        return "overflowing (non-finite)"
    if log10_ratio > GRAD_DECADES:
        return "exploding"
    if log10_ratio < -GRAD_DECADES:
        return "vanishing"
    return "healthy"


def _p0(e: dict) -> float:
    """Mean log10 ||P_0||^2/n at init over seeds; NaN if any seed overflowed."""
    v = np.asarray(e["log10_P0_init"], float)
    return float(v.mean()) if np.isfinite(v).all() else math.nan


def _f1(v: float) -> str:
    """One decimal, without a negative zero."""
    return f"{v:.1f}".replace("-0.0", "0.0")


def _decades(v: float) -> str:
    return "overflow" if not np.isfinite(v) else f"10^{_f1(v)}"


def conclusion_products(entries: list[dict], size: dict) -> str:
    """Gradient products at initialisation against mean-field theory, from the measurements."""
    by_form: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: e["depth"]):
        by_form.setdefault(e["form"], []).append(e)
    pieces = []
    for form, es in by_form.items():
        values = ", ".join(f"{_decades(_p0(e))} at depth {e['depth']}" for e in es)
        mf = [e["mean_field_log10_products"][0] for e in es if e["mean_field_log10_products"]]
        if mf:
            pieces.append(f"{form}: {values} (mean field: "
                          + ", ".join(f"10^{_f1(m)}" for m in mf) + ")")
        else:
            pieces.append(f"{form}: {values} (no mean-field prediction with BatchNorm)")
    text = "‖P_0‖²/n at initialisation — " + "; ".join(pieces) + "."
    agreement = theory_agreement(entries)
    ok = [a for a in agreement if np.isfinite(a["measured"])]
    off = [a for a in ok if abs(a["measured"] - a["predicted"]) > max(1.0, 0.2 * abs(a["predicted"]))]
    if ok and not off:
        text += " Every finite measurement is within a decade (or 20 %) of the mean-field prediction."
    elif off:
        text += (" The measurement departs from mean-field theory for "
                 + ", ".join(f"{a['form']} at depth {a['depth']} (10^{_f1(a['measured'])} against "
                             f"10^{_f1(a['predicted'])})" for a in off)
                 + f": finite width ({size['width']}) makes the log-product drift where the "
                   "wide-network theory predicts none.")
    return text


def _range(values, fmt="{:.0f}", scale=100.0) -> str:
    v = [scale * x for x in values if np.isfinite(x)]
    if not v:
        return "–"
    lo, hi = fmt.format(min(v)), fmt.format(max(v))
    return lo if lo == hi else f"{lo}–{hi}"


def degraded_plain_bn(entries: list[dict], size: dict) -> list[dict]:
    """The plain BN entries that degrade: > 10 points below the shallowest depth, or diverged."""
    by = {(e["form"], e["depth"]): e for e in entries}
    depths = sorted({e["depth"] for e in entries})
    shallow = by.get(("plain + BN", depths[0]))
    out = []
    for d in depths:
        e = by.get(("plain + BN", d))
        if e is None:
            continue
        drop = shallow is not None and d != depths[0] and (
            shallow["train_accuracy"]["mean"] - e["train_accuracy"]["mean"] > 0.1)
        if drop or any(x is not None for x in e["diverged_at_step"]):
            out.append(e)
    return out


def degradation_details(entries: list[dict], size: dict) -> str:
    """Training accuracy against depth, and the gradients of the degrading plain BN networks."""
    by = {(e["form"], e["depth"]): e for e in entries}
    depths = sorted({e["depth"] for e in entries})
    equal = [d for d in depths if d < size["short_depth"]] or depths
    forms = [f for f in size["forms"] if any(f == e["form"] for e in entries)]
    acc = lambda f, d: by[(f, d)]["train_accuracy"]["mean"] if (f, d) in by else math.nan
    lines = [f"Training accuracy from depth {equal[0]} to {equal[-1]} ({size['steps']} steps): "
             + ", ".join(f"{f} {100 * acc(f, equal[0]):.0f} → {100 * acc(f, equal[-1]):.0f} %"
                         for f in forms) + "."]
    for e in degraded_plain_bn(entries, size):
        r0 = _mean(e["log10_grad_ratio_init"])
        rt = float(plots.nanmean(e["log10_grad_ratio_train_median"]))
        div = [x for x in e["diverged_at_step"] if x is not None]
        moved = _mean(e["log10_first_block_weight_change"])
        head = (f"- plain + BN, depth {e['depth']} ({100 * e['train_accuracy']['mean']:.0f} % "
                "training accuracy): ")
        at_init = (f"first/last block weight-gradient ratio 10^{r0:.1f} at initialisation "
                   f"({gradient_verdict(r0)})" if np.isfinite(r0) else
                   "weight gradients non-finite at initialisation (float32 overflow)")
        if div:
            later = f"; diverged at step {min(div)} in {len(div)} of {len(e['diverged_at_step'])} seeds"
        else:
            later = (f"; median ratio during training 10^{rt:.1f} ({gradient_verdict(rt)})"
                     if np.isfinite(rt) else "")
            if np.isfinite(moved):
                later += (f"; block 1's weights end {10 ** moved:.3g}× their initial norm away from "
                          f"it (block L: {10 ** _mean(e['log10_last_block_weight_change']):.2g}×)")
        lines.append(head + at_init + later + ".")
    return "\n".join(lines)


def conclusion(entries: list[dict], size: dict) -> str:
    """Two or three sentences from the measured numbers (nothing assumed)."""
    by = {(e["form"], e["depth"]): e for e in entries}
    depths = sorted({e["depth"] for e in entries})
    equal = [d for d in depths if d < size["short_depth"]] or depths
    shallow, deep = equal[0], equal[-1]
    long = [d for d in depths if d >= size["short_depth"]]
    forms = [f for f in size["forms"] if any(f == e["form"] for e in entries)]
    acc = lambda f, d: by[(f, d)]["train_accuracy"]["mean"] if (f, d) in by else math.nan
    residual = [f for f in forms if "residual" in f]
    plain = [f for f in forms if "residual" not in f]
    # Residual forms that train at every depth without losing more than 10 points.
    good = [f for f in residual if all(acc(f, d) > TRAINS for d in depths if (f, d) in by)
            and not acc(f, shallow) - acc(f, deep) > 0.1]
    parts = []
    if good:
        p0 = [_p0(by[(f, d)]) for f in good for d in depths if (f, d) in by]
        sentence = (f"Residual networks with {' or '.join(good)} keep ‖P_0‖²/n between "
                    f"10^{_f1(min(p0))} and 10^{_f1(max(p0))} at initialisation at every depth up to "
                    f"{depths[-1]} and train at every depth ({_range([acc(f, deep) for f in good])} % "
                    f"training accuracy at depth {deep}"
                    + (f", {_range([acc(f, long[-1]) for f in good])} % at depth {long[-1]} after "
                       f"{size['short_steps']} steps" if long else "") + ")")
    else:
        sentence = f"No residual form trains at every depth up to {depths[-1]} here"
    if plain and deep != shallow:
        sentence += (f", while the plain networks go from {_range([acc(f, shallow) for f in plain])} "
                     f"% at depth {shallow} to {_range([acc(f, deep) for f in plain])} % at depth {deep}"
                     + (" (degradation)" if all(acc(f, shallow) - acc(f, deep) > 0.1 for f in plain)
                        else ""))
    worse = [f for f in residual if f not in good and (f, deep) in by and (f, shallow) in by]
    if worse and deep != shallow:
        sentence += ("; " + ", ".join(f"{f} goes from {100 * acc(f, shallow):.0f} to "
                                      f"{100 * acc(f, deep):.0f} %" for f in worse))
    parts.append(sentence + ".")
    bad = [e for e in degraded_plain_bn(entries, size) if np.isfinite(_mean(e["log10_grad_ratio_init"]))]
    if bad:
        e = bad[0]
        r0 = _mean(e["log10_grad_ratio_init"])
        rt = float(plots.nanmean(e["log10_grad_ratio_train_median"]))
        verdicts = [gradient_verdict(_mean(b["log10_grad_ratio_init"])) for b in bad]
        worst = max(bad, key=lambda b: _mean(b["log10_grad_ratio_init"]))
        vanish = any(v == "vanishing" for v in verdicts)
        explode = all(v == "exploding" for v in verdicts)
        text = (f"The degrading plain BN networks {'have' if vanish else 'do not have'} vanishing "
                f"gradients: at depth {e['depth']} the first block's weight gradient is "
                f"10^{r0:.1f} times the last block's at initialisation"
                + (f" (10^{_mean(worst['log10_grad_ratio_init']):.1f} at depth {worst['depth']})"
                   if worst is not e else ""))
        if explode:
            text += (", i.e. they *explode*, which contradicts He et al.'s 'healthy gradient "
                     "norms' at initialisation")
            if np.isfinite(rt) and gradient_verdict(rt) == "healthy":
                text += (f"; during training the ratio is a healthy 10^{rt:.1f} (median), as they "
                         f"measured, yet the network reaches only "
                         f"{100 * acc('plain + BN', e['depth']):.0f} %")
        elif all(v == "healthy" for v in verdicts):
            text += ", healthy as He et al. report: here degradation is not a gradient problem"
        parts.append(text + ".")
    deep_plain = by.get(("plain", depths[-1]))
    if deep_plain is not None and deep_plain["mean_field_log10_products"] is not None:
        measured, predicted = _p0(deep_plain), deep_plain["mean_field_log10_products"][0]
        if np.isfinite(measured) and abs(measured - predicted) > 1:
            parts.append(f"Plain networks without BN vanish instead: ‖P_0‖²/n = 10^{measured:.1f} "
                         f"at depth {depths[-1]} (width {size['width']}), where mean-field theory "
                         f"(the infinite-width limit) predicts 10^{_f1(predicted)}.")
    if len(parts) == 1:  # nothing on degradation (e.g. one depth): the products instead
        parts.append(conclusion_products(entries, size))
    return " ".join(parts)


def theory_agreement(entries: list[dict]) -> list[dict]:
    """Measured against predicted log10 ||P_0||^2/n at init, where theory gives one."""
    out = []
    for e in entries:
        if e["mean_field_log10_products"] is None:
            continue
        measured = np.asarray(e["log10_P0_init"], float)
        out.append({"form": e["form"], "depth": e["depth"],
                    "measured": float(np.mean(measured)) if np.isfinite(measured).all() else math.nan,
                    "predicted": e["mean_field_log10_products"][0]})
    return out


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _style(e: dict) -> dict:
    return {"color": plots.color(e["color_key"]), "linestyle": e["linestyle"]}


def _forms(entries):
    return list(dict.fromkeys(e["form"] for e in entries))


def figure_summary(entries: list[dict], size: dict):
    """Headline: ||P_0||^2/n at init vs depth (with mean field), training accuracy vs depth,
    and the deepest networks' training curves."""
    fig, axes = plots.figure(3, 1, width=5.0, height=4.2)
    depths = sorted({e["depth"] for e in entries})
    ax = axes[0, 0]
    finite = [v for e in entries for v in e["log10_P0_init"] if np.isfinite(v)]
    ceiling = max(finite + [1.0]) + 4
    for form in _forms(entries):
        es = sorted([e for e in entries if e["form"] == form], key=lambda e: e["depth"])
        x = [e["depth"] for e in es]
        vals = np.asarray([e["log10_P0_init"] for e in es], float)
        over = ~np.isfinite(vals).all(1)
        y = np.where(over, ceiling, plots.nanmean(np.where(np.isfinite(vals), vals, np.nan), 1))
        ax.plot(x, y, marker="o", ms=4, label=form, lw=1.6, **_style(es[0]))
        if over.any():
            ax.plot(np.asarray(x)[over], y[over], "x", ms=10, mew=2, color=_style(es[0])["color"])
        mf = [e["mean_field_log10_products"][0] if e["mean_field_log10_products"] else np.nan
              for e in es]
        if np.isfinite(mf).any():
            ax.plot(x, np.minimum(mf, ceiling + 30), marker="s", ms=5, mfc="none", lw=0.8,
                    color=_style(es[0])["color"], ls=(0, (1, 1)), alpha=0.7)
    if any(not np.isfinite(v) for e in entries for v in e["log10_P0_init"]):
        ax.axhline(ceiling, color="0.5", lw=0.6)
        ax.text(0.03, 0.9, "×: the forward pass overflows float32", transform=ax.transAxes,
                ha="left", va="top", fontsize="x-small")
    ax.set_ylim(min(finite + [-2.0]) - 2, ceiling + 0.04 * (ceiling - min(finite + [-2.0])) + 1)
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    plots.power_of_ten_axis(ax)
    ax.set(xlabel="depth L (blocks)", ylabel=r"$\|P_0\|_F^2/n$ at initialisation",
           title="Gradient product, input to output\n(squares: mean-field prediction)")
    ax = axes[0, 1]
    equal = [d for d in depths if d < size["short_depth"]]
    for form in _forms(entries):
        es = sorted([e for e in entries if e["form"] == form], key=lambda e: e["depth"])
        eq = [e for e in es if e["depth"] in equal]
        if eq:
            ys = np.asarray([e["train_accuracy"]["values"] for e in eq], float).T
            plots.band(ax, [e["depth"] for e in eq], ys, label=form, marker="o", **_style(es[0]))
        short = [e for e in es if e["depth"] not in equal]
        for e in short:  # a shorter budget: unconnected markers with their min-max range
            v = np.asarray(e["train_accuracy"]["values"], float)
            v = v[np.isfinite(v)]
            if v.size:
                ax.errorbar([e["depth"]], [v.mean()], yerr=[[max(0.0, v.mean() - v.min())],
                                                              [max(0.0, v.max() - v.mean())]],
                            marker="D", mfc="none", color=_style(e)["color"], capsize=2)
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    if len(equal) < len(depths):
        ax.axvspan(np.sqrt(equal[-1] * min(d for d in depths if d not in equal)) if equal else depths[0],
                   depths[-1] * 1.5, color="0.9", zorder=0)
        ax.text(depths[-1], 0.97, f"{size['short_steps']} steps", ha="center", va="top",
                fontsize="x-small")
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set(xlabel="depth L (blocks)", ylabel="training accuracy (whole training set)", ylim=(0, 1),
           title=f"Degradation: accuracy after {size['steps']} steps\n(mean, min-max over seeds)")
    ax = axes[0, 2]
    deepest = depths[-1]
    for e in [e for e in entries if e["depth"] == deepest]:
        c = e["batch_accuracy_curve"]
        plots.band(ax, c["steps"], c["values"], label=e["form"], **_style(e))
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls=":")
    gone = [e["form"] for e in entries if e["depth"] == deepest
            and all(x is not None and x <= 1 for x in e["diverged_at_step"])]
    if gone:
        ax.text(0.98, 0.97, "diverge at once (no curve):\n" + "\n".join(gone), transform=ax.transAxes,
                ha="right", va="top", fontsize="x-small", color="0.3")
    ax.set(xlabel="training step", ylabel="batch training accuracy (smoothed)", ylim=(0, 1),
           title=f"Depth {deepest}: does it train at all?")
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize="small")
    return fig


def figure_products(entries: list[dict]):
    """log10 ||P_l||^2/n against l/L at init (top) and after training (bottom), one panel per depth."""
    depths = sorted({e["depth"] for e in entries})
    fig, axes = plots.figure(len(depths), 2, width=3.8, height=3.3)
    for col, d in enumerate(depths):
        for row, key in enumerate(("log10_products_init", "log10_products_final")):
            ax = axes[row, col]
            ax.set_title(f"depth {d}, " + ("at initialisation" if row == 0 else "after training"),
                         fontsize="small")
            here = [e for e in entries if e["depth"] == d]
            values = np.asarray([e[key] for e in here], float)
            if not np.isfinite(values).any():
                ax.text(0.5, 0.5, "not measured" if row else "every form overflows",
                        transform=ax.transAxes, ha="center", va="center", color="0.4")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            for e, v in zip(here, values):
                x = np.arange(len(v))
                ax.plot(x, np.where(np.isfinite(v), v, np.nan), label=e["form"], lw=1.5, **_style(e))
                if row == 0 and e["mean_field_log10_products"] is not None:
                    ax.plot(x, e["mean_field_log10_products"], color=_style(e)["color"], lw=3,
                            alpha=0.25)
            # Limits from the measurements (a prediction far beyond them is cut at the edge).
            finite = values[np.isfinite(values)]
            lo, hi = finite.min(), finite.max()
            pad = 0.06 * max(hi - lo, 1.0)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlabel("layer l")
            plots.power_of_ten_axis(ax)
        axes[0, col].set_ylabel(r"$\|P_l\|_F^2/n$" if col == 0 else "")
        axes[1, col].set_ylabel(r"$\|P_l\|_F^2/n$" if col == 0 else "")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize="small")
    fig.suptitle("Gradient product from layer l to the output (thick pale lines: mean-field "
                 "prediction; missing: float32 overflow or diverged)")
    return fig


def figure_plain_bn(entries: list[dict]):
    """Plain BN networks: per-block weight-gradient norms at init; first/last ratio in training."""
    es = sorted([e for e in entries if e["form"] == "plain + BN"], key=lambda e: e["depth"])
    ref = sorted([e for e in entries if e["form"] == "BN + residual α=1"], key=lambda e: e["depth"])
    fig, axes = plots.figure(2, 1, width=5.4, height=4.0)
    cmap = matplotlib.colormaps["viridis"]
    shade = lambda i, n: cmap(0.9 * i / max(1, n - 1))
    ax = axes[0, 0]
    for group, style in ((es, "-"), (ref, "--")):
        for i, e in enumerate(group):
            g = np.asarray(e["log10_weight_grad_norms_init"], float)
            L = len(g)
            ax.plot(np.arange(1, L + 1) / L, np.where(np.isfinite(g), g, np.nan), ls=style,
                    lw=1.8 if style == "-" else 1.2, color=shade(i, len(group)),
                    label=f"{e['form']}, depth {e['depth']}")
    ax.set(xlabel="block l / L", ylabel=r"$\|\partial L/\partial W_l\|$ at initialisation",
           title="Weight-gradient norm per block at initialisation\n(missing: float32 overflow)")
    plots.power_of_ten_axis(ax)
    ax = axes[0, 1]
    gone = []
    for i, e in enumerate(es):
        div = [x for x in e["diverged_at_step"] if x is not None]
        if len(div) == len(e["diverged_at_step"]) and min(div) <= 2:
            gone.append(f"depth {e['depth']}: diverges at step {min(div)}")
            continue
        c = e["grad_ratio_curve"]
        plots.band(ax, c["steps"], c["values"], label=f"plain + BN, depth {e['depth']}",
                   color=shade(i, len(es)))
    if gone:
        ax.text(0.98, 0.97, "\n".join(gone), transform=ax.transAxes, ha="right", va="top",
                fontsize="x-small", color="0.3")
    ax.axhspan(-GRAD_DECADES, GRAD_DECADES, color="0.92", zorder=0)
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="training step",
           ylabel=r"$\|\partial L/\partial W_1\| \,/\, \|\partial L/\partial W_L\|$",
           title="Plain + BN: first / last block gradient in training\n"
                 rf"(shaded: within $10^{{\pm {GRAD_DECADES:g}}}$, 'healthy')")
    plots.power_of_ten_axis(ax)
    ax.legend(fontsize="x-small", loc="center right")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=max(1, len(es)), fontsize="x-small")
    return fig


def figure_curves(entries: list[dict], size: dict):
    """Batch accuracy (top) and loss (bottom) over training, one column per depth."""
    depths = sorted({e["depth"] for e in entries})
    fig, axes = plots.figure(len(depths), 2, width=3.8, height=3.2)
    for col, d in enumerate(depths):
        gone = []
        for e in [e for e in entries if e["depth"] == d]:
            div = [x for x in e["diverged_at_step"] if x is not None]
            if div and len(div) == len(e["diverged_at_step"]):
                gone.append(f"{e['form']}: diverges at step {min(div)}")
            c = e["batch_accuracy_curve"]
            plots.band(axes[0, col], c["steps"], c["values"], label=e["form"], **_style(e))
            c = e["loss_curve"]
            plots.band(axes[1, col], c["steps"], c["values"], label=e["form"], **_style(e))
        axes[0, col].axhline(CHANCE, color="0.6", lw=0.8, ls=":")
        axes[0, col].set(title=f"depth {d}", ylim=(0, 1), xlabel="training step")
        # Diverging runs start at enormous losses: the axis shows the range of a trainable run.
        axes[1, col].set(yscale="log", ylim=(0.5, 200), xlabel="training step")
        if gone:
            axes[0, col].text(0.98, 0.97, "\n".join(gone), transform=axes[0, col].transAxes,
                              ha="right", va="top", fontsize="xx-small", color="0.3")
    axes[0, 0].set_ylabel("batch training accuracy (smoothed)")
    axes[1, 0].set_ylabel("training loss (batch)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize="small")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d")
    # Two sweeps: the short-budget depths are measured at initialisation only (a
    # measurement of a depth-1000 network costs seconds per run).
    full = [d for d in size["depths"] if d < size["short_depth"]]
    short = [d for d in size["depths"] if d >= size["short_depth"]]
    results, runs = [], []
    for depths, name, at in ((full, "sweep", [0, size["steps"]]), (short, "sweep_short", [0])):
        if depths:
            part = grid(args, depths)
            runs += part
            results.append(s.sweep(part, dataset, name=name, measure_at=at, measure_batch_size=64))
    entries = [e for r in results for e in summarise(r, size)]
    groups = [g for r in results for g in r.groups]
    table = [row for r in results for row in r.table()]
    figures = {"summary": figure_summary(entries, size), "products": figure_products(entries),
               "plain_bn_gradients": figure_plain_bn(entries), "curves": figure_curves(entries, size)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "Residual connections: gradient products, trainability and degradation"
    rep.add("Setup", f"""
- Network: ReLU MLP, He init, width {size['width']}, depths {', '.join(map(str, size['depths']))};
  residual blocks pre-activation, h + α·F(h), F = [BN] → ReLU → Dense → [BN] → ReLU → Dense;
  plain blocks Dense → [BN] → ReLU. Forms: {', '.join(size['forms'])}.
- Data: MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), standardised.
- Training: SGD, momentum 0.9, learning rate {args.learning_rate}, batch {size['batch_size']},
  {size['steps']} steps (depth ≥ {size['short_depth']}: {size['short_steps']} steps), {size['seeds']}
  seed(s) per form and depth.
- Measured: ‖P_l‖²/n (8 random probes, one batch of 64, BatchNorm in training mode) and per-block
  weight-gradient norms at initialisation and at the end; the block gradient norms of every step;
  training accuracy on the whole training set at the end (BatchNorm in evaluation mode), and the
  batch accuracy during training (smoothed over {entries[0]['batch_accuracy_curve']['smoothing_window']}
  steps; "steps to {100 * SPEED_THRESHOLD:.0f} %" is when it first reaches {SPEED_THRESHOLD}).
- Mean-field prediction (``theory.predicted_log_product_sq_norms``) for the forms without
  BatchNorm: 0 for plain ReLU/He, (1 + α²)^L for pre-activation residual ReLU/He.
- {len(runs)} runs in {len(groups)} compiled programs.""")
    rows = table_rows(entries)
    rep.add("Summary", markdown_table(rows, [
        ("form", "form"), ("depth", "depth"), ("steps", "steps"), ("train accuracy %", "train"),
        (f"steps to {100 * SPEED_THRESHOLD:.0f} %", "speed"), ("log10 ‖P_0‖²/n at init", "p0"),
        ("mean-field", "mf"), ("after training", "p0f"),
        ("log10 ‖∂L/∂W_1‖/‖∂L/∂W_L‖ at init", "ratio"), ("status", "status")])
        + "\n\n\\* some seeds non-finite (float32 overflow), mean of the finite ones; "
          "\"overflow\": every seed non-finite.")
    text = conclusion(entries, size)
    rep.add("Conclusion", text)
    rep.add("Gradient products at initialisation against mean-field theory",
            conclusion_products(entries, size))
    rep.add("Degradation and the gradients of plain BN networks", degradation_details(entries, size))
    rep.add_figures(paths)
    return {"entries": entries, "theory_agreement": theory_agreement(entries),
            "conclusion": text, "table": table,
            "sizes": size, "groups": groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
