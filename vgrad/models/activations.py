"""Activation functions by name, with the facts the analysis needs about them.

Every activation maps an array elementwise. ``prelu`` takes its learnable
per-unit slope as an argument; the model owns that parameter.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vgrad.config import ACTIVATIONS

PRELU_INIT_SLOPE = 0.25

# Families used by gradient-flow statistics: a saturating unit has a tiny
# derivative far from 0; a rectified unit has a (near-)zero derivative for x < 0.
SATURATING = frozenset({"sigmoid", "tanh", "hard_tanh", "softsign"})
RECTIFIED = frozenset({"relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu"})


def activation_fn(name: str, *, leaky_slope: float = 0.01,
                  prelu_slope: float = PRELU_INIT_SLOPE) -> Callable[[jax.Array], jax.Array]:
    """Elementwise activation ``x -> f(x)`` for a registered name.

    ``prelu_slope`` (a scalar or an array broadcastable to x) is only used by
    "prelu"; pass the model's learned slope there, or rely on its initial value.
    """
    table: dict[str, Callable[[jax.Array], jax.Array]] = {
        "linear": lambda x: x,
        "sigmoid": jax.nn.sigmoid,
        "tanh": jnp.tanh,
        "hard_tanh": jax.nn.hard_tanh,
        "softsign": jax.nn.soft_sign,
        "relu": jax.nn.relu,
        "leaky_relu": lambda x: jnp.where(x >= 0, x, leaky_slope * x),
        "prelu": lambda x: jnp.where(x >= 0, x, prelu_slope * x),
        "elu": jax.nn.elu,
        "selu": jax.nn.selu,
        # The exact (erf) GELU, so that quadrature theory and model agree.
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"invalid activation={name!r}: allowed values are {', '.join(ACTIVATIONS)}")
    return table[name]
