"""The benchmarks still run: ``python -m benchmarks.run --quick`` once, into a
temporary directory (the measurements in benchmarks/results are left alone).

--quick is a smoke run at reduced sizes (< 1 min on an idle 2-core machine);
it checks that every benchmark runs end to end and writes its results, not
the speed targets (those are measured by the full run, see docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_quick_run_writes_every_result(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = (tmp_path / "summary_quick.md").read_text()
    for name in ("throughput", "seeds", "sweep", "compile_time"):
        result = json.loads((tmp_path / f"{name}_quick.json").read_text())
        assert result["quick"] is True and result["machine"]["jax"]
        assert result["markdown"].splitlines()[0] in summary
    throughput = json.loads((tmp_path / "throughput_quick.json").read_text())
    case = throughput["cases"][0]
    assert case["jax_steps_per_s"] > 0 and case["jax_matmul_peak_gflops"] > 0
    if case["torch"] is not None:  # the bench extra is installed: same network on both sides
        assert case["torch"]["step0_abs_loss_diff"] < 1e-4
    seeds = json.loads((tmp_path / "seeds_quick.json").read_text())
    assert seeds["seed0_step0_loss_abs_diff"] == 0.0
    swept = json.loads((tmp_path / "sweep_quick.json").read_text())
    # The sweep and the loop of fit calls train the same runs: after 20 steps their
    # float32 rounding differences have not grown to a changed prediction.
    assert swept["max_accuracy_difference_sweep_vs_fit"] < 0.02 and swept["config"]["runs"] == 4
    compile_time = json.loads((tmp_path / "compile_time_quick.json").read_text())
    assert set(compile_time["results"]["scanned"]) == {str(d) for d in compile_time["depths"]}
