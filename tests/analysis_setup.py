"""Shared setup of the analysis tests: tiny models with non-trivial BatchNorm statistics."""

import functools

import jax

import vgrad.models
from vgrad.config import ModelConfig


@functools.lru_cache(maxsize=None)
def _jit_init(cfg: ModelConfig):
    return jax.jit(vgrad.models.build(cfg).init)


def setup(cfg: ModelConfig, batch: int = 3, length: int = 5, seed: int = 0):
    """(model, variables, x) with x (batch, length); one compiled init per config."""
    model = vgrad.models.build(cfg)
    x = jax.random.normal(jax.random.key(seed), (batch, length))
    variables = _jit_init(cfg)(jax.random.key(seed + 1), x)
    if cfg.norm == "batch":  # non-trivial running averages, so eval mode differs from train
        variables = {**variables, "batch_stats": jax.tree_util.tree_map(
            lambda a: a + 0.3 * jax.random.uniform(jax.random.key(seed + 2), a.shape),
            variables["batch_stats"])}
    return model, variables, x
