"""Flax modules of the layered model: one layer, one block, the scanned stack.

A *layer* is [Dense (or Conv1D)] -> [norm] -> [activation]. A *block* keeps the
hidden shape, (B, width) for mlp and (B, length, width) for conv: one plain
layer Dense -> [norm] -> activation, or a residual block in one of the
``ModelConfig.residual_form`` forms, with branch scale alpha:

  preact (default)  h + alpha * F(h),  F = [norm] -> act -> Dense -> [norm] -> act -> Dense
  postact           act(h + alpha * F(h)),  F = Dense -> [norm] -> act -> Dense -> [norm]
  branch_act        h + alpha * F(h),  F = (Dense -> [norm] -> act) twice   (non-standard)

Parameter layout of a residual block (under ``blocks/block``, stacked over L):
preact: ``layer_0`` (its norm and prelu slope; no Dense, so without those it
has no entry), ``layer_1`` (Dense_0, norm) and ``branch_out`` (the branch's
last Dense, or Conv); postact and branch_act: ``layer_0``,
``layer_1``, each with Dense_0 and norm; plus ``residual_alpha`` when learnable.
The modules named ``layer_*`` always return post-activation values (postact's
``layer_1`` adds the shortcut before its activation), which is what the
activation statistics of ``vgrad.analysis.gradient_flow`` read.

Attribution support: ``identity_sublayers`` names sub-layer kinds ("dense",
"norm", "activation") whose Jacobian with respect to their *input* is replaced
by the identity in the backward pass, while the forward value and the weight
gradients are unchanged; the scanned stack does the same for whole blocks
chosen by a boolean mask. Both use  y = f(sg(x)) + x - sg(x),  whose value is
f(x) and whose input-Jacobian is I.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from vgrad.config import BATCH_NORMS, ModelConfig
from vgrad.models.activations import PRELU_INIT_SLOPE, activation_fn
from vgrad.models.initializers import bias_init, kernel_init

SUBLAYER_KINDS = ("dense", "norm", "activation")


def identity_backward(f, x: jax.Array) -> jax.Array:
    """f(x) in the forward pass, with an identity input-Jacobian in the backward pass."""
    x_const = jax.lax.stop_gradient(x)
    return f(x_const) + (x - x_const)


def linear_module(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """The width-preserving linear map of ``cfg``: Dense(width) or a 'SAME' Conv1D."""
    if cfg.arch == "conv":
        return nn.Conv(cfg.width, (cfg.kernel_size,), padding="SAME",
                       kernel_init=kernel_init(cfg), bias_init=bias_init(cfg), name=name)
    return nn.Dense(cfg.width, kernel_init=kernel_init(cfg), bias_init=bias_init(cfg), name=name)


class Layer(nn.Module):
    """[Dense/Conv1D] -> [BatchNorm | LayerNorm] -> [+ shortcut] -> [activation].

    features = cfg.width; ``linear`` / ``activate`` switch the first / last
    step off (preact's first branch layer has no Dense, its stem no activation).
    Called as ``layer(x)`` or, for the last layer of a post-activation block,
    ``layer(x, shortcut=h, alpha=a)``, which computes act(h + a * norm(Dense(x))).
    x: (B, features) for mlp or (B, length, channels) for conv; returns
    (B, width) or (B, length, width).
    """

    cfg: ModelConfig
    train: bool
    identity_sublayers: tuple[str, ...] = ()
    shape_preserving: bool = True  # False for the stem, whose input has another width
    linear: bool = True
    activate: bool = True

    def _maybe_identity(self, kind: str, f, x: jax.Array) -> jax.Array:
        if kind in self.identity_sublayers and self.shape_preserving:
            return identity_backward(f, x)
        return f(x)

    @nn.compact
    def __call__(self, h: jax.Array, shortcut: jax.Array | None = None,
                 alpha: jax.Array | float = 1.0) -> jax.Array:
        cfg = self.cfg
        z = self._maybe_identity("dense", linear_module(cfg), h) if self.linear else h
        if cfg.norm in BATCH_NORMS:
            # Batch statistics reduce over every axis but the feature axis; under
            # jit with a sharded batch the mean is over the global batch.
            kind = NoisyBatchNorm if cfg.norm == "noisy_batch" else nn.BatchNorm
            extra = {"noise": cfg.bn_noise} if cfg.norm == "noisy_batch" else {}
            norm = kind(use_running_average=not self.train, momentum=cfg.bn_momentum,
                        epsilon=cfg.bn_epsilon, **extra)
            z = self._maybe_identity("norm", norm, z)
        elif cfg.norm == "layer":
            z = self._maybe_identity("norm", nn.LayerNorm(epsilon=cfg.bn_epsilon), z)
        if shortcut is not None:
            z = shortcut + alpha * z
        if not self.activate:
            return z
        slope = PRELU_INIT_SLOPE
        if cfg.activation == "prelu":
            slope = self.param("prelu_slope", nn.initializers.constant(PRELU_INIT_SLOPE),
                               (cfg.width,))
        act = activation_fn(cfg.activation, leaky_slope=cfg.leaky_slope, prelu_slope=slope)
        return self._maybe_identity("activation", act, z)


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed, in training mode, by z <- s * z + m ("noisy BN",
    Santurkar et al. 2018): per feature and per training step a fresh shift
    m ~ U(-noise, noise) and scale s ~ U(1/(1+noise), 1+noise), shared by every
    example of the batch, so each layer's input distribution moves at every
    step however well BatchNorm has normalised it. Evaluation mode is plain
    BatchNorm (running averages, no noise).

    The noise needs no random key from the train step: each layer draws a seed
    at initialisation (``batch_stats/noise_seed``) and counts its training
    applications (``batch_stats/noise_step``), so every run of a sweep has its
    own noise sequence and a resumed run continues it.
    z: (..., features) -> (..., features).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    noise: float = 1.0

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        z = nn.BatchNorm(use_running_average=self.use_running_average, momentum=self.momentum,
                         epsilon=self.epsilon)(z)
        seed = self.variable("batch_stats", "noise_seed",
                             lambda: jax.random.bits(self.make_rng("params"), (), jnp.uint32))
        count = self.variable("batch_stats", "noise_step", lambda: jnp.zeros((), jnp.uint32))
        if self.use_running_average or self.is_initializing():
            return z
        shift_key, scale_key = jax.random.split(jax.random.fold_in(jax.random.key(seed.value),
                                                                   count.value))
        count.value = count.value + 1
        a = self.noise
        m = jax.random.uniform(shift_key, z.shape[-1:], z.dtype, -a, a)
        s = jax.random.uniform(scale_key, z.shape[-1:], z.dtype, 1 / (1 + a), 1 + a)
        return s * z + m


def stem_activates(cfg: ModelConfig) -> bool:
    """Whether the stem ends in the activation: not for pre-activation residual
    networks, whose blocks begin with [norm] -> activation themselves (He et al.
    2016), so the stream h^0 is a zero-mean linear map of the input."""
    return not (cfg.residual and cfg.residual_form == "preact")


class Block(nn.Module):
    """One shape-preserving block h^{l-1} -> h^l (plain or residual, see the module doc)."""

    cfg: ModelConfig
    train: bool
    identity_sublayers: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.cfg
        layer = lambda name, **kw: Layer(cfg, self.train, self.identity_sublayers, name=name, **kw)
        if not cfg.residual:
            return layer("layer_0")(h)
        alpha = residual_alpha(self, cfg)
        if cfg.residual_form == "preact":
            a = layer("layer_1")(layer("layer_0", linear=False)(h))
            out = linear_module(cfg, name="branch_out")
            if "dense" in self.identity_sublayers:
                return h + alpha * identity_backward(out, a)
            return h + alpha * out(a)
        if cfg.residual_form == "postact":
            # The shortcut joins before the last activation: act(h + alpha * norm(Dense(a))).
            return layer("layer_1")(layer("layer_0")(h), shortcut=h, alpha=alpha)
        branch = layer("layer_1")(layer("layer_0")(h))  # branch_act
        return h + alpha * branch


def residual_alpha(module: nn.Module, cfg: ModelConfig) -> jax.Array | float:
    """The branch scale alpha of a residual block.

    A numeric ``residual_scale`` is a variable of the block, not a constant of
    the program: ``batch_stats/residual_scale`` (the collection of everything a
    model carries but does not train) is set at initialisation and read by
    every apply, so runs that differ only in alpha share one compiled program
    and train side by side in a sweep. The model applies the alpha its
    variables were initialised with.
    """
    if cfg.residual_scale == "learnable_zero":
        return module.param("residual_alpha", nn.initializers.zeros, ())
    if cfg.residual_scale == "inv_sqrt_depth":
        return 1.0 / math.sqrt(cfg.depth)
    return module.variable("batch_stats", "residual_scale",
                           lambda: jnp.asarray(cfg.residual_scale, jnp.float32)).value


class _ScanStep(nn.Module):
    """One step of the scanned stack: (h, identity_flag) -> (h', h' or None)."""

    cfg: ModelConfig
    train: bool
    identity_sublayers: tuple[str, ...] = ()
    collect: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, identity_flag: jax.Array):
        block = Block(self.cfg, self.train, self.identity_sublayers, name="block")
        # Blocks flagged for identity backward see a constant input and add the
        # straight-through term; unflagged blocks are untouched (one evaluation).
        h_const = jax.lax.stop_gradient(h)
        out = block(jnp.where(identity_flag, h_const, h)) + jnp.where(identity_flag, h - h_const, 0)
        return out, (out if self.collect else None)


def BlockStack(cfg: ModelConfig, train: bool, identity_sublayers: tuple[str, ...] = (),
               collect: bool = False, name: str = "blocks") -> nn.Module:
    """The L blocks under ``nn.scan``: parameters and batch statistics are
    stacked along a leading axis of length L, so compile time is independent of depth."""
    scanned = nn.scan(
        _ScanStep,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        in_axes=0,
        length=cfg.depth,
    )
    return scanned(cfg, train, identity_sublayers, collect, name=name)


class Network(nn.Module):
    """stem -> BlockStack -> head. ``__call__`` returns logits, or with
    ``collect=True`` the pair (logits, hidden_LxBx...) of block outputs.
    The stem is a Layer (Dense -> [norm] -> act), without the activation for
    pre-activation residual networks; the head is Dense(num_classes) of h^L
    (average-pooled over length for conv) in every form."""

    cfg: ModelConfig
    train: bool
    identity_sublayers: tuple[str, ...] = ()
    collect: bool = False

    def stem(self, x: jax.Array) -> jax.Array:
        return Layer(self.cfg, self.train, shape_preserving=False,
                     activate=stem_activates(self.cfg), name="stem")(x)

    @nn.compact
    def __call__(self, x: jax.Array, identity_flags: jax.Array):
        cfg = self.cfg
        h0 = self.stem(to_model_input(cfg, x))
        h, hidden = BlockStack(cfg, self.train, self.identity_sublayers, self.collect)(
            h0, identity_flags)
        if cfg.arch == "conv":
            h = h.mean(axis=1)  # global average pool over length
        logits = nn.Dense(cfg.num_classes, kernel_init=kernel_init(cfg), name="head")(h)
        if self.collect:
            return logits, jnp.concatenate([h0[None], hidden], axis=0)
        return logits


def to_model_input(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """(B, ...) data -> (B, features) for mlp, (B, length, channels) for conv."""
    if cfg.arch == "conv":
        if x.ndim == 2:
            return x[..., None]
        if x.ndim != 3:
            raise ValueError(f"conv arch expects inputs of shape (batch, length) or "
                             f"(batch, length, channels), got {x.shape}")
        return x
    return x.reshape(x.shape[0], -1)
