"""Adaptive gradient clipping (Brock et al. 2021) for vgrad's parameter layout.

optax's ``adaptive_grad_clip`` infers a "unit" from each leaf's rank (rank 3 =
multi-head Dense, reduced over axis 0). vgrad stacks block parameters along a
leading layer axis and uses 1-D conv kernels (k, in, out), so that inference
would mix units of different layers. Here a unit is one output feature of one
layer: a kernel (..., in, out) is reduced over every axis but the last, a
vector or scalar (bias, BN scale, PReLU slope, residual alpha) is one unit, and
leaves under ``params["blocks"]`` are handled layer by layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _unit_norms(x: jax.Array) -> jax.Array:
    """L2 norm of each unit of one (unstacked) leaf, broadcast to x.shape."""
    axes = tuple(range(x.ndim - 1)) if x.ndim >= 2 else tuple(range(x.ndim))
    return jnp.broadcast_to(jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True)), x.shape)


def _clip_leaf(g: jax.Array, p: jax.Array, clipping: float, eps: float) -> jax.Array:
    max_norm = jnp.maximum(_unit_norms(p), eps) * clipping
    g_norm = _unit_norms(g)
    # Units already within the bound pass through unchanged (not re-scaled up).
    return jnp.where(g_norm > max_norm, g * (max_norm / jnp.maximum(g_norm, 1e-16)), g)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """Clip every unit's gradient to ``clipping * max(||w_unit||, eps)``."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adaptive_grad_clip needs the parameters (optax params argument)")
        clip = lambda g, p: _clip_leaf(g, p, clipping, eps)
        per_layer = jax.vmap(clip)
        out = {k: jax.tree_util.tree_map(per_layer if k == "blocks" else clip, updates[k], params[k])
               for k in updates}
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
