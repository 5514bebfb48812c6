"""Plain-JAX references for the model tests: layers written out from the same
parameters, without Flax, so the models can be checked against them."""

import jax.numpy as jnp


def dense(p, h):
    """Dense layer: h (..., in) @ kernel (in, out) + bias (out,)."""
    return h @ p["kernel"] + p["bias"]


def conv_same(p, h):
    """'SAME' 1-D convolution written with explicit shifts: h (B, T, C) -> (B, T, O)."""
    k = p["kernel"].shape[0]
    left = (k - 1) // 2
    padded = jnp.pad(h, ((0, 0), (left, k - 1 - left), (0, 0)))
    return sum(padded[:, i:i + h.shape[1], :] @ p["kernel"][i] for i in range(k)) + p["bias"]
