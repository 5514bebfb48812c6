"""Layered models: stem -> L scanned, shape-preserving blocks -> head."""

from vgrad.models.activations import activation_fn
from vgrad.models.model import LayeredModel, build

__all__ = ["LayeredModel", "activation_fn", "build"]
