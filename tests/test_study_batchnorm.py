"""The BatchNorm summary (experiments/batchnorm.py): runs or reuses studies, one claims table."""

import json
import re
from pathlib import Path

import pytest

from experiments import batchnorm
from studies_setup import run_quick
from vgrad import io

STUDY = "bn_depth"  # the one study the test runs (its quick form)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    return (out, *run_quick(batchnorm, out, "--studies", STUDY))


def test_summary_runs_the_study_and_tables_its_claims(quick):
    out, code, run, results = quick
    assert code == 0 and results["status"] == "completed"
    (study_run,) = (out / STUDY).iterdir()  # run with the summary's run id
    own = io.from_jsonable(io.read_json(study_run / "results.json"))
    assert own["claims"], "the study states its claims"
    assert [c["claim"] for c in results["claims"]] == [c["claim"] for c in own["claims"]]
    assert [c["verdict"] for c in results["claims"]] == [c["verdict"] for c in own["claims"]]
    counts = results["verdict_counts"]
    assert sum(counts.values()) == len(own["claims"])
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    for claim in own["claims"]:
        assert claim["claim"] in report and claim["measured"] in report
    # Every link of the report resolves from the report's own directory.
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert links and all((run / link).exists() for link in links), links
    # The other eight studies are listed as not run.
    by_study = {e["study"]: e for e in results["entries"]}
    assert list(by_study) == list(batchnorm.STUDIES)
    assert [s for s, e in by_study.items() if e["status"] == "not run"] == \
        [s for s in batchnorm.STUDIES if s != STUDY]
    assert (run / "figures" / "summary.png").stat().st_size > 0


def test_summary_reuses_a_finished_study(quick):
    out, *_ = quick
    before = sorted(p.name for p in (out / STUDY).iterdir())
    code, run, results = _run_again(out)
    assert code == 0
    assert sorted(p.name for p in (out / STUDY).iterdir()) == before  # not run again
    (entry,) = [e for e in results["entries"] if e["study"] == STUDY]
    assert Path(entry["run_dir"]).name == before[0]


def _run_again(out):
    code = batchnorm.main(["--quick", "--out", str(out), "--run-id", "again", "--no-progress",
                           "--studies", STUDY])
    run = out / "batchnorm" / "again"
    return code, run, io.from_jsonable(io.read_json(run / "results.json"))


def test_a_claim_without_a_known_verdict_is_refused(quick, tmp_path):
    out, *_ = quick
    (study_run,) = (out / STUDY).iterdir()
    saved = io.read_json(study_run / "results.json")
    saved["claims"][0]["verdict"] = "probably"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="allowed: holds, holds partly, does not hold here"):
        batchnorm.collect(STUDY, tmp_path, tmp_path)


def test_batchnorm_refuses_unknown_studies(tmp_path, capsys):
    assert batchnorm.main(["--quick", "--out", str(tmp_path), "--studies", "bn_magic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgrad: error:") and "invalid --studies" in err and "bn_vs_none" in err
    assert not any(tmp_path.iterdir())
