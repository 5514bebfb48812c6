"""Shared setup of the analysis tests: tiny models with non-trivial BatchNorm statistics."""

import functools
import math

import jax
import numpy as np

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


# name: (config, BatchNorm train mode). Covers mlp/conv, with and without
# BatchNorm (train and eval mode), residual or not.
CASES = {
    "mlp-tanh": (ModelConfig(depth=3, width=4, num_classes=3, activation="tanh",
                             init="variance_scaling", weight_var=1.5, bias_var=0.1), True),
    "mlp-relu-bn-residual-train": (ModelConfig(depth=3, width=4, num_classes=3, norm="batch",
                                               residual=True), True),
    "conv-relu-bn-residual-train": (ModelConfig(arch="conv", depth=3, width=3, num_classes=3,
                                                norm="batch", residual=True, kernel_size=3), True),
    "conv-tanh-bn-eval": (ModelConfig(arch="conv", depth=2, width=3, num_classes=3,
                                      activation="tanh", norm="batch", kernel_size=3), False),
}


@functools.lru_cache(maxsize=None)
def case(name: str):
    """(model, variables, x, train) of a named case, built once per test session."""
    cfg, train = CASES[name]
    return (*setup(cfg), train)


def msv(m: np.ndarray) -> float:
    """Mean squared singular value ||M||_F^2 / n."""
    return float(np.sum(m**2) / m.shape[0])


def probe_sd(m: np.ndarray, k: int) -> float:
    """Standard deviation of mean_i ||u_i^T M||^2 over k unit-sphere probes u_i."""
    n = m.shape[0]
    a = m @ m.T
    var = 2 * n / (n + 2) * (np.sum(a**2) - np.trace(a) ** 2 / n) / n**2
    return math.sqrt(max(var, 0.0) / k)
