"""Frozen, validated configs: the public contract of a run.

Every invalid value raises ``ValueError`` naming the field, the value and what
is allowed, at construction time, so a bad command line fails before any work.
Aliases ("xavier", "kaiming") are resolved to their canonical names so that
``config.json`` always records what actually ran.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ARCHS = ("mlp", "conv")
ACTIVATIONS = (
    "linear", "sigmoid", "tanh", "hard_tanh", "softsign", "relu", "leaky_relu",
    "prelu", "elu", "selu", "gelu", "silu",
)
INITS = (
    "normal", "uniform", "lecun_normal", "glorot_uniform", "glorot_normal",
    "he_normal", "he_uniform", "orthogonal", "variance_scaling",
)
INIT_ALIASES = {"xavier": "glorot_uniform", "kaiming": "he_normal"}
NORMS = ("none", "batch", "noisy_batch", "layer")
BATCH_NORMS = ("batch", "noisy_batch")  # the norms that use batch statistics in training
RESIDUAL_SCALES = ("inv_sqrt_depth", "learnable_zero")
RESIDUAL_FORMS = ("preact", "postact", "branch_act")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
CLIPS = ("none", "global_norm", "value", "agc")
ON_NONFINITE = ("stop", "skip")
DATASETS = ("mnist1d", "digits", "synthetic", "mnist", "fashion_mnist")
# Seeds become jax.random.key(seed), which takes a signed 64-bit integer.
# jax.random.key keeps only the low 32 bits of a seed (without x64): seeds 2**32
# apart would give the same key, so larger seeds are refused.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """An invalid config value. A ValueError whose message names the field, the
    value and what is allowed; ``field`` and ``value`` say which (so that the
    command line can name the flag, e.g. ``--model.activation``)."""

    def __init__(self, field: str, value: Any, message: str):
        super().__init__(message)
        self.field, self.value = field, value


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(field, value, f"invalid {field}={value!r}: {allowed}")


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN and +-inf are never valid config values."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, value, "allowed values are " + ", ".join(choices))


def _at_least(field: str, value: Any, minimum: float, *, integer: bool = False) -> None:
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    else:
        ok = _is_number(value) and value >= minimum
    if not ok:
        _fail(field, value, f"must be {'an integer' if integer else 'a finite number'} >= {minimum}")


def _seed(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        _fail(field, value, "must be an integer >= 0 and <= 2**32 - 1 (a JAX PRNG seed)")


def _positive(field: str, value: Any) -> None:
    if not (_is_number(value) and value > 0):
        _fail(field, value, "must be a finite number > 0")


def _in_unit_interval(field: str, value: Any, *, closed_low: bool = True) -> None:
    ok = _is_number(value) and (0 <= value < 1 if closed_low else 0 < value < 1)
    if not ok:
        _fail(field, value, "must be a finite number in [0, 1)" if closed_low
              else "must be a finite number in (0, 1)")


def _finite_floats(cfg: Any) -> None:
    """Every float-valued field of ``cfg`` (also inside tuples, e.g. data options)
    is finite: a NaN or an infinity is rejected whatever the field, including
    fields whose own check would let it through."""
    def bad(value: Any) -> bool:
        if isinstance(value, float):
            return not math.isfinite(value)
        if isinstance(value, (tuple, list)):
            return any(bad(v) for v in value)
        return False

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if bad(value):
            _fail(f.name, value, "must be finite (NaN and infinity are not allowed)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A layered model: stem -> ``depth`` shape-preserving blocks -> head.

    arch: "mlp" (Dense blocks on flattened inputs) or "conv" (1-D conv blocks on
        (batch, length) or (batch, length, channels) inputs, global average pool).
    depth: number of hidden blocks L.
    width: hidden units (mlp) or channels (conv).
    activation: one of ``ACTIVATIONS``; ``leaky_slope`` is leaky_relu's slope.
        prelu learns one slope per unit, initialised at 0.25.
    init: one of ``INITS`` (or the aliases "xavier", "kaiming"). "normal" draws
        N(0, init_std^2) regardless of fan-in (the naive init); "orthogonal" has
        gain sqrt(weight_var); "variance_scaling" draws N(0, weight_var / fan_in),
        the mean-field parameterisation. Biases are N(0, bias_var) (0 by default).
    norm: "none", "batch" (BatchNorm after each Dense), "noisy_batch" or "layer"
        (LayerNorm, a batch-independent comparison point). "noisy_batch" is
        BatchNorm followed, in training mode only, by z <- s * z + m with a fresh
        shift m ~ U(-a, a) and scale s ~ U(1/(1+a), 1+a) per unit and step (the
        same for every example), a = ``bn_noise``: the "noisy BN" of Santurkar et
        al. (2018), which re-injects distribution shift after normalising.
    bn_momentum / bn_epsilon: running average r <- m r + (1 - m) batch_stat; eps in the variance.
    bn_noise: a, the noise level of "noisy_batch" (0: plain BatchNorm).
    residual: blocks are residual, in the form ``residual_form``, with branch scale alpha.
    residual_scale: alpha = a number (1.0), "inv_sqrt_depth" (1/sqrt(L)) or
        "learnable_zero" (a learnable scalar per block initialised at 0).
    residual_form: which residual block (only read when ``residual`` is true):
        "preact" (default): h + alpha * F(h), F = [norm] -> activation -> Dense ->
            [norm] -> activation -> Dense, the pre-activation block of He et al.
            2016 ("Identity Mappings in Deep Residual Networks"): the identity path
            is untouched and the branch ends in a linear layer, so it adds a
            zero-mean term at init. The stem is then Dense -> [norm] without an
            activation (the blocks start with one), as in that paper's networks.
        "postact": activation(h + alpha * F(h)), F = Dense -> [norm] -> activation
            -> Dense -> [norm], the original ResNet block (He et al. 2015).
        "branch_act": h + alpha * F(h), F = two Dense -> [norm] -> activation
            layers. Non-standard (vgrad's block before the two forms above): with
            an activation of non-zero mean (relu, sigmoid, gelu, ...) every branch
            adds a positive mean and the stream grows along one common direction.
    kernel_size: conv kernel size (conv arch only).
    """

    arch: str = "mlp"
    depth: int = 10
    width: int = 128
    num_classes: int = 10
    activation: str = "relu"
    leaky_slope: float = 0.01
    init: str = "he_normal"
    init_std: float = 0.01
    weight_var: float = 1.0
    bias_var: float = 0.0
    norm: str = "none"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_noise: float = 1.0
    residual: bool = False
    residual_scale: float | str = 1.0
    residual_form: str = "preact"
    kernel_size: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "init", INIT_ALIASES.get(self.init, self.init))
        _choice("arch", self.arch, ARCHS)
        _at_least("depth", self.depth, 1, integer=True)
        _at_least("width", self.width, 1, integer=True)
        _at_least("num_classes", self.num_classes, 2, integer=True)
        _choice("activation", self.activation, ACTIVATIONS)
        _at_least("leaky_slope", self.leaky_slope, 0)
        _choice("init", self.init, INITS + tuple(INIT_ALIASES))
        _positive("init_std", self.init_std)
        _positive("weight_var", self.weight_var)
        _at_least("bias_var", self.bias_var, 0)
        _choice("norm", self.norm, NORMS)
        _in_unit_interval("bn_momentum", self.bn_momentum)
        _positive("bn_epsilon", self.bn_epsilon)
        _at_least("bn_noise", self.bn_noise, 0)
        if not isinstance(self.residual, bool):
            _fail("residual", self.residual, "must be true or false")
        scale = self.residual_scale
        if isinstance(scale, str):
            try:  # command lines hand numbers over as strings
                scale = float(scale)
            except ValueError:
                pass
            object.__setattr__(self, "residual_scale", scale)
        if isinstance(scale, str):
            if scale not in RESIDUAL_SCALES:
                _fail("residual_scale", scale, "must be a finite number >= 0 or one of "
                      + ", ".join(RESIDUAL_SCALES))
        elif not _is_number(scale) or scale < 0:
            _fail("residual_scale", scale,
                  "must be a finite number >= 0, 'inv_sqrt_depth' or 'learnable_zero'")
        _choice("residual_form", self.residual_form, RESIDUAL_FORMS)
        _at_least("kernel_size", self.kernel_size, 1, integer=True)
        _finite_floats(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one run.

    optimizer: "sgd" (with ``momentum``; 0 = plain SGD) or "adam".
    schedule: "constant", "cosine" (decay to 0 over the run) or "warmup_cosine"
        (linear warm-up over ``warmup_steps``, then cosine).
    steps: total optimiser steps; when set it overrides ``epochs``.
    clip: "none", "global_norm" (rescale so ||g||_2 <= clip_value), "value"
        (clamp each entry to [-clip_value, clip_value]) or "agc" (adaptive
        gradient clipping, unit-wise ||g|| <= clip_value * ||w||).
    weight_decay: decoupled (AdamW-style for adam, added to the gradient for sgd).
    eval_every: evaluate on the test split every this many steps; 0 = at the end
        of every epoch. A final evaluation always runs.
    on_nonfinite: "stop" the run at the first non-finite loss/gradient, or
        "skip" that update and go on.
    """

    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 128
    epochs: int = 10
    steps: int | None = None
    clip: str = "none"
    clip_value: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 0
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _positive("learning_rate", self.learning_rate)
        _in_unit_interval("momentum", self.momentum)
        _choice("schedule", self.schedule, SCHEDULES)
        _at_least("warmup_steps", self.warmup_steps, 0, integer=True)
        _at_least("batch_size", self.batch_size, 1, integer=True)
        _at_least("epochs", self.epochs, 1, integer=True)
        if self.steps is not None:
            _at_least("steps", self.steps, 1, integer=True)
        _choice("clip", self.clip, CLIPS)
        _positive("clip_value", self.clip_value)
        _at_least("weight_decay", self.weight_decay, 0)
        _seed("seed", self.seed)
        _at_least("eval_every", self.eval_every, 0, integer=True)
        _choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        _finite_floats(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how to prepare it.

    name: one of ``DATASETS``; "mnist" and "fashion_mnist" need ``path`` (IDX
        directory or .npz file you already have; nothing is downloaded).
    cache_dir: where generated datasets are cached (default $VGRAD_CACHE_DIR or
        ~/.cache/vgrad).
    seed: seed of generated data (synthetic) and nothing else.
    standardize: per-feature z-scoring with train-split statistics.
    options: dataset-specific (key, value) pairs, e.g. (("dim", 16),) for synthetic.
    """

    name: str = "mnist1d"
    path: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    standardize: bool = True
    options: tuple[tuple[str, int | float | str], ...] = ()

    def __post_init__(self) -> None:
        _choice("name", self.name, DATASETS)
        _seed("seed", self.seed)
        _finite_floats(self)


# ModelConfig fields read only by ``init``, and the fixed values that
# :func:`without_init` sets them to: two models equal up to these compute the
# same function of their variables (they share compiled programs).
MODEL_INIT_FIELDS = {"init": "normal", "init_std": 1.0, "weight_var": 1.0, "bias_var": 0.0}


def without_init(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with :data:`MODEL_INIT_FIELDS` set to fixed values, and a numeric
    ``residual_scale`` set to 1.0: the model reads alpha from its variables
    (``batch_stats/residual_scale``, set by ``init``), so it too is an init value."""
    fixed = dict(MODEL_INIT_FIELDS)
    if not isinstance(cfg.residual_scale, str):
        fixed["residual_scale"] = 1.0
    return dataclasses.replace(cfg, **fixed)


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)
