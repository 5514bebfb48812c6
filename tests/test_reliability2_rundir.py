"""Reliability, round two: run directories and failures of the environment (issue 9).

1. one process owns a run directory (lock held for the run, stale locks of
   killed processes named and taken over); 2. a run id is a name, never a path,
   and analyze never writes over a run; 3. everything is validated before the
   first file is written; 4. files respect the umask; 7. an environment failure
   mid-run is status "failed", exit 3, one line; 8. Ctrl-C / SIGTERM during
   start-up stop the command with one short line.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from vgrad import io
from vgrad.checkpoint import committed_steps
from vgrad.cli import main

SYNTH = ["--data.name", "synthetic", "--data.options", "dim", "8", "num_train", "64",
         "num_test", "16", "num_classes", "4", "--model.num_classes", "4"]
TINY = [*SYNTH, "--model.depth", "2", "--model.width", "8", "--train.batch_size", "16",
        "--train.steps", "3", "--progress", "False"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "COLUMNS": "200"}


def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def _one_line_error(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vgrad: error: ") and "Traceback" not in err, err
    return lines[0]


def _train(out: Path, *argv: str) -> int:
    return main(["train", "--out_dir", str(out), *TINY, *argv])


def _holder(run_dir: Path) -> subprocess.Popen:
    """A process that takes run_dir's lock and keeps it until killed."""
    code = textwrap.dedent("""
        import sys, time
        import vgrad.io as io
        lock = io.run_dir_lock(sys.argv[1])
        lock.__enter__()
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ----------------------------------------------------------------------------
# 1. One process per run directory
# ----------------------------------------------------------------------------


def test_lock_names_a_live_owner_and_takes_over_a_killed_ones_stale_lock(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "train" / "r"
    holder = _holder(run_dir)
    try:
        with pytest.raises(io.RunDirLockedError, match=f"in use by process {holder.pid}"):
            with io.run_dir_lock(run_dir):
                pass
        # The command line: one line naming the owner, and nothing written.
        before = _snapshot(tmp_path / "runs")
        assert _train(tmp_path / "runs", "--run_id", "r") == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"in use by process {holder.pid}" in line and "--run-id" in line
        assert _snapshot(tmp_path / "runs") == before
    finally:
        holder.kill()
        holder.wait()
    # Killed with SIGKILL: its lock file stays behind, stale; the next run names it and goes on.
    assert (run_dir / io.LOCK_FILE).exists()
    assert _train(tmp_path / "runs", "--run_id", "r") == 0
    err = capsys.readouterr().err
    assert f"stale lock left by process {holder.pid}" in err and "no longer running" in err
    assert io.read_json(run_dir / "results.json")["status"] == "completed"
    assert not (run_dir / io.LOCK_FILE).exists()  # released at the end of the run


def test_lock_is_released_on_every_exit_path_and_reentrant(tmp_path):
    run_dir = tmp_path / "r"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with io.run_dir_lock(run_dir) as lock:
                assert json.loads(lock.path.read_text())["pid"] == os.getpid()
                with io.run_dir_lock(run_dir) as inner:  # the same process may nest
                    assert inner is lock
                assert io.run_dir_owner(run_dir)["pid"] == os.getpid()  # still held
                raise exc
        assert not (run_dir / io.LOCK_FILE).exists() and io.run_dir_owner(run_dir) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cleanly released lock is not stale
        with io.run_dir_lock(run_dir) as lock:
            assert lock.stale_owner is None


_SLOW_START = textwrap.dedent("""
    import os, sys, time
    import vgrad.loop
    original = vgrad.loop.fit
    def fit(*args, **kwargs):  # holds the run directory until told to go on
        open(sys.argv[1], "w").close()
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.02)
        return original(*args, **kwargs)
    vgrad.loop.fit = fit
    from vgrad.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def test_two_runs_with_the_same_run_id_the_second_fails_in_one_line(tmp_path, capsys):
    script, started, go = tmp_path / "slow.py", tmp_path / "started", tmp_path / "go"
    script.write_text(_SLOW_START)
    out = tmp_path / "runs"
    first = subprocess.Popen([sys.executable, str(script), str(started), str(go), "train",
                              "--out_dir", str(out), *TINY, "--run_id", "same"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = _snapshot(out)
        assert _train(out, "--run_id", "same") == 2  # the second run of the same id
        line = _one_line_error(capsys.readouterr().err)
        assert f"in use by process {first.pid}" in line
        assert _snapshot(out) == before  # it wrote nothing
    finally:
        go.touch()
        output, _ = first.communicate(timeout=120)
    assert first.returncode == 0, output
    run_dir = out / "train" / "same"
    records = io.read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3]  # no duplicated records
    assert io.read_json(run_dir / "results.json")["status"] == "completed"


# ----------------------------------------------------------------------------
# 2. A run id is a name
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../x", "ABS", ".", "..", "a/b", "", "x\ny"])
def test_run_id_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, capsys, run_id):
    run_id = str(tmp_path / "elsewhere") if run_id == "ABS" else run_id
    out = tmp_path / "work" / "runs"
    out.mkdir(parents=True)
    before = _snapshot(tmp_path)
    assert _train(out, "--run_id", run_id) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "--run_id=" in line and "a run id is a name, not a path" in line
    assert _snapshot(tmp_path) == before and not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs", "work"]
    with pytest.raises(ValueError, match="a run id is a name"):
        io.check_run_id(run_id)
    with pytest.raises(ValueError, match="a run id is a name"):
        io.new_run_dir(out, "train", run_id)


def test_analyze_never_writes_over_a_run(tmp_path, capsys):
    from vgrad.analysis.command import AnalyzeArgs, analyze

    out = tmp_path / "runs"
    train_run = out / "train" / "t"
    train_run.mkdir(parents=True)
    (train_run / "config.json").write_text('{"train": "config"}')
    (train_run / "results.json").write_text('{"status": "completed"}')
    earlier = out / "analyze" / "a"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text('{"earlier": true}')
    before = _snapshot(tmp_path)
    assert main(["analyze", "--out_dir", str(out), "--run_id", "../train/t"]) == 2
    assert "a run id is a name" in _one_line_error(capsys.readouterr().err)
    assert main(["analyze", "--out_dir", str(out), "--run_id", "a"]) == 2
    assert "already holds a run" in _one_line_error(capsys.readouterr().err)
    with pytest.raises(ValueError, match="already holds a run"):
        analyze(AnalyzeArgs(out_dir=str(out), run_id="a"))
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------
# 3. Validate everything, then create files
# ----------------------------------------------------------------------------


def test_resume_of_an_empty_directory_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "train" / "empty"
    run_dir.mkdir(parents=True)
    assert _train(tmp_path / "runs", "--run_id", "empty", "--resume", "True") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "cannot resume" in line and "no checkpoint" in line
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("argv, needle", [
    (["--train.seed", str(2**32)], "--train.seed=4294967296"),
    (["--train.seed", str(2**32 - 1), "--seeds", "2"], "--seeds=2"),
])
def test_seed_too_large_for_the_prng_is_bad_input_before_any_file(tmp_path, capsys, argv, needle):
    assert _train(tmp_path / "runs", "--run_id", "s", *argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert needle in line and "2**32 - 1" in line
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------
# 4. Results files respect the umask
# ----------------------------------------------------------------------------


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_results_files_respect_the_umask(tmp_path, umask):
    for mask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)):
        umask(mask)
        path = io.write_json(tmp_path / f"r{mask:o}.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == mode, (oct(mask), oct(path.stat().st_mode))
        jsonl = io.write_jsonl(tmp_path / f"m{mask:o}.jsonl", [{"a": 1}])
        assert jsonl.stat().st_mode & 0o777 == mode
    umask(0o002)
    assert _train(tmp_path / "runs", "--run_id", "u") == 0
    run_dir = tmp_path / "runs" / "train" / "u"
    for name in ("config.json", "results.json", "metrics.jsonl"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o664, name
    from vgrad import data

    data._write_npz_atomic(str(tmp_path / "cache" / "c.npz"), {"x": [1, 2]})
    assert (tmp_path / "cache" / "c.npz").stat().st_mode & 0o777 == 0o664


# ----------------------------------------------------------------------------
# 7. The environment fails mid-run
# ----------------------------------------------------------------------------


def test_disk_failure_mid_run_is_status_failed_exit_3_and_keeps_what_was_saved(
        tmp_path, capsys, monkeypatch):
    import vgrad.checkpoint as vckpt

    original, calls = vckpt.RunCheckpointer.save, []

    def save(self, step, state, meta):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return original(self, step, state, meta)

    monkeypatch.setattr(vckpt.RunCheckpointer, "save", save)
    assert _train(tmp_path / "runs", "--run_id", "full", "--checkpoint_every", "1") == 3
    line = _one_line_error(capsys.readouterr().err)
    assert "No space left on device" in line and "not bad input" in line
    run_dir = tmp_path / "runs" / "train" / "full"
    results = io.read_json(run_dir / "results.json")
    assert results["status"] == "failed" and "No space left on device" in results["message"]
    assert "\n" not in results["message"] and results["config"]["run_id"] == "full"
    assert committed_steps(run_dir / "checkpoints") == [1]  # what was saved is kept
    assert results["checkpoint_steps"] == [1]
    assert [r["step"] for r in io.read_jsonl(run_dir / "metrics.jsonl") if "loss" in r][:2] == [1, 2]
    assert not (run_dir / io.LOCK_FILE).exists()


_BREAK_CHECKPOINTS = textwrap.dedent("""
    import shutil, sys
    import vgrad.checkpoint as vckpt
    original, calls = vckpt.RunCheckpointer.save, []
    def save(self, step, state, meta):  # the checkpoint directory goes away mid-run
        calls.append(step)
        if len(calls) == 2:
            self.wait()
            shutil.rmtree(self.directory)
            self.directory.write_text("not a directory any more")
        return original(self, step, state, meta)
    vckpt.RunCheckpointer.save = save
    from vgrad.cli import main
    sys.argv = ["vgrad", *sys.argv[1:]]
    sys.exit(main())
""")


def test_orbax_write_failure_of_the_vgrad_command_is_short_and_prompt(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(_BREAK_CHECKPOINTS)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), "train", "--out_dir", str(tmp_path / "runs"),
                           *TINY, "--train.steps", "6", "--checkpoint_every", "2", "--run_id", "b"],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - start < 120  # orbax's stuck save threads do not hold the exit
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 6, proc.stderr
    assert "vgrad: error: run failed (not bad input)" in proc.stderr
    results = io.read_json(tmp_path / "runs" / "train" / "b" / "results.json")
    assert results["status"] == "failed" and "Not a directory" in results["message"]
    assert len(results["message"]) < 500


def test_environment_errors_are_told_from_bad_input():
    tensorstore = ValueError('NOT_FOUND: Error writing "x" [tensorstore_spec=\'{"a": 1}\']\nmore')
    assert io.is_environment_error(tensorstore)
    assert io.describe_error(tensorstore) == 'NOT_FOUND: Error writing "x"'
    assert io.is_environment_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    assert io.is_environment_error(PermissionError(13, "Permission denied"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert io.is_environment_error(wrapped)
    assert not io.is_environment_error(ValueError("invalid depth=0: must be an integer >= 1"))
    assert io.EXIT_CODES["failed"] == 3 and len(set(io.EXIT_CODES[k] for k in (
        "completed", "interrupted", "bad_input", "failed"))) == 4


# ----------------------------------------------------------------------------
# 8. Signals during start-up
# ----------------------------------------------------------------------------

_SLOW_IMPORT = textwrap.dedent("""
    import sys, time, importlib.abc
    class SlowJax(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "jax":
                print("importing jax", flush=True)
                time.sleep(60)
            return None
    sys.meta_path.insert(0, SlowJax())
    from vgrad.cli import main
    sys.exit(main(sys.argv[1:]))
""")

_SLOW_DATA = textwrap.dedent("""
    import sys, time
    import vgrad.data
    def load_config(cfg):
        print("loading data", flush=True)
        time.sleep(60)
    vgrad.data.load_config = load_config
    from vgrad.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("script, marker, sig", [
    (_SLOW_IMPORT, "importing jax", signal.SIGINT),
    (_SLOW_DATA, "loading data", signal.SIGTERM),
])
def test_signal_during_start_up_stops_with_one_short_line(tmp_path, script, marker, sig):
    path = tmp_path / "start.py"
    path.write_text(script)
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(path), "train", "--out_dir", str(out), *TINY,
                             "--run_id", "s"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == marker
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    assert f"vgrad: interrupted by {sig.name}" in stderr
    assert not out.exists()
