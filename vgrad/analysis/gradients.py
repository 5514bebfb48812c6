"""Gradient flow through a model on one batch: per-block weight and hidden-state
gradient norms of the real loss, activation statistics, and attribution.

Loss: mean softmax cross-entropy over the batch (optax
``softmax_cross_entropy_with_integer_labels``), of the full model (stem, blocks,
head), so every number here is what a training step would see.

Attribution: ``identity_blocks`` / ``identity_sublayers`` are handed to
``model.apply``, which replaces those Jacobians by the identity in the backward
pass (forward values unchanged). Comparing reports with and without them shows
which layers make the gradient vanish or explode; e.g.
``identity_sublayers=("norm",)`` removes every BatchNorm Jacobian.

Models: any model of the analysis protocol (``vgrad.models.AnalysisModel``) with
``apply`` and ``head_fn``. vgrad's own models (``vgrad.models.build``) also
have sub-layers the analysis can see: ``identity_sublayers`` attribution and
activation statistics of every layer inside a block. For other models the
statistics are over the hidden states h^l themselves, and saturated / dead
fractions need the model's ``activation`` name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from vgrad.analysis.jacobians import _cache_key, _canonical_model, _model_for
from vgrad.io import to_jsonable
from vgrad.models.activations import RECTIFIED
from vgrad.models.blocks import SUBLAYER_KINDS, Block, Layer, Network
from vgrad.models.layered import GRADIENT_FLOW_ATTRIBUTES, check_protocol, identity_mask
from vgrad.models.model import LayeredModel
from vgrad.steps import block_norms, part_norms, scaled_norms

# A saturating unit counts as saturated when its derivative is below this
# fraction of the activation's maximal derivative (which is at 0 for all of
# SATURATING): sigmoid |z| > 4.36, tanh |z| > 2.19, softsign |z| > 3.47,
# hard_tanh |z| > 1.
SATURATION_THRESHOLD = 0.05


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """Gradient flow of the mean cross-entropy on one batch.

    loss: the mean softmax cross-entropy.
    weight_grad_norms: (L,), index l-1 for block l: L2 norm of dLoss/d(all
        parameters of block l) (kernels, biases, norm scales/offsets, prelu
        slopes, residual alpha).
    hidden_grad_norms: (L+1,), index l = 0..L: ||dLoss/dh^l||_2 over the whole
        batch (h^0 = stem output, h^L = last block output), with the
        attribution applied.
    stem_grad_norm / head_grad_norm: L2 norms of the stem's / head's parameter gradients.
    Activation statistics, (L+1,) each, index 0 = the stem layer, index l = the
    layer(s) of block l (both branch layers of a residual block, pooled). They
    are over the post-activation unit values a = phi(z) of those layers (for
    plain blocks a = h^l), all examples and units; for models other than
    vgrad's own, over the hidden states a = h^l, with phi = ``model.activation``:
      activation_mean, activation_std: mean and std of a.
      saturated_fraction: fraction of units with phi'(z) < SATURATION_THRESHOLD *
        max phi', for SATURATING activations (sigmoid, tanh, hard_tanh,
        softsign), read off a exactly (e.g. sigmoid: phi' = a(1-a)); NaN for
        other activations.
      dead_fraction: fraction of units with pre-activation z <= 0, i.e. in the
        rectified regime, for RECTIFIED activations; it is read off as a <= 0,
        which is equivalent for every RECTIFIED activation with a non-negative
        negative-side slope (a learned prelu slope < 0 breaks this). For relu
        these units pass no gradient; for leaky_relu/prelu/elu/selu/gelu/silu
        they pass a reduced one. NaN for other activations.
    identity_blocks: the attributed blocks (1-based) and identity_sublayers the
        attributed sub-layer kinds; train: BatchNorm mode.
    """

    loss: float
    weight_grad_norms: np.ndarray
    hidden_grad_norms: np.ndarray
    stem_grad_norm: float
    head_grad_norm: float
    activation_mean: np.ndarray
    activation_std: np.ndarray
    saturated_fraction: np.ndarray
    dead_fraction: np.ndarray
    identity_blocks: tuple[int, ...]
    identity_sublayers: tuple[str, ...]
    train: bool

    @property
    def depth(self) -> int:
        return int(self.weight_grad_norms.shape[0])

    def to_dict(self) -> dict:
        return to_jsonable(self)


def _block_apply(model: Any, variables: dict, l: jax.Array, train: bool,
                 identity_sublayers: tuple[str, ...], capture: bool = False):
    """Block l as a function of its input, with ``identity_sublayers`` applied
    (``model.block_fn`` has no attribution argument, so the block is built here
    the same way). With ``capture`` it also returns the post-activation outputs
    of its layers, a list of arrays shaped like h."""
    block = Block(model.cfg, train, identity_sublayers)
    block_vars = model.block_variables(variables, l)
    mutable = ["batch_stats"] if (train and model.has_batch_stats) else []
    kwargs = {}
    if capture:
        mutable = mutable + ["intermediates"]
        kwargs["capture_intermediates"] = lambda mdl, method: (
            isinstance(mdl, Layer) and method == "__call__")

    def f(h):
        if not mutable:
            return block.apply(block_vars, h, **kwargs)
        out, state = block.apply(block_vars, h, mutable=mutable, **kwargs)
        if not capture:
            return out
        layers = state["intermediates"]
        acts = [layers[name]["__call__"][0] for name in sorted(layers) if name.startswith("layer_")]
        return out, acts

    return f


def _activation_stats(name: str, acts: jax.Array) -> tuple[jax.Array, ...]:
    """mean, std, saturated fraction, dead fraction of post-activation values."""
    mean, std = jnp.mean(acts), jnp.std(acts)
    nan = jnp.asarray(jnp.nan, acts.dtype)
    t = SATURATION_THRESHOLD
    if name == "sigmoid":  # phi' = a (1 - a), max 1/4
        saturated = jnp.mean(acts * (1 - acts) < t * 0.25)
    elif name == "tanh":  # phi' = 1 - a^2, max 1
        saturated = jnp.mean(1 - acts**2 < t)
    elif name == "softsign":  # phi' = 1 / (1 + |z|)^2 = (1 - |a|)^2, max 1
        saturated = jnp.mean((1 - jnp.abs(acts)) ** 2 < t)
    elif name == "hard_tanh":  # phi' = 0 where |z| >= 1, i.e. |a| = 1
        saturated = jnp.mean(jnp.abs(acts) >= 1)
    else:
        saturated = nan
    dead = jnp.mean(acts <= 0) if name in RECTIFIED else nan
    return mean, std, saturated.astype(acts.dtype), jnp.asarray(dead, acts.dtype)


# What vgrad's own models (LayeredModel) provide beyond the protocol: a config
# with the activation name, sub-layers for attribution and statistics, and the
# head reached through the Flax network (they have no head_fn).


def _is_own_model(model: Any) -> bool:
    return isinstance(model, LayeredModel)


def _activation_name(model: Any) -> str | None:
    """The activation whose statistics are reported (None: mean and std only)."""
    if _is_own_model(model):
        return model.cfg.activation
    return getattr(model, "activation", None)


def _supports_identity_sublayers(model: Any) -> bool:
    return bool(getattr(model, "supports_identity_sublayers", _is_own_model(model)))


def _stem_perturbed_apply(model: Any, variables: dict, x: jax.Array, eps: jax.Array, *,
                          train: bool, identity_blocks, identity_sublayers):
    """``model.apply`` with ``eps`` added to the stem output h^0 (so the gradient
    with respect to eps is dLoss/dh^0 of the real model). Uses a Flax method
    interceptor on the network's ``stem`` method."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Network) and context.method_name == "stem":
            return out + eps
        return out

    with nn.intercept_methods(interceptor):
        return model.apply(variables, x, train=train, identity_blocks=identity_blocks,
                           identity_sublayers=identity_sublayers)


@functools.lru_cache(maxsize=64)
def _gradient_flow_fn(key: Any, train: bool, identity_sublayers: tuple[str, ...]):
    model = _model_for(key)
    L = model.depth
    act_name = _activation_name(model)
    own = _is_own_model(model)

    def run(variables, x, y, mask):
        hs = model.hidden_states(variables, x, train=train)

        def top_loss(eps):
            if not own:  # the protocol's head: dLoss/dh^L directly
                logits = model.head_fn(variables, train=train)(hs[L] + eps)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            # dLoss/dh^L of the real model (its own head and pooling): with every
            # block's backward replaced by the identity, dLoss/dh^0 = dLoss/dh^L,
            # and the forward pass is unchanged.
            logits, _ = _stem_perturbed_apply(
                model, variables, x, eps, train=train,
                identity_blocks=jnp.ones((L,), bool), identity_sublayers=())
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def attributed_loss(params):
            # identity_sublayers is () for models without sub-layers (checked
            # by gradient_flow), and the protocol's apply does not take it.
            extra = {"identity_sublayers": identity_sublayers} if identity_sublayers else {}
            logits, _ = model.apply({**variables, "params": params}, x, train=train,
                                    identity_blocks=mask, **extra)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(attributed_loss)(variables["params"])
        g_top = jax.grad(top_loss)(jnp.zeros_like(hs[0]))

        # dLoss/dh^{l-1} = dLoss/dh^l J_l (or = dLoss/dh^l where block l is attributed).
        def back(g, l):
            block = (_block_apply(model, variables, l, train, identity_sublayers) if own
                     else model.block_fn(variables, l, train=train))
            _, vjp = jax.vjp(block, hs[l - 1])
            g_prev = jnp.where(mask[l - 1], g, vjp(g)[0])
            return g_prev, scaled_norms([g_prev[None]])[0]

        _, below = jax.lax.scan(back, g_top, jnp.arange(L, 0, -1))
        hidden = jnp.concatenate([below[::-1], scaled_norms([g_top[None]])])

        # The same per-part norms as the training step's metrics.
        weight = block_norms(grads)
        stem, head = (part_norms(grads)[k] for k in ("stem", "head"))

        def block_stats(l):
            _, acts = _block_apply(model, variables, l, train, (), capture=True)(hs[l - 1])
            return _activation_stats(act_name, jnp.stack(acts))

        if own:
            stats = jax.lax.map(block_stats, jnp.arange(1, L + 1))
            stem_stats = _activation_stats(act_name, hs[0])
            stats = tuple(jnp.concatenate([s0[None], s]) for s0, s in zip(stem_stats, stats))
        else:  # no sub-layers to look into: the hidden states h^0 .. h^L
            stats = jax.vmap(lambda h: _activation_stats(act_name, h))(hs)
        return loss, weight, hidden, stem, head, stats

    return jax.jit(run)


def _num_classes(model: Any, variables: dict, x: jax.Array, train: bool) -> int | None:
    """The model's number of classes: its config's, else the width of its logits."""
    num = getattr(getattr(model, "cfg", None), "num_classes", None)
    if num is not None:
        return int(num)
    try:
        logits = jax.eval_shape(lambda v, xs: model.apply(v, xs, train=train)[0], variables, x)
        return int(logits.shape[-1])
    except Exception:  # not knowable without running the model: the loss check still applies
        return None


def _check_labels(model: Any, variables: dict, x: jax.Array, labels: Any, train: bool) -> None:
    """ValueError unless ``labels`` are integer class labels in [0, num_classes), as
    ``fit`` requires (out-of-range labels give a NaN loss but normal-looking norms).
    Traced labels (inside jit) cannot be checked and are let through."""
    if isinstance(labels, jax.core.Tracer):
        return
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise ValueError(f"invalid batch['y'] of dtype {y.dtype}: labels must be integer class "
                         "indices (e.g. np.int32), not floats, booleans or strings")
    num_classes = _num_classes(model, variables, x, train)
    bad = (y < 0) | (y >= num_classes) if num_classes is not None else (y < 0)
    if bad.any():
        where = f"[0, {num_classes})" if num_classes is not None else "[0, num_classes)"
        raise ValueError(f"invalid batch['y']: {int(bad.sum())} label(s) outside {where}, e.g. "
                         f"{int(y[bad][0])} (the model has {num_classes} classes)")


def gradient_flow(model: Any, variables: dict, batch: dict, *, train: bool = True,
                  identity_blocks: Sequence[int] | np.ndarray | None = None,
                  identity_sublayers: Sequence[str] = ()) -> GradientReport:
    """Per-block gradient norms and activation statistics of the real loss on ``batch``.

    Args:
      model, variables: a model of the analysis protocol with ``apply`` and
        ``head_fn`` (``vgrad.models.build``, ``layered``, ``from_linen``,
        ``from_nnx``; see ``vgrad.models.AnalysisModel``) and its variables, whose
        ``params`` are ``{"stem", "blocks" (stacked), "head"}``.
      batch: ``{"x": (B, ...), "y": (B,) int labels}``; labels must be integers
        in [0, num_classes) (ValueError naming the first bad one otherwise).
      train: BatchNorm uses batch statistics (True, as in a training step) or
        running averages (False). Updated running averages are discarded.
      identity_blocks: 1-based block indices, or a bool mask (L,), whose
        Jacobian is the identity in the backward pass.
      identity_sublayers: subset of ("dense", "norm", "activation") whose
        Jacobians are the identity in the backward pass, in every block; only
        for vgrad's own models (ValueError otherwise).

    Weight gradients come from ``jax.grad`` of the full model's loss. Hidden
    gradients: dLoss/dh^L from the full model, then one VJP per block down the
    stack (applying the same attribution); they equal autodiff of the full loss
    with respect to each h^l. Jitted, cached per (model key, train, sublayers).
    """
    sub = tuple(sorted(set(identity_sublayers)))
    unknown = set(sub) - set(SUBLAYER_KINDS)
    if unknown:
        raise ValueError(f"invalid identity_sublayers={sorted(unknown)}: allowed values are "
                         + ", ".join(SUBLAYER_KINDS))
    check_protocol(model, () if _is_own_model(model) else GRADIENT_FLOW_ATTRIBUTES)
    if sub and not _supports_identity_sublayers(model):
        raise ValueError(
            f"identity_sublayers={list(sub)} needs a model whose sub-layers the analysis can see "
            f"(vgrad.models.build); a {type(model).__name__} supports identity_blocks only: "
            "write a sub-layer's identity backward into your block function instead")
    mask = np.asarray(identity_mask(model.depth, identity_blocks))
    x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    if y.shape != x.shape[:1]:
        raise ValueError(f"batch['y'] must have shape ({x.shape[0]},), got {y.shape}")
    _check_labels(model, variables, x, batch["y"], train)
    fn = _gradient_flow_fn(_cache_key(_canonical_model(model)), bool(train), sub)
    loss, weight, hidden, stem, head, stats = fn(variables, x, y.astype(jnp.int32),
                                                 jnp.asarray(mask))
    mean, std, saturated, dead = (np.asarray(s, np.float64) for s in stats)
    return GradientReport(
        loss=float(loss), weight_grad_norms=np.asarray(weight, np.float64),
        hidden_grad_norms=np.asarray(hidden, np.float64), stem_grad_norm=float(stem),
        head_grad_norm=float(head), activation_mean=mean, activation_std=std,
        saturated_fraction=saturated, dead_fraction=dead,
        identity_blocks=tuple(int(i) + 1 for i in np.flatnonzero(mask)),
        identity_sublayers=sub, train=bool(train))
