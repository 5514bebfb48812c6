"""Results files, written so that a crash never leaves a half-written one.

Every whole-file write goes to a temporary file in the same directory, is
flushed to disk, then renamed over the target (``os.replace`` is atomic on
POSIX and Windows). ``metrics.jsonl`` grows by appending whole lines; a reader
skips a torn last line, so killing a run mid-write loses at most that line.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy/jax arrays and scalars -> plain JSON types (NaN/Inf as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        arr = np.asarray(obj)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "nan", "inf": valid JSON, and visible in the file
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return to_jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; the line is written with a single write call."""
    line = json.dumps(to_jsonable(record)) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """Atomically replace a JSON-lines file with ``records`` (e.g. to truncate it)."""
    return atomic_write_text(path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data to disk (no-op if it does not exist).

    Appended records survive a killed process without this (they are in the
    OS page cache); this makes them survive a machine crash too. Called before
    a checkpoint is taken, so the records a checkpoint counts are on disk.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete records of a JSON-lines file (a torn last line is skipped)."""
    records = []
    if not Path(path).exists():
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def environment_info() -> dict:
    """What a result depends on besides its config: package versions, Python,
    platform, and the JAX backend and devices it ran on."""
    import platform
    import sys
    from importlib import metadata

    import jax

    packages = {}
    for name in ("vgrad", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    devices = jax.devices()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "argv": list(sys.argv),
    }


def new_run_dir(root: str | os.PathLike, experiment: str, run_id: str | None = None) -> Path:
    """``root/experiment/run_id`` (default: a timestamp), created."""
    run_id = run_id or datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = Path(root) / experiment / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
