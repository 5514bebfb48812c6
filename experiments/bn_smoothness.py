"""BatchNorm and the smoothness of the loss landscape (Santurkar et al. 2018).

Santurkar et al. ("How does batch normalization help optimization?", 2018)
argue that BatchNorm helps because it makes the loss landscape smoother, not
because it stabilises the distribution of each layer's input ("internal
covariate shift"): a network with *noisy* BN, whose normalised outputs are
randomly shifted and scaled at every step, has a less stable input
distribution yet trains about as well as BN. This study measures both halves
on a deep ReLU MLP, without BN, with BN, and with noisy BN
(``ModelConfig(norm="noisy_batch", bn_noise=a)``: z <- s z + m after BN in
training mode, m ~ U(-a, a), s ~ U(1/(1+a), 1+a), fresh per step and unit).

At 13 points of training, on a fixed batch of 128 training examples with
BatchNorm in training mode (batch statistics; the noise of that step held
fixed), ``vgrad.analysis.gradient_direction_probe`` steps along the gradient
g by η in {0.05, 0.1, 0.2, 0.3, 0.4} (Santurkar's range, the same ruler for
every network) and measures the loss-landscape variation (max - min of
L(θ - ηg)), the gradient predictiveness (max ‖∇L(θ) - ∇L(θ - ηg)‖) and the
effective β-smoothness (max ‖∇L(θ) - ∇L(θ - ηg)‖ / ‖ηg‖). The drift of a
layer's input distribution is the spread over training of each unit's batch
mean of h^5 (the input of block 6) in units of its within-batch std; training
is measured by the accuracy on the whole training set in training mode (what
the optimiser sees, noise included).

Network: ReLU MLP, He init, depth 10, width 64. Data: MNIST-1D (4,000 train /
1,000 test). Training: SGD, momentum 0.9, learning rates 0.02 (no-BN trains
well) and 0.1, batch 128, 1000 steps, 3 seeds; noise levels a = 0.1, 0.3, 1.

    python -m experiments.bn_smoothness              # ~5-6 min on 2 shared CPU cores
                                                     # (278 s and 356 s measured at load 9-12,
                                                     # 122-125 s of CPU: ~2-3 min idle)
    python -m experiments.bn_smoothness --quick      # tiny sizes, for the tests
    python -m experiments.bn_smoothness --noise-levels 0.1 1.0 --learning-rates 0.02

Finding (default run): BN smooths the landscape against no BN in 5 of 6
comparisons (lr 0.02: 29x less loss variation, 7.8x less gradient change, 2x
smaller effective beta; at lr 0.1 the loss variation is the same, 0.22 vs
0.20). Noisy BN does *not* train as well as BN except at the smallest noise:
79 % training accuracy for BN, 77 % for a = 0.1 (whose input drift, 0.06, is
close to BN's 0.03 and far below no BN's 0.20), 61 % for a = 0.3 and 44 % for
a = 1 (67 % / 49 % with the noise switched off: the weights learnt are worse).
Yet noisy BN's landscape is *smoother* than BN's in every case (effective beta
4.8 for a = 1 against BN's 13.6 at lr 0.02). Across the 10 (form, lr) points
training accuracy follows input-distribution stability (Spearman 0.65), not
smoothness (-0.58): against Santurkar et al., in this setting distribution
shift re-injected after BN costs accuracy, and smoothness measured along the
gradient does not explain BN's benefit. ``report.md`` has every number.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import warnings

import jax
import jax.numpy as jnp
import matplotlib
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
import numpy as np
import scipy.stats

from vgrad import ModelConfig, TrainConfig, data, plots, study, sweep
from vgrad.analysis import gradient_direction_probe
from vgrad.models import build
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_smoothness"
SMOOTHNESS = {  # measurement key -> (axis label, title)
    "loss_variation": ("max - min of L(θ - ηg)", "Loss variation along the gradient"),
    "gradient_predictiveness": (r"max $\|\nabla L(\theta) - \nabla L(\theta - \eta g)\|$",
                                "Gradient predictiveness (lower: more predictive)"),
    "effective_beta": (r"max $\|\nabla L(\theta) - \nabla L(\theta-\eta g)\| / \|\eta g\|$",
                       "Effective β-smoothness"),
}
SAME_TRAINING = 0.03  # "trains about as well": final training accuracy within 3 points of BN
CLOSE_TRAINING = 0.10  # ... within 10 points: partly


def noisy_form(a: float) -> str:
    return f"noisy BN a={a:g}"


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """No BN, BN and noisy BN: loss-landscape smoothness, input-distribution drift and training."""

    depth: int = 10
    width: int = 64
    steps: int = 1000
    learning_rates: tuple[float, ...] = (0.02, 0.1)
    """SGD learning rates (momentum 0.9); the first is one where the network without BN trains."""
    noise_levels: tuple[float, ...] = (0.1, 0.3, 1.0)
    """Noise levels a of noisy BN (each is one compiled program)."""
    step_sizes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4)
    """Step sizes η of the probe along the gradient (absolute, the same for every run)."""
    measure_points: int = 13
    """Training steps (evenly spaced, step 0 included) at which the landscape is probed."""
    batch_size: int = 128

    def validate(self) -> None:
        super().validate()
        for name in ("depth", "width", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 "must be an integer >= 1")
        if self.depth < 2:
            raise ValueError(f"invalid --depth={self.depth!r}: must be >= 2 (the drift is measured "
                             "at a middle layer)")
        if (isinstance(self.measure_points, bool) or not isinstance(self.measure_points, int)
                or self.measure_points < 3):
            raise ValueError(f"invalid --measure-points={self.measure_points!r}: must be an integer "
                             ">= 3")
        for name, values, low in (("learning_rates", self.learning_rates, 0.0),
                                  ("step_sizes", self.step_sizes, 0.0),
                                  ("noise_levels", self.noise_levels, 0.0)):
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                 or not math.isfinite(v) or v <= low for v in values):
                raise ValueError(f"invalid --{name.replace('_', '-')}={values!r}: must be one or "
                                 f"more finite numbers > {low:g}")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depth=4, width=16, steps=40, learning_rates=(0.05,), noise_levels=(1.0,),
                    step_sizes=(0.1, 0.4), measure_points=3, batch_size=32,
                    seeds=args.num_seeds(3))
    return dict(depth=args.depth, width=args.width, steps=args.steps,
                learning_rates=tuple(sorted(set(args.learning_rates))),
                noise_levels=tuple(sorted(set(args.noise_levels))),
                step_sizes=tuple(sorted(set(args.step_sizes))), measure_points=args.measure_points,
                batch_size=args.batch_size, seeds=args.num_seeds(3))


def forms(size: dict) -> dict[str, dict]:
    """label -> ModelConfig overrides, in plotting order."""
    out = {"no BN": {"model.norm": "none"}, "BN": {"model.norm": "batch"}}
    for a in size["noise_levels"]:
        out[noisy_form(a)] = {"model.norm": "noisy_batch", "model.bn_noise": float(a)}
    return out


def style(form: str, size: dict) -> dict:
    """Colour and line style of a form: the shared technique colours, purples for noisy BN."""
    if form == "no BN":
        return {"color": plots.color("baseline"), "linestyle": "-"}
    if form == "BN":
        return {"color": plots.color("batchnorm"), "linestyle": "-"}
    levels = size["noise_levels"]
    i = [noisy_form(a) for a in levels].index(form)
    shade = 0.55 + 0.4 * (i / max(1, len(levels) - 1))
    return {"color": matplotlib.colormaps["Purples"](shade), "linestyle": "--"}


def grid(args: Args) -> list[sweep.Run]:
    """One run per (form, learning rate, seed), labelled with the form; every form of a
    seed sees the same batches and the forms without noise the same initial weights."""
    s = sizes(args)
    model = ModelConfig(depth=s["depth"], width=s["width"], activation="relu", init="he_normal")
    train = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], momentum=0.9,
                        eval_every=s["steps"])
    runs = []
    for form, overrides in forms(s).items():
        runs += sweep.grid(model, train, vary={**{k: [v] for k, v in overrides.items()},
                                               "train.learning_rate": list(s["learning_rates"])},
                           seeds=s["seeds"], label=form)
    return runs


def measure_steps(size: dict) -> list[int]:
    return sorted({int(round(t)) for t in np.linspace(0, size["steps"], size["measure_points"])})


def drift_layers(depth: int) -> tuple[int, int]:
    """The hidden states whose unit statistics are recorded: a middle one and the last."""
    return depth // 2, depth


# ----------------------------------------------------------------------------
# measurements (the sweep's extra_measure hook)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _state_fn(cfg: ModelConfig):
    """Jitted ``f(variables, x_BxD, x_NxBxD, y_NxB) -> (unit means (2, width), unit stds
    (2, width), correct count, correct count with the noise off)`` of ``cfg``'s model in
    training mode: the batch statistics of two hidden states (``drift_layers``) on x_BxD,
    and how many of the N batches' examples it classifies correctly, as it is and (noisy
    BN) with the same weights and a = 0, i.e. plain BN with batch statistics. One program:
    one compilation per model."""
    model = build(cfg)
    quiet = build(dataclasses.replace(cfg, bn_noise=0.0)) if cfg.norm == "noisy_batch" else None
    layers = jnp.asarray(drift_layers(cfg.depth))

    def correct(m, variables, batch):
        logits, _ = m.apply(variables, batch[0], train=True)
        return jnp.sum(jnp.argmax(logits, -1) == batch[1])

    @jax.jit
    def state(variables, x_BxD, x_NxBxD, y_NxB):
        h = model.hidden_states(variables, x_BxD, train=True)[layers]  # (2, B, width)
        right = jnp.sum(jax.lax.map(lambda b: correct(model, variables, b), (x_NxBxD, y_NxB)))
        right_quiet = right if quiet is None else jnp.sum(
            jax.lax.map(lambda b: correct(quiet, variables, b), (x_NxBxD, y_NxB)))
        return h.mean(axis=1), h.std(axis=1), right, right_quiet

    return state


def make_extra_measure(dataset, size: dict):
    """``extra_measure(model, variables)`` for the sweep: the gradient-direction probe on the
    first ``batch_size`` training examples, the batch mean / std of every unit of two hidden
    states on the same batch, and the accuracy on the whole training set in training mode
    (BatchNorm with the statistics of each batch of ``batch_size``, the step's noise), also
    with the noise switched off (noisy BN only; the same number otherwise)."""
    b = size["batch_size"]
    x_probe, y_probe = np.asarray(dataset.x_train[:b]), np.asarray(dataset.y_train[:b])
    n = (dataset.num_train // b) * b
    x_all = np.asarray(dataset.x_train[:n]).reshape(n // b, b, -1)
    y_all = np.asarray(dataset.y_train[:n]).reshape(n // b, b).astype(np.int32)
    step_sizes = np.asarray(size["step_sizes"], float)

    def extra(model, variables) -> dict:
        probe = gradient_direction_probe(model, variables, x_probe, y_probe, step_sizes, train=True)
        mean, std, correct, correct_quiet = _state_fn(model.cfg)(variables, x_probe, x_all, y_all)
        return {"probe_loss": probe["loss"], "probe_grad_norm": probe["grad_norm"],
                "probe_losses": probe["losses"], "probe_grad_distances": probe["grad_distances"],
                **{k: probe[k] for k in SMOOTHNESS},
                "unit_mean": np.asarray(mean), "unit_std": np.asarray(std),
                "train_mode_accuracy": float(correct) / n,
                "noise_off_accuracy": float(correct_quiet) / n}

    return extra


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def _nanmedian(values, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(np.asarray(values, float), axis=axis)


def _series(runs: list, key: str) -> np.ndarray:
    """(S, T, ...) of a measurement over the measured steps; NaN after a run diverged
    (its later measurements are of its frozen last good state)."""
    out = []
    for r in runs:
        stop = r.final.get("step", math.inf) if r.status == "diverged" else math.inf
        rows = []
        for m in r.measurements:
            v = np.asarray(m[key], float)
            rows.append(np.full_like(v, np.nan) if m["step"] > stop else v)
        out.append(rows)
    return np.asarray(out, float)


def input_drift(unit_mean_TxW: np.ndarray, unit_std_TxW: np.ndarray) -> float:
    """How much a layer's input distribution moves over training: the std over the
    measured steps of each unit's batch mean, averaged over units, divided by the
    units' average within-batch std (so a rescaled layer has the same drift).
    unit_mean_TxW, unit_std_TxW: (T, width). Dead units (std 0 throughout) count as 0."""
    mean, std = np.asarray(unit_mean_TxW, float), np.asarray(unit_std_TxW, float)
    keep = np.isfinite(mean).all(axis=1) & np.isfinite(std).all(axis=1)
    mean, std = mean[keep], std[keep]
    if len(mean) < 2 or not np.mean(std) > 0:
        return math.nan
    return float(np.mean(np.std(mean, axis=0)) / np.mean(std))


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D arrays (NaN pairs dropped; NaN if < 3 left)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(scipy.stats.spearmanr(a, b).statistic)  # ties get their average rank


def summarise(result: sweep.SweepResult, size: dict) -> list[dict]:
    """One entry per (form, learning rate) with every number the figures and claims use."""
    entries = []
    for form in forms(size):
        for lr in size["learning_rates"]:
            runs = [r for r in result.runs if r.label == form and r.train.learning_rate == lr]
            if not runs:
                continue
            steps = np.asarray([m["step"] for m in runs[0].measurements])
            later = steps > 0  # the probe at initialisation is not "during training"
            smooth = {k: _series(runs, k) for k in SMOOTHNESS}  # (S, T)
            losses = _series(runs, "probe_losses")  # (S, T, K)
            unit_mean, unit_std = _series(runs, "unit_mean"), _series(runs, "unit_std")  # (S,T,2,W)
            drift = np.asarray([[input_drift(m[later, i], s[later, i]) for i in range(2)]
                                for m, s in zip(unit_mean, unit_std)])  # (S, 2)
            acc = _series(runs, "train_mode_accuracy")  # (S, T)
            quiet = _series(runs, "noise_off_accuracy")  # (S, T)
            # The three most active units of seed 0's middle layer (a dead ReLU unit is flat).
            active = np.argsort(-plots.nanmean(unit_std[0, :, 0, :], axis=0))[:3]
            acc_steps, batch_acc = result.curves(runs, "accuracy")
            loss_steps, batch_loss = result.curves(runs, "loss")
            window = max(5, len(acc_steps) // 20)
            batch_acc = plots.smoothed(batch_acc, window)
            tail = max(1, len(acc_steps) // 10)
            entries.append({
                "form": form, "learning_rate": lr, "seeds": [r.seed for r in runs],
                "status": [r.status for r in runs],
                "diverged_at_step": [r.final.get("step") if r.status == "diverged" else None
                                     for r in runs],
                "measure_steps": steps.tolist(),
                **{k: v.tolist() for k, v in smooth.items()},
                **{f"{k}_median": _nanmedian(v[:, later], axis=1).tolist()
                   for k, v in smooth.items()},
                "probe_loss": _series(runs, "probe_loss").tolist(),
                "probe_grad_norm": _series(runs, "probe_grad_norm").tolist(),
                "probe_loss_min": np.min(losses, axis=-1).tolist(),
                "probe_loss_max": np.max(losses, axis=-1).tolist(),
                "drift_layers": list(drift_layers(size["depth"])),
                "input_drift": drift.tolist(),  # (S, 2): middle layer, last layer
                "traced_units": active.tolist(),
                "unit_mean_traces": unit_mean[0][:, 0][:, active].T.tolist(),  # (3, T)
                "unit_std_traces": unit_std[0][:, 0][:, active].T.tolist(),
                "train_mode_accuracy": acc.tolist(),
                "final_train_mode_accuracy": acc[:, -1].tolist(),
                "noise_off_accuracy": quiet.tolist(),
                # ||θ_l(end) - θ_l(0)|| / ||θ_l(0)||, mean over blocks l: how far the weights moved
                # (BN's output ignores a block's weight scale, so its curvature falls as it grows).
                "relative_weight_change": [float(plots.nanmean(np.asarray(
                    r.measurements[-1]["relative_weight_change"], float).ravel())) for r in runs],
                "final_noise_off_accuracy": quiet[:, -1].tolist(),
                "final_batch_accuracy": [float(plots.nanmean(a[-tail:])) for a in batch_acc],
                "batch_accuracy_curve": {"steps": acc_steps.tolist(), "values": batch_acc.tolist(),
                                         "smoothing_window": window},
                "loss_curve": {"steps": loss_steps.tolist(), "values": batch_loss.tolist()},
                "eval_train_accuracy": result.final_stats(runs, "train_accuracy"),
                "eval_test_accuracy": result.final_stats(runs, "test_accuracy"),
                "step_time_s": runs[0].step_time_s,
            })
    return entries


def _mean(values) -> float:
    return float(plots.nanmean(np.asarray(values, float).ravel()))


def _entry(entries: list[dict], form: str, lr: float) -> dict | None:
    return next((e for e in entries if e["form"] == form and e["learning_rate"] == lr), None)


def _smooth_value(e: dict, key: str) -> float:
    """Seed mean of the median over training of a smoothness measurement."""
    return _mean(e[f"{key}_median"])


def _acc(e: dict) -> float:
    return _mean(e["final_train_mode_accuracy"])


def _drift(e: dict) -> float:
    return _mean(np.asarray(e["input_drift"], float)[:, 0])


def table_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for e in entries:
        acc = np.asarray(e["final_train_mode_accuracy"], float)
        div = [d for d in e["diverged_at_step"] if d is not None]
        rows.append({
            "form": e["form"], "lr": f"{e['learning_rate']:g}",
            "acc": f"{100 * np.nanmean(acc):.1f} ± {100 * np.nanstd(acc):.1f}",
            "test": f"{100 * e['eval_test_accuracy']['mean']:.1f}",
            "lv": f"{_smooth_value(e, 'loss_variation'):.3g}",
            "gp": f"{_smooth_value(e, 'gradient_predictiveness'):.3g}",
            "beta": f"{_smooth_value(e, 'effective_beta'):.3g}",
            "drift": f"{_drift(e):.2f}",
            "drift_last": f"{_mean(np.asarray(e['input_drift'], float)[:, 1]):.2f}",
            "quiet": f"{100 * _mean(e['final_noise_off_accuracy']):.1f}" if e["form"].startswith("noisy")
            else "–",
            "moved": f"{_mean(e['relative_weight_change']):.2f}",
            "status": f"diverged at step {min(div)} ({len(div)}/{len(e['seeds'])})" if div else "ok",
        })
    return rows


# ----------------------------------------------------------------------------
# claims
# ----------------------------------------------------------------------------


def claim_smoother(entries: list[dict], size: dict) -> dict:
    """BN against no BN: each smoothness measurement at each learning rate (lower = smoother)."""
    wins, parts, total = 0, [], 0
    for lr in size["learning_rates"]:
        bn, none = _entry(entries, "BN", lr), _entry(entries, "no BN", lr)
        if bn is None or none is None:
            continue
        cells = []
        for key in SMOOTHNESS:
            a, b = _smooth_value(bn, key), _smooth_value(none, key)
            total += 1
            wins += bool(a < b)
            cells.append(f"{key.replace('_', ' ')} {a:.3g} vs {b:.3g}")
        parts.append(f"lr {lr:g}: " + ", ".join(cells))
    verdict = ("holds" if total and wins == total else
               "holds partly" if total and wins >= total / 2 else "does not hold here")
    return {"claim": "BN makes the loss landscape smoother (less loss variation, more predictive "
                     "gradients, smaller effective β)",
            "measured": f"Median over training, BN vs no BN (lower is smoother), BN smoother in "
                        f"{wins} of {total} comparisons: " + "; ".join(parts) + ".",
            "verdict": verdict, "figure": "figures/landscape.png",
            "bn_smoother_comparisons": wins, "comparisons": total}


def claim_noisy_trains(entries: list[dict], size: dict) -> dict:
    """Noisy BN against BN: final training accuracy (training mode) at each noise level and lr,
    with its noise (what the optimiser sees) and with the same weights and the noise off.
    holds: every noisy form within SAME_TRAINING of BN with its noise; partly: one within
    CLOSE_TRAINING with its noise, or within SAME_TRAINING with the noise off."""
    gaps, quiet_gaps, parts = [], [], []
    for a in size["noise_levels"]:
        for lr in size["learning_rates"]:
            bn, noisy = _entry(entries, "BN", lr), _entry(entries, noisy_form(a), lr)
            none = _entry(entries, "no BN", lr)
            if bn is None or noisy is None:
                continue
            quiet = _mean(noisy["final_noise_off_accuracy"])
            gaps.append(_acc(bn) - _acc(noisy))
            quiet_gaps.append(_acc(bn) - quiet)
            parts.append(f"a={a:g}, lr {lr:g}: {100 * _acc(noisy):.1f} % ({100 * quiet:.1f} % with "
                         f"the noise off, input drift {_drift(noisy):.2f}) vs BN {100 * _acc(bn):.1f} % "
                         f"(drift {_drift(bn):.2f})"
                         + (f" and no BN {100 * _acc(none):.1f} % (drift {_drift(none):.2f})"
                            if none else ""))
    gaps, quiet_gaps = np.asarray(gaps, float), np.asarray(quiet_gaps, float)
    verdict = ("holds" if gaps.size and np.all(gaps <= SAME_TRAINING) else
               "holds partly" if gaps.size and (np.any(gaps <= CLOSE_TRAINING)
                                                or np.any(quiet_gaps <= SAME_TRAINING)) else
               "does not hold here")
    return {"claim": "noisy BN (distribution shift re-injected) trains about as well as BN",
            "measured": f"Final training accuracy (whole training set, training mode), noisy BN "
                        f"vs BN, 'about as well' = within {100 * SAME_TRAINING:.0f} points: "
                        + "; ".join(parts) + ".",
            "verdict": verdict, "figure": "figures/summary.png"}


def claim_tracks_smoothness(entries: list[dict], size: dict) -> dict:
    """Across every (form, lr): does training accuracy follow smoothness or input stability?"""
    acc = [_acc(e) for e in entries]
    beta = [-math.log10(_smooth_value(e, "effective_beta")) if _smooth_value(e, "effective_beta") > 0
            else math.nan for e in entries]
    stability = [-_drift(e) for e in entries]
    rho_smooth, rho_stable = spearman(acc, beta), spearman(acc, stability)
    noisy_less_stable = []
    for a in size["noise_levels"]:
        for lr in size["learning_rates"]:
            bn, noisy = _entry(entries, "BN", lr), _entry(entries, noisy_form(a), lr)
            if bn is not None and noisy is not None:
                noisy_less_stable.append(_drift(noisy) > _drift(bn))
    drifts = "; ".join(f"{e['form']} lr {e['learning_rate']:g}: drift {_drift(e):.2f}, "
                       f"β {_smooth_value(e, 'effective_beta'):.3g}, acc {100 * _acc(e):.0f} %"
                       for e in entries)
    if np.isfinite(rho_smooth) and rho_smooth >= 0.5 and (not np.isfinite(rho_stable)
                                                          or rho_smooth > rho_stable + 0.2):
        verdict = "holds"
    elif np.isfinite(rho_smooth) and rho_smooth > (rho_stable if np.isfinite(rho_stable) else 0):
        verdict = "holds partly"
    else:
        verdict = "does not hold here"
    return {"claim": "BN's benefit tracks smoothness, not distribution stability",
            "measured": f"Across {len(entries)} (form, learning rate) points, Spearman correlation "
                        f"of final training accuracy with smoothness (-log β) {rho_smooth:.2f} and "
                        f"with input-distribution stability (-drift of h^{size['depth'] // 2}) "
                        f"{rho_stable:.2f}; noisy BN's input distribution is less stable than BN's "
                        f"in {sum(noisy_less_stable)} of {len(noisy_less_stable)} cases ({drifts}).",
            "verdict": verdict, "figure": "figures/tracks.png",
            "spearman_accuracy_smoothness": rho_smooth, "spearman_accuracy_stability": rho_stable}


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def log_axis(ax, axis: str = "y") -> None:
    """A log scale labelled with plain numbers at 1, 2, 5 x 10^k (no crowded minor labels
    when the range is under a decade)."""

    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _log_band(ax, steps, values, **kw):
    """band() on a log axis: the smoothness measurements span decades."""
    plots.band(ax, steps, values, **kw)
    log_axis(ax)


def figure_summary(entries: list[dict], size: dict):
    """Per learning rate (rows): training accuracy, loss variation, effective β, input drift."""
    lrs = size["learning_rates"]
    names = list(forms(size))
    fig, axes = plots.figure(4, len(lrs), width=3.7, height=3.1)
    for row, lr in enumerate(lrs):
        here = [e for e in entries if e["learning_rate"] == lr]
        for e in here:
            st = style(e["form"], size)
            plots.band(axes[row, 0], e["measure_steps"], e["train_mode_accuracy"], label=e["form"],
                       marker="o", **st)
            if e["form"].startswith("noisy"):  # the same weights with the noise switched off
                plots.band(axes[row, 0], e["measure_steps"], e["noise_off_accuracy"],
                           color=st["color"], linestyle=":")
            _log_band(axes[row, 1], e["measure_steps"], e["loss_variation"], marker="o", **st)
            _log_band(axes[row, 2], e["measure_steps"], e["effective_beta"], marker="o", **st)
        axes[row, 0].set(ylim=(0, 1), ylabel=f"lr {lr:g}\ntraining accuracy")
        axes[row, 1].set(ylabel="max − min of L(θ − ηg)")
        axes[row, 2].set(ylabel="effective β")
        ax = axes[row, 3]
        drift = [_drift(_entry(here, f, lr)) if _entry(here, f, lr) else math.nan for f in names]
        spread = [np.nanstd(np.asarray(_entry(here, f, lr)["input_drift"], float)[:, 0])
                  if _entry(here, f, lr) else 0 for f in names]
        ax.bar(range(len(names)), drift, yerr=spread, color=[style(f, size)["color"] for f in names],
               capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize="small")
        ax.set(ylabel=f"drift of $h^{{{size['depth'] // 2}}}$ (units of its std)")
        for ax in axes[row, :3]:
            ax.set_xlabel("training step")
    titles = ("Training accuracy (training mode;\ndotted: noisy BN with its noise off)",
              "Loss variation along the gradient\n(η ∈ " + _eta_range(size) + ")",
              "Effective β-smoothness\n(lower: smoother)",
              "Input-distribution drift\n(higher: less stable)")
    for ax, t in zip(axes[0], titles):
        ax.set_title(t, fontsize="medium")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    return fig


def _eta_range(size: dict) -> str:
    eta = size["step_sizes"]
    return f"[{min(eta):g}, {max(eta):g}]"


def figure_landscape(entries: list[dict], size: dict):
    """Santurkar Fig. 4: loss range along the gradient, gradient predictiveness, effective β."""
    lrs = size["learning_rates"]
    fig, axes = plots.figure(3, len(lrs), width=4.0, height=3.2)
    for row, lr in enumerate(lrs):
        for e in [e for e in entries if e["learning_rate"] == lr]:
            st = style(e["form"], size)
            x = e["measure_steps"]
            if not e["form"].startswith("noisy"):  # five overlapping bands would hide each other
                lo, hi = plots.nanmean(e["probe_loss_min"]), plots.nanmean(e["probe_loss_max"])
                axes[row, 0].fill_between(x, lo, hi, color=st["color"], alpha=0.3, lw=0)
            axes[row, 0].plot(x, plots.nanmean(e["probe_loss"]), label=e["form"],
                              color=st["color"], linestyle=st["linestyle"], lw=1.5)
            _log_band(axes[row, 1], x, e["gradient_predictiveness"], marker="o", **st)
            _log_band(axes[row, 2], x, e["effective_beta"], marker="o", **st)
        axes[row, 0].set(ylabel=f"lr {lr:g}\nloss on the probe batch")
        axes[row, 1].set(ylabel=SMOOTHNESS["gradient_predictiveness"][0])
        axes[row, 2].set(ylabel=SMOOTHNESS["effective_beta"][0])
        log_axis(axes[row, 0])
        for ax in axes[row]:
            ax.set_xlabel("training step")
    axes[0, 0].set_title(f"Loss L(θ) (line) and range of L(θ − ηg),\nη ∈ {_eta_range(size)} "
                         "(band; no BN and BN)", fontsize="medium")
    axes[0, 1].set_title("Gradient predictiveness\n(lower: more predictive)", fontsize="medium")
    axes[0, 2].set_title("Effective β-smoothness\n(lower: smoother)", fontsize="medium")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    return fig


def figure_distributions(entries: list[dict], size: dict):
    """Santurkar Fig. 2/7: a middle layer's units over training (batch mean ± std), per form,
    at the first learning rate; the last panel: drift against effective β for every point."""
    lr = size["learning_rates"][0]
    names = [f for f in forms(size) if _entry(entries, f, lr)]
    fig, axes = plots.figure(len(names), 1, width=3.4, height=3.2)
    layer = size["depth"] // 2
    unit_colors = matplotlib.colormaps["tab10"].colors
    for ax, form in zip(axes[0], names):
        e = _entry(entries, form, lr)
        x = np.asarray(e["measure_steps"])
        for u, (unit, m, s) in enumerate(zip(e["traced_units"], e["unit_mean_traces"],
                                             e["unit_std_traces"])):
            m, s = np.asarray(m, float), np.asarray(s, float)
            ax.plot(x, m, color=unit_colors[u], lw=1.5, marker=".", label=f"unit {unit}")
            ax.fill_between(x, m - s, m + s, color=unit_colors[u], alpha=0.15, lw=0)
        ax.set(title=f"{form} (lr {lr:g})", xlabel="training step",
               ylabel=f"unit of $h^{{{layer}}}$: batch mean ± std" if form == names[0] else "")
    lims = [ax.get_ylim() for ax in axes[0, :len(names)]]
    for ax in axes[0, :len(names)]:  # one scale: the drift is comparable between panels
        ax.set_ylim(min(l[0] for l in lims), max(l[1] for l in lims))
    for ax in axes[0]:
        ax.legend(fontsize="x-small", loc="upper right")
    fig.suptitle(f"Three units of $h^{{{layer}}}$ (the input of block {layer + 1}) over training, "
                 "on the probe batch in training mode (seed 0; drawn: its most active units)")
    return fig


def figure_tracks(entries: list[dict], size: dict, tracks: dict):
    """Final training accuracy against smoothness (effective β) and against input drift, one
    point per (form, learning rate), mean over seeds."""
    fig, axes = plots.figure(2, 1, width=4.3, height=3.6)
    markers = dict(zip(size["learning_rates"], "os^vD"))
    for e in entries:
        st = style(e["form"], size)
        beta = _smooth_value(e, "effective_beta")
        kw = dict(color=st["color"], edgecolor="k", lw=0.5, s=60, marker=markers[e["learning_rate"]],
                  label=f"{e['form']}, lr {e['learning_rate']:g}")
        axes[0, 0].scatter(beta if beta > 0 else math.nan, 100 * _acc(e), **kw)
        axes[0, 1].scatter(_drift(e), 100 * _acc(e), **kw)
    log_axis(axes[0, 0], "x")
    axes[0, 0].set(xlabel="effective β (median over training; left: smoother)",
                   ylabel="final training accuracy % (training mode)",
                   title=f"Accuracy against smoothness\nSpearman ρ(accuracy, −log β) = "
                         f"{tracks['spearman_accuracy_smoothness']:.2f}")
    axes[0, 1].set(xlabel=f"input drift of $h^{{{size['depth'] // 2}}}$ (left: more stable)",
                   title=f"Accuracy against input-distribution stability\nSpearman ρ(accuracy, "
                         f"−drift) = {tracks['spearman_accuracy_stability']:.2f}")
    for ax in axes[0]:
        ax.title.set_fontsize("medium")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return fig


def figure_curves(entries: list[dict], size: dict):
    """Batch accuracy (smoothed) and batch loss over training, one column per learning rate."""
    lrs = size["learning_rates"]
    fig, axes = plots.figure(len(lrs), 2, width=4.2, height=3.0)
    for col, lr in enumerate(lrs):
        for e in [e for e in entries if e["learning_rate"] == lr]:
            st = style(e["form"], size)
            plots.curve_band(axes[0, col], e["batch_accuracy_curve"], label=e["form"], **st)
            c = e["loss_curve"]
            window = e["batch_accuracy_curve"]["smoothing_window"]
            plots.band(axes[1, col], c["steps"], plots.smoothed(c["values"], window), **st)
        axes[0, col].set(title=f"lr {lr:g}", ylim=(0, 1), xlabel="training step")
        axes[1, col].set(xlabel="training step")
        log_axis(axes[1, col])
    axes[0, 0].set_ylabel("batch accuracy (smoothed)")
    axes[1, 0].set_ylabel("batch training loss (smoothed)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def conclusion(entries: list[dict], claims: list[dict], size: dict) -> str:
    """Sentences from the measured numbers and the verdicts."""
    smoother, trains, tracks = claims
    lr = size["learning_rates"][0]
    bn, none = _entry(entries, "BN", lr), _entry(entries, "no BN", lr)
    parts = []
    if bn and none:
        ratio = lambda k: _smooth_value(bn, k) / _smooth_value(none, k)
        parts.append(
            f"At lr {lr:g}, BN / no BN ratios (median over training; below 1: BN smoother): loss "
            f"variation {ratio('loss_variation'):.2g}, gradient change "
            f"{ratio('gradient_predictiveness'):.2g}, "
            f"effective β {ratio('effective_beta'):.2g}, at {100 * _acc(bn):.0f} and "
            f"{100 * _acc(none):.0f} % training accuracy (BN, no BN); over every lr BN is smoother "
            f"in {smoother['bn_smoother_comparisons']} of {smoother['comparisons']} comparisons "
            f"({smoother['verdict']}).")
    noisy = [e for e in entries if e["form"].startswith("noisy") and e["learning_rate"] == lr]
    if bn and noisy:
        worst = noisy[-1]
        good = [e for e in noisy if _acc(bn) - _acc(e) <= SAME_TRAINING]
        bad = [e for e in noisy if e not in good]
        quiet_bad = [e for e in bad if _acc(bn) - _mean(e["final_noise_off_accuracy"]) > SAME_TRAINING]
        acc_text = lambda e: (f"{100 * _acc(e):.0f} % "
                              f"({100 * _mean(e['final_noise_off_accuracy']):.0f} % with the noise "
                              f"off, drift {_drift(e):.2f})")
        text = (f"Noisy BN at lr {lr:g} (BN: {100 * _acc(bn):.0f} %, input drift {_drift(bn):.2f}"
                + (f"; no BN: {100 * _acc(none):.0f} %, drift {_drift(none):.2f}" if none else "")
                + ") ")
        if good:
            text += ("trains about as well as BN at " + ", ".join(f"{e['form']}, {acc_text(e)}"
                                                                  for e in good))
            text += (", where its input distribution is still far more stable than without BN"
                     if none and all(_drift(e) < 0.5 * _drift(none) for e in good) else "")
        if bad:
            text += ("; " if good else "") + "trains worse at " + ", ".join(
                f"{e['form']}, {acc_text(e)}" for e in bad)
            if quiet_bad:
                text += (" — the weights learnt under noise are themselves worse, not only their "
                         "noisy read-out")
        text += (f" ('noisy BN trains about as well as BN': {trains['verdict']}). In evaluation "
                 f"mode (running averages gathered under noise) {worst['form']} "
                 f"reaches {100 * worst['eval_test_accuracy']['mean']:.0f} % test accuracy against "
                 f"BN's {100 * bn['eval_test_accuracy']['mean']:.0f} %.")
        parts.append(text)
        noisy_all = [e for e in entries if e["form"].startswith("noisy")]
        below = [e for e in noisy_all if _smooth_value(e, "effective_beta")
                 < _smooth_value(_entry(entries, "BN", e["learning_rate"]), "effective_beta")]
        less_stable = [e for e in noisy_all
                       if _drift(e) > _drift(_entry(entries, "BN", e["learning_rate"]))]
        parts.append(
            f"Over every (noise level, lr), noisy BN's input distribution is less stable than BN's "
            f"in {len(less_stable)} of {len(noisy_all)} cases and its effective β is below BN's in "
            f"{len(below)} of {len(noisy_all)}"
            + (": the noise destabilises the distribution without roughening the landscape"
               + (", and training follows the distribution, not β"
                  if tracks["spearman_accuracy_stability"] > tracks["spearman_accuracy_smoothness"]
                  else "") + "." if 2 * len(below) > len(noisy_all)
               and 2 * len(less_stable) > len(noisy_all) else "."))
    parts.append(f"Across every form and lr, final training accuracy follows smoothness with Spearman "
                 f"ρ = {tracks['spearman_accuracy_smoothness']:.2f} and input-distribution stability "
                 f"with ρ = {tracks['spearman_accuracy_stability']:.2f} ('BN's benefit tracks "
                 f"smoothness, not distribution stability': {tracks['verdict']}).")
    return " ".join(parts)


def disagreement(claims: list[dict], size: dict) -> str:
    """Where the measurement departs from Santurkar et al.'s story, from the verdicts."""
    lines = []
    for c in claims:
        if c["verdict"] != "holds":
            lines.append(f"- *{c['claim']}*: {c['verdict']}.")
    if not lines:
        return "Every claim holds here, as Santurkar et al. report."
    return ("The measurement departs from Santurkar et al. (2018) on:\n" + "\n".join(lines) + """

Differences of setting that may matter: a {depth}-block ReLU MLP of width {width} on MNIST-1D
instead of VGG on CIFAR-10; this noisy BN shifts and scales each unit by the same random amount
for every example of a batch (a pure distribution shift), where Santurkar et al. add i.i.d.
noise to every activation of every example, from a distribution whose mean and variance change
every step; the landscape is probed with the noise of one step held fixed, so it is the
landscape of that step's network, not of the noise-averaged loss. A network that fits worse
also has softer predictions and so a flatter cross-entropy, which lowers β without making
optimisation easier: β compared between networks at different losses is not a clean measure of
how easy they are to train.""".format(
        depth=size["depth"], width=size["width"]))


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d")
    runs = grid(args)
    result = s.sweep(runs, dataset, measure_at=measure_steps(size),
                     measure_batch_size=size["batch_size"], jacobians=False,
                     extra_measure=make_extra_measure(dataset, size))
    entries = summarise(result, size)
    claims = [claim_smoother(entries, size), claim_noisy_trains(entries, size),
              claim_tracks_smoothness(entries, size)]
    figures = {"summary": figure_summary(entries, size), "landscape": figure_landscape(entries, size),
               "distributions": figure_distributions(entries, size),
               "tracks": figure_tracks(entries, size, claims[2]),
               "curves": figure_curves(entries, size)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "BatchNorm and the smoothness of the loss landscape (Santurkar et al. 2018)"
    rep.add("Setup", f"""
- Network: ReLU MLP, He init, depth {size['depth']}, width {size['width']}; forms
  {', '.join(forms(size))}. Noisy BN: BN, then in training mode z ← s ⊙ z + m with, per step and
  unit (shared by the batch), m ~ U(−a, a), s ~ U(1/(1+a), 1+a); evaluation mode is plain BN.
- Data: MNIST-1D ({dataset.num_train} train / {len(dataset.y_test)} test), standardised.
- Training: SGD, momentum 0.9, learning rates {', '.join(f'{lr:g}' for lr in size['learning_rates'])},
  batch {size['batch_size']}, {size['steps']} steps, {size['seeds']} seed(s) per form and lr.
- Landscape probe (`vgrad.analysis.gradient_direction_probe`) at steps
  {', '.join(map(str, measure_steps(size)))}, on the first {size['batch_size']} training examples,
  BN in training mode (batch statistics; the step's noise held fixed), only the parameters moved:
  L(θ − ηg) and ∇L(θ − ηg) for η ∈ {{{', '.join(f'{x:g}' for x in size['step_sizes'])}}}
  (the same η for every run). Loss variation = max − min of L(θ − ηg); gradient predictiveness =
  max ‖∇L(θ) − ∇L(θ − ηg)‖; effective β = max ‖∇L(θ) − ∇L(θ − ηg)‖ / ‖ηg‖. Table values: median
  over the probed steps after 0, mean over seeds.
- Input-distribution drift of h^l (the input of block l+1), l = {size['depth'] // 2} and {size['depth']}:
  per unit, the batch mean on the probe batch (training mode, noise included) at every probed
  step after 0; drift = mean over units of its std over training / mean within-batch std.
- Training accuracy: the whole training set in training mode (batch statistics of {size['batch_size']}
  examples, the step's noise: what the optimiser sees); "noise off": the same noisy-BN weights with
  a = 0 (plain BN, batch statistics); test accuracy in evaluation mode (running averages, no noise).
  "Weights moved": ‖θ_l − θ_l(0)‖ / ‖θ_l(0)‖ at the end, mean over blocks.
- {len(runs)} runs in {len(result.groups)} compiled programs.""")
    rep.add("Summary", markdown_table(table_rows(entries), [
        ("form", "form"), ("lr", "lr"), ("training accuracy %", "acc"), ("noise off %", "quiet"),
        ("test accuracy % (eval mode)", "test"), ("loss variation", "lv"),
        ("gradient predictiveness", "gp"), ("effective β", "beta"),
        (f"drift h^{size['depth'] // 2}", "drift"), (f"drift h^{size['depth']}", "drift_last"),
        ("weights moved", "moved"), ("status", "status")]))
    text = conclusion(entries, claims, size)
    rep.add("Conclusion", text)
    rep.add_claims(claims)
    rep.add("Against the usual story", disagreement(claims, size))
    rep.add_figures(paths)
    return {"entries": entries, "claims": claims, "conclusion": text, "table": result.table(),
            "sizes": size, "measure_steps": measure_steps(size), "groups": result.groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
