"""Gradient-flow measurements of the runs of a group, at chosen training steps.

``make_measure(model, x, y)`` returns the ``measure(step, state_R, alive_R)``
callback that :func:`vgrad.loop.train_group` calls at its ``measure_at``
steps (0 = initialisation). For every run of the stacked state it measures,
on one fixed batch (x, y), with BatchNorm in training mode:

* ``log10_product_sq_norms`` (L+1,): log10 ||P_l||_F^2 / n, P_l = dh^L/dh^l
  (:func:`vgrad.analysis.jacobian_products`; index 0 is the first-to-last
  product, the last entry is 0);
* ``log10_layer_sq_norms`` (L,): log10 ||J_l||_F^2 / n of each block;
* ``weight_grad_norms`` (L,), ``hidden_grad_norms`` (L+1,), ``loss`` and the
  per-layer activation statistics ``activation_mean``, ``activation_std``,
  ``saturated_fraction``, ``dead_fraction`` ((L+1,), index 0 = stem)
  (:func:`vgrad.analysis.gradient_flow`);
* ``relative_weight_change`` (L,): ||theta_l(t) - theta_l(0)|| / ||theta_l(0)||
  over all parameters of block l, against the parameters measured at step 0
  (NaN when step 0 was not measured in this process, e.g. after a resume);
* whatever ``extra(model, variables)`` returns for that run (a mapping of
  names to numbers or arrays), when a study passes one: e.g. accuracy with
  running against batch statistics, unit percentiles, loss-landscape probes.

The same probe key is used at every step and for every run, so differences
between runs and steps are not probe noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from vgrad.analysis import gradient_flow, jacobian_products

_STATS = ("activation_mean", "activation_std", "saturated_fraction", "dead_fraction")
# Every name a built-in measurement may use (an extra measurement must not reuse one).
BUILTIN_NAMES = frozenset({"step", "loss", "weight_grad_norms", "hidden_grad_norms", *_STATS,
                           "log10_product_sq_norms", "log10_layer_sq_norms",
                           "relative_weight_change"})


def make_measure(model: Any, x: Any, y: Any, *, num_probes: int = 8, seed: int = 0,
                 products: bool = True, flow: bool = True,
                 extra: Callable[[Any, dict], Mapping[str, Any]] | None = None
                 ) -> Callable[[int, Any, np.ndarray], list[dict]]:
    """The measurement callback for :func:`vgrad.loop.train_group`.

    x: (B, ...) inputs, y: (B,) labels of the measurement batch.
    num_probes: random probes of the Jacobian-product estimator.
    products: False skips ``jacobian_products`` (the cheaper gradient-flow part only).
    flow: False skips ``gradient_flow`` (loss, gradient norms, activation statistics),
        e.g. when a study only wants its ``extra`` measurement.
    extra: ``extra(model, variables) -> {name: value}`` for one run's variables
        (``{"params", "batch_stats"}``, no run axis); its entries join that run's
        measurement (names must not clash with the built-in ones).
    """
    x, y = jax.numpy.asarray(x), jax.numpy.asarray(y)
    key = jax.random.key(seed)

    def measure_one(variables: dict) -> dict:
        out = {}
        if flow:
            grads = gradient_flow(model, variables, {"x": x, "y": y}, train=True)
            out = {"loss": float(grads.loss), "weight_grad_norms": grads.weight_grad_norms,
                   "hidden_grad_norms": grads.hidden_grad_norms,
                   **{name: getattr(grads, name) for name in _STATS}}
        if products:
            jac = jacobian_products(model, variables, x, train=True, key=key, num_probes=num_probes)
            out["log10_product_sq_norms"] = jac.log_product_sq_norms / math.log(10)
            out["log10_layer_sq_norms"] = jac.log_layer_sq_norms / math.log(10)
        if extra is not None:
            added = dict(extra(model, variables))
            clash = sorted(set(added) & BUILTIN_NAMES)
            if clash:
                raise ValueError(f"extra measurement names {clash} clash with built-in ones")
            out.update(added)
        return {k: np.asarray(v).tolist() for k, v in out.items()}

    initial: dict[str, Any] = {}

    def measure(step: int, state: Any, alive: np.ndarray) -> list[dict]:
        del alive  # frozen (diverged) runs are measured at their last good state
        variables = jax.device_get(state.variables)
        if step == 0:
            initial["params"] = variables["params"]
        runs = int(np.shape(jax.tree_util.tree_leaves(state.params)[0])[0])
        change = _relative_change(initial.get("params"), variables["params"], runs)
        return [{**measure_one(jax.tree_util.tree_map(lambda a: a[r], variables)),
                 "relative_weight_change": change[r].tolist()} for r in range(runs)]

    return measure


def _relative_change(initial: Any, params: Any, runs: int) -> np.ndarray:
    """(R, L): per run and block, ||params - initial|| / ||initial|| (NaN without initial)."""
    blocks = jax.tree_util.tree_leaves(params["blocks"])
    depth = int(np.shape(blocks[0])[1])
    if initial is None:
        return np.full((runs, depth), np.nan)
    sq = lambda tree: sum(np.sum(np.square(np.asarray(a, np.float64)).reshape(runs, depth, -1), -1)
                          for a in jax.tree_util.tree_leaves(tree))
    diff = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                  params["blocks"], initial["blocks"])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(sq(diff) / sq(initial["blocks"]))
