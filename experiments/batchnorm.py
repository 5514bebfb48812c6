"""The BatchNorm study: every common claim about batch normalisation, measured.

Nine studies, one claim (or a few) each; this module runs them (or reuses
their finished runs) and writes one summary: a table of claim, what was
measured and the verdict (holds / holds partly / does not hold here), each
row linked to the study's report and figure, and one headline figure.

    python -m experiments.batchnorm                 # runs the studies not yet run under --out, then the summary
    python -m experiments.batchnorm --no-reuse      # runs all nine again (up to ~45 min on 2 CPU cores)
    python -m experiments.batchnorm --quick         # the nine --quick forms and their summary (~2-3 min)
    python -m experiments.batchnorm --figure docs/figures/batchnorm.png

Each study alone: ``python -m experiments.<name>`` (``bn_vs_none``,
``bn_batch_size``, ``bn_learning_rate``, ``bn_init``, ``bn_train_eval``,
``bn_distribution``, ``bn_regularization``, ``bn_depth``, ``bn_smoothness``),
each at most 10 minutes at its default size. Reused runs are the latest
completed run of each study under ``--out`` of the same size (``--quick`` or
not); which run each row comes from is in the report.

Finding: see the summary table in the README ("The BatchNorm study"), which
this command regenerates.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path

import matplotlib.image
from matplotlib.figure import Figure

from vgrad import io, plots, study
from vgrad.study import VERDICTS, StudyArgs, markdown_table

NAME = "batchnorm"
STUDIES = ("bn_vs_none", "bn_batch_size", "bn_learning_rate", "bn_init", "bn_train_eval",
           "bn_distribution", "bn_regularization", "bn_depth", "bn_smoothness")
VERDICT_COLORS = {"holds": "#1b7837", "holds partly": "#b8860b", "does not hold here": "#b2182b"}


@dataclasses.dataclass(frozen=True)
class Args(StudyArgs):
    """Run (or reuse) the nine BatchNorm studies and summarise their claims."""

    studies: tuple[str, ...] = STUDIES
    """Which of the nine studies to include (the others are listed as not run)."""
    reuse: bool = True
    """Reuse the latest completed run of a study under --out (same size) instead of running it."""

    def validate(self) -> None:
        super().validate()
        unknown = [s for s in self.studies if s not in STUDIES]
        if not self.studies or unknown:
            raise ValueError(f"invalid --studies={self.studies!r}: allowed studies are "
                             + ", ".join(STUDIES))


def latest_completed(out: Path, name: str, quick: bool) -> Path | None:
    """The newest ``<out>/<name>/<run-id>/`` whose results.json says completed, of this size."""
    found = []
    for results in (out / name).glob("*/results.json"):
        try:
            saved = io.read_json(results)
        except (OSError, ValueError):
            continue  # a damaged or foreign file is not a finished run
        if saved.get("status") == "completed" and bool(saved.get("config", {}).get("quick")) == quick:
            found.append((results.stat().st_mtime, results.parent))
    return max(found)[1] if found else None


def run_one(name: str, args: Args, run_id: str) -> dict:
    """Run study ``name`` with this summary's size, seeds and run id; its results."""
    module = importlib.import_module(f"experiments.{name}")
    sub_args = module.Args(quick=args.quick, seeds=args.seeds, out=args.out, run_id=run_id,
                           progress=args.progress, tensorboard=args.tensorboard,
                           wandb_project=args.wandb_project)
    return study.run_study(name, sub_args, module.body,
                           command=f"python -m experiments.{name}" + " --quick" * args.quick)


def collect(name: str, run_dir: Path | None, summary_dir: Path) -> dict:
    """One study's entry: its claims (verdicts checked), report and figure paths relative
    to the summary's directory, and status."""
    if run_dir is None:
        return {"study": name, "status": "not run", "claims": [], "run_dir": None}
    saved = io.read_json(run_dir / "results.json")
    claims = []
    for c in saved.get("claims", []):
        if c.get("verdict") not in VERDICTS:
            raise ValueError(f"{run_dir}/results.json: claim {c.get('claim')!r} has verdict "
                             f"{c.get('verdict')!r}; allowed: {', '.join(VERDICTS)}")
        claims.append({**c, "figure": os.path.relpath(run_dir / c.get("figure", "figures/summary.png"),
                                                      summary_dir)})
    return {"study": name, "status": saved.get("status"), "claims": claims,
            "run_dir": str(run_dir), "wall_time_s": saved.get("wall_time_s"),
            "report": os.path.relpath(run_dir / "report.md", summary_dir),
            "headline": str(run_dir / "figures" / "summary.png"),
            "conclusion": saved.get("conclusion", "")}


def table_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for e in entries:
        if not e["claims"]:
            rows.append({"study": e["study"], "claim": "–", "measured": e["status"], "verdict": "–"})
        for c in e["claims"]:
            rows.append({"study": f"[{e['study']}]({e['report']})", "claim": c["claim"],
                         "measured": c["measured"],
                         "verdict": f"**{c['verdict']}** ([figure]({c['figure']}))"})
    return rows


def verdict_counts(entries: list[dict]) -> dict[str, int]:
    verdicts = [c["verdict"] for e in entries for c in e["claims"]]
    return {v: verdicts.count(v) for v in VERDICTS}


def figure_overview(entries: list[dict]):
    """Every study's headline figure in a grid, titled with its verdicts."""
    shown = [e for e in entries if e["claims"] and Path(e["headline"]).exists()]
    cols = 3 if len(shown) > 4 else max(1, min(2, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plots.figure(cols, rows, width=6.4, height=4.6)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, e in zip(axes.ravel(), shown):
        ax.imshow(matplotlib.image.imread(e["headline"]))
        tally = verdict_counts([e])
        worst = next(v for v in reversed(VERDICTS) if tally[v]) if any(tally.values()) else "holds"
        summary = ", ".join(f"{n} {v}" for v, n in tally.items() if n)
        ax.set_title(f"{e['study']}: {summary}", color=VERDICT_COLORS[worst], fontsize="large")
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no study has been run", ha="center", va="center")
    fig.suptitle("The BatchNorm study: each claim measured (title colour: the weakest verdict)",
                 fontsize="x-large")
    return fig


def figure_scoreboard(entries: list[dict]):
    """One row per claim, grouped by study: the claim and its verdict, coloured."""
    rows = [(e["study"], c["claim"], c["verdict"]) for e in entries for c in e["claims"]]
    fig = Figure(figsize=(13, 0.34 * max(len(rows), 1) + 1.0))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(len(rows) + 1.6, -0.2)
    ax.text(0.01, 0.3, "The BatchNorm study: each claim against its measurement", fontsize=14,
            weight="bold", va="center")
    previous = None
    for i, (name, claim, verdict) in enumerate(rows, start=1):
        y = i + 0.4
        if name != previous:
            ax.axhline(y - 0.5, color="0.75", lw=0.8)
            ax.text(0.01, y, name, fontsize=10, va="center", family="monospace", color="0.25")
            previous = name
        text = claim if len(claim) <= 95 else claim[:94] + "…"
        ax.text(0.165, y, text, fontsize=10, va="center")
        ax.text(0.985, y, verdict, fontsize=10, va="center", ha="right", color="white",
                weight="bold", bbox=dict(boxstyle="round,pad=0.25", fc=VERDICT_COLORS[verdict],
                                         ec="none"))
    if not rows:
        ax.text(0.5, 1.2, "no study has been run", ha="center")
    return fig


def body(s: study.Study) -> dict:
    args: Args = s.args
    out = Path(args.out)
    entries = []
    for name in STUDIES:
        run_dir = None
        if name in args.studies and not s.interrupted:
            run_dir = latest_completed(out, name, args.quick) if args.reuse else None
            if run_dir is None:
                s.trained = True  # a sub-study's failure from here on is a failure, not bad input
                results = run_one(name, args, s.run_dir.name)
                # Ctrl-C: what finished is kept (and summarised); the rest is not run.
                s.interrupted = results["status"] != "completed"
                run_dir = None if s.interrupted else Path(results["run_dir"])
        entries.append(collect(name, run_dir, s.run_dir))
    counts = verdict_counts(entries)
    path = s.save_figure(figure_scoreboard(entries), "summary", headline=True)
    overview = s.save_figure(figure_overview(entries), "overview")

    rep = s.report
    rep.title = "The BatchNorm study: claims against measurements"
    rep.add("Setup", "Nine studies, each a module of its own (`python -m experiments.<name>`, "
            "its own report with setup, figures and the measured conclusion). The verdicts "
            "below are computed by each study from its measurements, not written by hand.\n\n"
            + "\n".join(f"- `{e['study']}`: " + (f"[report]({e['report']}) ({e['status']}, "
                                                 f"{e['wall_time_s']:.0f} s, `{e['run_dir']}`)"
                                                 if e["run_dir"] else "not run")
                        for e in entries))
    rep.add("Summary", markdown_table(table_rows(entries), [
        ("study", "study"), ("claim", "claim"), ("measured here", "measured"),
        ("verdict", "verdict")]))
    conclusion = (f"Of {sum(counts.values())} claims, {counts['holds']} hold, "
                  f"{counts['holds partly']} hold partly and {counts['does not hold here']} "
                  "do not hold in these measurements.")
    rep.add("Conclusion", conclusion + "\n\n" + "\n\n".join(
        f"**{e['study']}**: {e['conclusion']}" for e in entries if e.get("conclusion")))
    rep.add("Figures", f"![claims and verdicts]({path})\n\nEvery study's headline figure "
            f"(full resolution):\n\n![overview]({overview})")
    return {"entries": entries, "verdict_counts": counts, "conclusion": conclusion,
            "claims": [{"study": e["study"], **c} for e in entries for c in e["claims"]]}


def main(argv: list[str] | None = None) -> int:
    return study.main(NAME, Args, body, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
