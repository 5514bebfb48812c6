"""Experiment modules run end to end in their --quick form."""

import numpy as np

from experiments import mitigations_at_init


def test_mitigations_at_init_quick(tmp_path):
    figure = tmp_path / "figure.png"
    args = mitigations_at_init.Args(quick=True, seeds=2, out_dir=str(tmp_path), run_id="q",
                                    figure=str(figure))
    results = mitigations_at_init.run(args)
    run = tmp_path / "mitigations_at_init" / "q"
    for name in ("config.json", "results.json", "report.md", "figures/products.png"):
        assert (run / name).stat().st_size > 0
    assert figure.stat().st_size > 0
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == set(mitigations_at_init.VARIANTS)
    naive = rows["sigmoid, N(0, 0.01²) (naive)"]
    # Even at depth 8 the naive sigmoid network loses many decades; theory agrees.
    assert naive["log10_P0_mean"] < -15
    np.testing.assert_allclose(naive["log10_P0_mean"], naive["theory_log10_P0"], atol=1.0)
    assert abs(rows["sigmoid, naive + residual"]["log10_P0_mean"]) < 1
    # Pre-activation residual blocks have a prediction too: (1 + 1/L)^L at depth 8,
    # which the 16-unit networks measure within their finite-width scatter.
    residual = rows["ReLU, He + residual 1/√L"]
    np.testing.assert_allclose(residual["theory_log10_P0"], 8 * np.log10(1 + 1 / 8), rtol=1e-9)
    assert abs(residual["log10_P0_mean"] - residual["theory_log10_P0"]) < 0.2
    assert rows["ReLU, He + BN + residual 1/√L"]["theory_log10_P0"] is None
    assert mitigations_at_init.main(["--quick", "True", "--out-dir", str(tmp_path)]) == 0
