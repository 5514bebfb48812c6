"""vgrad: measure and fix vanishing gradients in deep networks (JAX/Flax).

Submodules: ``config`` (validated configs), ``models`` (layered models with
every mitigation), ``data`` (offline datasets), ``train`` (jitted training),
``analysis`` (Jacobian products, gradient flow, mean-field theory).
Importing vgrad does no I/O and allocates nothing on a device.
"""

from vgrad.config import DataConfig, ModelConfig, TrainConfig

__all__ = ["DataConfig", "ModelConfig", "TrainConfig"]
__version__ = "0.1.0"
