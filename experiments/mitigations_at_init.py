"""Study: the gradient product across layers at initialisation, for each mitigation.

For a baseline (sigmoid, naive N(0, 0.01²) init) and each fix (Xavier/tanh,
He/ReLU, BatchNorm, residual connections, BN + residual) it measures
log ||P_l||_F^2 / n, P_l = dh^L/dh^l, on one MNIST-1D batch with
``vgrad.analysis.jacobian_products`` (BatchNorm in training mode, so the batch
coupling counts), overlays the mean-field prediction where one exists (plain
and pre-activation residual networks without normalisation), and
writes ``runs/mitigations_at_init/<run-id>/`` (results.json, report.md,
figures/products.png). With ``--seeds N`` every curve is the mean over N
initialisations, with the min-max band.

    python -m experiments.mitigations_at_init [--quick] [--seeds 3] [--depth 50]
    python -m experiments.mitigations_at_init --figure docs/figures/mitigations_at_init.png

Takes about a minute on 2 CPU cores at the default size; --quick a few seconds.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys

import jax
import numpy as np
import tyro

from vgrad import DataConfig, ModelConfig, data, io
from vgrad.analysis import jacobian_products, theory
from vgrad.models import build

# label -> ModelConfig overrides (depth and width come from the arguments).
VARIANTS = {
    "sigmoid, N(0, 0.01²) (naive)": dict(activation="sigmoid", init="normal", init_std=0.01),
    "tanh, Xavier": dict(activation="tanh", init="glorot_normal"),
    "ReLU, He": dict(activation="relu", init="he_normal"),
    "sigmoid, naive + BatchNorm": dict(activation="sigmoid", init="normal", init_std=0.01, norm="batch"),
    # Residual blocks are pre-activation (ModelConfig.residual_form's default):
    # h + alpha * F(h), F = [BN] -> act -> Dense -> [BN] -> act -> Dense.
    "sigmoid, naive + residual": dict(activation="sigmoid", init="normal", init_std=0.01,
                                      residual=True),
    "ReLU, He + residual 1/√L": dict(activation="relu", init="he_normal", residual=True,
                                     residual_scale="inv_sqrt_depth"),
    "ReLU, He + BN + residual 1/√L": dict(activation="relu", init="he_normal", norm="batch",
                                          residual=True, residual_scale="inv_sqrt_depth"),
}


# Curves within this many decades of 1 count as mitigations for the zoomed panel.
ZOOM_MAX_DECADES = 5.0


@dataclasses.dataclass(frozen=True)
class Args:
    """Jacobian products at initialisation for every mitigation."""

    depth: int = 50
    width: int = 128
    batch_size: int = 64
    num_probes: int = 16
    seeds: int = 1
    """Initialisations per variant (curves show the mean and the min-max band)."""
    quick: bool = False
    """Tiny sizes (depth 8, width 16, batch 8), for smoke tests."""
    data: DataConfig = DataConfig()
    out_dir: str = "runs"
    run_id: str | None = None
    figure: str | None = None
    """Also copy the figure here (the README's figure comes from this)."""

    def __post_init__(self) -> None:
        for name in ("depth", "width", "batch_size", "num_probes", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name}={value!r}: must be an integer >= 1")


def run(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, depth=8, width=16, batch_size=8, num_probes=4)
    ds = data.load_config(args.data)
    x = np.asarray(ds.x_train[:args.batch_size])
    run_dir = io.new_run_dir(args.out_dir, "mitigations_at_init", args.run_id)
    io.write_json(run_dir / "config.json", args)

    curves, rows = {}, []
    for label, overrides in VARIANTS.items():
        cfg = ModelConfig(depth=args.depth, width=args.width, num_classes=ds.num_classes, **overrides)
        model = build(cfg)
        logs, h0_second_moments = [], []
        for seed in range(args.seeds):
            variables = model.init(jax.random.key(seed), x)
            report = jacobian_products(model, variables, x, train=True, key=jax.random.key(10_000 + seed),
                                       num_probes=args.num_probes)
            logs.append(report.log_product_sq_norms)
            h0 = model.hidden_states(variables, x, train=True)[0]
            h0_second_moments.append(float(np.mean(np.square(h0))))
        logs = np.stack(logs)  # (seeds, L+1)
        try:  # propagated from the measured stem output, so the transient is predicted too
            predicted = theory.predicted_log_product_sq_norms(
                cfg, input_second_moment=float(np.mean(h0_second_moments)))
        except ValueError:  # no mean-field prediction with normalisation layers
            predicted = None
        curves[label] = {"config": cfg, "log_product_sq_norms": logs, "theory": predicted}
        log10_p0 = logs[:, 0] / math.log(10)
        rows.append({"variant": label, "log10_P0_mean": float(log10_p0.mean()),
                     "log10_P0_min": float(log10_p0.min()), "log10_P0_max": float(log10_p0.max()),
                     "theory_log10_P0": None if predicted is None else float(predicted[0] / math.log(10))})
        print(f"{label:<34} log10 ||P_0||^2/n = {log10_p0.mean():9.2f}"
              + ("" if predicted is None else f"   (mean-field: {predicted[0] / math.log(10):9.2f})"))

    figure = run_dir / "figures" / "products.png"
    _plot(curves, args, figure)
    results = {"args": args, "rows": rows, "curves": curves, "run_dir": str(run_dir)}
    io.write_json(run_dir / "results.json", results)
    io.atomic_write_text(run_dir / "report.md", _report(rows, args))
    if args.figure:
        shutil.copyfile(figure, args.figure)
    print(f"wrote {run_dir}")
    return results


def _plot(curves: dict, args: Args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vgrad.analysis import plots

    # Left: everything (the naive baseline spans 100+ decades); right: zoom on the fixes.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = np.arange(args.depth + 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes:
        for (label, c), color in zip(curves.items(), colors):
            log10 = c["log_product_sq_norms"] / math.log(10)
            ax.plot(layers, log10.mean(0), color=color, label=label)
            if args.seeds > 1:
                ax.fill_between(layers, log10.min(0), log10.max(0), color=color, alpha=0.2)
            if c["theory"] is not None:
                ax.plot(layers, c["theory"] / math.log(10), color=color, ls="--", lw=1)
        ax.set_xlabel("layer l")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10  ||P_l||_F^2 / n,   P_l = dh^L / dh^l")
    axes[0].set_title("all variants", fontsize=10)
    # Zoom on the curves that stay within a few decades (the mitigations), with margin.
    spans = [np.abs(c["log_product_sq_norms"] / math.log(10)).max() for c in curves.values()]
    zoom = 1.2 * max([s for s in spans if s < ZOOM_MAX_DECADES], default=ZOOM_MAX_DECADES / 1.2)
    axes[1].set_ylim(-zoom, zoom)
    axes[1].set_title(f"zoom on the mitigations (y from {-zoom:.1f} to {zoom:.1f})", fontsize=10)
    # The lower right of the left panel is empty (every curve ends at 0, the naive one rises to it).
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Gradient product at initialisation, depth {args.depth}, width {args.width}, "
                 f"{args.seeds} seed(s) (dashed: mean-field prediction)", fontsize=11)
    fig.tight_layout()
    plots.save(fig, path)


def _report(rows: list[dict], args: Args) -> str:
    lines = [f"# Gradient product at initialisation (depth {args.depth}, width {args.width}, "
             f"batch {args.batch_size}, {args.seeds} seed(s))", "",
             "| variant | log10 ‖P_0‖²/n (mean) | min | max | mean-field |", "|---|---|---|---|---|"]
    for r in rows:
        theory_cell = "-" if r["theory_log10_P0"] is None else f"{r['theory_log10_P0']:.2f}"
        lines.append(f"| {r['variant']} | {r['log10_P0_mean']:.2f} | {r['log10_P0_min']:.2f} | "
                     f"{r['log10_P0_max']:.2f} | {theory_cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv, config=(tyro.conf.FlagConversionOff,))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
