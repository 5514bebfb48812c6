"""Every bad input fails early with one clear message naming what is wrong.

From the command line (`vgrad train`): exit status 2, a one-line
"vgrad: error: ..." naming the flag as typed, no traceback, and no run
directory. From Python (`fit`): ValueError naming the field.
"""

import gzip
import struct
import types

import numpy as np
import pytest

from vgrad import ModelConfig, TrainConfig, data
from vgrad.cli import main
from vgrad.models import build
from vgrad.loop import fit

SYNTH = ["--data.name", "synthetic", "--data.options", "dim", "8", "num_train", "64",
         "num_test", "16", "num_classes", "4", "--model.num_classes", "4"]
TINY = ["--model.depth", "2", "--model.width", "8", "--progress", "False"]


def _train(tmp_path, *argv):
    return main(["train", "--out_dir", str(tmp_path / "runs"), *argv])


def _expect_error(tmp_path, capsys, argv, *needles, code=2):
    """Run `vgrad train argv`; it must fail with `code`, print every needle, and write nothing."""
    before = _snapshot(tmp_path / "runs")
    try:
        rc = _train(tmp_path, *argv)
    except SystemExit as exit_:  # tyro: a value it cannot parse or a config that rejects it
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    flat = " ".join(err.split()).replace("│", "")
    flat = " ".join(flat.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {err!r}"
    assert _snapshot(tmp_path / "runs") == before  # no file written, created or changed
    return flat


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


# ----------------------------------------------------------------------------
# Config values and CLI overrides
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["--model.activation", "swish2"], ["activation='swish2'", "allowed values are", "relu", "tanh"]),
    (["--model.norm", "group"], ["norm='group'", "none, batch, noisy_batch, layer"]),
    (["--model.depth", "0"], ["depth=0", ">= 1"]),
    (["--train.optimizer", "lbfgs"], ["optimizer='lbfgs'", "sgd, adam"]),
    (["--train.learning_rate", "-1"], ["learning_rate=-1.0", "> 0"]),
    (["--train.on_nonfinite", "ignore"], ["on_nonfinite='ignore'", "stop, skip"]),
    (["--model.depth", "ten"], ["--model.depth", "ten"]),  # not an integer: tyro names the flag
    (["--seeds", "0"], ["seeds=0", ">= 1"]),
    (["--log_every", "0"], ["log_every=0", ">= 1"]),
    (["--keep_checkpoints", "0"], ["keep_checkpoints=0", ">= 1"]),
    (["--checkpoint_every", "-5"], ["checkpoint_every=-5", ">= 0"]),
    (["--resume", "True"], ["resume=True without run_id", "--run-id"]),
])
def test_bad_config_values_and_overrides(tmp_path, capsys, argv, needles):
    _expect_error(tmp_path, capsys, [*SYNTH, *TINY, *argv], *needles)


def test_unknown_dataset_lists_the_allowed_names(tmp_path, capsys):
    _expect_error(tmp_path, capsys, ["--data.name", "imagenet"],
                  "name='imagenet'", "mnist1d, digits, synthetic, mnist, fashion_mnist")
    with pytest.raises(ValueError, match="imagenet"):
        data.load("imagenet")


def test_dataset_and_model_classes_must_match(tmp_path, capsys):
    _expect_error(tmp_path, capsys, [*SYNTH[:-2], "--model.num_classes", "10", *TINY],
                  "model.num_classes=10", "has 4 classes")


# ----------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------


def _idx(array, dtype_code=0x08):
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1").tobytes()


def _mnist_dir(path, *, truncate=False, label=None):
    path.mkdir()
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": rng.integers(0, 255, (20, 4, 4)),
             "train-labels-idx1-ubyte": np.arange(20) % 10,
             "t10k-images-idx3-ubyte": rng.integers(0, 255, (10, 4, 4)),
             "t10k-labels-idx1-ubyte": np.arange(10) % 10}
    if label is not None:
        files["train-labels-idx1-ubyte"][3] = label
    for name, arr in files.items():
        raw = _idx(np.asarray(arr))
        if truncate and name.startswith("train-images"):
            raw = raw[: len(raw) // 2]
        (path / name).write_bytes(raw)
    return path


def _npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((20, 16), np.float32), "y_train": np.arange(20) % 10,
              "x_test": rng.random((10, 16), np.float32), "y_test": np.arange(10) % 10}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(missing)],
                  "cannot load dataset 'mnist'", str(missing), "does not exist")
    _expect_error(tmp_path, capsys, ["--data.name", "fashion_mnist"], "needs path=")


def test_missing_idx_file(tmp_path, capsys):
    d = _mnist_dir(tmp_path / "idx")
    (d / "t10k-labels-idx1-ubyte").unlink()
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(d)],
                  "missing IDX file", "t10k-labels-idx1-ubyte")


def test_truncated_idx_file(tmp_path, capsys):
    d = _mnist_dir(tmp_path / "idx", truncate=True)
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(d)],
                  "train-images-idx3-ubyte", "truncated IDX file")


def test_corrupt_gzip_and_npz(tmp_path, capsys):
    d = _mnist_dir(tmp_path / "idx")
    raw = (d / "train-labels-idx1-ubyte").read_bytes()
    (d / "train-labels-idx1-ubyte").unlink()
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw)[:-12])
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(d)],
                  "corrupt or truncated gzip data")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(bad)],
                  "cannot read npz")


def test_labels_out_of_range(tmp_path, capsys):
    d = _mnist_dir(tmp_path / "idx", label=12)
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(d)],
                  "y_train has 1 label(s) outside [0, 10)", "e.g. 12")
    p = _npz(tmp_path / "neg.npz", y_test=np.full(10, -1))
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(p)],
                  "y_test has 10 label(s) outside [0, 10)")


def test_nan_and_inf_in_input_data(tmp_path, capsys):
    x = np.random.default_rng(0).random((20, 16), np.float32)
    x[3, 2], x[7, 1] = np.nan, np.inf
    p = _npz(tmp_path / "nan.npz", x_train=x)
    _expect_error(tmp_path, capsys, ["--data.name", "mnist", "--data.path", str(p),
                                     "--data.standardize", "False"],
                  "x_train contains non-finite values: 1 NaN, 1 Inf")


def _plain_dataset(ds, **changes):
    fields = dict(x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                  num_classes=ds.num_classes, num_train=ds.num_train, name="custom")
    fields.update(changes)
    return types.SimpleNamespace(**fields)


def test_fit_validates_data_it_is_given():
    ds = data.load("synthetic", dim=8, num_train=64, num_test=16, num_classes=4)
    model = build(ModelConfig(depth=2, width=8, num_classes=4))
    x = ds.x_train.copy()
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="x_train contains non-finite values: 0 NaN, 1 Inf"):
        fit(model, TrainConfig(batch_size=16), data.Dataset(x, ds.y_train, ds.x_test, ds.y_test, 4),
            progress=False)
    y = ds.y_train.copy()
    y[0] = 7
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        fit(model, TrainConfig(batch_size=16), data.Dataset(ds.x_train, y, ds.x_test, ds.y_test, 4),
            progress=False)
    with pytest.raises(ValueError, match="model.num_classes=4: dataset 'custom' has 9 classes"):
        fit(model, TrainConfig(batch_size=16), _plain_dataset(ds, num_classes=9), progress=False)


# ----------------------------------------------------------------------------
# Batch sizes
# ----------------------------------------------------------------------------


def test_batch_size_larger_than_dataset(tmp_path, capsys):
    _expect_error(tmp_path, capsys, [*SYNTH, *TINY, "--train.batch_size", "100"],
                  "train.batch_size=100", "larger than the 64 training examples")
    ds = data.load("synthetic", dim=8, num_train=64, num_test=16, num_classes=4)
    with pytest.raises(ValueError, match="train.batch_size=65: larger than the 64"):
        fit(build(ModelConfig(depth=2, width=8, num_classes=4)), TrainConfig(batch_size=65), ds,
            progress=False)


def test_batchnorm_in_training_mode_with_batch_size_one(tmp_path, capsys):
    _expect_error(tmp_path, capsys,
                  [*SYNTH, *TINY, "--model.norm", "batch", "--train.batch_size", "1"],
                  "train.batch_size=1 with model.norm='batch'", "variance is 0")
    ds = data.load("synthetic", dim=8, num_train=64, num_test=16, num_classes=4)
    with pytest.raises(ValueError, match="variance is 0"):
        fit(build(ModelConfig(depth=2, width=8, num_classes=4, norm="batch")),
            TrainConfig(batch_size=1), ds, progress=False)
    # Without BatchNorm a batch of one is legitimate.
    result = fit(build(ModelConfig(depth=2, width=8, num_classes=4, norm="layer")),
                 TrainConfig(batch_size=1, steps=2), ds, progress=False)
    assert result.status == "completed"


# ----------------------------------------------------------------------------
# Run directories and --resume
# ----------------------------------------------------------------------------


def test_resume_errors(tmp_path, capsys):
    base = [*SYNTH, *TINY, "--train.batch_size", "16", "--train.steps", "4", "--checkpoint_every", "2"]
    _expect_error(tmp_path, capsys, [*base, "--run_id", "ghost", "--resume", "True"],
                  "run_id='ghost'", "does not exist")
    assert _train(tmp_path, *base, "--run_id", "r") == 0
    capsys.readouterr()
    flat = _expect_error(tmp_path, capsys, [*base, "--run_id", "r", "--resume", "True",
                                            "--model.width", "16", "--train.optimizer", "adam"],
                         "incompatible config", "model.width: checkpoint has 8, this run has 16",
                         "train.optimizer: checkpoint has 'sgd', this run has 'adam'")
    assert "train.learning_rate" not in flat  # only the fields that differ
    _expect_error(tmp_path, capsys, [*base, "--run_id", "r"], "already holds a run", "--resume true")
    # The same config resumes (here: nothing left to do but the final evaluation).
    assert _train(tmp_path, *base, "--run_id", "r", "--resume", "True") == 0
