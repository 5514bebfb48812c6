"""Flax modules of the layered model: one layer, one block, the scanned stack.

A *layer* is Dense (or Conv1D) -> [norm] -> activation. A *block* is one plain
layer, or a residual block h + alpha * F(h) with F two layers. Blocks keep the
hidden shape, (B, width) for mlp and (B, length, width) for conv.

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

from vgrad.config import ModelConfig
from vgrad.models.activations import PRELU_INIT_SLOPE, activation_fn
from vgrad.models.initializers import bias_init, kernel_init

SUBLAYER_KINDS = ("dense", "norm", "activation")


def identity_backward(f, x: jax.Array) -> jax.Array:
    """f(x) in the forward pass, with an identity input-Jacobian in the backward pass."""
    x_const = jax.lax.stop_gradient(x)
    return f(x_const) + (x - x_const)


class Layer(nn.Module):
    """Dense/Conv1D -> [BatchNorm | LayerNorm] -> activation; features = cfg.width."""

    cfg: ModelConfig
    train: bool
    identity_sublayers: tuple[str, ...] = ()
    shape_preserving: bool = True  # False for the stem, whose input has another width

    def _maybe_identity(self, kind: str, f, x: jax.Array) -> jax.Array:
        if kind in self.identity_sublayers and self.shape_preserving:
            return identity_backward(f, x)
        return f(x)

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.arch == "conv":
            linear = nn.Conv(cfg.width, (cfg.kernel_size,), padding="SAME",
                             kernel_init=kernel_init(cfg), bias_init=bias_init(cfg))
        else:
            linear = nn.Dense(cfg.width, kernel_init=kernel_init(cfg), bias_init=bias_init(cfg))
        z = self._maybe_identity("dense", linear, h)
        if cfg.norm == "batch":
            # Batch statistics reduce over every axis but the feature axis; under
            # jit with a sharded batch the mean is over the global batch.
            norm = nn.BatchNorm(use_running_average=not self.train, momentum=cfg.bn_momentum,
                                epsilon=cfg.bn_epsilon)
            z = self._maybe_identity("norm", norm, z)
        elif cfg.norm == "layer":
            z = self._maybe_identity("norm", nn.LayerNorm(epsilon=cfg.bn_epsilon), z)
        slope = PRELU_INIT_SLOPE
        if cfg.activation == "prelu":
            slope = self.param("prelu_slope", nn.initializers.constant(PRELU_INIT_SLOPE),
                               (cfg.width,))
        act = activation_fn(cfg.activation, leaky_slope=cfg.leaky_slope, prelu_slope=slope)
        return self._maybe_identity("activation", act, z)


class Block(nn.Module):
    """One shape-preserving block h^{l-1} -> h^l (plain or residual)."""

    cfg: ModelConfig
    train: bool
    identity_sublayers: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.cfg
        layer = lambda name: Layer(cfg, self.train, self.identity_sublayers, name=name)
        if not cfg.residual:
            return layer("layer_0")(h)
        branch = layer("layer_1")(layer("layer_0")(h))
        return h + residual_alpha(self, cfg) * branch


def residual_alpha(module: nn.Module, cfg: ModelConfig) -> jax.Array | float:
    """The branch scale alpha of a residual block."""
    if cfg.residual_scale == "learnable_zero":
        return module.param("residual_alpha", nn.initializers.zeros, ())
    if cfg.residual_scale == "inv_sqrt_depth":
        return 1.0 / math.sqrt(cfg.depth)
    return float(cfg.residual_scale)


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
    ``collect=True`` the pair (logits, hidden_LxBx...) of block outputs."""

    cfg: ModelConfig
    train: bool
    identity_sublayers: tuple[str, ...] = ()
    collect: bool = False

    def stem(self, x: jax.Array) -> jax.Array:
        return Layer(self.cfg, self.train, shape_preserving=False, name="stem")(x)

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
