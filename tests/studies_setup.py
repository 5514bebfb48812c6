"""Running a study's --quick form once for a test module."""

from vgrad import io


def run_quick(module, out, *extra: str):
    """``module.main`` with --quick into ``out``: (exit code, run directory, results.json
    with NaN/inf restored)."""
    name = module.__name__.rsplit(".", 1)[-1]
    code = module.main(["--quick", "--out", str(out), "--run-id", "q", "--no-progress", *extra])
    run = out / name / "q"
    return code, run, io.from_jsonable(io.read_json(run / "results.json"))


def check_refuses(module, cases, out, capsys, *, quick: bool = True) -> None:
    """Each (extra arguments, needle) of ``cases`` makes ``module.main`` exit 2 with one
    ``vgrad: error:`` line containing the needle, and nothing is written under ``out``."""
    for bad, needle in cases:
        assert module.main(["--quick"] * quick + ["--out", str(out), *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("vgrad: error:") and needle in err, err
    assert not any(out.iterdir())
