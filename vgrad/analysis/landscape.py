"""The loss landscape along the gradient direction: loss variation, gradient
predictiveness and effective smoothness (Santurkar et al. 2018, "How does batch
normalization help optimization?", Fig. 4).

At parameters θ with the gradient g = ∇L(θ) of the loss on one batch (x, y),
the probe steps along -g by each step size η_k and measures, on the *same*
batch and with the *same* batch statistics (only the parameters move):

* ``losses[k]`` = L(θ - η_k g): the loss along the gradient direction;
* ``grad_distances[k]`` = ‖∇L(θ) - ∇L(θ - η_k g)‖₂ (over every parameter);
* ``loss_variation`` = max_k L(θ - η_k g) - min_k L(θ - η_k g): how much the
  loss changes over the step sizes (Santurkar's "loss landscape" range);
* ``gradient_predictiveness`` = max_k ‖∇L(θ) - ∇L(θ - η_k g)‖₂: how far the
  gradient moves over a step (small = the gradient at θ predicts the gradient
  where the step lands);
* ``effective_beta`` = max_k ‖∇L(θ) - ∇L(θ - η_k g)‖₂ / ‖η_k g‖₂: the largest
  local Lipschitz constant of the gradient along the step ("effective
  β-smoothness"; for a quadratic ½ θᵀAθ it is ‖A ĝ‖ with ĝ = g / ‖g‖).

The loss is the training loss, mean softmax cross-entropy over the batch
(``vgrad.steps.cross_entropy``). With BatchNorm and ``train=True`` the model
normalises with the statistics of the batch (as in a training step) and the
updated running averages are discarded.

Models: anything with vgrad's functional face,
``model.apply(variables, x, train=...) -> (logits, new_batch_stats)`` and
variables ``{"params": ..., "batch_stats": ...}`` (``vgrad.models.build``,
``vgrad.models.layered``, the linen / NNX adapters). Jitted, cached per model
key (models with equal keys, e.g. equal configs, share the compiled probe).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgrad.analysis.jacobians import _cache_key
from vgrad.steps import cross_entropy


class _ModelKey:
    """A model as a static jit argument: hashes and compares by ``_cache_key``, so
    models that compute the same functions share one compiled probe."""

    __slots__ = ("model", "key")

    def __init__(self, model: Any):
        self.model, self.key = model, _cache_key(model)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ModelKey) and self.key == other.key


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree)))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("train",))
def _probe(model_key: _ModelKey, variables: dict, x: jax.Array, y: jax.Array,
           step_sizes_K: jax.Array, *, train: bool) -> dict:
    model = model_key.model
    batch_stats = variables["batch_stats"]

    def loss_fn(params):
        logits, _ = model.apply({**variables, "params": params, "batch_stats": batch_stats}, x,
                                train=train)
        return cross_entropy(logits, y)

    # Jitted inside: traced once, used at θ and inside the map over step sizes.
    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    params = variables["params"]
    loss, grad = loss_and_grad(params)
    grad_norm = _global_norm(grad)

    def along(eta):
        moved = jax.tree_util.tree_map(lambda p, g: p - eta * g, params, grad)
        loss_eta, grad_eta = loss_and_grad(moved)
        distance = _global_norm(jax.tree_util.tree_map(jnp.subtract, grad, grad_eta))
        return loss_eta, distance

    # One step size at a time (lax.map): the memory of one extra forward/backward pass.
    losses_K, distances_K = jax.lax.map(along, step_sizes_K)
    return {"loss": loss, "grad_norm": grad_norm, "losses": losses_K,
            "grad_distances": distances_K}


def gradient_direction_probe(model: Any, variables: dict, x: Any, y: Any,
                             step_sizes: Sequence[float] | np.ndarray, *,
                             train: bool = True) -> dict:
    """Loss and gradient along the (negative) gradient direction on one batch.

    Args:
      model: has ``apply(variables, x, train=...) -> (logits (B, C), batch_stats)``.
      variables: ``{"params": ..., "batch_stats": ...}``; only ``params`` move.
      x: (B, ...) inputs; y: (B,) integer labels in [0, C).
      step_sizes: (K,) step sizes η_k > 0 (units of the parameters per unit of
        gradient, like a learning rate).
      train: BatchNorm with batch statistics (True, as in a training step) or
        with the running averages (False).

    Returns a dict of numpy float64 values:
      ``step_sizes`` (K,), ``loss`` () L(θ), ``grad_norm`` () ‖g‖₂,
      ``losses`` (K,) L(θ - η_k g), ``grad_distances`` (K,) ‖g - ∇L(θ - η_k g)‖₂,
      ``loss_variation`` () max - min of ``losses``,
      ``gradient_predictiveness`` () max of ``grad_distances``,
      ``effective_beta`` () max_k ``grad_distances[k]`` / (η_k ‖g‖₂)
      (NaN when g = 0: no direction to probe).
    """
    eta = np.asarray(step_sizes, np.float64).reshape(-1)
    if eta.size == 0 or not np.all(np.isfinite(eta)) or np.any(eta <= 0):
        raise ValueError(f"invalid step_sizes={np.asarray(step_sizes).tolist()!r}: must be a "
                         "non-empty list of finite numbers > 0")
    x = jnp.asarray(x)
    y_np = np.asarray(y)
    if y_np.dtype.kind not in "iu" or y_np.shape != tuple(x.shape[:1]):
        raise ValueError(f"invalid y of dtype {y_np.dtype} and shape {y_np.shape}: must be integer "
                         f"labels of shape ({x.shape[0]},)")
    out = _probe(_ModelKey(model), variables, x, jnp.asarray(y_np, jnp.int32),
                 jnp.asarray(eta, jnp.float32), train=bool(train))
    out = {k: np.asarray(v, np.float64) for k, v in jax.device_get(out).items()}
    losses, distances, grad_norm = out["losses"], out["grad_distances"], float(out["grad_norm"])
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = distances / (eta * grad_norm) if grad_norm > 0 else np.full_like(eta, np.nan)
    return {"step_sizes": eta, "loss": float(out["loss"]), "grad_norm": grad_norm,
            "losses": losses, "grad_distances": distances,
            "loss_variation": float(np.max(losses) - np.min(losses)),
            "gradient_predictiveness": float(np.max(distances)),
            "effective_beta": float(np.max(beta))}
