"""BatchNorm's extra variables, and its population statistics recomputed after training.

A Flax ``BatchNorm`` layer holds two learnable vectors in ``params`` (``scale``
gamma and ``bias`` beta, one entry per feature) and two running averages in
``batch_stats`` (``mean`` and ``var``), updated in training mode as
``r <- m r + (1 - m) batch_stat`` and used instead of the batch statistics in
evaluation mode. In vgrad's layered models they live at the same path in both
collections, e.g. ``params["stem"]["BatchNorm_0"]["scale"]`` /
``batch_stats["stem"]["BatchNorm_0"]["mean"]``, and the blocks' ones are
stacked along a leading axis of length L (``[...]["blocks"]["block"]...``, shape
(L, width)).

* :func:`count_variables`: how many numbers BatchNorm adds, per part of the model.
* :func:`recompute_batch_stats`: "precise BN" (Wu & Johnson 2021, *Rethinking
  "Batch" in BatchNorm*): replace the running averages, an exponential average
  over past training steps with past weights, by the population statistics of
  the final weights over a data set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgrad.config import ModelConfig, without_init
from vgrad.models import build

Variables = dict[str, Any]
STAT_NAMES = ("mean", "var")


def _is_bn_stats(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == set(STAT_NAMES)


def batchnorm_paths(batch_stats: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (tuples of keys) of every BatchNorm module in a ``batch_stats`` tree:
    the dicts holding exactly ``mean`` and ``var``."""
    if _is_bn_stats(batch_stats):
        return [prefix]
    if not isinstance(batch_stats, dict):
        return []
    return [p for key in batch_stats for p in batchnorm_paths(batch_stats[key], prefix + (key,))]


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _size(tree: Any) -> int:
    # .shape: arrays and jax.ShapeDtypeStruct alike (counts from jax.eval_shape(model.init, ...)).
    return int(sum(math.prod(np.shape(a)) for a in jax.tree_util.tree_leaves(tree)))


def count_variables(variables: Variables) -> dict[str, dict[str, int]]:
    """Numbers in a model's variables, per top-level part of ``params`` ("stem",
    "blocks", "head", ...) and a "total" row.

    variables: ``{"params", "batch_stats"}`` of arrays, or of ``jax.ShapeDtypeStruct``
    (``jax.eval_shape(model.init, key, x)``: counted without allocating anything).
    Each row: ``params`` (all learnable numbers), ``bn_params`` (BatchNorm's
    gamma and beta, included in ``params``), ``bn_stats`` (running mean and var,
    not learnable, not in ``params``) and ``bn_layers`` (BatchNorm layers: a
    stacked (L, width) entry counts L layers). BatchNorm modules are found
    through ``batch_stats`` (a dict with exactly ``mean`` and ``var``), so
    without BatchNorm the three bn counts are 0.
    """
    params, stats = variables["params"], variables.get("batch_stats") or {}
    rows = {part: {"params": _size(tree), "bn_params": 0, "bn_stats": 0, "bn_layers": 0}
            for part, tree in params.items()}
    for path in batchnorm_paths(stats):
        row = rows.setdefault(path[0], {"params": 0, "bn_params": 0, "bn_stats": 0, "bn_layers": 0})
        module_stats = _get(stats, path)
        row["bn_stats"] += _size(module_stats)
        row["bn_layers"] += int(math.prod(module_stats["mean"].shape[:-1]))
        try:
            row["bn_params"] += _size(_get(params, path))  # scale and bias (absent if use_scale=False)
        except KeyError:
            pass
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in
                     ("params", "bn_params", "bn_stats", "bn_layers")}
    return rows


def _combine(per_batch: Any, original: Any) -> Any:
    """Per-batch statistics (leaves with a leading batch axis K) -> population
    statistics: mean = E_k[mu_k], var = E_k[var_k] + Var_k[mu_k]. Entries of
    ``batch_stats`` that are not BatchNorm statistics (e.g. a residual block's
    fixed ``residual_scale``) keep their ``original`` value."""
    if _is_bn_stats(per_batch):
        mu, var = per_batch["mean"], per_batch["var"]
        return {"mean": mu.mean(0), "var": var.mean(0) + mu.var(0)}
    if isinstance(per_batch, dict):
        return {key: _combine(value, original[key]) for key, value in per_batch.items()}
    return original


def _zero_bn_stats(batch_stats: Any) -> Any:
    """``batch_stats`` with BatchNorm means and variances set to 0, other entries kept."""
    if _is_bn_stats(batch_stats):
        return jax.tree_util.tree_map(jnp.zeros_like, batch_stats)
    if isinstance(batch_stats, dict):
        return {key: _zero_bn_stats(value) for key, value in batch_stats.items()}
    return batch_stats


@functools.lru_cache(maxsize=None)
def _population_stats_fn(cfg: ModelConfig):
    """Jitted (variables, x_KxBx...) -> population batch_stats, for models like ``cfg``."""
    # With momentum 0 the "running average" a training-mode forward pass returns
    # is exactly that batch's statistics: r <- 0 * r + 1 * batch_stat.
    probe = build(dataclasses.replace(cfg, bn_momentum=0.0))

    def one_batch(params: Any, zero_stats: Any, x_b: jax.Array) -> Any:
        _, stats = probe.apply({"params": params, "batch_stats": zero_stats}, x_b, train=True)
        return stats

    @jax.jit
    def population(variables: Variables, x_batches: jax.Array) -> Any:
        # Zeroed running averages: 0 * r is 0 even where a stale r is not finite.
        zero = _zero_bn_stats(variables["batch_stats"])
        per_batch = jax.lax.map(lambda x_b: one_batch(variables["params"], zero, x_b), x_batches)
        return _combine(per_batch, variables["batch_stats"])

    return population


def recompute_batch_stats(model: Any, variables: Variables, x: Any, *, batch_size: int) -> Variables:
    """``variables`` with every BatchNorm running mean/var replaced by the population
    statistics of the current weights over ``x`` ("precise BN").

    model: a vgrad model (``vgrad.models.build(cfg)``; it needs ``model.cfg``).
    variables: ``{"params", "batch_stats"}`` of that model (no run axis).
    x: (N, ...) inputs, e.g. the training set; it is cut into K = N // batch_size
        full batches of ``batch_size`` in order (shuffle it first for random
        batches; the last N - K * batch_size examples are not used, since a
        smaller batch would be normalised with statistics unlike training's).
    batch_size: the training batch size. Each batch goes through the network in
        training mode, so layer l sees the activations of earlier layers
        normalised with *batch* statistics, as in training; then, per layer and
        feature, mean = average over batches of the batch means, and
        var = average of the (biased, within-batch) batch variances + the
        variance of the batch means. For the first BatchNorm layer, whose input
        does not depend on batching, these are the mean and variance of its
        inputs over all K * batch_size examples.

    Returns new variables (params unchanged). A model without BatchNorm is
    returned as it is. Pure; jitted per model config and input shape.
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("recompute_batch_stats needs a vgrad model built by vgrad.models.build "
                        f"(with a ModelConfig .cfg), got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"invalid batch_size={batch_size!r}: must be an integer >= 1")
    if cfg.norm != "batch" or not batchnorm_paths(variables.get("batch_stats") or {}):
        return variables
    x = jnp.asarray(x)
    num_batches = x.shape[0] // batch_size
    if num_batches < 1:
        raise ValueError(f"invalid batch_size={batch_size}: x has only {x.shape[0]} examples, "
                         "fewer than one full batch")
    x_batches = x[:num_batches * batch_size].reshape(num_batches, batch_size, *x.shape[1:])
    # One compiled program for every momentum and initialiser of an architecture.
    stats = _population_stats_fn(without_init(dataclasses.replace(cfg, bn_momentum=0.0)))(
        variables, x_batches)
    return {**variables, "batch_stats": stats}
