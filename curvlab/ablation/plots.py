"""Figures of an ablation (matplotlib, of the ``ablate`` extra, imported on first use)."""

from __future__ import annotations

from typing import Any

from curvlab.ablation.imports import import_from_ablate_extra
from curvlab.ablation.metrics import QualityReport
from curvlab.ablation.races import RaceResult

_AXES = {"iterations": ("steps", "iteration"), "seconds": ("seconds", "wall-clock seconds")}


def plot_loss(result: RaceResult, x: str = "iterations", ax: Any = None) -> Any:
    """Loss of every contender against ``x`` (``"iterations"`` or ``"seconds"``): solid
    lines for the training loss, dashed for the validation loss, log scale. Returns the
    figure."""
    if x not in _AXES:
        raise ValueError(f"plot_loss: x must be one of {', '.join(_AXES)}, got {x!r}.")
    plt = import_from_ablate_extra("matplotlib.pyplot")

    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.8))
    key, label = _AXES[x]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, curve in enumerate(result.curves):
        xs = getattr(curve, key)
        color = colors[i % len(colors)]
        ax.plot(xs, curve.train_loss, color=color, label=curve.name)
        ax.plot(xs, curve.val_loss, color=color, linestyle="--")
    if result.target_loss is not None:
        ax.axhline(result.target_loss, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("loss (solid: train, dashed: validation)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.figure.tight_layout()
    return ax.figure


def plot_race(result: RaceResult) -> Any:
    """The two-panel figure: loss against iterations (left) and against seconds (right)."""
    plt = import_from_ablate_extra("matplotlib.pyplot")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.9), sharey=True)
    plot_loss(result, "iterations", left)
    plot_loss(result, "seconds", right)
    right.set_ylabel("")
    right.get_legend().remove()
    fig.tight_layout()
    return fig


def plot_quality(report: QualityReport) -> Any:
    """Bars per backend: matrix error, natural-gradient direction error and cosine,
    and top-eigenvalue error, all against the exact Fisher."""
    plt = import_from_ablate_extra("matplotlib.pyplot")

    names = [r.backend for r in report.rows]
    panels = [
        ("‖C − F‖ / ‖F‖", [r.matrix_error for r in report.rows], None),
        ("direction error ‖u − u*‖ / ‖u*‖", [r.direction_error for r in report.rows], None),
        ("cosine(u, u*)", [r.direction_cosine for r in report.rows], (0.0, 1.0)),
        ("top-eigenvalue error", [r.eigenvalue_error for r in report.rows], None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 0.45 * len(names) + 1.4))
    for i, (ax, (title, values, limits)) in enumerate(zip(axes, panels)):
        ax.barh(names, values, color=f"C{i}")
        ax.invert_yaxis()
        ax.set_title(title, fontsize="medium")
        if limits is not None:
            ax.set_xlim(*limits)
        if i:
            ax.set_yticks([])
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Against the exact Fisher (λ = {report.damping:g})", fontsize="medium")
    fig.tight_layout()
    return fig
