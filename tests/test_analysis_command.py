"""Reports, plots and the ``vgrad analyze`` command."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgrad.models
from vgrad.analysis import gradient_flow, jacobian_products, jacobian_spectrum
from vgrad.config import DataConfig, ModelConfig

CFG = ModelConfig(depth=3, width=4, num_classes=3, activation="tanh", init="variance_scaling",
                  weight_var=1.5, bias_var=0.1)


def setup(cfg: ModelConfig = CFG, batch: int = 3, length: int = 5):
    model = vgrad.models.build(cfg)
    x = jax.random.normal(jax.random.key(0), (batch, length))
    return model, model.init(jax.random.key(1), x), x


def test_reports_serialise_and_plot(tmp_path):
    from matplotlib.figure import Figure

    from vgrad.analysis import plot_grad_norms, plot_layer_curves, plot_spectrum, theory

    model, variables, x = setup()
    cfg, train = CFG, True
    report = jacobian_products(model, variables, x, train=train, key=jax.random.key(0))
    d = json.loads(json.dumps(report.to_dict()))
    assert len(d["log_product_sq_norms"]) == cfg.depth + 1
    fig = plot_layer_curves({"tanh": report},
                            theory={"tanh": theory.predicted_log_product_sq_norms(
                                cfg, input_second_moment=float(np.mean(np.square(
                                    model.hidden_states(variables, x, train=False)[0]))))})
    assert isinstance(fig, Figure)
    assert len(fig.axes[0].lines) == 2
    assert isinstance(plot_layer_curves({"tanh": report}, quantity="layer"), Figure)
    assert isinstance(plot_spectrum(jacobian_spectrum(model, variables, x, train=train)), Figure)
    grad = gradient_flow(model, variables, {"x": x, "y": jnp.array([0, 1, 2])})
    assert isinstance(plot_grad_norms({"tanh": grad}), Figure)


def test_analyze_command_writes_results(tmp_path, capsys):
    from vgrad.analysis.command import AnalyzeArgs, analyze
    from vgrad.io import read_json

    # Same model config and batch shape as setup(): compiled functions are reused.
    data = DataConfig(name="synthetic", options=(("dim", 5), ("num_classes", 3),
                                                 ("num_train", 16), ("num_test", 4)))
    args = AnalyzeArgs(model=CFG, data=data, batch_size=3, num_probes=8,
                       out_dir=str(tmp_path), run_id="r")
    results = analyze(args)
    run = tmp_path / "analyze" / "r"
    on_disk = read_json(run / "results.json")
    assert on_disk["jacobian"] == results["jacobian"]
    assert len(on_disk["jacobian"]["log_product_sq_norms"]) == 4
    assert on_disk["spectrum"]["method"] == "dense_svd"
    assert on_disk["theory"]["applies"] is True
    assert read_json(run / "config.json")["model"]["depth"] == 3
    for fig in ("products", "layers", "grad_norms", "spectrum"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 0
    assert "log10 P_l" in capsys.readouterr().out

    with pytest.raises(ValueError, match="num_classes"):
        analyze(AnalyzeArgs(model=ModelConfig(depth=2, width=4, num_classes=5), data=data,
                            out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="checkpoint"):
        analyze(AnalyzeArgs(model=args.model, data=data, batch_size=3,
                            checkpoint=str(tmp_path / "nope"), out_dir=str(tmp_path)))


def test_analyze_float64_agrees_with_float32(tmp_path):
    from vgrad.analysis.command import AnalyzeArgs, analyze

    data = DataConfig(name="synthetic", options=(("dim", 5), ("num_classes", 3),
                                                 ("num_train", 16), ("num_test", 4)))
    common = dict(model=CFG, data=data, batch_size=3, num_probes=8, out_dir=str(tmp_path))
    f32 = analyze(AnalyzeArgs(**common, run_id="f32"))
    f64 = analyze(AnalyzeArgs(**common, run_id="f64", float64=True))
    # Deterministic quantities (no random probes) agree to float32 precision, and
    # differ at all only because float64 ran (bit-identical would mean the flag did nothing).
    for a, b in [(f32["gradients"]["hidden_grad_norms"], f64["gradients"]["hidden_grad_norms"]),
                 (f32["spectrum"]["singular_values"], f64["spectrum"]["singular_values"])]:
        np.testing.assert_allclose(a, b, rtol=1e-5)
        assert not np.array_equal(a, b)


def test_analyze_reads_a_training_checkpoint(tmp_path):
    from vgrad import TrainConfig, data as vdata
    from vgrad.analysis.command import AnalyzeArgs, analyze
    from vgrad.loop import fit

    data = DataConfig(name="synthetic", options=(("dim", 5), ("num_classes", 3),
                                                 ("num_train", 16), ("num_test", 4)))
    run = tmp_path / "run"
    result = fit(vgrad.models.build(CFG), TrainConfig(steps=3, batch_size=8), vdata.load_config(data),
                 run_dir=run, checkpoint_every=0, progress=False)
    args = AnalyzeArgs(model=CFG, data=data, batch_size=3, checkpoint=str(run), out_dir=str(tmp_path))
    from_ckpt = analyze(args)
    model, _, _ = setup()
    x = np.asarray(vdata.load_config(data).x_train[:3])
    expected = gradient_flow(model, result.state.variables,
                             {"x": x, "y": np.asarray(vdata.load_config(data).y_train[:3])})
    np.testing.assert_allclose(from_ckpt["gradients"]["weight_grad_norms"], expected.weight_grad_norms,
                               rtol=1e-5)
    # Without model fields the checkpoint's own config is used.
    implicit = analyze(AnalyzeArgs(data=data, batch_size=3, checkpoint=str(run), out_dir=str(tmp_path)))
    assert implicit["gradients"] == from_ckpt["gradients"]
    with pytest.raises(ValueError, match="does not match"):
        analyze(AnalyzeArgs(model=ModelConfig(depth=2, width=4, num_classes=3), data=data,
                            batch_size=3, checkpoint=str(run), out_dir=str(tmp_path)))
