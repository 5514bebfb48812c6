"""Layered models: stem -> L scanned, shape-preserving blocks -> head.

``build(cfg)`` makes vgrad's own models; ``layered(stem, block, head, depth)``
makes one from your pure functions, ``from_linen`` / ``from_nnx`` (and
``linen_variables``) from Flax networks; all satisfy the analysis protocol
documented in ``AnalysisModel``.
"""

from vgrad.models.activations import activation_fn
from vgrad.models.layered import AnalysisModel, FunctionModel, layered
from vgrad.models.model import LayeredModel, build

# The adapters import flax.nnx (~0.2 s): loaded on first use.
_LAZY = {name: "vgrad.models.adapters" for name in ("from_linen", "from_nnx", "linen_variables")}

__all__ = ["AnalysisModel", "FunctionModel", "LayeredModel", "activation_fn", "build",
           "from_linen", "from_nnx", "layered", "linen_variables"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vgrad.models' has no attribute {name!r}")
