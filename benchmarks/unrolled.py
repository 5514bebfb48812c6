"""A Python-unrolled reference of vgrad's layered model, for the benchmarks only.

``UnrolledModel(cfg)`` has the same variables as ``vgrad.models.build(cfg)``
(block parameters and statistics stacked on a leading axis of length L), the
same modules (``vgrad.models.blocks.Layer`` / ``Block``) and the same
``init`` / ``apply`` signatures, so it plugs into ``vgrad.train`` unchanged.
The only difference is that ``init`` and ``apply`` run the L blocks as a
Python loop, so the traced programs hold L copies of the block instead of one
``while`` loop body: the classical way of writing a deep network, whose trace
and compile time grow with depth. Given the same variables it computes the
same function as the scanned model (the compile benchmark checks the loss).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vgrad.config import ModelConfig
from vgrad.models.blocks import Block, Layer, to_model_input
from vgrad.models.initializers import kernel_init
from vgrad.models.model import LayeredModel

Variables = dict[str, Any]


class UnrolledModel(LayeredModel):
    """vgrad's model with ``for l in range(L): h = block_l(h)`` instead of ``nn.scan``.

    Only ``init`` and ``apply`` (without identity_blocks / identity_sublayers)
    are supported; that is all training needs.
    """

    def __init__(self, cfg: ModelConfig):
        if cfg.arch != "mlp":
            raise ValueError(f"UnrolledModel supports arch='mlp' only, got {cfg.arch!r}")
        super().__init__(cfg)

    def init(self, key: jax.Array, x: jax.Array) -> Variables:
        """Initial variables, created block by block in a Python loop (L inits in
        the traced program) and stacked into vgrad's layout. Same distributions
        as the scanned model's init, different random streams."""
        cfg = self.cfg
        k_stem, k_blocks, k_head = jax.random.split(key, 3)
        h = to_model_input(cfg, x)
        stem = Layer(cfg, False, shape_preserving=False).init(k_stem, h)
        h = Layer(cfg, False, shape_preserving=False).apply(stem, h)
        block = Block(cfg, False)
        blocks = [block.init(k, h) for k in jax.random.split(k_blocks, cfg.depth)]
        head = nn.Dense(cfg.num_classes, kernel_init=kernel_init(cfg)).init(k_head, h)
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)
        params = {"stem": stem["params"], "blocks": {"block": stacked["params"]},
                  "head": head["params"]}
        stats = {}
        if self.has_batch_stats:
            stats = {"stem": stem["batch_stats"], "blocks": {"block": stacked["batch_stats"]}}
        return {"params": params, "batch_stats": stats}

    def apply(self, variables: Variables, x: jax.Array, *, train: bool,
              identity_blocks=None, identity_sublayers=()) -> tuple[jax.Array, dict]:
        if identity_blocks is not None or identity_sublayers:
            raise ValueError("UnrolledModel does not support identity_blocks/identity_sublayers")
        cfg = self.cfg
        params, stats = variables["params"], variables["batch_stats"]
        mutate = train and self.has_batch_stats

        def run(module: nn.Module, p: Any, s: Any, h: jax.Array) -> tuple[jax.Array, Any]:
            v = {"params": p, **({"batch_stats": s} if s else {})}
            if mutate:
                out, updates = module.apply(v, h, mutable=["batch_stats"])
                return out, updates["batch_stats"]
            return module.apply(v, h), s

        stem_stats = stats.get("stem", {}) if stats else {}
        h, new_stem = run(Layer(cfg, train, shape_preserving=False), params["stem"], stem_stats,
                          to_model_input(cfg, x))
        block = Block(cfg, train)
        new_blocks = []
        for l in range(1, cfg.depth + 1):  # the Python loop: L blocks in the traced program
            bv = self.block_variables(variables, l)
            h, s = run(block, bv["params"], bv["batch_stats"], h)
            new_blocks.append(s)
        logits = nn.Dense(cfg.num_classes, kernel_init=kernel_init(cfg)).apply(
            {"params": params["head"]}, h)
        if not mutate:
            return logits, stats
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *new_blocks)
        return logits, {"stem": new_stem, "blocks": {"block": stacked}}
