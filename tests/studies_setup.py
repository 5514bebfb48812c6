"""Running a study's --quick form once for a test module."""

from vgrad import io


def run_quick(module, out, *extra: str):
    """``module.main`` with --quick into ``out``: (exit code, run directory, results.json
    with NaN/inf restored)."""
    name = module.__name__.rsplit(".", 1)[-1]
    code = module.main(["--quick", "--out", str(out), "--run-id", "q", "--no-progress", *extra])
    run = out / name / "q"
    return code, run, io.from_jsonable(io.read_json(run / "results.json"))
