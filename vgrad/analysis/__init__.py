"""Gradient analysis: Jacobian products, gradient flow, mean-field theory.

Every function takes a model of the analysis protocol documented in
``vgrad.models.AnalysisModel`` (``depth``, ``hidden_states``, ``block_fn``; plus
``apply`` and ``head_fn`` for gradient flow): ``vgrad.models.build(cfg)``,
``vgrad.models.layered(stem, block, head, depth)``, ``vgrad.models.from_linen``
or ``vgrad.models.from_nnx``. No ``ModelConfig`` is needed.

- ``jacobian_products(model, variables, x, *, train, key, num_probes=8)`` ->
  ``JacobianReport``: log mean squared singular values of every block Jacobian
  J_l and every product P_l = dh^L/dh^l, matrix-free, in one backward pass.
- ``jacobian_spectrum`` (dense, small nets) and ``top_singular_values``
  (JVP/VJP subspace iteration) of dh^stop/dh^start.
- ``gradient_flow(model, variables, batch, ...)`` -> ``GradientReport``: weight
  and hidden-state gradient norms of the real loss, activation statistics,
  attribution by identity Jacobians.
- ``theory``: q*, chi1, depth scale, predicted per-layer products.
- ``plots`` (imported lazily, it loads matplotlib): ``plot_layer_curves``,
  ``plot_spectrum``, ``plot_grad_norms``.
- ``command``: the ``vgrad analyze`` entry point (``AnalyzeArgs``, ``analyze``).
"""

from vgrad.analysis import theory
from vgrad.analysis.gradients import SATURATION_THRESHOLD, GradientReport, gradient_flow
from vgrad.analysis.jacobians import (JacobianReport, chain_fn, dense_jacobian,
                                      jacobian_products, jacobian_spectrum,
                                      top_singular_values)
from vgrad.analysis.landscape import gradient_direction_probe

_LAZY = {
    "plot_layer_curves": "vgrad.analysis.plots",
    "plot_spectrum": "vgrad.analysis.plots",
    "plot_grad_norms": "vgrad.analysis.plots",
    "AnalyzeArgs": "vgrad.analysis.command",
    "analyze": "vgrad.analysis.command",
}

__all__ = [
    "GradientReport", "JacobianReport", "SATURATION_THRESHOLD", "chain_fn", "dense_jacobian",
    "gradient_direction_probe", "gradient_flow", "jacobian_products", "jacobian_spectrum", "theory",
    "top_singular_values",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vgrad.analysis' has no attribute {name!r}")
