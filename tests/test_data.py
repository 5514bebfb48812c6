"""Tests for vgrad.data. Runs offline; mnist1d is generated once per session."""

import dataclasses
import gzip
import os
import random
import struct

import numpy as np
import pytest

from vgrad import data


def _boom(*args, **kwargs):
    raise AssertionError("must not be called")


# ----------------------------------------------------------------------------
# mnist1d
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """Generates mnist1d once into a fresh cache dir, with the package's
    download path (and any HTTP) booby-trapped."""
    cache = tmp_path_factory.mktemp("vgrad_cache")
    with pytest.MonkeyPatch.context() as mp:
        import mnist1d.data
        import requests

        mp.setattr(mnist1d.data, "get_dataset", _boom)
        mp.setattr(requests, "get", _boom)
        np.random.seed(123)
        random.seed(123)
        np_before, py_before = np.random.random(), random.random()
        np.random.seed(123)
        random.seed(123)
        raw = data.load("mnist1d", cache_dir=cache, standardize=False)
        # Generation must not reseed the global RNGs (mnist1d calls np.random.seed(42)).
        assert np.random.random() == np_before
        assert random.random() == py_before
    return cache, raw


def test_mnist1d_shapes_and_dtypes(mnist1d_cache):
    _, ds = mnist1d_cache
    assert ds.name == "mnist1d"
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.input_shape == (40,) and ds.num_train == 4000 and ds.num_test == 1000
    assert ds.num_classes == 10
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_mnist1d_matches_package_generator(mnist1d_cache):
    from mnist1d.data import get_dataset_args, make_dataset

    _, ds = mnist1d_cache
    ref = make_dataset(get_dataset_args())
    np.testing.assert_allclose(ds.x_train, ref["x"].astype(np.float32))
    np.testing.assert_allclose(ds.x_test, ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, ref["y"])
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])


def test_mnist1d_second_load_hits_cache(mnist1d_cache, monkeypatch):
    cache, first = mnist1d_cache
    files = [f for f in os.listdir(cache) if f.endswith(".npz")]
    assert len(files) == 1 and files[0].startswith("mnist1d")
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]  # temp file renamed away
    monkeypatch.setattr(data, "_generate_mnist1d", _boom)
    again = data.load("mnist1d", cache_dir=cache, standardize=False)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    np.testing.assert_array_equal(again.y_test, first.y_test)


def test_mnist1d_corrupt_cache_is_regenerated(mnist1d_cache, tmp_path):
    cache, first = mnist1d_cache
    (name,) = [f for f in os.listdir(cache) if f.endswith(".npz")]
    bad = tmp_path / name
    bad.write_bytes(b"this is not an npz file")
    with pytest.warns(RuntimeWarning, match="regenerating"):
        ds = data.load("mnist1d", cache_dir=tmp_path, standardize=False)
    np.testing.assert_array_equal(ds.x_train, first.x_train)
    with np.load(bad) as f:  # rewritten with valid content
        np.testing.assert_array_equal(f["y_train"], first.y_train)


def test_mnist1d_cache_dir_from_env(mnist1d_cache, tmp_path, monkeypatch):
    _, first = mnist1d_cache
    fake = {k: getattr(first, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    monkeypatch.setattr(data, "_generate_mnist1d", lambda args: fake)
    monkeypatch.setenv("VGRAD_CACHE_DIR", str(tmp_path / "envcache"))
    data.load("mnist1d")
    assert any(f.endswith(".npz") for f in os.listdir(tmp_path / "envcache"))


def test_mnist1d_rejects_options_and_path(mnist1d_cache):
    cache, _ = mnist1d_cache
    with pytest.raises(ValueError, match="unknown option.*'mnist1d'.*bogus"):
        data.load("mnist1d", cache_dir=cache, bogus=1)
    with pytest.raises(ValueError, match="does not read files"):
        data.load("mnist1d", cache_dir=cache, path="/some/file.npz")


# ----------------------------------------------------------------------------
# standardization
# ----------------------------------------------------------------------------


def test_standardize_uses_train_statistics_only(mnist1d_cache):
    cache, raw = mnist1d_cache
    ds = data.load("mnist1d", cache_dir=cache)  # standardize=True by default
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(ds.x_train.std(0), 1.0, atol=1e-3)
    mean, std = raw.x_train.mean(0, dtype=np.float64), raw.x_train.std(0, dtype=np.float64)
    np.testing.assert_allclose(ds.x_test, (raw.x_test - mean) / std, rtol=1e-4, atol=1e-4)
    # Test statistics were not used: the test split is not exactly centred.
    assert np.abs(ds.x_test.mean(0)).max() > 1e-3
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32


def test_standardize_constant_feature_is_not_blown_up():
    x_train = np.ones((10, 3), np.float32)
    x_train[:, 0] = np.arange(10)
    x_test = np.full((4, 3), 2.0, np.float32)
    y = np.zeros(10, np.int32)
    ds = data._standardize(data.Dataset(x_train, y, x_test, y[:4], num_classes=1))
    np.testing.assert_array_equal(ds.x_train[:, 1:], 0.0)
    np.testing.assert_allclose(ds.x_test[:, 1:], 1.0)  # centred only


# ----------------------------------------------------------------------------
# digits, synthetic
# ----------------------------------------------------------------------------


def test_digits():
    ds = data.load("digits", standardize=False)
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))
    # Fixed split: does not depend on seed.
    other = data.load("digits", standardize=False, seed=7)
    np.testing.assert_array_equal(ds.x_test, other.x_test)
    # Train and test are disjoint (no row of test appears in train).
    train_rows = {r.tobytes() for r in ds.x_train}
    assert sum(r.tobytes() in train_rows for r in ds.x_test) < 5  # a few duplicates exist in digits


@pytest.mark.parametrize("kind", ["teacher", "gaussian_mixture"])
def test_synthetic_deterministic_by_seed(kind):
    a = data.load("synthetic", seed=1, kind=kind, standardize=False)
    b = data.load("synthetic", seed=1, kind=kind, standardize=False)
    c = data.load("synthetic", seed=2, kind=kind, standardize=False)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert not np.array_equal(a.y_train, c.y_train)
    assert a.x_train.shape == (4096, 32) and a.x_test.shape == (1024, 32)
    assert a.num_classes == 10
    assert set(np.unique(a.y_train)) == set(range(10))
    assert set(np.unique(a.y_test)) == set(range(10))


def test_synthetic_options():
    ds = data.load("synthetic", dim=16, num_classes=3, num_train=300, num_test=60, standardize=False)
    assert ds.x_train.shape == (300, 16) and ds.x_test.shape == (60, 16)
    assert set(np.unique(ds.y_train)) == {0, 1, 2}
    # Teacher classes are roughly balanced, not degenerate.
    assert np.bincount(ds.y_train).min() > 300 / 3 / 2
    # Independent streams: a larger train set leaves the test set unchanged.
    bigger = data.load("synthetic", dim=16, num_classes=3, num_train=600, num_test=60, standardize=False)
    np.testing.assert_array_equal(ds.x_test, bigger.x_test)
    np.testing.assert_array_equal(ds.y_test, bigger.y_test)


def test_synthetic_teacher_labels_are_a_function_of_x():
    # Same inputs must get the same labels: the test set labels agree with a
    # nearest-neighbour lookup into train only if labels depend on x at all.
    ds = data.load("synthetic", dim=2, num_classes=3, num_train=2000, num_test=200, standardize=False)
    d = ((ds.x_test[:, None, :] - ds.x_train[None, :, :]) ** 2).sum(-1)
    nn = ds.y_train[d.argmin(1)]
    assert (nn == ds.y_test).mean() > 0.9


def test_gaussian_mixture_noise_controls_separability():
    def nn_acc(noise):
        ds = data.load("synthetic", kind="gaussian_mixture", noise=noise, num_train=500,
                       num_test=200, standardize=False)
        d = ((ds.x_test[:, None, :] - ds.x_train[None, :, :]) ** 2).sum(-1)
        return (ds.y_train[d.argmin(1)] == ds.y_test).mean()

    assert nn_acc(0.1) == 1.0
    assert nn_acc(5.0) < 0.6


def test_synthetic_bad_options():
    with pytest.raises(ValueError, match="unknown option.*'synthetic'.*width"):
        data.load("synthetic", width=3)
    with pytest.raises(ValueError, match="kind"):
        data.load("synthetic", kind="spirals")
    with pytest.raises(ValueError, match="noise"):
        data.load("synthetic", kind="teacher", noise=0.5)
    with pytest.raises(ValueError, match="dim"):
        data.load("synthetic", dim=0)


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError) as e:
        data.load("foo")
    msg = str(e.value)
    assert "'foo'" in msg
    for name in data.DATASETS:
        assert name in msg


def test_load_config():
    @dataclasses.dataclass(frozen=True)
    class DataConfig:
        name: str = "synthetic"
        path: str | None = None
        cache_dir: str | None = None
        seed: int = 3
        standardize: bool = False
        options: tuple = (("dim", 16), ("num_train", 128), ("num_test", 32))

    ds = data.load_config(DataConfig())
    ref = data.load("synthetic", seed=3, standardize=False, dim=16, num_train=128, num_test=32)
    assert ds.x_train.shape == (128, 16)
    np.testing.assert_array_equal(ds.x_train, ref.x_train)


# ----------------------------------------------------------------------------
# IDX / npz files (mnist, fashion_mnist)
# ----------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    """Encodes a uint8 array as IDX, written from the spec independently of
    the reader: magic 0x0000 08 ndim, big-endian uint32 dims, raw bytes."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _small_mnist(rng, n_train=12, n_test=5):
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def _write_idx_dir(directory, arrays, compress):
    directory.mkdir(parents=True, exist_ok=True)
    for key, base in data._IDX_FILES.items():
        raw = _idx_bytes(arrays[key])
        if compress:
            (directory / (base + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / base).write_bytes(raw)


def test_read_idx_other_dtype_big_endian(tmp_path):
    arr = (np.arange(6).reshape(2, 3) * 100_000).astype(">i4")  # big-endian on disk
    p = tmp_path / "ints"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes())
    out = data.read_idx(p)
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3) * 100_000)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_dir_round_trip(tmp_path, compress, name):
    arrays = _small_mnist(np.random.default_rng(0))
    _write_idx_dir(tmp_path / "raw", arrays, compress)
    ds = data.load(name, path=tmp_path / "raw", standardize=False)
    assert ds.name == name
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train, arrays["x_train"].reshape(12, 784) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_npz_round_trip(tmp_path):
    arrays = _small_mnist(np.random.default_rng(1))
    p = tmp_path / "mnist.npz"
    np.savez(p, **arrays)
    ds = data.load("mnist", path=str(p), standardize=False)
    np.testing.assert_allclose(ds.x_test, arrays["x_test"].reshape(5, 784) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])


def test_missing_dir_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.load("mnist", path=missing)


def test_missing_idx_file_names_it(tmp_path):
    _write_idx_dir(tmp_path, _small_mnist(np.random.default_rng(0)), compress=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load("mnist", path=tmp_path)


def test_path_required():
    with pytest.raises(ValueError, match="path"):
        data.load("fashion_mnist")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_idx_names_path(tmp_path, compress):
    arrays = _small_mnist(np.random.default_rng(0))
    _write_idx_dir(tmp_path, arrays, compress=False)
    target = tmp_path / "train-images-idx3-ubyte"
    raw = target.read_bytes()[:-10]
    if compress:
        os.remove(target)
        target = tmp_path / "train-images-idx3-ubyte.gz"
        raw = gzip.compress(raw)
    target.write_bytes(raw)
    with pytest.raises(ValueError, match=f"{target}.*truncated"):
        data.load("mnist", path=tmp_path)


def test_truncated_gzip_stream_names_path(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(_idx_bytes(np.zeros((3, 4), np.uint8)))[:-8])
    with pytest.raises(ValueError, match=str(p)):
        data.read_idx(p)


def test_bad_magic_names_path(tmp_path):
    _write_idx_dir(tmp_path, _small_mnist(np.random.default_rng(0)), compress=False)
    target = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(target.read_bytes())
    raw[0] = 0x12
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{target}.*magic"):
        data.load("mnist", path=tmp_path)
    raw[0], raw[2] = 0, 0x42  # unknown type code
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(target)


def test_mismatched_image_label_counts(tmp_path):
    arrays = _small_mnist(np.random.default_rng(0))
    arrays["y_train"] = arrays["y_train"][:-1]
    _write_idx_dir(tmp_path, arrays, compress=False)
    with pytest.raises(ValueError, match="x_train has 12 examples.*y_train has 11 labels"):
        data.load("mnist", path=tmp_path)


def test_npz_missing_keys_names_path(tmp_path):
    arrays = _small_mnist(np.random.default_rng(0))
    p = tmp_path / "partial.npz"
    np.savez(p, x_train=arrays["x_train"], y_train=arrays["y_train"], images=arrays["x_test"])
    with pytest.raises(ValueError, match=f"{p}.*x_test, y_test") as e:
        data.load("mnist", path=p)
    assert "images" in str(e.value)  # tells the user what *is* there


def test_not_an_npz_names_path(tmp_path):
    p = tmp_path / "garbage.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=str(p)):
        data.load("mnist", path=p)


def test_mnist_labels_out_of_range_rejected(tmp_path):
    arrays = _small_mnist(np.random.default_rng(0))
    arrays["y_test"][2] = 11
    p = tmp_path / "m.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match="y_test.*11.*num_classes=10"):
        data.load("mnist", path=p)


# ----------------------------------------------------------------------------
# Dataset.validate
# ----------------------------------------------------------------------------


def _tiny(**overrides):
    base = dict(
        x_train=np.zeros((6, 3), np.float32),
        y_train=np.array([0, 1, 2, 0, 1, 2], np.int32),
        x_test=np.zeros((2, 3), np.float32),
        y_test=np.array([0, 1], np.int32),
        num_classes=3,
        name="tiny",
    )
    base.update(overrides)
    return data.Dataset(**base)


def test_validate_ok_returns_self():
    ds = _tiny()
    assert ds.validate() is ds
    assert ds.input_shape == (3,) and ds.num_train == 6 and ds.num_test == 2


def test_validate_nan_and_inf():
    x = np.zeros((2, 3), np.float32)
    x[0, 0] = np.nan
    x[1, 2] = np.nan
    x[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"x_test.*2 NaN, 1 Inf"):
        _tiny(x_test=x).validate()


def test_validate_labels_out_of_range():
    with pytest.raises(ValueError, match=r"y_train.*outside \[0, 3\).*5.*num_classes=3"):
        _tiny(y_train=np.array([0, 1, 5, 0, 1, 2], np.int32)).validate()
    with pytest.raises(ValueError, match=r"y_train.*e\.g\. 3 "):  # == num_classes is out of range
        _tiny(y_train=np.array([0, 1, 3, 0, 1, 2], np.int32)).validate()
    with pytest.raises(ValueError, match=r"y_test.*-1"):
        _tiny(y_test=np.array([0, -1], np.int32)).validate()


def test_validate_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="x_train has 6.*y_train has 5"):
        _tiny(y_train=np.zeros(5, np.int32)).validate()
    with pytest.raises(ValueError, match="test split is empty"):
        _tiny(x_test=np.zeros((0, 3), np.float32), y_test=np.zeros(0, np.int32)).validate()
    with pytest.raises(ValueError, match="shape"):
        _tiny(x_test=np.zeros((2, 4), np.float32)).validate()


# ----------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------


def test_epoch_permutation_deterministic_and_varies():
    a = data.epoch_permutation(100, seed=0, epoch=3)
    np.testing.assert_array_equal(a, data.epoch_permutation(100, seed=0, epoch=3))
    np.testing.assert_array_equal(np.sort(a), np.arange(100))
    assert not np.array_equal(a, data.epoch_permutation(100, seed=0, epoch=4))
    assert not np.array_equal(a, data.epoch_permutation(100, seed=1, epoch=3))


def test_steps_per_epoch():
    assert data.steps_per_epoch(100, 32) == 3
    assert data.steps_per_epoch(96, 32) == 3
    assert data.steps_per_epoch(5, 5) == 1
    with pytest.raises(ValueError, match=r"batch_size=101.*num_examples=100"):
        data.steps_per_epoch(100, 101)
    with pytest.raises(ValueError, match="batch_size=0"):
        data.steps_per_epoch(100, 0)


def _xy(n=103):
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    return x, np.arange(n, dtype=np.int32)


def test_epoch_batches_cover_each_example_at_most_once():
    x, y = _xy()
    batches = list(data.epoch_batches(x, y, 10, seed=0, epoch=0))
    assert len(batches) == 10  # 103 // 10, partial batch dropped
    ids = np.concatenate([b["y"] for b in batches])
    assert len(ids) == 100 and len(np.unique(ids)) == 100
    for b in batches:
        assert b["x"].shape == (10, 2)
        np.testing.assert_array_equal(b["x"][:, 0], b["y"])  # x and y stay aligned
    # The order is the epoch permutation, not dataset order.
    np.testing.assert_array_equal(ids, data.epoch_permutation(103, seed=0, epoch=0)[:100])
    other = np.concatenate([b["y"] for b in data.epoch_batches(x, y, 10, seed=0, epoch=1)])
    assert not np.array_equal(ids, other)


@pytest.mark.parametrize("start", [0, 1, 7, 10])
def test_epoch_batches_start_is_tail(start):
    x, y = _xy()
    full = list(data.epoch_batches(x, y, 10, seed=5, epoch=2))
    tail = list(data.epoch_batches(x, y, 10, seed=5, epoch=2, start=start))
    assert len(tail) == len(full) - start
    for a, b in zip(full[start:], tail):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


def test_epoch_batches_errors_are_eager():
    x, y = _xy(10)
    with pytest.raises(ValueError, match="batch_size=11"):
        data.epoch_batches(x, y, 11, seed=0, epoch=0)
    with pytest.raises(ValueError, match="start=3"):
        data.epoch_batches(x, y, 5, seed=0, epoch=0, start=3)
    with pytest.raises(ValueError, match="10 examples.*9"):
        data.epoch_batches(x, y[:9], 5, seed=0, epoch=0)


def test_eval_batches_in_order_keeps_partial():
    x, y = _xy(23)
    batches = list(data.eval_batches(x, y, 10))
    assert [len(b["y"]) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), y)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    assert [len(b["y"]) for b in data.eval_batches(x, y, 50)] == [23]
