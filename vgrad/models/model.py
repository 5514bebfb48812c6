"""The functional face of the layered model: ``build(cfg)`` -> ``LayeredModel``.

Variables are ``{"params": ..., "batch_stats": ...}`` (batch_stats is ``{}``
without BatchNorm). Block parameters and statistics live under
``variables[...]["blocks"]["block"]`` with a leading axis of length L.
Hidden states are indexed h^0 (the stem output) .. h^L (the last block output);
block l (1-based) maps h^{l-1} -> h^l.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax

from vgrad.config import BATCH_NORMS, ModelConfig
from vgrad.models.blocks import SUBLAYER_KINDS, Block, Network
from vgrad.models.layered import identity_mask

Variables = dict[str, Any]


class LayeredModel:
    """Pure functions of a stem -> L blocks -> head model built from ``cfg``."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    @property
    def depth(self) -> int:
        return self.cfg.depth

    @property
    def has_batch_stats(self) -> bool:
        return self.cfg.norm in BATCH_NORMS

    def _network(self, train: bool, identity_sublayers: Sequence[str] = (),
                 collect: bool = False) -> Network:
        unknown = set(identity_sublayers) - set(SUBLAYER_KINDS)
        if unknown:
            raise ValueError(f"invalid identity_sublayers={sorted(unknown)}: allowed values are "
                             + ", ".join(SUBLAYER_KINDS))
        return Network(self.cfg, train, tuple(sorted(identity_sublayers)), collect)

    def identity_mask(self, identity_blocks: Sequence[int] | jax.Array | None) -> jax.Array:
        """Block indices (1-based) or a bool mask of shape (L,) -> bool mask (L,); ValueError if out of range."""
        return identity_mask(self.cfg.depth, identity_blocks)

    def init(self, key: jax.Array, x: jax.Array) -> Variables:
        """Initial variables for inputs shaped like ``x`` (B, ...). Pure."""
        variables = self._network(train=False).init(key, x, self.identity_mask(None))
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    def _run(self, variables: Variables, x: jax.Array, train: bool, identity_blocks,
             identity_sublayers, collect: bool):
        net = self._network(train, identity_sublayers, collect)
        mutate = train and self.has_batch_stats
        out = net.apply(variables, x, self.identity_mask(identity_blocks),
                        mutable=["batch_stats"] if mutate else False)
        if mutate:
            out, updates = out
            return out, updates["batch_stats"]
        return out, variables["batch_stats"]

    def apply(self, variables: Variables, x: jax.Array, *, train: bool,
              identity_blocks: Sequence[int] | jax.Array | None = None,
              identity_sublayers: Sequence[str] = ()) -> tuple[jax.Array, dict]:
        """Logits (B, num_classes) and the new batch statistics. Pure.

        ``train=True`` normalises with batch statistics and returns updated
        running averages; ``train=False`` uses the running averages and returns
        them unchanged. ``identity_blocks`` / ``identity_sublayers`` replace the
        input-Jacobians of those blocks / sub-layer kinds by the identity in the
        backward pass (forward values unchanged), for gradient attribution.
        """
        return self._run(variables, x, train, identity_blocks, identity_sublayers, False)

    def hidden_states(self, variables: Variables, x: jax.Array, *, train: bool) -> jax.Array:
        """All hidden states stacked, shape (L+1, *h.shape): index l is h^l."""
        (_, hidden), _ = self._run(variables, x, train, None, (), True)
        return hidden

    def check_block_index(self, l: Any) -> None:
        """ValueError unless ``l`` is a valid block index 1..L; a traced index
        (inside jit/scan) cannot be checked and is let through."""
        if isinstance(l, jax.core.Tracer):
            return
        if isinstance(l, bool):
            raise ValueError(f"invalid block index l={l!r}: must be an integer in [1, {self.cfg.depth}]")
        try:
            value = operator.index(l) if not hasattr(l, "shape") or l.shape == () else None
        except TypeError:
            value = None
        if value is None:
            raise ValueError(f"invalid block index l={l!r}: must be an integer in [1, "
                             f"{self.cfg.depth}] (blocks are 1-based: block l maps h^(l-1) -> h^l)")
        if not 1 <= value <= self.cfg.depth:
            raise ValueError(f"invalid block index l={value}: blocks run from 1 to "
                             f"{self.cfg.depth} (block l maps h^(l-1) -> h^l; h^0 is the stem "
                             "output and has no block)")

    def block_variables(self, variables: Variables, l: int | jax.Array) -> Variables:
        """Variables of block l (1-based, 1..L; may be a traced integer).

        A concrete ``l`` outside 1..L raises ValueError (indexing would wrap
        l = 0 to block L and clamp l > L to it).
        """
        self.check_block_index(l)
        take = lambda tree: jax.tree_util.tree_map(lambda a: a[l - 1], tree["blocks"]["block"]) \
            if tree else {}
        return {"params": take(variables["params"]), "batch_stats": take(variables["batch_stats"])}

    def block_fn(self, variables: Variables, l: int | jax.Array, *,
                 train: bool) -> Callable[[jax.Array], jax.Array]:
        """The pure map h^{l-1} -> h^l of block l (1-based, may be traced).

        A concrete ``l`` must be in 1..L (ValueError naming the range otherwise).

        With BatchNorm and ``train=True`` it normalises with the statistics of
        the batch it is given, so it maps a whole batch (B, ...) -> (B, ...).
        """
        block = Block(self.cfg, train)
        block_vars = self.block_variables(variables, l)
        mutate = train and self.has_batch_stats

        def f(h: jax.Array) -> jax.Array:
            if mutate:
                return block.apply(block_vars, h, mutable=["batch_stats"])[0]
            return block.apply(block_vars, h)

        return f


def build(cfg: ModelConfig) -> LayeredModel:
    """The layered model described by ``cfg``."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build expects a ModelConfig, got {type(cfg).__name__}")
    return LayeredModel(cfg)
