"""vgrad: measure and fix vanishing gradients in deep networks (JAX/Flax).

Submodules: ``config`` (validated configs), ``models`` (layered models with
every mitigation), ``data`` (offline datasets), ``train`` (training: ``fit``,
state, jitted steps; from ``steps`` and ``loop``), ``sweep`` (grids of runs),
``measure`` (gradient flow during training), ``study`` and ``plots`` (what
experiments share), ``batchnorm`` (BN variable counts, population statistics),
``batch_noise`` (spread of batch statistics), ``trainable_range`` (the range of
a hyperparameter that trains), ``writers`` (TensorBoard / W&B), ``analysis``
(Jacobian products, gradient flow, loss landscape, mean-field theory),
``checkpoint``, ``parallel``, ``io``.

Every submodule is an attribute of the package, imported on first use:
``import vgrad; vgrad.models.build(cfg)`` works, and ``import vgrad`` itself
stays cheap (no JAX import, no I/O, nothing allocated on a device).
"""

from vgrad.config import DataConfig, ModelConfig, TrainConfig

# Submodules reachable as ``vgrad.<name>``, imported lazily by __getattr__.
SUBMODULES = ("analysis", "batch_noise", "batchnorm", "checkpoint", "cli", "clipping", "config",
              "data", "group_records", "io", "loop", "measure", "models", "parallel", "plots",
              "programs", "steps", "study", "sweep", "train", "trainable_range", "writers")

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", *SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in SUBMODULES:
        import importlib

        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its imports is missing
            raise AttributeError(f"module 'vgrad' has no attribute {name!r} "
                                 f"(no submodule vgrad.{name} in this version)") from None
    raise AttributeError(f"module 'vgrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
