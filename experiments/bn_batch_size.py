"""BatchNorm and the batch size: accuracy from batch 2 to 512, and the noise of the batch statistics.

A ReLU MLP (He init, depth 4, width 64) is trained on MNIST-1D with batch sizes
2, 4, 8, 16, 32, 128 and 512, without normalisation, with BatchNorm and with
LayerNorm (which normalises each example on its own and so cannot depend on the
batch). Budget: the same number of examples for every batch size, 20 epochs of
the 4,000 training examples (the last partial batch of an epoch dropped), so a
batch of 2 takes 40,000 steps and a batch of 512 takes 140. Learning rate: the
linear scaling rule (Goyal et al. 2017; Wu & He 2018 compare BatchNorm and
GroupNorm across batch sizes the same way), lr = 0.025 x B / 32, SGD with
momentum 0.9 (``--lr-scaling constant`` keeps one lr). Test accuracy is
measured as a user gets it: BatchNorm with its running averages
(``train=False``), over 3 seeds; the training-mode batch accuracy is kept too.

For the BatchNorm networks trained with batch 32 it also measures the noise of
the batch statistics (``vgrad.batch_noise``), at initialisation and after
training: for the pre-BN activations of the input layer (a fixed function of
each example) and of the last block (computed on the batch, whose earlier BN
layers also use its statistics), the spread of the per-batch mean and variance
over 200 random batches of each size B around the population values (all 4,000
training examples as one batch), with the closed form for B i.i.d. draws beside
it: std(mean)/sigma = 1/sqrt(B) and, for BatchNorm's biased variance,
std(var)/sigma^2 = (B-1)/B sqrt((kappa - (B-3)/(B-1))/B) with the measured
kurtosis kappa.

    python -m experiments.bn_batch_size                 # ~4 min on 2 idle CPU cores (321 s and 549 s
                                                        # measured on a machine shared at load
                                                        # average 8-12; 220 s CPU)
    python -m experiments.bn_batch_size --quick         # ~15 s (tiny sizes: 512 examples, B = 2, 64)
    python -m experiments.bn_batch_size --lr-scaling constant   # the same learning rate for every B

Finding (default run): BatchNorm collapses at small batches — 14 % test
accuracy at batch 2, 36 % at 4, 50 % at 8, against 62-65 % at 16-32 — while
LayerNorm and the unnormalised network stay at 60-63 % from batch 2 to 128; at
batch 2 BN does not even learn in training mode (15 % batch accuracy against
76 % unnormalised), so it is more than the running-average mismatch. At batch
512 (140 steps) LayerNorm falls to 45 % and the unnormalised network to 53 %
(BN 57 %): the claim "LayerNorm does not depend on the batch size" holds from 2
to 128 only, an optimisation effect of few large steps. Batch noise: the input
layer's batch mean and variance scatter exactly as the i.i.d. closed form says
(measured/predicted 0.97-1.01, 1/sqrt(B)); in the last block, fed by layers BN
has already normalised with the same batch, the batch mean hardly moves (0.03-0.15
of 1/sqrt(B)) and only the variance keeps the 1/sqrt(B) law (0.7-1.1 of the
prediction). ``report.md`` has the numbers of a run.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import matplotlib
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from vgrad import ModelConfig, TrainConfig, batch_noise, data, plots, study, sweep
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_batch_size"
MNIST1D_TRAIN = 4000  # training examples of data.load("mnist1d")
# norm -> (label, colour key)
NORMS = {"none": ("no normalisation", "baseline"), "batch": ("BatchNorm", "batchnorm"),
         "layer": ("LayerNorm", "layernorm")}
LR_SCALINGS = ("linear", "constant")
NOISE_KEYS = ("mean_spread", "var_spread", "var_bias", "predicted_var_spread", "kurtosis")
# Claim thresholds, in accuracy points (fractions).
HURTS = 0.05       # BN's loss at the smallest batch against its best batch size
FLAT = 0.03        # a batch-independent network's range over batch sizes
# A spread "follows the i.i.d. law" when its log-log slope against B is within this of the
# prediction's (-0.5 for the mean; the kurtosis-corrected form's, about -0.4 to -0.45, for the variance).
NOISE_SLOPE_TOLERANCE = 0.1


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """BatchNorm, LayerNorm and no normalisation from batch size 2 to 512 on MNIST-1D."""

    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 128, 512)
    norms: tuple[str, ...] = ("none", "batch", "layer")
    """Normalisations to compare (each is one compiled program per batch size)."""
    epochs: int = 20
    """Epochs of every run: every batch size sees the same number of examples."""
    learning_rate: float = 0.025
    """Learning rate at --reference-batch-size (SGD, momentum 0.9)."""
    reference_batch_size: int = 32
    """The batch size of --learning-rate, and the one whose BN networks' batch noise is measured."""
    lr_scaling: str = "linear"
    """'linear': lr = learning_rate x B / reference (Goyal et al. 2017); 'constant': the same lr."""
    depth: int = 4
    width: int = 64
    noise_batches: int = 200
    """Random batches per batch size in the batch-statistics noise measurement."""

    def validate(self) -> None:
        super().validate()
        for name in ("epochs", "depth", "width", "noise_batches", "reference_batch_size"):
            value = getattr(self, name)
            low = 2 if name in ("noise_batches", "reference_batch_size") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 f"must be an integer >= {low}")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int)
                                       or not 2 <= b <= MNIST1D_TRAIN for b in self.batch_sizes):
            raise ValueError(f"invalid --batch-sizes={self.batch_sizes!r}: must be integers in "
                             f"[2, {MNIST1D_TRAIN}] (BatchNorm needs two examples; MNIST-1D has "
                             f"{MNIST1D_TRAIN} training examples)")
        unknown = [n for n in self.norms if n not in NORMS]
        if not self.norms or unknown or "batch" not in self.norms:
            raise ValueError(f"invalid --norms={self.norms!r}: allowed values are "
                             + ", ".join(NORMS) + " ('batch' is required: it is the study's subject)")
        if self.reference_batch_size not in self.batch_sizes:
            raise ValueError(f"invalid --reference-batch-size={self.reference_batch_size!r}: must "
                             f"be one of --batch-sizes {self.batch_sizes} (its BN networks' batch "
                             "noise is measured)")
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"invalid --lr-scaling={self.lr_scaling!r}: allowed values are "
                             + ", ".join(LR_SCALINGS))
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"invalid --learning-rate={self.learning_rate!r}: must be a finite "
                             "number > 0")


def sizes(args: Args) -> dict:
    if args.quick:
        # 512 training examples: a batch of 2 is 256 steps per epoch.
        return dict(batch_sizes=(2, 64), norms=("none", "batch"), epochs=2, depth=2, width=32,
                    reference_batch_size=64, noise_batches=40, train_examples=512,
                    seeds=args.num_seeds(3))
    return dict(batch_sizes=tuple(sorted(set(args.batch_sizes))),
                norms=tuple(n for n in NORMS if n in args.norms), epochs=args.epochs,
                depth=args.depth, width=args.width, reference_batch_size=args.reference_batch_size,
                noise_batches=args.noise_batches, train_examples=MNIST1D_TRAIN,
                seeds=args.num_seeds(3))


def learning_rate(args: Args, size: dict, batch_size: int) -> float:
    """The learning rate of a batch size under --lr-scaling."""
    if args.lr_scaling == "linear":
        return args.learning_rate * batch_size / size["reference_batch_size"]
    return args.learning_rate


def grid(args: Args, batch_size: int) -> list[sweep.Run]:
    """One labelled run per (norm, seed) at ``batch_size``; label "<norm> @ <batch size>"."""
    s = sizes(args)
    model = ModelConfig(depth=s["depth"], width=s["width"], activation="relu", init="he_normal")
    # eval_every=0: the test set is evaluated after every epoch (a curve in epochs for every B).
    train = TrainConfig(epochs=s["epochs"], batch_size=batch_size, momentum=0.9, eval_every=0,
                        learning_rate=learning_rate(args, s, batch_size))
    return sweep.variants({f"{norm} @ {batch_size}": {"model.norm": norm} for norm in s["norms"]},
                          model=model, train=train, seeds=s["seeds"])


def noise_layers(depth: int) -> dict[str, int]:
    """Layers whose pre-BN activations are measured: name -> index (0 = stem, l = block l)."""
    return {"input layer": 0, f"block {depth}": depth}


def noise_measure(x_train: np.ndarray, batch_sizes: tuple[int, ...], num_batches: int, depth: int):
    """``extra_measure`` for the sweep: batch-statistics noise of a BN network's pre-BN
    activations (nothing for the networks without batch statistics). Every entry is the
    mean over the layer's units, one value per measured batch size (K,)."""
    key = jax.random.key(0)  # the same batches for every run and step: differences are not sampling

    def extra(model, variables) -> dict:
        if not model.has_batch_stats:
            return {}
        layers = noise_layers(depth)
        # Both layers in one forward pass: units [i*width, (i+1)*width) are layer i's.
        r = batch_noise.batch_statistic_spread(
            x_train, batch_sizes, num_batches, key, fn_args=variables,
            batch_fn=batch_noise.PreNormLayers(model.cfg, tuple(layers.values())))
        width = model.cfg.width
        out = {}
        for i, name in enumerate(layers):
            for k in NOISE_KEYS:
                units = r[k][..., i * width:(i + 1) * width]
                v = np.nanmean(units, axis=-1)  # over units; kurtosis (C,) -> one number
                out[f"noise/{name}/{k}"] = np.broadcast_to(v, (len(batch_sizes),)).tolist()
        return out

    return extra


# ----------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------


def summarise(results: dict[int, sweep.SweepResult], size: dict) -> list[dict]:
    """One entry per (norm, batch size) with everything the figures and the report use."""
    entries = []
    for batch_size, result in results.items():
        per_epoch = size["train_examples"] // batch_size
        for label, runs in result.by_label().items():
            norm = label.rsplit(" @ ", 1)[0]
            steps, test_curve = result.curves(runs, "test_accuracy")
            # Batch accuracy in training mode (each batch normalised with its own statistics),
            # mean over the logged steps of the last quarter of training, per seed.
            train_steps, batch_acc = result.curves(runs, "accuracy")
            late = batch_acc[:, train_steps > 0.75 * train_steps[-1]]
            entries.append({
                "norm": norm, "label": NORMS[norm][0], "color_key": NORMS[norm][1],
                "batch_size": batch_size, "learning_rate": runs[0].train.learning_rate,
                "steps": per_epoch * size["epochs"], "seeds": [r.seed for r in runs],
                "status": [r.status for r in runs],
                "test_accuracy": result.final_stats(runs, "test_accuracy"),
                "train_accuracy": result.final_stats(runs, "train_accuracy"),
                "test_loss": result.final_stats(runs, "test_loss"),
                "train_mode_batch_accuracy": plots.nanmean(late, axis=1).tolist(),
                "test_accuracy_curve": {"epochs": (steps / per_epoch).tolist(),
                                        "values": test_curve.tolist()},
                "step_time_s": runs[0].step_time_s,
            })
    return entries


def noise_summary(result: sweep.SweepResult, size: dict) -> dict:
    """The batch-noise measurements of the BN networks at the reference batch size:
    {layer: {"init"|"trained": {key: (S, K) per seed}}} plus the measured batch sizes."""
    runs = [r for r in result.runs if r.model.norm == "batch"]
    out: dict = {"batch_sizes": list(size["batch_sizes"]),
                 "predicted_mean_spread": (1 / np.sqrt(size["batch_sizes"])).tolist(),
                 "trained_with_batch_size": size["reference_batch_size"],
                 "num_batches": size["noise_batches"], "layers": {}}
    for name in noise_layers(size["depth"]):
        layer = {}
        for when, pick in (("init", 0), ("trained", -1)):
            layer[when] = {k: [r.measurements[pick][f"noise/{name}/{k}"] for r in runs]
                           for k in NOISE_KEYS}
            layer[when]["step"] = runs[0].measurements[pick]["step"]
        out["layers"][name] = layer
    return out


def _acc(entries: list[dict], norm: str) -> dict[int, float]:
    """batch size -> mean test accuracy of ``norm``."""
    return {e["batch_size"]: e["test_accuracy"]["mean"] for e in entries if e["norm"] == norm}


def _log_slope(x, y) -> float:
    """Least-squares slope of log y against log x (finite points only)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(y) & (y > 0)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def noise_numbers(noise: dict) -> dict:
    """Per layer (trained network): log-log slope of std(batch mean) against B, and the
    measured / predicted ratios of the mean and variance spreads (min, max over B)."""
    b = np.asarray(noise["batch_sizes"], float)
    pred_mean = np.asarray(noise["predicted_mean_spread"])
    out = {}
    for name, layer in noise["layers"].items():
        t = layer["trained"]
        mean_spread = plots.nanmean(t["mean_spread"])
        var_spread = plots.nanmean(t["var_spread"])
        pred_var = plots.nanmean(t["predicted_var_spread"])
        out[name] = {
            "mean_slope": _log_slope(b, mean_spread),
            "var_slope": _log_slope(b, var_spread),
            "predicted_var_slope": _log_slope(b, pred_var),
            "mean_ratio": (mean_spread / pred_mean).tolist(),
            "var_ratio": (var_spread / pred_var).tolist(),
            "kurtosis": float(np.nanmean(t["kurtosis"])),
            "mean_spread": mean_spread.tolist(), "var_spread": var_spread.tolist(),
            "var_bias": plots.nanmean(t["var_bias"]).tolist(),
        }
    return out


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def claims(entries: list[dict], noise: dict, size: dict) -> list[dict]:
    """The study's claims, each with the measured sentence and a verdict from the numbers."""
    bn, ln, none = _acc(entries, "batch"), _acc(entries, "layer"), _acc(entries, "none")
    smallest = min(bn)
    best_b = max(bn, key=bn.get)
    drop = bn[best_b] - bn[smallest]
    ln_range = (max(ln.values()) - min(ln.values())) if ln else math.nan
    none_range = (max(none.values()) - min(none.values())) if none else math.nan
    ln_drop = (max(ln.values()) - ln[smallest]) if ln else math.nan
    compare = f"; LayerNorm loses {_pts(ln_drop)} points from its best" if ln else ""
    if drop > HURTS and (not ln or drop > ln_drop + FLAT):
        verdict = "holds"
    elif drop > FLAT:
        verdict = "holds partly"
    else:
        verdict = "does not hold here"
    out = [{
        "claim": "BN depends on the batch size (small batches hurt)",
        "measured": (f"BatchNorm's test accuracy (running averages) is {_pts(bn[smallest])} % at "
                     f"batch {smallest} against {_pts(bn[best_b])} % at batch {best_b}, a loss of "
                     f"{_pts(drop)} points{compare}."),
        "verdict": verdict, "figure": "figures/summary.png"}]
    if ln:
        bn_range = max(bn.values()) - min(bn.values())
        worst = min(ln, key=ln.get)
        if none:
            # The optimiser itself depends on the batch size (fewer, larger steps): LayerNorm's
            # own dependence is what it adds to the network without normalisation.
            excess = {n: max(a[b] - none[b] for b in a) - min(a[b] - none[b] for b in a)
                      for n, a in (("layer", ln), ("batch", bn))}
            verdict = ("holds" if ln_range <= none_range + FLAT else
                       "holds partly" if excess["layer"] < 0.5 * excess["batch"] else
                       "does not hold here")
            base = (f", the unnormalised network's {_pts(none_range)} points (the optimiser's own "
                    "dependence on the batch size); measured against the unnormalised network at "
                    f"each batch size, LayerNorm moves by {_pts(excess['layer'])} points, BatchNorm "
                    f"by {_pts(excess['batch'])}")
        else:
            verdict = ("holds" if ln_range <= FLAT else
                       "holds partly" if ln_range < 0.5 * bn_range else "does not hold here")
            base = ""
        below = [b for b in sorted(ln) if b < max(ln)]
        part = (f"; over batch sizes {below[0]}–{below[-1]} it spans "
                f"{_pts(min(ln[b] for b in below))}–{_pts(max(ln[b] for b in below))} %"
                if len(below) > 1 else "")
        out.append({
            "claim": "LayerNorm does not depend on the batch size",
            "measured": (f"LayerNorm's test accuracy spans {_pts(min(ln.values()))}–"
                         f"{_pts(max(ln.values()))} % over batch sizes {min(ln)}–{max(ln)} "
                         f"({_pts(ln_range)} points, lowest at batch {worst}{part}), BatchNorm's "
                         f"{_pts(bn_range)} points{base}."),
            "verdict": verdict, "figure": "figures/summary.png"})
    nums = noise_numbers(noise)
    slopes = {(name, stat): (n[f"{key}_slope"], -0.5 if key == "mean" else n["predicted_var_slope"])
              for name, n in nums.items() for stat, key in (("mean", "mean"), ("variance", "var"))}
    in_range = [abs(v - p) <= NOISE_SLOPE_TOLERANCE for v, p in slopes.values()]
    verdict = "holds" if all(in_range) else "holds partly" if any(in_range) else "does not hold here"
    ratio = lambda r: f"{min(r):.2f}–{max(r):.2f}"
    out.append({
        "claim": "batch statistics get noisier as batches shrink (≈1/√B)",
        "measured": (f"Pre-BN activations of the BN network trained at batch "
                     f"{noise['trained_with_batch_size']}, batches of {min(noise['batch_sizes'])}–"
                     f"{max(noise['batch_sizes'])}: log-log slope of the spread against B "
                     "(i.i.d. prediction in brackets) "
                     + "; ".join(f"{name} {stat} {v:.2f} ({p:.2f})"
                                 for (name, stat), (v, p) in slopes.items())
                     + "; measured / i.i.d. prediction "
                     + "; ".join(f"{name} mean {ratio(n['mean_ratio'])}, variance "
                                 f"{ratio(n['var_ratio'])}" for name, n in nums.items()) + "."),
        "verdict": verdict, "figure": "figures/summary.png"})
    return out


def conclusion(entries: list[dict], noise: dict, size: dict, args: Args) -> str:
    """A few sentences from the measured numbers (nothing assumed)."""
    bn, ln, none = _acc(entries, "batch"), _acc(entries, "layer"), _acc(entries, "none")
    smallest, largest = min(bn), max(bn)
    best_b = max(bn, key=bn.get)
    text = (f"With the same {size['epochs']} epochs for every batch size and "
            f"{'linearly scaled' if args.lr_scaling == 'linear' else 'the same'} learning rates, "
            f"BatchNorm reaches {_pts(bn[best_b])} % test accuracy at batch {best_b} but "
            f"{_pts(bn[smallest])} % at batch {smallest}")
    if ln:
        text += f", where LayerNorm reaches {_pts(ln[smallest])} %"
    if none:
        text += f" and the network without normalisation {_pts(none[smallest])} %"
    text += (f"; at batch {largest} BatchNorm has {_pts(bn[largest])} %"
             + (f" (LayerNorm {_pts(ln[largest])} %, none {_pts(none[largest])} %)" if ln and none
                else "") + ". ")
    # Which is better at each batch size: BN against the batch-independent networks.
    others = {n: a for n, a in (("LayerNorm", ln), ("no normalisation", none)) if a}
    if others:
        ahead = [b for b in sorted(bn) if all(bn[b] > a[b] for a in others.values())]
        text += ("BatchNorm is ahead of " + " and ".join(others) + " at batch sizes "
                 + (", ".join(map(str, ahead)) if ahead else "none") + ". ")
    # Does BN fail to learn at the smallest batch, or learn and lose it at evaluation?
    mode = {e["norm"]: float(np.mean(e["train_mode_batch_accuracy"])) for e in entries
            if e["batch_size"] == smallest}
    text += (f"On its own training batches (normalised with their statistics) the batch-{smallest} "
             f"BatchNorm network is right on {_pts(mode['batch'])} % of the examples in the last "
             "quarter of training"
             + (f" (no normalisation: {_pts(mode['none'])} %)" if "none" in mode else "")
             + (": it does not learn at all with batches this small, so the loss is not only the "
                "mismatch of the running averages at evaluation. "
                if mode["batch"] < bn[smallest] + 0.1 else
                ": it learns with batch statistics and loses it at evaluation with the running "
                "averages. "))
    nums = noise_numbers(noise)
    b = noise["batch_sizes"]
    parts = []
    for name, n in nums.items():
        parts.append(f"{name}: std(batch mean)/σ {n['mean_spread'][0]:.2f} at B={b[0]} → "
                     f"{n['mean_spread'][-1]:.3f} at B={b[-1]} (slope {n['mean_slope']:.2f}; "
                     f"1/√B gives {1 / math.sqrt(b[0]):.2f} → {1 / math.sqrt(b[-1]):.3f}), "
                     f"std(batch var)/σ² {n['var_spread'][0]:.2f} → {n['var_spread'][-1]:.3f} "
                     f"(kurtosis {n['kurtosis']:.1f})")
    text += ("Batch-statistics noise of the trained BN network (batch "
             f"{noise['trained_with_batch_size']}): " + "; ".join(parts) + ". ")
    deep = [name for name in nums if name != "input layer"]
    if deep:
        d, inp = nums[deep[-1]], nums["input layer"]
        ratio = lambda r: f"{min(r):.2f}–{max(r):.2f}"
        mean_off = any(abs(r - 1) > 0.2 for r in d["mean_ratio"])
        var_off = any(abs(r - 1) > 0.2 for r in d["var_ratio"])
        text += (f"The input layer's statistics follow the i.i.d. closed form (measured/predicted "
                 f"{ratio(inp['mean_ratio'])} for the mean, {ratio(inp['var_ratio'])} for the "
                 f"variance). {deep[-1].capitalize()}, whose inputs come from layers that BN has already "
                 "normalised with the same batch's statistics, "
                 + (f"does not: its batch mean barely moves ({ratio(d['mean_ratio'])} of 1/√B"
                    + ("; at B=2 every unit below is normalised to exactly ±1, so the batch "
                       "mean of its ReLU output is fixed" if b[0] == 2 else "") + ")" if mean_off
                    else f"follows it for the mean ({ratio(d['mean_ratio'])})")
                 + (f"; its batch variance scatters {ratio(d['var_ratio'])} times the prediction"
                    + (" (the ≈1/√B shape, a smaller prefactor)" if var_off else "")
                    ) + ". ")
    bias = nums["input layer"]["var_bias"][0]
    text += (f"BatchNorm's biased batch variance averages (B−1)/B of the population's "
             f"(measured {bias:.2f} at B={b[0]}), and so does its running average: at evaluation the "
             f"normalised activations of a network trained with batch {b[0]} have variance ≈ "
             f"{1 / bias:.1f} where training normalised every batch to variance 1." if bias < 0.9
             else "")
    return text.strip()


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _batch_axis(ax, batch_sizes) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size B")


def _accuracy_panel(ax, entries: list[dict], size: dict) -> None:
    for norm in size["norms"]:
        es = sorted([e for e in entries if e["norm"] == norm], key=lambda e: e["batch_size"])
        x = [e["batch_size"] for e in es]
        ys = np.asarray([e["test_accuracy"]["values"] for e in es], float).T  # (S, K)
        plots.band(ax, x, 100 * ys, label=NORMS[norm][0], color=plots.color(NORMS[norm][1]),
                   marker="o")
    _batch_axis(ax, size["batch_sizes"])
    ax.set_ylabel("test accuracy % (BN: running averages)")
    ax.legend(fontsize="small")


LAYER_COLORS = ("#2ca02c", "#8c564b")  # input layer, deep block


def _log_y(ax) -> None:
    """Log y axis labelled at 1, 2, 5 x 10^k (a panel spanning one decade still has labels)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _noise_panel(ax, noise: dict, key: str, when: str = "trained") -> None:
    """std(batch mean)/sigma (key "mean_spread") or std(batch var)/sigma^2 ("var_spread")
    against B for every measured layer, with the i.i.d. prediction."""
    b = np.asarray(noise["batch_sizes"], float)
    if key == "mean_spread":
        ax.plot(b, noise["predicted_mean_spread"], color="0.6", ls="-", lw=4, alpha=0.6,
                zorder=0, label=r"i.i.d.: $1/\sqrt{B}$")
    for color, (name, layer) in zip(LAYER_COLORS, noise["layers"].items()):
        t = layer[when]
        ax.plot(b, plots.nanmean(t[key]), marker="o", color=color, label=name, ms=5)
        if key == "var_spread":
            ax.plot(b, plots.nanmean(t["predicted_var_spread"]), color=color, ls=":", lw=1.5,
                    label=f"i.i.d., kurtosis {np.nanmean(t['kurtosis']):.1f}")
    _log_y(ax)
    _batch_axis(ax, noise["batch_sizes"])
    ax.legend(fontsize="x-small", loc="lower left")


def figure_summary(entries: list[dict], noise: dict, size: dict, args: Args):
    fig, axes = plots.figure(3, 1, width=4.3, height=3.8)
    _accuracy_panel(axes[0, 0], entries, size)
    policy = (f"lr = {args.learning_rate:g}·B/{size['reference_batch_size']}"
              if args.lr_scaling == "linear" else f"lr = {args.learning_rate:g}")
    axes[0, 0].set_title(f"Test accuracy, {size['epochs']} epochs, {policy}", fontsize="medium")
    _noise_panel(axes[0, 1], noise, "mean_spread")
    axes[0, 1].set(ylabel="std(batch mean) / σ")
    axes[0, 1].set_title("Noise of the batch mean", fontsize="medium")
    _noise_panel(axes[0, 2], noise, "var_spread")
    axes[0, 2].set(ylabel="std(batch variance) / σ²")
    axes[0, 2].set_title("Noise of the batch variance", fontsize="medium")
    fig.suptitle(f"Left: MNIST-1D, mean and range over {size['seeds']} seed(s). Middle, right: "
                 "pre-BN activations of the BN network trained at batch "
                 f"{noise['trained_with_batch_size']}, {noise['num_batches']} random batches per B",
                 fontsize="small")
    return fig


def figure_curves(entries: list[dict], size: dict):
    """Test accuracy over epochs, one panel per normalisation, one line per batch size."""
    fig, axes = plots.figure(len(size["norms"]), 1, width=4.2, height=3.4, sharey=True)
    cmap = matplotlib.colormaps["viridis"]
    bs = size["batch_sizes"]
    for ax, norm in zip(axes[0], size["norms"]):
        for i, b in enumerate(bs):
            (e,) = [e for e in entries if e["norm"] == norm and e["batch_size"] == b]
            c = e["test_accuracy_curve"]
            plots.band(ax, c["epochs"], 100 * np.asarray(c["values"], float), label=f"B = {b}",
                       color=cmap(0.9 * i / max(1, len(bs) - 1)))
        ax.set(title=NORMS[norm][0], xlabel="epoch")
    axes[0, 0].set_ylabel("test accuracy %")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return fig


def figure_noise(noise: dict):
    """Spread of the batch mean and variance, and the mean batch variance, at init and trained."""
    fig, axes = plots.figure(3, len(noise["layers"]), width=3.9, height=3.2)
    b = np.asarray(noise["batch_sizes"], float)
    for row, (name, layer) in enumerate(noise["layers"].items()):
        for when, mfc in (("init", "white"), ("trained", None)):
            t = layer[when]
            kw = dict(marker="o", mfc=mfc, ms=5, label=f"{when} (step {t['step']})",
                      color=plots.color("batchnorm") if when == "trained" else "0.45")
            axes[row, 0].plot(b, plots.nanmean(t["mean_spread"]), **kw)
            axes[row, 1].plot(b, plots.nanmean(t["var_spread"]), **kw)
            axes[row, 1].plot(b, plots.nanmean(t["predicted_var_spread"]), ls=":", lw=1.2,
                              color=kw["color"], label=f"prediction, {when}")
            axes[row, 2].plot(b, plots.nanmean(t["var_bias"]), **kw)
        axes[row, 0].plot(b, noise["predicted_mean_spread"], color="k", ls="--", lw=1,
                          label=r"$1/\sqrt{B}$")
        axes[row, 2].plot(b, (b - 1) / b, color="k", ls="--", lw=1, label="(B−1)/B")
        for col, (title, log) in enumerate((("std(batch mean) / σ", True),
                                            ("std(batch var) / σ²", True),
                                            ("mean(batch var) / σ²", False))):
            ax = axes[row, col]
            if log:
                _log_y(ax)
            _batch_axis(ax, noise["batch_sizes"])
            ax.set_title(f"{name}: {title}", fontsize="small")
            ax.legend(fontsize="x-small")
    fig.suptitle("Pre-BN activations: batch statistics over random batches against the "
                 "population (all training examples)", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def table_rows(entries: list[dict], size: dict) -> list[dict]:
    rows = []
    for b in size["batch_sizes"]:
        row = {"B": b}
        for e in [e for e in entries if e["batch_size"] == b]:
            row["lr"] = f"{e['learning_rate']:.4g}"
            row["steps"] = e["steps"]
            acc = e["test_accuracy"]
            row[e["norm"]] = f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}"
            if e["norm"] == "batch":
                row["bn_train"] = f"{100 * e['train_accuracy']['mean']:.1f}"
                row["bn_batch"] = f"{100 * np.mean(e['train_mode_batch_accuracy']):.1f}"
            if any(s != "completed" for s in e["status"]):
                row[e["norm"]] += f" ({sum(s == 'diverged' for s in e['status'])} diverged)"
        rows.append(row)
    return rows


def noise_rows(noise: dict) -> list[dict]:
    nums = noise_numbers(noise)
    rows = []
    for i, b in enumerate(noise["batch_sizes"]):
        row = {"B": b, "pred": f"{noise['predicted_mean_spread'][i]:.3f}"}
        for j, (name, n) in enumerate(nums.items()):
            row[f"m{j}"] = f"{n['mean_spread'][i]:.3f}"
            row[f"v{j}"] = f"{n['var_spread'][i]:.3f} ({n['var_ratio'][i]:.2f})"
            row[f"b{j}"] = f"{n['var_bias'][i]:.2f}"
        rows.append(row)
    return rows


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d")
    if size["train_examples"] < dataset.num_train:
        dataset = dataclasses.replace(dataset, x_train=dataset.x_train[:size["train_examples"]],
                                      y_train=dataset.y_train[:size["train_examples"]])
    results: dict[int, sweep.SweepResult] = {}
    for b in size["batch_sizes"]:
        runs = grid(args, b)
        total_steps = runs[0].train.epochs * (dataset.num_train // b)
        log_every = max(1, total_steps // 200)  # a batch of 2 takes thousands of steps
        if b != size["reference_batch_size"]:
            results[b] = s.sweep(runs, dataset, name=f"sweep_b{b}", log_every=log_every)
            continue
        # The BN runs of the reference batch size carry the noise measurement (a sweep of
        # their own, so the other networks are not measured).
        bn = [r for r in runs if r.model.norm == "batch"]
        parts = [s.sweep(bn, dataset, name=f"sweep_b{b}_bn", log_every=log_every,
                         measure_at=[0, total_steps], jacobians=False, gradient_flow=False,
                         extra_measure=noise_measure(dataset.x_train, size["batch_sizes"],
                                                     size["noise_batches"], size["depth"]))]
        noise = noise_summary(parts[0], size)
        others = [r for r in runs if r.model.norm != "batch"]
        if others:
            parts.append(s.sweep(others, dataset, name=f"sweep_b{b}", log_every=log_every))
        results[b] = sweep.SweepResult([r for p in parts for r in p.runs],
                                       [g for p in parts for g in p.groups],
                                       sum(p.wall_time_s for p in parts))
    entries = summarise(results, size)
    claim_list = claims(entries, noise, size)
    text = conclusion(entries, noise, size, args)
    figures = {"summary": figure_summary(entries, noise, size, args),
               "curves": figure_curves(entries, size), "noise": figure_noise(noise)}
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "BatchNorm and the batch size"
    policy = (f"linear scaling, lr = {args.learning_rate:g} × B / {size['reference_batch_size']}"
              if args.lr_scaling == "linear" else f"the same lr = {args.learning_rate:g} for every B")
    rep.add("Setup", f"""
- Network: ReLU MLP, He init, depth {size['depth']}, width {size['width']}; Dense → [norm] → ReLU
  blocks with norm = {', '.join(NORMS[n][0] for n in size['norms'])}.
- Data: MNIST-1D ({dataset.num_train} train / {dataset.num_test} test), standardised.
- Budget: the same number of examples for every batch size, {size['epochs']} epochs (the last
  partial batch of an epoch dropped): from {min(e['steps'] for e in entries)} steps (batch
  {max(size['batch_sizes'])}) to {max(e['steps'] for e in entries)} steps (batch
  {min(size['batch_sizes'])}). SGD, momentum 0.9, constant learning rate, {policy}.
  {size['seeds']} seed(s) per norm and batch size; every batch size is its own compiled program.
- Test accuracy after training, BatchNorm with its running averages (momentum
  {ModelConfig().bn_momentum}), as a user evaluates it; the test set after every epoch.
- Batch-statistics noise (``vgrad.batch_noise``): the BN networks trained at batch
  {size['reference_batch_size']}, at initialisation and after training; pre-BN activations of the
  input layer and of block {size['depth']} (computed on each batch, BN in training mode);
  {size['noise_batches']} random batches (rows drawn with replacement) of each size; population
  values from all {dataset.num_train} training examples as one batch; unit means over the
  {size['width']} units.""")
    rep.add("Summary", markdown_table(table_rows(entries, size), [
        ("batch size", "B"), ("lr", "lr"), ("steps", "steps"),
        *[(f"{NORMS[n][0]} test %", n) for n in size["norms"]],
        ("BatchNorm train %", "bn_train"), ("BatchNorm batch accuracy in training %", "bn_batch")])
        + "\n\nTest and train accuracy on the whole sets, BatchNorm with running averages (mean ± "
          "std over seeds); \"batch accuracy in training\": on the training batches themselves, "
          "normalised with their own statistics, last quarter of training."
        + "\n\nBatch-statistics noise of the trained BN network (unit means; in brackets "
          "measured / kurtosis-corrected prediction):\n\n"
        + markdown_table(noise_rows(noise), [
            ("B", "B"), ("1/√B", "pred"),
            *[(f"{name}: std(mean)/σ", f"m{j}") for j, name in enumerate(noise["layers"])],
            *[(f"{name}: std(var)/σ²", f"v{j}") for j, name in enumerate(noise["layers"])],
            *[(f"{name}: mean(var)/σ²", f"b{j}") for j, name in enumerate(noise["layers"])]]))
    rep.add("Conclusion", text)
    rep.add_claims(claim_list)
    rep.add_figures(paths)
    table = [row for r in results.values() for row in r.table()]
    groups = [g for r in results.values() for g in r.groups]
    return {"entries": entries, "noise": noise, "noise_numbers": noise_numbers(noise),
            "claims": claim_list, "conclusion": text, "table": table, "sizes": size,
            "groups": groups}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
