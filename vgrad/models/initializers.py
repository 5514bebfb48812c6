"""Weight and bias initialisers selected by ``ModelConfig.init``.

All kernels have the fan-in on axis -2 and the fan-out on axis -1 (Dense:
(in, out); Conv1D: (kernel, in, out), whose receptive field multiplies both).
"""

from __future__ import annotations

import math

from flax import linen as nn

from vgrad.config import ModelConfig

Initializer = nn.initializers.Initializer


def kernel_init(cfg: ModelConfig) -> Initializer:
    """Kernel initialiser for ``cfg.init`` (variance per entry in the comment)."""
    vs = nn.initializers.variance_scaling
    table = {
        "normal": lambda: nn.initializers.normal(stddev=cfg.init_std),  # init_std^2
        # U[-1/sqrt(fan_in), 1/sqrt(fan_in)]: variance 1/(3 fan_in), the old PyTorch/Torch7 default.
        "uniform": lambda: vs(1.0 / 3.0, "fan_in", "uniform"),
        "lecun_normal": lambda: vs(1.0, "fan_in", "truncated_normal"),  # 1/fan_in
        "glorot_uniform": lambda: vs(1.0, "fan_avg", "uniform"),  # 2/(fan_in+fan_out)
        "glorot_normal": lambda: vs(1.0, "fan_avg", "truncated_normal"),
        "he_normal": lambda: vs(2.0, "fan_in", "truncated_normal"),  # 2/fan_in
        "he_uniform": lambda: vs(2.0, "fan_in", "uniform"),
        "orthogonal": lambda: nn.initializers.orthogonal(scale=math.sqrt(cfg.weight_var)),
        "variance_scaling": lambda: vs(cfg.weight_var, "fan_in", "normal"),  # weight_var/fan_in
    }
    return table[cfg.init]()


def bias_init(cfg: ModelConfig) -> Initializer:
    """N(0, bias_var) biases, exactly zero when bias_var == 0."""
    if cfg.bias_var == 0:
        return nn.initializers.zeros
    return nn.initializers.normal(stddev=math.sqrt(cfg.bias_var))
