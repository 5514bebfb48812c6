"""Figures of the analysis reports (matplotlib, Agg backend; nothing is shown).

Per-layer quantities span hundreds of orders of magnitude in deep networks
(beyond float64), so curves are drawn from the *log* values on a linear axis
whose ticks are labelled as powers of ten: it reads like a log-scale axis and
never loses a point to underflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# No matplotlib.use() here: a library that picks the backend at import would switch
# off a notebook's inline figures; without a display matplotlib falls back to Agg.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

_LOG10_E = 1.0 / math.log(10.0)


def _axes(ax: Any | None, figsize=(6.0, 4.0)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def _power_of_ten_axis(ax: Any) -> None:
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"$10^{{{v:g}}}$"))


def plot_layer_curves(reports: Mapping[str, Any], *,
                      theory: Mapping[str, Sequence[float]] | None = None,
                      quantity: str = "product", ax: Any | None = None) -> Figure:
    """Per-layer curves of several ``JacobianReport`` s, one line per label.

    quantity: "product" plots ||P_l||_F^2 / n (l = 0..L, the squared gain of the
        gradient from h^L back to h^l); "layer" plots ||J_l||_F^2 / n (l = 1..L).
    theory: optional {label: natural-log values (L+1,)} (e.g.
        ``theory.predicted_log_product_sq_norms(cfg)``) drawn dashed in the
        colour of the same label (or grey for labels without a report).
    """
    if quantity not in ("product", "layer"):
        raise ValueError(f"invalid quantity={quantity!r}: allowed values are product, layer")
    fig, ax = _axes(ax)
    colours = {}
    for label, report in reports.items():
        if quantity == "product":
            logs = np.asarray(report.log_product_sq_norms, np.float64)
            layers = np.arange(logs.shape[0])
        else:
            logs = np.asarray(report.log_layer_sq_norms, np.float64)
            layers = np.arange(1, logs.shape[0] + 1)
        (line,) = ax.plot(layers, logs * _LOG10_E, label=str(label), lw=1.5)
        colours[label] = line.get_color()
    for label, logs in (theory or {}).items():
        logs = np.asarray(logs, np.float64)
        ax.plot(np.arange(logs.shape[0]), logs * _LOG10_E, ls="--", lw=1.2,
                color=colours.get(label, "0.4"), label=f"{label} (theory)")
    _power_of_ten_axis(ax)
    ax.set_xlabel("layer l")
    ax.set_ylabel(r"$\|P_l\|_F^2 / n$" if quantity == "product" else r"$\|J_l\|_F^2 / n$")
    ax.set_title("Jacobian product dh^L/dh^l" if quantity == "product" else "block Jacobian J_l")
    ax.grid(True, alpha=0.3)
    if reports or theory:
        ax.legend(fontsize="small")
    return fig


def plot_spectrum(singular_values: Sequence[float], ax: Any | None = None, *,
                  label: str | None = None) -> Figure:
    """Singular values in descending order against their rank (log scale)."""
    fig, ax = _axes(ax)
    sv = np.sort(np.asarray(singular_values, np.float64).ravel())[::-1]
    positive = sv > 0
    ranks = np.arange(1, sv.shape[0] + 1)
    ax.semilogy(ranks[positive], sv[positive], marker="." if sv.size <= 200 else None,
                lw=1.0, label=label)
    ax.axhline(1.0, color="0.5", ls=":", lw=1.0)
    ax.set_xlabel("rank")
    ax.set_ylabel("singular value")
    ax.set_title("Jacobian spectrum")
    ax.grid(True, which="both", alpha=0.3)
    if label is not None:
        ax.legend(fontsize="small")
    return fig


def plot_grad_norms(reports: Mapping[str, Any], ax: Any | None = None) -> Figure:
    """Per-layer ||dLoss/dh^l|| (solid, l = 0..L) and ||dLoss/dW_l|| (dotted, l = 1..L)
    of ``GradientReport`` s, log scale."""
    fig, ax = _axes(ax)
    for label, report in reports.items():
        hidden = np.asarray(report.hidden_grad_norms, np.float64)
        weight = np.asarray(report.weight_grad_norms, np.float64)
        (line,) = ax.plot(np.arange(hidden.shape[0]), _safe_log10(hidden),
                          label=f"{label}: ||dL/dh^l||")
        ax.plot(np.arange(1, weight.shape[0] + 1), _safe_log10(weight), ls=":",
                color=line.get_color(), label=f"{label}: ||dL/dW_l||")
    _power_of_ten_axis(ax)
    ax.set_xlabel("layer l")
    ax.set_ylabel("gradient norm")
    ax.set_title("gradient norms")
    ax.grid(True, alpha=0.3)
    if reports:
        ax.legend(fontsize="small")
    return fig


def _safe_log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log10(values)


def save(fig: Figure, path: Any) -> None:
    """Save ``fig`` atomically (temp file + rename) and close it; format from the extension."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
