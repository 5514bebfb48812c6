"""Reliability, round two: inputs (issue 9).

6. every float config field rejects NaN/inf, and a checkpoint vgrad writes
   always loads back; 9. gradient_flow validates labels; 10. block_fn refuses
   block indices outside 1..L; 11. analyze refuses a checkpoint under another
   model unless told to override; 12. every malformed data file is one line
   naming the file, the array and what is wrong; 16. submodules are attributes
   of the package.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys
import textwrap
import typing

import jax
import numpy as np
import pytest

from vgrad import DataConfig, ModelConfig, TrainConfig, checkpoint, data, io
from vgrad.models import build

SYNTH = DataConfig(name="synthetic", options=(("dim", 8), ("num_train", 64), ("num_test", 16),
                                              ("num_classes", 4)))
# Non-default values in the fields that only initialisation reads, so the compiled
# program is the one of the other tiny runs of the test suite (compiled once).
TRAINED = ModelConfig(depth=2, width=8, num_classes=4, init="normal", init_std=0.3, bias_var=0.05,
                      weight_var=2.0)


def _float_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if "float" in str(hints[f.name])]


# ----------------------------------------------------------------------------
# 6. NaN / inf in configs; checkpoints always load back
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_field_rejects_non_finite_values(cls, bad):
    fields = _float_fields(cls)
    assert len(fields) >= (6 if cls is ModelConfig else 4)
    for name in fields:
        with pytest.raises(ValueError) as err:
            cls(**{name: bad})
        message = str(err.value)
        assert message.startswith(f"invalid {name}={bad!r}:") and "finite" in message, message
    for text in ("nan", "inf", "-inf"):  # numbers typed on the command line arrive as strings
        if cls is ModelConfig:
            with pytest.raises(ValueError, match="residual_scale=.*finite"):
                ModelConfig(residual_scale=text)
    with pytest.raises(ValueError, match="noise.*finite"):
        data.load("synthetic", kind="gaussian_mixture", noise=math.nan, num_train=8, num_test=4)
    with pytest.raises(ValueError, match="options=.*finite"):
        DataConfig(name="synthetic", options=(("noise", math.inf),))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with a checkpoint, trained with non-default float fields."""
    from vgrad.loop import fit

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_cfg = TrainConfig(batch_size=16, steps=3, learning_rate=1e-3, momentum=0.5,
                            weight_decay=1e-4, clip_value=0.25, seed=5)
    result = fit(build(TRAINED), train_cfg, data.load_config(SYNTH), run_dir=run_dir,
                 checkpoint_every=0, progress=False, run_config={"data": SYNTH})
    return run_dir, train_cfg, result


def test_a_checkpoint_vgrad_writes_loads_back(trained):
    run_dir, train_cfg, result = trained
    ckpt = checkpoint.load_checkpoint(run_dir)
    assert ckpt.model_config == TRAINED
    assert ckpt.train_config == train_cfg
    assert checkpoint.restore_model_config(run_dir) == TRAINED
    for a, b in zip(jax.tree_util.tree_leaves(ckpt.variables),
                    jax.tree_util.tree_leaves(result.state.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("cfg", [
    TRAINED, ModelConfig(residual_scale="inv_sqrt_depth", init="xavier", bias_var=0, leaky_slope=0),
    ModelConfig(activation="leaky_relu", leaky_slope=0.2, residual=True, residual_scale="0.5",
                bn_momentum=0.0, bn_epsilon=1e-12),
    TrainConfig(learning_rate=1e30, weight_decay=0, momentum=0, seed=2**32 - 1, steps=None),
    TrainConfig(learning_rate=5e-324, clip_value=1e-300),
])
def test_every_valid_config_round_trips_through_its_stored_json(cfg):
    stored = json.loads(json.dumps(io.to_jsonable(cfg)))
    assert checkpoint.stored_config(type(cfg), stored) == cfg


def test_a_stored_config_that_no_longer_validates_is_one_clear_error():
    stored = io.to_jsonable(dataclasses.asdict(ModelConfig()))
    stored["bias_var"] = io.to_jsonable(math.inf)  # what an older vgrad stored: the string "inf"
    with pytest.raises(ValueError, match=r"checkpoint runs/x: its stored model config no longer "
                                         r"validates: invalid bias_var=inf: must be a finite"):
        checkpoint.stored_config(ModelConfig, stored, where="runs/x", field="model")
    with pytest.raises(ValueError, match=r"field\(s\) this version of vgrad does not know: colour"):
        checkpoint.stored_config(ModelConfig, {**stored, "bias_var": 0.0, "colour": 1}, where="x",
                                 field="model")


# ----------------------------------------------------------------------------
# 9. gradient_flow labels; 10. block indices
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    model = build(ModelConfig(depth=3, width=8, num_classes=4))
    x = jax.random.normal(jax.random.key(0), (6, 5))
    return model, model.init(jax.random.key(1), x), x


@pytest.mark.parametrize("labels, needle", [
    (np.array([0, 1, 2, 3, 4, 0]), r"1 label\(s\) outside \[0, 4\), e\.g\. 4"),
    (np.array([0, -1, 2, 3, 1, 0]), r"outside \[0, 4\), e\.g\. -1"),
    (np.array([0, 1, 2**40, 3, 1, 0]), r"e\.g\. 1099511627776"),  # not wrapped into int32 range
    (np.array([0, 1.5, 2, 3, 1, 0]), "labels must be integer"),
    (np.array([0, 1, 2, 3, 1, 0], np.float32), "labels must be integer"),
])
def test_gradient_flow_rejects_labels_the_model_cannot_have(small, labels, needle):
    from vgrad.analysis import gradient_flow

    model, variables, x = small
    with pytest.raises(ValueError, match=needle):
        gradient_flow(model, variables, {"x": x, "y": labels})
    report = gradient_flow(model, variables, {"x": x, "y": np.array([0, 1, 2, 3, 1, 0])})
    assert np.isfinite(report.loss)


def test_block_fn_refuses_block_indices_outside_1_to_L(small):
    model, variables, x = small
    h = model.hidden_states(variables, x, train=False)
    for bad in (0, 4, -1, np.int64(7)):
        with pytest.raises(ValueError, match=r"blocks run from 1 to 3"):
            model.block_fn(variables, bad, train=False)
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 3\]"):
        model.block_fn(variables, 1.0, train=False)
    np.testing.assert_allclose(model.block_fn(variables, np.int32(3), train=False)(h[2]), h[3],
                               rtol=1e-5, atol=1e-6)
    traced = jax.jit(lambda l: model.block_fn(variables, l, train=False)(h[1]))(2)  # traced l
    np.testing.assert_allclose(traced, h[2], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# 11. analyze --checkpoint under another model
# ----------------------------------------------------------------------------


def test_analyze_refuses_a_checkpoint_under_another_model_unless_overridden(trained, tmp_path, capsys):
    from vgrad.analysis.command import AnalyzeArgs, analyze
    from vgrad.cli import main

    run_dir, _, _ = trained
    other = dataclasses.replace(TRAINED, activation="tanh", init="he_normal")  # same shapes
    args = AnalyzeArgs(model=other, data=SYNTH, batch_size=4, num_probes=2, checkpoint=str(run_dir),
                       out_dir=str(tmp_path), run_id="a")
    with pytest.raises(ValueError, match=r"model\.activation: checkpoint has 'relu', given 'tanh'"):
        analyze(args)
    assert not (tmp_path / "analyze").exists()
    argv = ["analyze", "--checkpoint", str(run_dir), "--model.activation", "tanh",
            "--out_dir", str(tmp_path), "--data.name", "synthetic", "--data.options", "dim", "8",
            "num_train", "64", "num_test", "16", "num_classes", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.activation: checkpoint has 'relu', given 'tanh'" in err
    assert "--override-model" in err
    # Asked for explicitly, the trained weights are analysed under the given model; on the
    # command line only the typed flags are laid over the checkpoint's config.
    from vgrad.analysis.command import model_for_checkpoint, with_model_fields
    from vgrad.cli import _parse

    assert model_for_checkpoint(dataclasses.replace(args, override_model=True)) == other
    command, parsed = _parse([*argv, "--override-model", "true"])
    assert command == "analyze" and parsed.model == dataclasses.replace(TRAINED, activation="tanh")
    assert model_for_checkpoint(parsed) == parsed.model
    assert with_model_fields(args, set()) is args  # no --model.* flags typed: nothing laid over
    assert model_for_checkpoint(dataclasses.replace(args, model=ModelConfig())) == TRAINED


# ----------------------------------------------------------------------------
# 12. Malformed data files
# ----------------------------------------------------------------------------


def _arrays(**overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((20, 16), np.float32), "y_train": np.arange(20) % 10,
              "x_test": rng.random((10, 16), np.float32), "y_test": np.arange(10) % 10}
    arrays.update(overrides)
    return arrays


@pytest.mark.parametrize("overrides, array, needle", [
    ({"y_train": np.arange(20, dtype=np.int64) % 10 + 2**32}, "y_train",
     "outside [0, 10), e.g. 4294967296"),
    ({"y_test": np.full(10, 2**40 + 3, np.uint64)}, "y_test", "e.g. 1099511627779"),
    ({"x_train": np.float32(3.0)}, "x_train", "is a 0-d array"),
    ({"y_test": np.int64(1)}, "y_test", "is a 0-d array"),
    ({"x_test": np.zeros((0, 16), np.float32), "y_test": np.zeros(0, np.int64)}, "x_test", "is empty"),
    ({"y_train": np.array(["a"] * 20)}, "y_train", "must hold numbers"),
    ({"x_test": np.zeros((10, 16), np.complex64)}, "x_test", "must hold numbers"),
    ({"x_train": np.array([object()] * 20, dtype=object)}, "x_train", "holds Python objects"),
    ({"y_train": np.zeros((20, 2), np.int64)}, "y_train", "must be 1-D"),
    ({"x_test": np.zeros((10, 15), np.float32)}, "x_test", "x_train has (16,)"),
    ({"y_test": np.arange(9) % 10}, "y_test", "x_test has 10 examples"),
])
def test_every_malformed_npz_is_one_line_naming_file_array_and_problem(tmp_path, overrides, array,
                                                                        needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **_arrays(**overrides))
    with pytest.raises(ValueError) as err:
        data.load("mnist", path=str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and array in message, message
    assert needle in message, message
    assert "pickle" not in message  # numbers that are not numbers are not "pickled data"


def _idx(array, code=0x08, fmt=">u1"):
    return (struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            + np.asarray(array).astype(fmt).tobytes())


def test_malformed_idx_files_name_the_file_and_array(tmp_path):
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": _idx(rng.integers(0, 255, (20, 4, 4))),
             "train-labels-idx1-ubyte": _idx(np.arange(20) % 10),
             "t10k-images-idx3-ubyte": _idx(np.zeros((0, 4, 4))),
             "t10k-labels-idx1-ubyte": _idx(np.zeros(0))}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: x_test is empty"):
        data.load("mnist", path=str(tmp_path))
    files["t10k-images-idx3-ubyte"] = _idx(rng.integers(0, 255, (3, 4, 4)))
    files["t10k-labels-idx1-ubyte"] = _idx(np.array([1, 2**31 - 1, 3]), code=0x0C, fmt=">i4")
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: y_test has 1 label\(s\) outside "
                                         r"\[0, 10\), e\.g\. 2147483647"):
        data.load("mnist", path=str(tmp_path))


# ----------------------------------------------------------------------------
# 16. Submodules are attributes of the package
# ----------------------------------------------------------------------------

_ATTRIBUTES = textwrap.dedent("""
    import sys
    import vgrad
    assert "jax" not in sys.modules  # importing vgrad stays cheap
    cfg = vgrad.ModelConfig(depth=2, width=8, num_classes=4)
    model = vgrad.models.build(cfg)
    ds = vgrad.data.load("synthetic", dim=8, num_train=32, num_test=8, num_classes=4)
    import jax
    variables = model.init(jax.random.key(0), ds.x_train[:8])
    report = vgrad.analysis.jacobian_products(model, variables, ds.x_train[:8], train=False,
                                              key=jax.random.key(1), num_probes=2)
    assert callable(vgrad.loop.fit) and callable(vgrad.train.make_train_step)
    for name in ("io", "checkpoint", "parallel", "config", "cli"):
        getattr(vgrad, name)
    print(report.depth, len(ds.y_train), sorted(set(dir(vgrad)) & {"loop", "sweep", "study"}))
""")


def test_submodules_are_attributes_of_the_package():
    import importlib.util

    import vgrad

    proc = subprocess.run([sys.executable, "-c", _ATTRIBUTES], capture_output=True, text=True,
                          timeout=180, env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["2", "32"]
    for name in ("loop", "sweep", "study"):  # the training loop and the study engine, lazily
        assert name in vgrad.SUBMODULES and name in dir(vgrad)
        if importlib.util.find_spec(f"vgrad.{name}") is not None:
            assert getattr(vgrad, name) is sys.modules[f"vgrad.{name}"]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        vgrad.nonexistent


def test_largest_seed_gives_a_key_no_smaller_seed_gives():
    """Seeds are capped at 2**32 - 1 because jax.random.key keeps only the low
    32 bits without x64: a larger seed would silently repeat a smaller one."""
    from vgrad.config import MAX_SEED

    top = jax.random.key_data(jax.random.key(MAX_SEED))
    assert not np.array_equal(top, jax.random.key_data(jax.random.key(0)))
    assert np.array_equal(jax.random.key_data(jax.random.key(MAX_SEED + 1)),
                          jax.random.key_data(jax.random.key(0)))
    with pytest.raises(ValueError, match=r"invalid seed=4294967296"):
        TrainConfig(seed=MAX_SEED + 1)
