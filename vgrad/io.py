"""Results files, written so that a crash never leaves a half-written one.

Every whole-file write goes to a temporary file in the same directory, is
flushed to disk, then renamed over the target (``os.replace`` is atomic on
POSIX and Windows). ``metrics.jsonl`` grows by appending whole lines; a reader
skips a torn last line, so killing a run mid-write loses at most that line.
Files are created with the permissions the umask allows (like ``open``), not
``mkstemp``'s private 0600.

Run directories (see docs/reliability.md):

* :func:`check_run_id` -- a run id is a name, never a path.
* :func:`run_dir_lock` -- one process owns a run directory at a time; a stale
  lock left by a killed process is detected, named and taken over.
* :func:`describe_error`, :func:`is_environment_error`, :func:`write_failure`
  and :data:`EXIT_CODES` -- how a run that failed mid-way is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import re
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
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


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows
    (``/proc/self/status`` on Linux); elsewhere by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def from_jsonable(obj: Any) -> Any:
    """Undo :func:`to_jsonable`'s NaN/Inf strings: "nan", "inf", "-inf" -> floats, recursively."""
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, str) and obj in _NONFINITE:
        return _NONFINITE[obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + fsync + rename).

    The file gets the mode a plain ``open(path, "w")`` would give it (0o666
    minus the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
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
    """The JSON value in ``path`` (NaN/inf kept as the strings :func:`to_jsonable` wrote;
    :func:`from_jsonable` turns them back into floats)."""
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; the line is written with a single write call."""
    line = json.dumps(to_jsonable(record)) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def append_jsonl_many(path: str | os.PathLike, records: list[dict]) -> None:
    """Append several JSON lines with one write call (a chunk of steps at a time)."""
    text = "".join(json.dumps(to_jsonable(r)) + "\n" for r in records)
    with open(path, "a") as f:
        f.write(text)
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


# ----------------------------------------------------------------------------
# Run ids and run directories
# ----------------------------------------------------------------------------


def check_run_id(run_id: Any, *, field: str = "run_id") -> str:
    """Return ``run_id`` if it is a valid run id, else raise ``ValueError``.

    A run id is a *name* (one path component), never a path: it must be a
    non-empty string without ``/``, ``\\``, NUL or control characters, and must
    not be ``.`` or ``..``. So ``root/<command>/<run_id>`` always stays inside
    ``root/<command>/``. ``field`` names the argument in the message.
    """
    why = None
    if not isinstance(run_id, str) or not run_id:
        why = "must be a non-empty name"
    elif run_id in (".", ".."):
        why = "'.' and '..' are not names"
    elif any(sep in run_id for sep in ("/", "\\", os.sep, os.altsep or "/")):
        why = "it must not contain '/' or '\\'"
    elif any(ord(c) < 32 or c == "\x7f" for c in run_id):
        why = "it must not contain control characters"
    if why is not None:
        raise ValueError(f"invalid {field}={run_id!r}: a run id is a name, not a path; {why} "
                         "(the run directory is <out-dir>/<command>/<run-id>)")
    return run_id


def new_run_id() -> str:
    """A fresh run id: the local time to the microsecond, e.g. 20260101-120000-123456."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def run_dir_path(root: str | os.PathLike, experiment: str, run_id: str | None = None) -> Path:
    """``root/experiment/run_id`` (default run id: :func:`new_run_id`), validated, not created."""
    check_run_id(experiment, field="experiment")
    return Path(root) / experiment / (new_run_id() if run_id is None else check_run_id(run_id))


def new_run_dir(root: str | os.PathLike, experiment: str, run_id: str | None = None, *,
                exist_ok: bool = True) -> Path:
    """``root/experiment/run_id`` (default: a timestamp), created.

    ``run_id`` is checked with :func:`check_run_id`. ``exist_ok=False`` refuses
    (``ValueError``) a directory that already exists and is not empty, so a
    command that must never write over an earlier run cannot.
    """
    run_dir = run_dir_path(root, experiment, run_id)
    if not exist_ok and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ValueError(f"invalid run_id={run_dir.name!r}: {run_dir} already exists and is not "
                         "empty; choose another --run-id (a run is never overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


LOCK_FILE = ".vgrad-lock"


class RunDirLockedError(ValueError):
    """The run directory is owned by another live process (:func:`run_dir_lock`).

    A ValueError, so that the command line reports it as bad input (exit 2, one
    line). ``owner`` is what the owner recorded (pid, host, start time, command).
    """

    def __init__(self, message: str, run_dir: Path, owner: dict):
        super().__init__(message)
        self.run_dir, self.owner = run_dir, owner


class StaleLockWarning(RuntimeWarning):
    """A run directory's lock file was left by a process that no longer holds it."""


@dataclasses.dataclass
class RunDirLock:
    """A held run-directory lock (what :func:`run_dir_lock` yields).

    path: the lock file. stale_owner: the record left by a previous owner that
    died without releasing (killed), else None.
    """

    run_dir: Path
    path: Path
    stale_owner: dict | None = None


# Locks held by this process, by real path: flock locks belong to an open file,
# so a second acquisition by the same process must not open the file again.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": list(sys.argv)}


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536).decode("utf-8", "replace").strip()
    except OSError:
        return {}
    if not raw:
        return {}
    try:
        owner = json.loads(raw)
        return owner if isinstance(owner, dict) else {"raw": raw[:200]}
    except json.JSONDecodeError:
        return {"raw": raw[:200]}


def _describe_owner(owner: dict) -> str:
    if not owner.get("pid"):
        return "another process (it did not record its PID)"
    where = f" on {owner['host']}" if owner.get("host") and owner["host"] != socket.gethostname() else ""
    since = f", started {owner['started']}" if owner.get("started") else ""
    return f"process {owner['pid']}{where}{since}"


def _pid_alive(pid: Any) -> bool | None:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, OverflowError):
        return None
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(run_dir: Path, path: Path) -> tuple[int, dict]:
    """Open and flock ``path``; returns (fd, record of a stale previous owner or {})."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read_owner(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLockedError(
                    f"run directory {run_dir} is in use by {_describe_owner(owner)} (lock file "
                    f"{path}); wait for that run to finish, or choose another --run-id",
                    run_dir, owner) from None
            # The filesystem cannot lock (e.g. some network filesystems): run unprotected.
            warnings.warn(f"cannot lock run directory {run_dir} ({err.strerror}); concurrent runs "
                          "with the same run id will not be detected", RuntimeWarning, stacklevel=4)
            return -1, {}
        # A releasing owner unlinks the file: make sure we locked the file that is at `path` now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_owner(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_owner_record()) + "\n").encode())
        os.fsync(fd)
        return fd, previous


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, *, create: bool = True) -> Iterator[RunDirLock]:
    """Own ``run_dir`` for the life of the ``with`` block: one process at a time.

    The lock is an ``fcntl.flock`` on ``run_dir/.vgrad-lock``, which records the
    owner's PID, host, start time and command line. It is released (and the
    file removed) on every way out of the block, including exceptions and
    KeyboardInterrupt; if the process is killed, the kernel releases the flock,
    and the file it leaves behind is detected as *stale* by the next owner, who
    names the dead process in a :class:`StaleLockWarning` and takes over.

    A second process (or a second ``run_dir_lock`` on another open file of the
    same directory) raises :class:`RunDirLockedError` (a ``ValueError``) naming
    the owner, before it writes anything. Within one process the lock is
    re-entrant: nested ``run_dir_lock`` calls on the same directory (the command
    line locks, then the training loop locks again) share the first lock.

    create: make ``run_dir`` (and parents) if missing; else it must exist.
    Yields a :class:`RunDirLock`. POSIX only (flock); on a filesystem without
    flock support it warns and runs unprotected.
    """
    run_dir = Path(run_dir)
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    elif not run_dir.is_dir():
        raise FileNotFoundError(f"run directory does not exist: {run_dir}")
    key = os.path.realpath(run_dir)
    path = run_dir / LOCK_FILE
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:  # re-entrant: this process already owns it
        try:
            yield held[2]
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    fd, previous = _acquire(run_dir, path)
    lock = RunDirLock(run_dir=run_dir, path=path, stale_owner=previous or None)
    with _HELD_GUARD:
        _HELD[key] = [fd, 1, lock]
    try:
        if previous:
            alive = _pid_alive(previous.get("pid"))
            state = ("no longer running" if alive is False else
                     "alive but no longer holding the lock (PID reused?)" if alive else "not checked")
            warnings.warn(f"run directory {run_dir} had a stale lock left by "
                          f"{_describe_owner(previous)} ({state}; killed?); taking it over",
                          StaleLockWarning, stacklevel=3)
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        if fd >= 0:
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    path.unlink()
            except OSError:
                pass
            os.close(fd)  # releases the flock


def check_run_dir_free(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunDirLockedError` (naming the owner) if a live process holds
    ``run_dir``'s lock; never writes. For checking before any other work; the
    lock itself (:func:`run_dir_lock`) is what makes it safe."""
    owner = run_dir_owner(run_dir)
    if owner is not None:
        run_dir = Path(run_dir)
        raise RunDirLockedError(
            f"run directory {run_dir} is in use by {_describe_owner(owner)} (lock file "
            f"{run_dir / LOCK_FILE}); wait for that run to finish, or choose another --run-id",
            run_dir, owner)


def run_dir_owner(run_dir: str | os.PathLike) -> dict | None:
    """The owner record of a run directory's lock if a live process holds it, else None."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_owner(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# Failed runs
# ----------------------------------------------------------------------------

#: Exit status of the ``vgrad`` commands (and of studies) by outcome.
EXIT_CODES = {"completed": 0, "diverged": 1, "interrupted": 1, "bad_input": 2, "failed": 3}

# Canonical status codes of absl/TensorStore/XLA errors: orbax and TensorStore
# report I/O failures (disk full, permission denied, missing files) as
# ValueError("PERMISSION_DENIED: ..."), XLA an out-of-memory as "RESOURCE_EXHAUSTED: ...".
_STATUS_CODES = ("CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
                 "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED", "INTERNAL")
_STATUS = re.compile(r"^(?:[\w.]+: )?(%s): " % "|".join(_STATUS_CODES))
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?'\]|\s*\[source locations='.*?'\]",
                               re.S)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen and len(seen) < 8:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_environment_error(err: BaseException) -> bool:
    """Is ``err`` a failure of the environment (disk, permissions, memory, devices)
    rather than of the input or of the code? True for OSError and MemoryError
    anywhere in the exception chain, and for errors carrying an absl/TensorStore/XLA
    status such as ``PERMISSION_DENIED`` or ``RESOURCE_EXHAUSTED``."""
    for e in _chain(err):
        if isinstance(e, (OSError, MemoryError)):
            return True
        text = str(e)
        if _STATUS.match(text) or "os_error_code=" in text:
            return True
    return False


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of ``text`` without TensorStore's spec dumps, at
    most ``limit`` characters (an ellipsis marks a cut)."""
    text = _TENSORSTORE_SPEC.sub("", str(text)).strip()
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe_error(err: BaseException, limit: int = 400) -> str:
    """One line saying what went wrong: the first line of the message, without
    TensorStore's spec dumps, at most ``limit`` characters; prefixed with the
    exception type unless the message carries its own status code."""
    line = one_line(str(err), limit=100_000)
    if not line:
        line = type(err).__name__
    elif isinstance(err, OSError) or not (_STATUS.match(line) or isinstance(err, ValueError)):
        line = f"{type(err).__name__}: {line}"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def write_failure(run_dir: str | os.PathLike, err: BaseException | str, results: dict | None = None,
                  *, status: str = "failed") -> Path | None:
    """Record a run that failed mid-way: ``run_dir/results.json`` with ``status``
    ("failed"), ``message`` (:func:`describe_error` of ``err``, one line),
    ``error_type`` and the fields of ``results`` (config, seeds, ...). Written
    atomically; returns its path, or None when even that write fails (the disk
    may be the cause). Nothing else in ``run_dir`` is touched.
    """
    message = err if isinstance(err, str) else describe_error(err)
    record = {**(results or {}), "status": status, "message": message}
    if not isinstance(err, str):
        record["error_type"] = type(err).__name__
        record["environment_error"] = is_environment_error(err)
    try:
        return write_json(Path(run_dir) / "results.json", record)
    except Exception:  # the disk itself may be what failed: report, don't mask the cause
        return None
