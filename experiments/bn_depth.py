"""BatchNorm at initialisation: does it cure vanishing gradients, or make them explode?

Gradient products and gradient norms of MLPs at initialisation (no training),
with BatchNorm in training mode (batch statistics, as in a training step):

* Depth scan: width 128, depths 10, 50 and 200, activations ReLU (He init),
  tanh and sigmoid (Xavier), each without BN, with BN (Dense -> BN -> act) and
  with BN in pre-activation residual blocks (h + F(h), alpha = 1; ``--forms``
  adds alpha = 1/sqrt(L) and the residual network without BN). Per layer:
  ||P_l||_F^2/n (P_l = dh^L/dh^l over the whole batch map, n = B x width,
  ``vgrad.analysis.jacobian_products``, 4 probes) and the weight-gradient
  norms ||dL/dW_l|| of the cross-entropy (``vgrad.analysis.gradient_flow``),
  on the first 16 MNIST-1D training inputs, 3 seeds.
* Growth factor against Yang et al. (2019, "A mean field theory of batch
  normalization"): plain ReLU + BN networks of depth 50 at widths 128, 256 and
  512 and batch sizes 16, 64, 256 and 1024. The factor compared is the per-layer
  growth of the squared gradient norm, lambda = ||dL/dh^{l-1}||^2 /
  ||dL/dh^l||^2, fitted as 10^(-slope) of log10 ||dL/dh^l||^2 against l over
  the middle layers (l from 0.1 L to 0.8 L); the same fit of ||P_l||^2/n and of
  ||dL/dW_l||^2 gives the same factor to within noise. References: 1.59 at
  B = 16 (Yang et al., as quoted in issue #11) and pi/(pi-1) ~ 1.467 at large B
  (issue #11; also the one-layer estimate E[phi'(z)^2] / Var[phi(z)], z ~ N(0, 1),
  of a BN layer at an isotropic batch: ReLU pi/(pi-1), tanh 1.18, sigmoid 1.03).

    python -m experiments.bn_depth           # ~4-5 min on 2 CPU cores (319 s measured, shared, load 4-7)
    python -m experiments.bn_depth --quick   # seconds (tiny sizes)
    python -m experiments.bn_depth --figure docs/figures/bn_depth.png

Finding (default run, 3 seeds): at initialisation BN does not cure vanishing
gradients, it replaces them by an explosion. With BN ||P_0||^2/n at depth 200
is 10^40.2 (ReLU), 10^19.9 (tanh) and 10^8.4 (sigmoid), a per-layer growth of
1.60, 1.27 and 1.12 at batch 16, where the same networks without BN give
10^-0.7 (ReLU + He, healthy), 10^-2.2 (tanh) and 10^-251 (sigmoid). The ReLU +
BN factor is 1.591 +- 0.005 at B = 16 (width 512), Yang et al.'s 1.59 to 0.1 %,
and falls with the batch size to 1.487 (B = 64), 1.446 (256) and 1.423 (1024),
the same at widths 128-1024 and at depth 120 (extra runs: ``--growth-widths
1024 --growth-batch-sizes 1024 --seeds 1``: 1.425; ``--growth-depth 120``:
1.418): below pi/(pi-1) = 1.467 by 3 % at
B = 1024 and still falling, so the measured large-batch factor does not level
off at pi/(pi-1). BN + residual blocks (alpha = 1) grow only polynomially,
||P_0||^2/n = 10^1.9, 10^3.5, 10^5.0 at depths 10, 50, 200 for ReLU (about
L^2.3; tanh L^1.5, sigmoid L^0.9, within 10^1.3): not bounded for ReLU and
tanh, but 35 decades below plain BN at depth 200. ``report.md`` has the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from matplotlib.lines import Line2D

from vgrad import ModelConfig, TrainConfig, data, models, plots, study, sweep
from vgrad.analysis import gradient_flow, jacobian_products, theory
from vgrad.study import StudyArgs, markdown_table

NAME = "bn_depth"
# The init of each activation (the no-BN networks' standard choice; BN networks are
# invariant to the scale of every weight matrix followed by BN).
INITS = {"relu": "he_normal", "tanh": "glorot_normal", "sigmoid": "glorot_normal",
         "linear": "glorot_normal"}
BN = {"model.norm": "batch"}
RES = {"model.residual": True}
# label -> (colour key, line style, ModelConfig overrides)
FORMS = {
    "no BN": ("baseline", "-", {}),
    "BN": ("batchnorm", "-", BN),
    "BN + residual α=1": ("bn_residual", "-", {**BN, **RES, "model.residual_scale": 1.0}),
    "BN + residual α=1/√L": ("bn_residual", "--", {**BN, **RES,
                                                    "model.residual_scale": "inv_sqrt_depth"}),
    "residual α=1/√L": ("residual", "--", {**RES, "model.residual_scale": "inv_sqrt_depth"}),
}
DEFAULT_FORMS = ("no BN", "BN", "BN + residual α=1")
YANG_B16 = 1.59  # ReLU + BN, batch 16: Yang et al. 2019 as quoted in issue #11
YANG_LARGE_B = math.pi / (math.pi - 1)  # ReLU + BN, B -> infinity (issue #11)
MATCH = 0.02  # a measured factor "matches" a reference within this relative difference
GRAD_DECADES = 2.0  # ||P_0||^2/n beyond 10^+-this: exploding / vanishing
PROBE_SEED = 0
FIT_WINDOW = (0.1, 0.8)  # fit the growth over layers l in [0.1 L, 0.8 L]


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Gradient products of MLPs with and without BatchNorm at initialisation, depth 10 to 200."""

    depths: tuple[int, ...] = (10, 50, 200)
    activations: tuple[str, ...] = ("relu", "tanh", "sigmoid")
    forms: tuple[str, ...] = DEFAULT_FORMS
    width: int = 128
    """Width of the depth scan."""
    batch_size: int = 16
    """Measurement batch of the depth scan (BN uses its statistics)."""
    num_probes: int = 4
    """Random probes of the Jacobian-product estimator."""
    growth_depth: int = 50
    growth_widths: tuple[int, ...] = (128, 256, 512)
    growth_batch_sizes: tuple[int, ...] = (16, 64, 256, 1024)

    def validate(self) -> None:
        super().validate()
        ints = {"depths": self.depths, "growth_widths": self.growth_widths,
                "growth_batch_sizes": self.growth_batch_sizes}
        for name, values in ints.items():
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"invalid --{name.replace('_', '-')}={values!r}: "
                                 "must be integers >= 1")
        if any(d < 4 for d in (*self.depths, self.growth_depth)):
            raise ValueError(f"invalid --depths={self.depths!r} / --growth-depth={self.growth_depth!r}: "
                             "must be >= 4 (the growth is fitted over the middle layers)")
        unknown = [a for a in self.activations if a not in INITS]
        if not self.activations or unknown:
            raise ValueError(f"invalid --activations={self.activations!r}: allowed values are "
                             + ", ".join(INITS))
        unknown = [f for f in self.forms if f not in FORMS]
        if not self.forms or unknown:
            raise ValueError(f"invalid --forms={self.forms!r}: allowed forms are "
                             + ", ".join(repr(f) for f in FORMS))
        for name in ("width", "batch_size", "num_probes", "growth_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')}={value!r}: "
                                 "must be an integer >= 1")
        if min((self.batch_size, *self.growth_batch_sizes)) < 4:
            raise ValueError(f"invalid --batch-size={self.batch_size!r} / --growth-batch-sizes="
                             f"{self.growth_batch_sizes!r}: BatchNorm needs batches of at least 4")


def sizes(args: Args) -> dict:
    if args.quick:
        return dict(depths=(12,), activations=("relu",), forms=DEFAULT_FORMS, width=32,
                    batch_size=16, num_probes=4, growth_depth=12, growth_widths=(32,),
                    growth_batch_sizes=(16, 64), seeds=args.num_seeds(2))
    return dict(depths=tuple(sorted(set(args.depths))),
                activations=tuple(a for a in INITS if a in args.activations),
                forms=tuple(f for f in FORMS if f in args.forms), width=args.width,
                batch_size=args.batch_size, num_probes=args.num_probes,
                growth_depth=args.growth_depth, growth_widths=tuple(sorted(set(args.growth_widths))),
                growth_batch_sizes=tuple(sorted(set(args.growth_batch_sizes))),
                seeds=args.num_seeds(3))


def _base(activation: str, depth: int, width: int) -> tuple[ModelConfig, TrainConfig]:
    return (ModelConfig(depth=depth, width=width, activation=activation, init=INITS[activation]),
            TrainConfig(steps=1))  # nothing is trained: the runs only carry configs and seeds


def grid(args: Args) -> list[sweep.Run]:
    """The depth scan: one labelled run per (form, activation, depth, seed),
    label "<form> | <activation> @ <depth>"."""
    s = sizes(args)
    runs = []
    for act in s["activations"]:
        for depth in s["depths"]:
            model, train = _base(act, depth, s["width"])
            runs += sweep.variants({f"{form} | {act} @ {depth}": FORMS[form][2] for form in s["forms"]},
                                   model=model, train=train, seeds=s["seeds"])
    return runs


def growth_grid(args: Args) -> list[tuple[sweep.Run, int]]:
    """The growth-factor measurements: (run, batch size) per width, batch size and seed of
    plain ReLU + BN at --growth-depth; label "BN | relu @ <depth>, width <w>"."""
    s = sizes(args)
    out = []
    for width in s["growth_widths"]:
        model, train = _base("relu", s["growth_depth"], width)
        runs = sweep.variants({f"BN | relu @ {s['growth_depth']}, width {width}": BN},
                              model=model, train=train, seeds=s["seeds"])
        out += [(r, b) for b in s["growth_batch_sizes"] for r in runs]
    return out


# ----------------------------------------------------------------------------
# measurement and numbers
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _init_fn(cfg: ModelConfig):
    """Jitted (keys (S,), x) -> variables stacked over S seeds (as the sweep draws them:
    ``model.init(jax.random.key(seed), x)``)."""
    return jax.jit(jax.vmap(models.build(cfg).init, in_axes=(0, None)))


def measure(cfg: ModelConfig, seeds: list[int], x: np.ndarray, y: np.ndarray, *,
            num_probes: int, products: bool = True) -> list[dict]:
    """Per seed, at initialisation, BatchNorm with the statistics of the batch x (B, D):
    log10 ||P_l||^2/n (L+1,) when ``products``, and log10 of ||dL/dh^l|| (L+1,) and
    ||dL/dW_l|| (L,) of the mean cross-entropy on (x, y). Norms outside the float32
    range (overflow to inf, underflow to 0) are NaN."""
    model = models.build(cfg)
    variables = _init_fn(cfg)(jnp.stack([jax.random.key(s) for s in seeds]), jnp.asarray(x))
    out = []
    for i, seed in enumerate(seeds):
        v = jax.tree_util.tree_map(lambda a: a[i], variables)
        flow = gradient_flow(model, v, {"x": x, "y": y}, train=True)
        m = {"seed": seed, "batch_size": int(x.shape[0]), "loss": float(flow.loss),
             "log10_hidden_grad_norms": _finite_log10(flow.hidden_grad_norms),
             "log10_weight_grad_norms": _finite_log10(flow.weight_grad_norms)}
        if products:
            jac = jacobian_products(model, v, x, train=True, key=jax.random.key(PROBE_SEED),
                                    num_probes=num_probes)
            m["log10_product_sq_norms"] = (jac.log_product_sq_norms / math.log(10)).tolist()
        out.append(m)
    return out


def _finite_log10(values) -> list[float]:
    v = plots.log10(values)
    return np.where(np.isfinite(v), v, np.nan).tolist()


def fit_window(depth: int) -> tuple[int, int]:
    """Layers [lo, hi] over which the per-layer growth is fitted: away from the input
    (the forward pass settles) and from the output (the loss gradient's own direction)."""
    lo, hi = math.ceil(FIT_WINDOW[0] * depth), math.floor(FIT_WINDOW[1] * depth)
    return lo, max(hi, lo + 2)


def growth_factor(log10_sq, layers, window: tuple[int, int]) -> float:
    """Per-layer backward growth of a squared norm: 10^(-slope) of the least-squares line
    of ``log10_sq`` (K,) against ``layers`` (K,) over layers in ``window`` (inclusive);
    > 1 means it grows towards the input. NaN with fewer than 3 finite points."""
    v, l = np.asarray(log10_sq, float), np.asarray(layers, float)
    keep = (l >= window[0]) & (l <= window[1]) & np.isfinite(v)
    if keep.sum() < 3:
        return math.nan
    return float(10.0 ** (-np.polyfit(l[keep], v[keep], 1)[0]))


def growth_factors(m: dict, depth: int) -> dict:
    """The three growth factors of one measurement: of ||dL/dh^l||^2 ("hidden", l = 0..L),
    ||dL/dW_l||^2 ("weight", l = 1..L) and ||P_l||^2/n ("product", l = 0..L, if measured)."""
    w = fit_window(depth)
    out = {"hidden": growth_factor(2 * np.asarray(m["log10_hidden_grad_norms"]), np.arange(depth + 1), w),
           "weight": growth_factor(2 * np.asarray(m["log10_weight_grad_norms"]),
                                   np.arange(1, depth + 1), w)}
    if "log10_product_sq_norms" in m:
        out["product"] = growth_factor(m["log10_product_sq_norms"], np.arange(depth + 1), w)
    return out


def summarise_scan(runs: list[sweep.Run], measured: list[dict], size: dict) -> list[dict]:
    """One entry per (form, activation, depth): per-layer curves (mean over seeds of the
    log10 values; NaN where a seed overflowed) and growth factors per seed."""
    by: dict[str, list[tuple[sweep.Run, dict]]] = {}
    for r, m in zip(runs, measured):
        by.setdefault(r.label, []).append((r, m))
    entries = []
    for label, pairs in by.items():
        form, rest = label.split(" | ")
        act, depth = rest.split(" @ ")
        depth = int(depth)
        ms = [m for _, m in pairs]
        products = np.asarray([m["log10_product_sq_norms"] for m in ms], float)  # (S, L+1)
        weights = np.asarray([m["log10_weight_grad_norms"] for m in ms], float)  # (S, L)
        hidden = np.asarray([m["log10_hidden_grad_norms"] for m in ms], float)  # (S, L+1)
        factors = [growth_factors(m, depth) for m in ms]
        entries.append({
            "form": form, "activation": act, "depth": depth, "width": size["width"],
            "batch_size": size["batch_size"], "seeds": [m["seed"] for m in ms],
            "color_key": FORMS[form][0], "linestyle": FORMS[form][1],
            "log10_P0": products[:, 0].tolist(),
            "log10_products": plots.nanmean(products).tolist(),
            "log10_weight_grad_norms": _mean_keep_nan(weights).tolist(),
            "log10_hidden_grad_norms": _mean_keep_nan(hidden).tolist(),
            "log10_weight_grad_ratio": (weights[:, 0] - weights[:, -1]).tolist(),
            "weight_grad_overflow": bool(not np.isfinite(weights).all()),
            "growth": {k: [f.get(k, math.nan) for f in factors] for k in ("product", "hidden", "weight")},
            "loss": [m["loss"] for m in ms],
        })
    return entries


def _mean_keep_nan(values) -> np.ndarray:
    """Mean over seeds; NaN where any seed is NaN (an overflowed seed is not averaged away)."""
    return np.asarray(values, float).mean(0)


def summarise_growth(pairs: list[tuple[sweep.Run, int]], measured: list[dict], size: dict) -> list[dict]:
    """One entry per (width, batch size) of the ReLU + BN growth measurements."""
    by: dict[tuple[int, int], list[dict]] = {}
    for (r, b), m in zip(pairs, measured):
        by.setdefault((r.model.width, b), []).append(m)
    depth = size["growth_depth"]
    out = []
    for (width, b), ms in sorted(by.items()):
        factors = [growth_factors(m, depth) for m in ms]
        hidden = np.asarray([f["hidden"] for f in factors], float)
        out.append({"width": width, "batch_size": b, "depth": depth,
                    "seeds": [m["seed"] for m in ms],
                    "hidden": hidden.tolist(), "weight": [f["weight"] for f in factors],
                    "hidden_mean": float(np.nanmean(hidden)) if np.isfinite(hidden).any() else math.nan,
                    "hidden_std": float(np.nanstd(hidden)) if np.isfinite(hidden).any() else math.nan,
                    "fit_window": list(fit_window(depth))})
    return out


# ----------------------------------------------------------------------------
# claims and conclusion
# ----------------------------------------------------------------------------


def _p0(e: dict) -> float:
    v = np.asarray(e["log10_P0"], float)
    return float(v.mean()) if np.isfinite(v).all() else math.nan


def _entry(entries, form, act, depth):
    return next((e for e in entries if (e["form"], e["activation"], e["depth"]) == (form, act, depth)),
                None)


def _gm(values) -> float:
    """Geometric mean of the finite positive values (growth factors multiply)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.exp(np.mean(np.log(v)))) if v.size else math.nan


def _verdict_word(log10_p0: float) -> str:
    if not np.isfinite(log10_p0):
        return "overflow"
    return ("explodes" if log10_p0 > GRAD_DECADES else "vanishes" if log10_p0 < -GRAD_DECADES
            else "healthy")


def claim_cures_vanishing(entries: list[dict], size: dict) -> dict:
    """At the deepest depth: BN's ||P_0||^2/n per activation, next to no BN's."""
    deep = max(size["depths"])
    parts, healthy, cured = [], 0, 0
    acts = [a for a in size["activations"] if _entry(entries, "BN", a, deep)]
    for act in acts:
        bn = _entry(entries, "BN", act, deep)
        none = _entry(entries, "no BN", act, deep)
        p_bn = _p0(bn)
        healthy += _verdict_word(p_bn) == "healthy"
        part = f"{act}: BN 10^{p_bn:.1f} ({_verdict_word(p_bn)})"
        if none is not None:
            p_none = _p0(none)
            part += f", no BN 10^{p_none:.1f} ({_verdict_word(p_none)})"
            cured += _verdict_word(p_none) == "vanishes" and _verdict_word(p_bn) == "healthy"
        parts.append(part)
    verdict = ("holds" if acts and healthy == len(acts) else
               "holds partly" if healthy or cured else "does not hold here")
    return {"claim": "BN cures vanishing gradients in deep nets",
            "measured": f"‖P_0‖²/n at initialisation, depth {deep}, width {size['width']}, batch "
                        f"{size['batch_size']} ('healthy' = within 10^±{GRAD_DECADES:g}): "
                        + "; ".join(parts) + ".",
            "verdict": verdict, "figure": "figures/summary.png"}


def claim_yang(growth: list[dict], entries: list[dict], size: dict) -> dict:
    """ReLU + BN growth factor at the widest width: at B = 16 against 1.59, at the largest
    batch against pi/(pi-1)."""
    widest = max(g["width"] for g in growth)
    at = {g["batch_size"]: g for g in growth if g["width"] == widest}
    parts, matches, compared = [], 0, 0
    bs = sorted(at)
    # Below the B -> infinity value by more than 2 std and still falling with B: the
    # large-batch factor does not tend to pi/(pi-1) here, however close it is.
    falling_below = (len(bs) >= 2 and at[bs[-1]]["hidden_mean"] + 2 * at[bs[-1]]["hidden_std"]
                     < YANG_LARGE_B and at[bs[-1]]["hidden_mean"] < at[bs[-2]]["hidden_mean"])
    for b, ref, name in ((16, YANG_B16, "Yang et al. at B = 16"),
                         (bs[-1], YANG_LARGE_B, "π/(π−1), B → ∞")):
        if b not in at or (name.startswith("π") and b < 128):
            continue
        g = at[b]
        rel = g["hidden_mean"] / ref - 1
        compared += 1
        matches += abs(rel) <= MATCH and not (name.startswith("π") and falling_below)
        parts.append(f"B = {b}: {g['hidden_mean']:.3f} ± {g['hidden_std']:.3f} against {ref:.3f} "
                     f"({name}; {100 * rel:+.1f} %)")
    trend = ", ".join(f"B {b}: {at[b]['hidden_mean']:.3f}" for b in bs)
    if falling_below:
        trend += (f"; the largest batch's factor is more than 2 std below π/(π−1) and still falls "
                  f"from B = {bs[-2]} to {bs[-1]}: the measured factor does not level off at π/(π−1)")
    verdict = ("holds" if compared and matches == compared else
               "holds partly" if matches else "does not hold here")
    if not compared:
        parts.append("no batch size comparable with the references was measured")
    return {"claim": "the gradient explosion of a plain ReLU + BN network matches Yang et al.'s "
                     "factor (1.59 per layer at batch 16, π/(π−1) ≈ 1.467 at large batch)",
            "measured": f"Per-layer growth of ‖∂L/∂h^l‖², depth {size['growth_depth']}, width "
                        f"{widest}, {len(at[min(at)]['seeds'])} seeds ('matches' = within "
                        f"{100 * MATCH:.0f} %): " + "; ".join(parts) + f". All batch sizes: {trend}.",
            "verdict": verdict, "figure": "figures/growth.png"}


def power_law_exponent(depths, log10_values) -> float:
    """k of values ~ L^k: least-squares slope of log10 values against log10 depth (NaN with
    fewer than 2 finite points)."""
    d, v = np.asarray(depths, float), np.asarray(log10_values, float)
    keep = np.isfinite(v)
    if keep.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log10(d[keep]), v[keep], 1)[0])


def claim_residual_bounded(entries: list[dict], size: dict) -> dict:
    """BN + residual against plain BN: ||P_0||^2/n at every depth, and how it grows with depth."""
    res_forms = [f for f in size["forms"] if f.startswith("BN + residual")]
    parts, bounded, total, slower = [], 0, 0, 0
    for act in size["activations"]:
        for form in res_forms:
            values = [(d, _p0(_entry(entries, form, act, d))) for d in size["depths"]
                      if _entry(entries, form, act, d)]
            plain = [(d, _p0(_entry(entries, "BN", act, d))) for d in size["depths"]
                     if _entry(entries, "BN", act, d)]
            if not values:
                continue
            total += 1
            bounded += all(np.isfinite(v) and abs(v) <= GRAD_DECADES for _, v in values)
            if plain and np.isfinite(values[-1][1]) and (
                    not np.isfinite(plain[-1][1]) or values[-1][1] < 0.5 * plain[-1][1]):
                slower += 1
            k = power_law_exponent(*zip(*values))
            part = f"{act}, {form}: " + ", ".join(f"10^{v:.1f}" for _, v in values)
            if np.isfinite(k):
                part += f" (≈ L^{k:.1f})"
            if plain:
                part += "; plain BN " + ", ".join(f"10^{v:.1f}" for _, v in plain)
            parts.append(part)
    verdict = ("holds" if total and bounded == total else
               "holds partly" if bounded or slower else "does not hold here")
    return {"claim": "residual connections with BN keep the gradient product bounded",
            "measured": f"‖P_0‖²/n at initialisation at depths "
                        f"{', '.join(map(str, size['depths']))} ('bounded' = within "
                        f"10^±{GRAD_DECADES:g} at every depth; L^k: power-law fit over depth): "
                        + "; ".join(parts) + ".",
            "verdict": verdict, "figure": "figures/summary.png"}


def conclusion(entries: list[dict], growth: list[dict], claims: list[dict], size: dict) -> str:
    """A paragraph from the measured numbers (nothing assumed)."""
    cures, yang, residual = claims
    deep = max(size["depths"])
    acts = [a for a in size["activations"] if _entry(entries, "BN", a, deep)]
    # Per activation: geometric mean over depths and seeds of the product growth factor.
    factor = {a: _gm([x for d in size["depths"] if _entry(entries, "BN", a, d)
                      for x in _entry(entries, "BN", a, d)["growth"]["product"]]) for a in acts}
    text = ("At initialisation, with batch statistics, BatchNorm makes the gradient of a plain "
            "network grow geometrically towards the input for every activation measured: "
            "‖P_l‖²/n grows per layer by "
            + ", ".join(f"{factor[a]:.2f} ({a})" for a in acts)
            + f" at batch {size['batch_size']} and width {size['width']}, so that at depth {deep} "
            "‖P_0‖²/n is " + ", ".join(f"10^{_p0(_entry(entries, 'BN', a, deep)):.1f} ({a})" for a in acts)
            + ". ")
    without = [a for a in acts if _entry(entries, "no BN", a, deep)]
    if without:
        text += ("The same networks without BN give "
                 + ", ".join(f"10^{_p0(_entry(entries, 'no BN', a, deep)):.1f} ({a}, {INITS[a]}: "
                             f"{_verdict_word(_p0(_entry(entries, 'no BN', a, deep)))})"
                             for a in without)
                 + ". BN removes the vanishing where there is one, but only by making the gradient "
                   "explode, and it turns a healthy product into an exploding one; the claim that "
                   f"BN cures vanishing gradients {cures['verdict']} at initialisation. ")
    text += f"Yang et al.'s factor: {yang['verdict']}. {yang['measured']} "
    text += f"Residual blocks with BN: {residual['verdict']}. {residual['measured']}"
    return text


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def _style(e: dict) -> dict:
    return {"color": plots.color(e["color_key"]), "linestyle": e["linestyle"]}


def figure_summary(entries: list[dict], growth: list[dict], size: dict):
    """(a) ReLU products against layer at the deepest depth; (b) ||P_0||^2/n against depth;
    (c) ReLU + BN growth factor against batch size with the references."""
    deep = max(size["depths"])
    act0 = size["activations"][0]
    fig, axes = plots.figure(3, 1, width=4.6, height=3.7)
    ax = axes[0, 0]
    for e in [e for e in entries if e["activation"] == act0 and e["depth"] == deep]:
        v = np.asarray(e["log10_products"], float)
        ax.plot(np.arange(len(v)), v, label=e["form"], lw=1.8, **_style(e))
    ax.axhspan(-GRAD_DECADES, GRAD_DECADES, color="0.93", zorder=0)
    ax.set(xlabel="layer l", ylabel=r"$\|P_l\|_F^2/n$,  $P_l = \partial h^L/\partial h^l$",
           title=f"(a) {act0}, depth {deep}: gradient product\nfrom the output down to layer l")
    plots.power_of_ten_axis(ax)
    ax.legend(fontsize="x-small", loc="upper right")
    _p0_panel(axes[0, 1], entries, size)
    _growth_panel(axes[0, 2], growth, "(c) ReLU + BN: per-layer growth\nof the squared gradient")
    fig.suptitle("BatchNorm at initialisation (batch statistics): the gradient explodes in plain "
                 "networks", fontsize="medium")
    return fig


MARKERS = {"relu": "o", "tanh": "s", "sigmoid": "^", "linear": "D"}
P0_FLOOR = -15.0  # panel (b) shows ||P_0||^2/n down to 10^this; lower values are listed


def _p0_panel(ax, entries: list[dict], size: dict) -> None:
    """||P_0||^2/n against depth: colour = form, marker = activation; values below
    10^P0_FLOOR (vanishing without BN) are drawn as arrows at the floor and listed."""
    off_scale = []
    for form in size["forms"]:
        for act in size["activations"]:
            es = sorted([e for e in entries if e["form"] == form and e["activation"] == act],
                        key=lambda e: e["depth"])
            if not es:
                continue
            d = np.asarray([e["depth"] for e in es], float)
            v = np.asarray([_p0(e) for e in es], float)
            low = v < P0_FLOOR
            ax.plot(d, np.where(low, np.nan, v), marker=MARKERS[act], lw=1.4, **_style(es[0]))
            if low.any():
                ax.plot(d[low], np.full(low.sum(), P0_FLOOR), marker="v", ls="none", ms=8,
                        color=_style(es[0])["color"])
                off_scale.append(f"{form}, {act}: " + ", ".join(f"$10^{{{x:.0f}}}$ at L = {dd:.0f}"
                                                               for dd, x in zip(d[low], v[low])))
    top = max([_p0(e) for e in entries if np.isfinite(_p0(e))], default=0.0)
    ax.set_ylim(P0_FLOOR - 2 if off_scale else None, top + 0.08 * (top - P0_FLOOR) + 1)
    ax.axhspan(-GRAD_DECADES, GRAD_DECADES, color="0.93", zorder=0)
    ax.set_xscale("log")
    ax.set(xlabel="depth L", ylabel=r"$\|P_0\|_F^2/n$ (first block to output)",
           title=f"(b) first-to-last product at initialisation\n(width {size['width']}, "
                 f"batch {size['batch_size']}; shaded: within $10^{{\\pm{GRAD_DECADES:g}}}$)")
    plots.power_of_ten_axis(ax)
    # Two legends: forms by colour, activations by marker.
    forms = [Line2D([], [], color=plots.color(FORMS[f][0]), ls=FORMS[f][1], label=f)
             for f in size["forms"]]
    acts = [Line2D([], [], color="0.3", marker=MARKERS[a], ls="none", label=a)
            for a in size["activations"]]
    first = ax.legend(handles=forms, fontsize="x-small", loc="upper left")
    ax.add_artist(first)
    ax.legend(handles=acts, fontsize="x-small", loc="center left")
    if off_scale:  # under the axis: no text box can collide with the points
        ax.set_xlabel("depth L\n▼ off scale: " + "; ".join(off_scale), fontsize="small")


def _min_decades(ax, span: float = 1.2) -> None:
    """Widen a log10-valued y axis to at least ``span`` decades (integer power-of-ten ticks)."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = 0.5 * (lo + hi)
        ax.set_ylim(mid - span / 2, mid + span / 2)


def _growth_panel(ax, growth: list[dict], title: str) -> None:
    widths = sorted({g["width"] for g in growth})
    cmap = colormaps["viridis"]
    for i, w in enumerate(widths):
        gs = sorted([g for g in growth if g["width"] == w], key=lambda g: g["batch_size"])
        color = cmap(0.85 * i / max(1, len(widths) - 1))
        b = [g["batch_size"] for g in gs]
        ax.errorbar(b, [g["hidden_mean"] for g in gs], yerr=[g["hidden_std"] for g in gs],
                    marker="o", capsize=3, color=color, label=f"measured, width {w}")
    ax.plot([16], [YANG_B16], marker="*", ms=15, color="#d62728", ls="none", zorder=5,
            markeredgecolor="k", markeredgewidth=0.6, label=f"Yang et al., B = 16: {YANG_B16}")
    ax.axhline(YANG_LARGE_B, color="#d62728", ls="--", lw=1,
               label=f"π/(π−1) = {YANG_LARGE_B:.3f} (B → ∞)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size B (BatchNorm statistics)",
           ylabel=r"$\|\partial L/\partial h^{l-1}\|^2 / \|\partial L/\partial h^{l}\|^2$", title=title)
    ax.legend(fontsize="x-small", loc="upper right")


def figure_products(entries: list[dict], size: dict, key: str, ylabel: str, title: str):
    """One panel per (activation, depth): a per-layer curve per form."""
    acts, depths = size["activations"], size["depths"]
    fig, axes = plots.figure(len(depths), len(acts), width=3.9, height=3.0)
    for row, act in enumerate(acts):
        for col, d in enumerate(depths):
            ax = axes[row, col]
            for e in [e for e in entries if e["activation"] == act and e["depth"] == d]:
                v = np.asarray(e[key], float)
                x = np.arange(len(v)) if len(v) == d + 1 else np.arange(1, d + 1)
                ax.plot(x, v, label=e["form"], lw=1.5, **_style(e))
            ax.set(title=f"{act}, depth {d}", xlabel="layer l" if row == len(acts) - 1 else "")
            if col == 0:
                ax.set_ylabel(ylabel)
            _min_decades(ax)
            plots.power_of_ten_axis(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return fig


def figure_growth(growth: list[dict], entries: list[dict], size: dict):
    """(a) growth against batch size per width (ReLU + BN); (b) growth factor per activation
    (depth-scan networks) against the one-layer isotropic estimate."""
    fig, axes = plots.figure(2, 1, width=4.8, height=3.7)
    _growth_panel(axes[0, 0], growth, f"(a) ReLU + BN, depth {size['growth_depth']}")
    ax = axes[0, 1]
    acts = list(size["activations"])
    for i, act in enumerate(acts):
        es = [e for e in entries if e["form"] == "BN" and e["activation"] == act]
        for k, (key, marker) in enumerate((("product", "o"), ("hidden", "s"), ("weight", "^"))):
            vals = [x for e in es for x in e["growth"][key]]
            vals = [v for v in vals if np.isfinite(v)]
            ax.plot(np.full(len(vals), i + 0.15 * (k - 1)), vals, marker, ms=4, alpha=0.7,
                    color=plots.color(act), label={"product": r"$\|P_l\|^2/n$",
                                                   "hidden": r"$\|\partial L/\partial h^l\|^2$",
                                                   "weight": r"$\|\partial L/\partial W_l\|^2$"}[key]
                    if i == 0 else None)
        ax.plot([i - 0.35, i + 0.35], [theory.bn_gradient_growth(act)] * 2, color="k", lw=1.5,
                label=r"$E[\phi'^2]/\mathrm{Var}\,\phi$ (one layer, B → ∞)" if i == 0 else None)
    ax.set_xticks(range(len(acts)), acts)
    ax.set(ylabel="per-layer growth of the squared norm",
           title=f"(b) plain BN, width {size['width']}, batch {size['batch_size']}\n(every depth and seed)")
    ax.legend(fontsize="x-small", loc="upper right")
    return fig


# ----------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------


def table_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for e in entries:
        p0 = _p0(e)
        g = e["growth"]
        ratio = np.asarray(e["log10_weight_grad_ratio"], float)
        rows.append({
            "form": e["form"], "act": e["activation"], "depth": e["depth"],
            "p0": "overflow" if not np.isfinite(p0) else f"{p0:.1f}",
            "state": _verdict_word(p0),
            "gp": f"{_gm(g['product']):.3f}", "gh": f"{_gm(g['hidden']):.3f}",
            "gw": f"{_gm(g['weight']):.3f}",
            "ratio": "overflow" if not np.isfinite(ratio).all() else f"{ratio.mean():.1f}",
        })
    return rows


def body(s: study.Study) -> dict:
    args: Args = s.args
    size = sizes(args)
    dataset = data.load("mnist1d")
    runs = grid(args)
    pairs = growth_grid(args)
    s.trained = True  # from here on an error is a failure of the study, not bad input
    batch = lambda b: (np.asarray(dataset.x_train[:b]), np.asarray(dataset.y_train[:b]))

    measured: list[dict] = [{}] * len(runs)
    for label, idx in _by_config(runs).items():
        cfg = runs[idx[0]].model
        x, y = batch(size["batch_size"])
        for i, m in zip(idx, measure(cfg, [runs[i].seed for i in idx], x, y,
                                     num_probes=size["num_probes"])):
            measured[i] = m
    entries = summarise_scan(runs, measured, size)

    growth_measured: list[dict] = [{}] * len(pairs)
    reuse = {(runs[i].model, runs[i].seed, size["batch_size"]): measured[i] for i in range(len(runs))}
    groups: dict[tuple, list[int]] = {}
    for i, (r, b) in enumerate(pairs):
        groups.setdefault((r.model, b), []).append(i)
    for (cfg, b), idx in groups.items():
        seeds = [pairs[i][0].seed for i in idx]
        if all((cfg, sd, b) in reuse for sd in seeds):  # already measured by the depth scan
            for i, sd in zip(idx, seeds):
                growth_measured[i] = reuse[(cfg, sd, b)]
            continue
        x, y = batch(b)
        for i, m in zip(idx, measure(cfg, seeds, x, y, num_probes=size["num_probes"], products=False)):
            growth_measured[i] = m
    growth = summarise_growth(pairs, growth_measured, size)

    claims = [claim_cures_vanishing(entries, size), claim_yang(growth, entries, size),
              claim_residual_bounded(entries, size)]
    figures = {
        "summary": figure_summary(entries, growth, size),
        "growth": figure_growth(growth, entries, size),
        "products": figure_products(entries, size, "log10_products", r"$\|P_l\|_F^2/n$",
                                    "Gradient product ‖P_l‖²/n at initialisation (log-domain "
                                    "estimate: no overflow)"),
        "weight_gradients": figure_products(entries, size, "log10_weight_grad_norms",
                                            r"$\|\partial L/\partial W_l\|$",
                                            "Weight-gradient norm per block at initialisation "
                                            "(missing: outside the float32 range)"),
    }
    paths = {name: s.save_figure(fig, name, headline=name == "summary")
             for name, fig in figures.items()}

    rep = s.report
    rep.title = "BatchNorm at initialisation: gradient explosion with depth (Yang et al. 2019)"
    rep.add("Setup", f"""
- Networks (no training): MLPs, stem → L blocks → head; activations
  {', '.join(f'{a} ({INITS[a]})' for a in size['activations'])}; forms {', '.join(size['forms'])}.
  Plain block: Dense → [BN] → activation; residual block (pre-activation): h + α·F(h),
  F = BN → act → Dense → BN → act → Dense.
- Depth scan: depths {', '.join(map(str, size['depths']))}, width {size['width']}, the first
  {size['batch_size']} MNIST-1D training inputs as the batch (BN uses its statistics),
  {size['seeds']} seed(s). ‖P_l‖²/n: `vgrad.analysis.jacobian_products`, {size['num_probes']} probes
  (n = batch × width); ‖∂L/∂h^l‖, ‖∂L/∂W_l‖: `vgrad.analysis.gradient_flow` (mean cross-entropy).
- Growth factor: 10^(−slope) of the least-squares line of log10 of the squared norm against the
  layer l, over l ∈ [{FIT_WINDOW[0]}·L, {FIT_WINDOW[1]}·L]; compared quantity: ‖∂L/∂h^l‖² (Yang et
  al.'s gradient squared norm per layer). ReLU + BN at depth {size['growth_depth']}, widths
  {', '.join(map(str, size['growth_widths']))}, batch sizes
  {', '.join(map(str, size['growth_batch_sizes']))}.
- References: {YANG_B16} at B = 16 (Yang et al. 2019, as quoted in issue #11); π/(π−1) ≈
  {YANG_LARGE_B:.3f} for B → ∞; the one-layer isotropic estimate E[φ'(z)²]/Var φ(z):
  {', '.join(f'{a} {theory.bn_gradient_growth(a):.3f}' for a in size['activations'])}.""")
    rep.add("Summary", markdown_table(table_rows(entries), [
        ("form", "form"), ("activation", "act"), ("depth", "depth"),
        ("log10 ‖P_0‖²/n", "p0"), ("state", "state"), ("growth ‖P_l‖²", "gp"),
        ("growth ‖∂L/∂h^l‖²", "gh"), ("growth ‖∂L/∂W_l‖²", "gw"),
        ("log10 ‖∂L/∂W_1‖/‖∂L/∂W_L‖", "ratio")])
        + "\n\nGrowth factors: geometric mean over seeds; > 1 grows towards the input.")
    rep.add("Growth factor of ReLU + BN against Yang et al.", markdown_table(
        [{"w": g["width"], "b": g["batch_size"], "f": f"{g['hidden_mean']:.3f} ± {g['hidden_std']:.3f}",
          "wf": f"{_gm(g['weight']):.3f}"} for g in growth],
        [("width", "w"), ("batch", "b"), ("growth ‖∂L/∂h^l‖² (mean ± std over seeds)", "f"),
         ("growth ‖∂L/∂W_l‖²", "wf")]))
    text = conclusion(entries, growth, claims, size)
    rep.add("Conclusion", text)
    rep.add_claims(claims)
    rep.add_figures(paths)
    return {"entries": entries, "growth": growth, "claims": claims, "conclusion": text,
            "sizes": size, "references": {"yang_b16": YANG_B16, "large_batch": YANG_LARGE_B,
                                          "isotropic": {a: theory.bn_gradient_growth(a)
                                                        for a in size["activations"]}}}


def _by_config(runs: list[sweep.Run]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        out.setdefault(r.label, []).append(i)
    return out


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
