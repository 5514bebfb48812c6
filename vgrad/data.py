"""Datasets and deterministic batching for vgrad.

Everything here is plain numpy: datasets are small enough to live in host
memory, and keeping JAX out of this module means data loading never touches
an accelerator.

Datasets (all classification, ``x`` float32, ``y`` int32 in ``[0, num_classes)``):

* ``mnist1d``  -- generated offline with the ``mnist1d`` package's own
  generator at its default arguments; 4000 train / 1000 test, x of shape (N, 40).
  Cached as an ``.npz`` so only the first load pays for generation.
* ``digits``   -- scikit-learn's bundled 8x8 digits; fixed 1437 / 360 split,
  x of shape (N, 64) scaled to [0, 1].
* ``synthetic`` -- teacher-network or Gaussian-mixture data, deterministic
  given ``seed``.
* ``mnist``, ``fashion_mnist`` -- read from files the user already has
  (``path=``: a directory of IDX files or an ``.npz``); x of shape (N, 784)
  in [0, 1].

Batching is a pure function of ``(seed, epoch)`` so a run resumed from a
checkpoint taken mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import random
import struct
import tempfile
import warnings
from typing import Any, Iterator

import numpy as np

from vgrad.config import DATASETS  # one list of names, also validated by DataConfig

# Features whose train std is below this are treated as constant (see _standardize).
_MIN_STD = 1e-6


# ----------------------------------------------------------------------------
# Dataset container
# ----------------------------------------------------------------------------


# eq=False: the generated __eq__ would compare numpy arrays with `==`, which
# raises on truth-testing; identity equality is the honest default here.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test classification dataset held in host memory.

    Attributes:
      x_train: (N_train, *input_shape) float32.
      y_train: (N_train,) int32, values in [0, num_classes).
      x_test: (N_test, *input_shape) float32.
      y_test: (N_test,) int32, values in [0, num_classes).
      num_classes: number of classes.
      name: dataset name, for logging.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (40,) for mnist1d."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def validate(self) -> "Dataset":
        """Checks invariants the training code relies on; returns self.

        Raises:
          ValueError: on empty splits, x/y length mismatch, train/test input
            shape mismatch, non-float x or non-integer y, NaN/Inf in x, or
            labels outside [0, num_classes).
        """
        prefix = f"dataset {self.name!r}: " if self.name else "dataset: "
        if int(self.num_classes) < 1:
            raise ValueError(f"{prefix}num_classes must be >= 1, got {self.num_classes}")
        for split in ("train", "test"):
            x = np.asarray(getattr(self, f"x_{split}"))
            y = np.asarray(getattr(self, f"y_{split}"))
            if x.ndim < 1 or x.shape[0] == 0:
                raise ValueError(f"{prefix}{split} split is empty (x_{split}.shape={x.shape})")
            if y.ndim != 1:
                raise ValueError(f"{prefix}y_{split} must be 1-D, got shape {y.shape}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{prefix}x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}"
                )
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"{prefix}x_{split} must be floating point, got {x.dtype}")
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{prefix}y_{split} must be integer, got {y.dtype}")
            bad = ~np.isfinite(x)
            if bad.any():
                n_nan = int(np.isnan(x).sum())
                n_inf = int(bad.sum()) - n_nan
                raise ValueError(
                    f"{prefix}x_{split} contains non-finite values: {n_nan} NaN, {n_inf} Inf"
                )
            out = (y < 0) | (y >= self.num_classes)
            if out.any():
                raise ValueError(
                    f"{prefix}y_{split} has {int(out.sum())} label(s) outside "
                    f"[0, {self.num_classes}), e.g. {int(y[out][0])} "
                    f"(num_classes={self.num_classes})"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{prefix}train and test inputs differ in shape: "
                f"{self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            )
        return self


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def load(
    name: str = "mnist1d",
    *,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    standardize: bool = True,
    **options: Any,
) -> Dataset:
    """Loads a dataset by name; the result has been validated.

    Args:
      name: one of DATASETS.
      path: required for "mnist"/"fashion_mnist" (directory of IDX files or an
        .npz); must be unset for the other datasets.
      cache_dir: where generated mnist1d arrays are cached; defaults to
        $VGRAD_CACHE_DIR, then ~/.cache/vgrad. Ignored by other datasets.
      seed: only "synthetic" depends on it. The other datasets have fixed,
        canonical splits so results are comparable across training seeds.
      standardize: per-feature (x - mean) / std using *train* statistics only,
        applied to both splits.
      **options: dataset-specific options: "mnist1d" takes num_samples (see
        `_load_mnist1d`), "synthetic" several (see `_load_synthetic`); an unknown
        option raises ValueError.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if path and name not in ("mnist", "fashion_mnist"):
        raise ValueError(f"dataset {name!r} does not read files; got path={str(path)!r}")
    ds = _LOADERS[name](name=name, path=path, cache_dir=cache_dir, seed=seed, options=dict(options))
    # Validate before standardizing so a NaN in the raw data is reported as
    # such, not as a NaN mean smeared over every feature.
    ds.validate()
    if standardize:
        ds = _standardize(ds).validate()
    return ds


def load_config(cfg: Any) -> Dataset:
    """Loads from a DataConfig-like object.

    `cfg` needs attributes name, path, cache_dir, seed, standardize, options
    (options: tuple of (key, value) pairs, or a mapping).
    """
    return load(
        cfg.name,
        path=cfg.path,
        cache_dir=cfg.cache_dir,
        seed=cfg.seed,
        standardize=cfg.standardize,
        **dict(cfg.options),
    )


def _standardize(ds: Dataset) -> Dataset:
    """Per-feature standardization with train statistics applied to both splits.

    Features that are constant on train (std < 1e-6, e.g. MNIST border
    pixels) are only centred, not divided by the clipped std: dividing by 1e-6
    would turn any test-time deviation on such a feature into a ~1e6 input.
    """
    mean = ds.x_train.mean(axis=0, dtype=np.float64)
    std = ds.x_train.std(axis=0, dtype=np.float64)
    std = np.where(std < _MIN_STD, 1.0, std)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    return dataclasses.replace(
        ds,
        x_train=((ds.x_train - mean) / std).astype(np.float32),
        x_test=((ds.x_test - mean) / std).astype(np.float32),
    )


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"unknown option(s) for dataset {name!r}: {', '.join(unknown)}; accepted: {accepted}"
        )


def _make(name, x_train, y_train, x_test, y_test, num_classes) -> Dataset:
    return Dataset(
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=np.ascontiguousarray(y_train, dtype=np.int32),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=np.ascontiguousarray(y_test, dtype=np.int32),
        num_classes=int(num_classes),
        name=name,
    )


# ----------------------------------------------------------------------------
# mnist1d (generated offline, cached)
# ----------------------------------------------------------------------------


def _cache_dir(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is None:
        cache_dir = os.environ.get("VGRAD_CACHE_DIR") or os.path.join("~", ".cache", "vgrad")
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


def _mnist1d_args() -> Any:
    from mnist1d.data import get_dataset_args  # lazy: pulls in scipy/matplotlib

    return get_dataset_args()


def _mnist1d_cache_path(cache_dir: str, args: Any) -> str:
    # Key the file on the generator arguments so a change in the package's
    # defaults produces a new cache file instead of silently reusing old data.
    spec = {k: v for k, v in vars(args).items() if k != "url"}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"mnist1d_{key}.npz")


def _generate_mnist1d(args: Any) -> dict[str, np.ndarray]:
    """Runs mnist1d's own generator (never its download path).

    Returns arrays x_train (4000, 40), y_train (4000,), x_test (1000, 40),
    y_test (1000,) for the default args.
    """
    from mnist1d.data import make_dataset

    # make_dataset reseeds the *global* numpy and `random` RNGs; restore them
    # so loading data cannot change the randomness of unrelated code.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x_train": d["x"], "y_train": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}


def _read_mnist1d_cache(path: str) -> Dataset:
    arrays = _read_npz(path)
    _check_file_arrays(arrays, dict.fromkeys(arrays, path), num_classes=10)
    ds = _make("mnist1d", num_classes=10, **arrays).validate()
    if len(ds.input_shape) != 1:
        raise ValueError(f"expected 2-D x arrays, got input shape {ds.input_shape}")
    return ds


def _write_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes to a temp file in the same directory, then renames over `path`,
    so a crash or a concurrent reader never sees a half-written cache."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        from vgrad.io import default_file_mode

        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; respect the umask instead
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_mnist1d(*, name, path, cache_dir, seed, options) -> Dataset:
    """MNIST-1D from the package's own generator: its default 5000 samples (4000
    train / 1000 test), or ``num_samples`` (the same 80/20 split; the first
    samples differ from the default set's, the generator draws them in another
    order). More samples are what lets deep MLPs generalise on MNIST-1D."""
    del path, seed  # fixed dataset: the package's default args pin its seed (42)
    _check_options(name, options, ("num_samples",))
    args = _mnist1d_args()
    if "num_samples" in options:
        num = options["num_samples"]
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 10:
            raise ValueError(f"invalid data.options num_samples={num!r}: must be an integer >= 10")
        args.num_samples = int(num)
    cache_path = _mnist1d_cache_path(_cache_dir(cache_dir), args)
    if os.path.exists(cache_path):
        try:
            return _read_mnist1d_cache(cache_path)
        except Exception as e:  # corrupt/partial file: regenerate, don't fail
            warnings.warn(
                f"ignoring unreadable mnist1d cache {cache_path} ({type(e).__name__}: {e}); "
                "regenerating",
                RuntimeWarning,
                stacklevel=3,
            )
    arrays = _generate_mnist1d(args)
    ds = _make(name, num_classes=10, **arrays)
    try:
        _write_npz_atomic(cache_path, {k: getattr(ds, k) for k in arrays})
    except OSError as e:  # e.g. read-only home: caching is an optimisation only
        warnings.warn(f"could not write mnist1d cache {cache_path}: {e}", RuntimeWarning, stacklevel=3)
    return ds


# ----------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# ----------------------------------------------------------------------------

_DIGITS_NUM_TRAIN = 1437  # 80% of 1797; the remaining 360 are the test set
_DIGITS_SPLIT_SEED = 0  # fixed so every run, whatever its seed, uses one split


def _load_digits(*, name, path, cache_dir, seed, options) -> Dataset:
    del path, cache_dir, seed
    _check_options(name, options, ())
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data / 16.0  # pixel intensities are integers 0..16
    y = bunch.target
    # The bundled order is not i.i.d. (grouped by writer), so shuffle once
    # with a fixed seed before splitting.
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(y))
    tr, te = perm[:_DIGITS_NUM_TRAIN], perm[_DIGITS_NUM_TRAIN:]
    return _make(name, x[tr], y[tr], x[te], y[te], num_classes=10)


# ----------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------

_SYNTHETIC_DEFAULTS = {
    "dim": 32,
    "num_classes": 10,
    "num_train": 4096,
    "num_test": 1024,
    "kind": "teacher",
    "hidden": 64,  # teacher only: width of the teacher's hidden layer
    "noise": 1.0,  # gaussian_mixture only: per-coordinate std around each class mean
}
_SYNTHETIC_KINDS = ("teacher", "gaussian_mixture")


def _load_synthetic(*, name, path, cache_dir, seed, options) -> Dataset:
    """Synthetic classification data, deterministic given `seed`.

    Options: dim, num_classes, num_train, num_test, kind ("teacher" or
    "gaussian_mixture"), hidden (teacher), noise (gaussian_mixture).

    * teacher: x ~ N(0, I_dim); y = argmax of a random tanh network
      W2 tanh(W1 x / sqrt(dim)) / sqrt(hidden), with each logit standardized
      over a reference sample so that classes are roughly balanced.
    * gaussian_mixture: class means ~ N(0, I_dim); x = mean[y] + noise * N(0, I);
      labels exactly balanced (cycled, then shuffled).

    The model, train set and test set use independent RNG streams derived from
    `seed`, so changing num_train does not change the test set or the model.
    """
    del path, cache_dir
    _check_options(name, options, tuple(_SYNTHETIC_DEFAULTS))
    o = {**_SYNTHETIC_DEFAULTS, **options}
    kind = o["kind"]
    if kind not in _SYNTHETIC_KINDS:
        raise ValueError(f"synthetic: unknown kind {kind!r}; expected one of {_SYNTHETIC_KINDS}")
    if kind != "teacher" and "hidden" in options:
        raise ValueError("synthetic: option 'hidden' only applies to kind='teacher'")
    if kind != "gaussian_mixture" and "noise" in options:
        raise ValueError("synthetic: option 'noise' only applies to kind='gaussian_mixture'")
    for key in ("dim", "num_classes", "num_train", "num_test", "hidden"):
        if not isinstance(o[key], (int, np.integer)) or isinstance(o[key], bool) or o[key] < 1:
            raise ValueError(f"synthetic: option {key!r} must be a positive integer, got {o[key]!r}")
    dim, c, n_train, n_test = (int(o[k]) for k in ("dim", "num_classes", "num_train", "num_test"))
    noise_ok = isinstance(o["noise"], (int, float, np.number)) and not isinstance(o["noise"], bool)
    if not noise_ok or not np.isfinite(float(o["noise"])) or float(o["noise"]) < 0:
        raise ValueError(f"synthetic: option 'noise' must be a finite number >= 0, got {o['noise']!r}")

    model_rng, train_rng, test_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    if kind == "teacher":
        h = int(o["hidden"])
        w1 = model_rng.standard_normal((dim, h))
        w2 = model_rng.standard_normal((h, c))

        def logits(x):  # (N, dim) -> (N, c)
            return np.tanh(x @ w1 / np.sqrt(dim)) @ w2 / np.sqrt(h)

        # Raw argmax labels are badly imbalanced (some classes nearly empty);
        # standardizing each logit over a fixed reference sample evens them out.
        ref = logits(model_rng.standard_normal((4096, dim)))
        mu, sd = ref.mean(axis=0), ref.std(axis=0) + 1e-12

        def sample(rng, n):
            x = rng.standard_normal((n, dim))
            return x, ((logits(x) - mu) / sd).argmax(axis=1)

    else:
        means = model_rng.standard_normal((c, dim))
        noise = float(o["noise"])

        def sample(rng, n):
            y = rng.permutation(np.arange(n) % c)
            return means[y] + noise * rng.standard_normal((n, dim)), y

    x_train, y_train = sample(train_rng, n_train)
    x_test, y_test = sample(test_rng, n_test)
    return _make(name, x_train, y_train, x_test, y_test, num_classes=c)


# ----------------------------------------------------------------------------
# mnist / fashion_mnist (user-provided files)
# ----------------------------------------------------------------------------

# IDX type codes (third magic byte) -> element dtype; IDX data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (as used by MNIST), optionally gzip-compressed.

    Format: 2 zero bytes, a type code byte (0x08 = uint8, ...), a byte giving
    the number of dims, then one big-endian uint32 per dim, then the data.
    Compression is detected from the content, not the suffix.

    Returns:
      array of shape dims, in native byte order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError (naming the path): bad gzip stream, bad magic, truncated
        header or data, or trailing bytes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:2] == b"\x1f\x8b":  # gzip magic
        try:
            buf = gzip.decompress(buf)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(buf) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(buf)} bytes, header needs 4)")
    if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES or buf[3] == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{buf[:4].hex()} "
            "(expected 0x0000 then a type code such as 08 and a dim count)"
        )
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(buf)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = np.dtype(_IDX_DTYPES[buf[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(buf) - header
    if actual < expected:
        raise ValueError(
            f"{path}: truncated IDX file: dims {dims} need {expected} data bytes, found {actual}"
        )
    if actual > expected:
        raise ValueError(
            f"{path}: IDX size mismatch: dims {dims} need {expected} data bytes, found {actual}"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, base: str) -> str:
    for candidate in (base, base + ".gz"):
        p = os.path.join(directory, candidate)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(
        f"missing IDX file in {directory}: expected {base} or {base}.gz"
    )


def _read_idx_dir(directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four IDX arrays of a directory, and the file each came from."""
    arrays, sources = {}, {}
    for key, base in _IDX_FILES.items():
        p = _find_idx(directory, base)
        a = read_idx(p)
        want = 3 if key.startswith("x") else 1
        if a.ndim != want:
            raise ValueError(f"{p}: expected a {want}-D IDX array for {key}, got shape {a.shape}")
        arrays[key], sources[key] = a, p
    return arrays, sources


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test of an .npz (never unpickling anything).

    Every failure is one ValueError naming the file and, where it is about one
    array, the array.
    """
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip, truncated, ...
        raise ValueError(f"{path}: cannot read npz ({type(e).__name__}: {e})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an npz archive (np.load read a single array of shape "
                         f"{np.shape(f)}); expected an .npz with keys {', '.join(_SPLIT_KEYS)}")
    with f:
        found = list(f.files)
        missing = [k for k in _SPLIT_KEYS if k not in found]
        if missing:
            raise ValueError(
                f"{path}: npz is missing key(s) {', '.join(missing)}; "
                f"expected {', '.join(_SPLIT_KEYS)}, found {', '.join(found) or 'none'}"
            )
        arrays = {}
        for k in _SPLIT_KEYS:
            try:
                arrays[k] = f[k]
            except ValueError as e:
                if "allow_pickle" in str(e):  # an object array: only loadable by unpickling
                    raise ValueError(
                        f"{path}: {k} holds Python objects (dtype object), not numbers; save it "
                        "as a numeric array, e.g. np.asarray(values, np.float32)") from e
                raise ValueError(f"{path}: cannot read {k} ({type(e).__name__}: {e})") from e
            except Exception as e:  # truncated member, bad CRC, ...
                raise ValueError(f"{path}: cannot read {k} ({type(e).__name__}: {e})") from e
    for k in ("y_train", "y_test"):
        if arrays[k].dtype.kind == "f":
            raise ValueError(f"{path}: {k} must hold integer labels, got dtype {arrays[k].dtype}")
    return arrays


_DTYPE_KINDS = {"b": "booleans", "c": "complex numbers", "O": "Python objects", "U": "strings",
                "S": "bytes", "V": "raw records", "M": "datetimes", "m": "timedeltas"}


def _check_file_arrays(arrays: dict[str, np.ndarray], sources: dict[str, str],
                       num_classes: int) -> None:
    """Check arrays read from files before anything converts them; every problem is
    one ValueError naming the file, the array and what is wrong.

    Checked: numeric dtype, at least 1-D, non-empty, labels 1-D integers in
    [0, num_classes) (on the stored values: casting to int32 first would wrap
    large labels into range), finite inputs, as many labels as inputs, and the
    same input shape in both splits.
    """
    for key in _SPLIT_KEYS:
        a, where = arrays[key], f"{sources[key]}: {key}"
        if a.dtype.kind not in "iuf":
            raise ValueError(f"{where} must hold numbers (integers or floats), got dtype {a.dtype} "
                             f"({_DTYPE_KINDS.get(a.dtype.kind, 'not numbers')})")
        if a.ndim == 0:
            raise ValueError(f"{where} is a 0-d array (the single value {a.item()!r}); expected "
                             "one entry per example, shape (N, ...)")
        if a.shape[0] == 0:
            raise ValueError(f"{where} is empty (shape {a.shape}); every split needs at least "
                             "one example")
        if key.startswith("y"):
            if a.ndim != 1:
                raise ValueError(f"{where} must be 1-D (one label per example), got shape {a.shape}")
            if a.dtype.kind == "f":
                raise ValueError(f"{where} must hold integer labels, got dtype {a.dtype}")
            out = (a < 0) | (a >= num_classes)
            if out.any():
                raise ValueError(f"{where} has {int(out.sum())} label(s) outside "
                                 f"[0, {num_classes}), e.g. {int(a[out][0])} "
                                 f"(num_classes={num_classes})")
        elif a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                n_nan = int(np.isnan(a).sum())
                raise ValueError(f"{where} contains non-finite values: {n_nan} NaN, "
                                 f"{int(bad.sum()) - n_nan} Inf")
    for split in ("train", "test"):
        x, y = f"x_{split}", f"y_{split}"
        if len(arrays[x]) != len(arrays[y]):
            raise ValueError(f"{sources[x]}: {x} has {len(arrays[x])} examples but "
                             f"{sources[y]}: {y} has {len(arrays[y])} labels")
    shapes = [np.prod(arrays[x].shape[1:], dtype=np.int64) for x in ("x_train", "x_test")]
    if shapes[0] != shapes[1]:
        raise ValueError(f"{sources['x_test']}: x_test has examples of shape "
                         f"{arrays['x_test'].shape[1:]} but {sources['x_train']}: x_train has "
                         f"{arrays['x_train'].shape[1:]}")


def _to_unit_float(x: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, D) -> (N, H*W) float32. Integer pixels are assumed to be
    0..255 and scaled to [0, 1]; float pixels are assumed already scaled."""
    x = x.reshape(len(x), -1)
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def _load_mnist_files(*, name, path, cache_dir, seed, options) -> Dataset:
    del cache_dir, seed
    _check_options(name, options, ())
    if not path:
        raise ValueError(
            f"dataset {name!r} needs path=: a directory with the 4 IDX files "
            f"({', '.join(_IDX_FILES.values())}, optionally .gz) or an .npz with keys "
            f"{', '.join(_SPLIT_KEYS)}"
        )
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        arrays, sources = _read_idx_dir(path)
    elif os.path.isfile(path):
        arrays, sources = _read_npz(path), dict.fromkeys(_SPLIT_KEYS, path)
    else:
        raise FileNotFoundError(f"dataset {name!r}: path does not exist: {path}")
    _check_file_arrays(arrays, sources, num_classes=10)
    return _make(
        name,
        _to_unit_float(arrays["x_train"]),
        arrays["y_train"],
        _to_unit_float(arrays["x_test"]),
        arrays["y_test"],
        num_classes=10,
    )


_LOADERS = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "mnist": _load_mnist_files,
    "fashion_mnist": _load_mnist_files,
}
assert tuple(_LOADERS) == DATASETS


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order for one epoch: (num_examples,) int64 permutation.

    A pure function of (seed, epoch) -- no hidden RNG state -- so a resumed
    run can recompute the order of the epoch it stopped in.
    """
    if num_examples < 0 or seed < 0 or epoch < 0:
        raise ValueError(
            f"num_examples, seed and epoch must be >= 0, got {num_examples}, {seed}, {epoch}"
        )
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped)."""
    if batch_size < 1 or batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} must be in [1, num_examples] (num_examples={num_examples})"
        )
    return num_examples // batch_size


def epoch_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled training batches of one epoch, from batch index `start` on.

    Yields {"x": (batch_size, *input_shape), "y": (batch_size,)} for batches
    start, start + 1, ..., steps_per_epoch - 1 of the epoch's permutation; the
    last partial batch is dropped so every step has the same shape (one jit
    compilation). Arguments are checked eagerly, not on first iteration.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    steps = steps_per_epoch(len(x), batch_size)
    if not 0 <= start <= steps:
        raise ValueError(f"start={start} must be in [0, {steps}] (steps per epoch)")
    perm = epoch_permutation(len(x), seed=seed, epoch=epoch)

    def gen():
        for i in range(start, steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            yield {"x": x[idx], "y": y[idx]}

    return gen()


def eval_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches in dataset order, keeping the last partial batch so every
    example is evaluated exactly once. Yields {"x": (<=batch_size, ...), "y": ...}."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")

    def gen():
        for i in range(0, len(x), batch_size):
            yield {"x": x[i : i + batch_size], "y": y[i : i + batch_size]}

    return gen()
