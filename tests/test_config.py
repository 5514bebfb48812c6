"""Configs: defaults are valid, aliases resolve, every bad value names field, value and choices."""

import dataclasses

import pytest

from vgrad import config
from vgrad.config import DataConfig, ModelConfig, TrainConfig


def test_defaults_are_valid_and_frozen():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3  # type: ignore[misc]
    TrainConfig()
    DataConfig()


@pytest.mark.parametrize("alias, canonical", [("xavier", "glorot_uniform"), ("kaiming", "he_normal")])
def test_init_aliases_resolve_to_canonical_names(alias, canonical):
    assert ModelConfig(init=alias).init == canonical


def test_residual_scale_accepts_numbers_given_as_strings():
    # tyro hands a float|str union over as the string when it looks like a name.
    assert ModelConfig(residual_scale="0.5").residual_scale == 0.5
    assert ModelConfig(residual_scale="learnable_zero").residual_scale == "learnable_zero"


BAD_VALUES = [
    (ModelConfig, "arch", "transformer", ["mlp", "conv"]),
    (ModelConfig, "activation", "swish2", list(config.ACTIVATIONS)),
    (ModelConfig, "init", "zeros", list(config.INITS)),
    (ModelConfig, "norm", "group", ["none", "batch", "layer"]),
    (ModelConfig, "depth", 0, [">= 1"]),
    (ModelConfig, "depth", 2.5, ["integer"]),
    (ModelConfig, "width", 0, [">= 1"]),
    (ModelConfig, "num_classes", 1, [">= 2"]),
    (ModelConfig, "init_std", 0.0, ["> 0"]),
    (ModelConfig, "weight_var", -1.0, ["> 0"]),
    (ModelConfig, "bias_var", -0.1, [">= 0"]),
    (ModelConfig, "bn_momentum", 1.0, ["[0, 1)"]),
    (ModelConfig, "bn_epsilon", 0.0, ["> 0"]),
    (ModelConfig, "residual", "yes", ["true or false"]),
    (ModelConfig, "residual_scale", "huge", ["inv_sqrt_depth", "learnable_zero"]),
    (ModelConfig, "residual_scale", -1.0, [">= 0"]),
    (ModelConfig, "leaky_slope", -0.1, [">= 0"]),
    (TrainConfig, "optimizer", "lbfgs", ["sgd", "adam"]),
    (TrainConfig, "learning_rate", 0.0, ["> 0"]),
    (TrainConfig, "learning_rate", -1e-3, ["> 0"]),
    (TrainConfig, "momentum", 1.5, ["[0, 1)"]),
    (TrainConfig, "schedule", "step", list(config.SCHEDULES)),
    (TrainConfig, "batch_size", 0, [">= 1"]),
    (TrainConfig, "epochs", 0, [">= 1"]),
    (TrainConfig, "steps", 0, [">= 1"]),
    (TrainConfig, "clip", "norm", list(config.CLIPS)),
    (TrainConfig, "clip_value", 0.0, ["> 0"]),
    (TrainConfig, "weight_decay", -1.0, [">= 0"]),
    (TrainConfig, "seed", -1, [">= 0"]),
    (TrainConfig, "on_nonfinite", "ignore", ["stop", "skip"]),
    (DataConfig, "name", "cifar10", list(config.DATASETS)),
]


@pytest.mark.parametrize("cls, field, value, allowed", BAD_VALUES,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _ in BAD_VALUES])
def test_bad_value_names_field_value_and_allowed(cls, field, value, allowed):
    with pytest.raises(ValueError) as err:
        cls(**{field: value})
    message = str(err.value)
    assert f"{field}=" in message and repr(value) in message
    for fragment in allowed:
        assert fragment in message
