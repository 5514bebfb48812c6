"""Study conventions (vgrad.study) and the main study in its --quick form."""

import json

import numpy as np
import pytest

from experiments import mitigations
from vgrad import io, study


@pytest.fixture(scope="module")
def quick_mitigations(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    code = mitigations.main(["--quick", "--seeds", "2", "--out", str(out), "--run-id", "q",
                             "--no-progress", "--figure", str(out / "headline.png")])
    return code, out / "mitigations" / "q", out


def test_quick_main_study_writes_the_study_conventions(quick_mitigations):
    code, run, out = quick_mitigations
    assert code == 0
    for name in ("config.json", "results.json", "report.md", "figures/summary.png",
                 "figures/curves.png", "figures/products.png", "figures/grad_heatmaps.png"):
        assert (run / name).stat().st_size > 0, name
    assert (out / "headline.png").read_bytes() == (run / "figures" / "summary.png").read_bytes()
    results = io.read_json(run / "results.json")
    assert results["study"] == "mitigations" and results["status"] == "completed"
    assert results["config"]["quick"] is True and results["wall_time_s"] > 0
    names = [t["name"] for t in results["techniques"]]
    assert names == list(mitigations.TECHNIQUES)
    depth = results["sizes"]["depth"]
    for t in results["techniques"]:
        assert {"test_accuracy_mean", "test_accuracy_std", "log_product_sq_norms_init",
                "log_product_sq_norms_final", "step_time_s"} <= set(t)
        assert len(t["log_product_sq_norms_init"]) == depth + 1
        assert len(t["test_accuracy"]) == 2 and t["step_time_s"] > 0
        assert np.asarray(t["log10_block_grad_norms"]["values"]).shape[1] == depth
    report = (run / "report.md").read_text()
    for heading in ("## Setup", "## Summary", "## Conclusion", "## Figures", "## Run"):
        assert heading in report
    assert "figures/summary.png" in report
    assert len(results["table"]) == 2 * len(mitigations.TECHNIQUES)


def test_quick_main_study_robust_findings(quick_mitigations):
    """Findings that hold at any size: the naive sigmoid baseline's gradient
    product at init is many decades below the best combination's, and residual
    connections (identity path) keep it near 1."""
    _, run, _ = quick_mitigations
    t = {x["name"]: x for x in io.read_json(run / "results.json")["techniques"]}
    baseline, best = t["baseline: sigmoid, naive init"], t["best: ReLU + He + BN + residual"]
    assert np.mean(baseline["log10_P0_init"]) < np.mean(best["log10_P0_init"]) - 8
    assert abs(np.mean(t["residual"]["log10_P0_init"])) < 1
    # Clipping cannot make a vanishing gradient larger.
    assert np.mean(t["clipping (global norm 1)"]["log10_P0_init"]) < -8


def test_study_refuses_bad_arguments_and_an_existing_run(quick_mitigations, capsys):
    _, run, out = quick_mitigations
    assert mitigations.main(["--quick", "--out", str(out), "--run-id", "q"]) == 2
    assert "already holds a study run" in capsys.readouterr().err
    for bad, needle in ((["--seeds", "0"], "invalid --seeds=0"),
                        (["--run-id", "../x"], "a run id is a name"),
                        (["--resume"], "--resume without --run-id")):
        assert mitigations.main(["--quick", "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vgrad: error:") and needle in err and len(err.splitlines()) == 1
    assert not (out / "x").exists()


def test_study_resume_reads_finished_groups_back(quick_mitigations, monkeypatch):
    _, run, out = quick_mitigations
    before = io.read_json(run / "results.json")
    trained = []
    from vgrad import sweep

    original = sweep.train_group
    monkeypatch.setattr(sweep, "train_group", lambda *a, **k: trained.append(1) or original(*a, **k))
    assert mitigations.main(["--quick", "--seeds", "2", "--out", str(out), "--run-id", "q",
                             "--resume", "--no-progress"]) == 0
    assert trained == []  # every group was finished: nothing is retrained
    after = io.read_json(run / "results.json")
    assert after["techniques"] == before["techniques"]


def test_markdown_table_and_report():
    table = study.markdown_table([{"a": 1.23456, "b": "x"}], [("A", "a"), ("B", lambda r: r["b"] * 2)])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.235 | xx |"]
    rep = study.Report("T")
    rep.add("S", "body\n")
    assert rep.render() == "# T\n\n## S\n\nbody\n"
    rep.add_claims([{"claim": "C1", "verdict": "holds", "measured": "m1"},
                    {"claim": "C2", "verdict": "holds partly", "measured": "m2"}])
    rep.add_figures({"a": "figures/a.png", "b": "figures/b.png"})
    assert rep.render().endswith("## Claims\n\n- **C1** — holds. m1\n- **C2** — holds partly. m2\n\n"
                                 "## Figures\n\n![a](figures/a.png)\n\n![b](figures/b.png)\n")
    json.dumps(study.StudyArgs().__dict__)


def test_study_errors_bad_input_before_training_vs_a_bug_after(tmp_path, capsys):
    from vgrad import ModelConfig

    def bad_grid(s):  # an invalid value found while building the grid: nothing trained
        ModelConfig(depth=0)

    assert study.main("fake", study.StudyArgs, bad_grid, ["--out", str(tmp_path), "--run-id", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgrad: error: invalid depth=0") and len(err.splitlines()) == 1
    assert not (tmp_path / "fake").exists()

    def bug(s):  # a bug once training has started: a traceback, and results.json says failed
        s.trained = True
        return {}["missing"]

    with pytest.raises(RuntimeError, match="study fake failed: KeyError"):
        study.main("fake", study.StudyArgs, bug, ["--out", str(tmp_path), "--run-id", "b"])
    failed = io.read_json(tmp_path / "fake" / "b" / "results.json")
    assert failed["status"] == "failed" and "KeyError" in failed["message"]
