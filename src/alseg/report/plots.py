"""The report's figures as PNG bytes (matplotlib's Agg canvas; no pyplot, no GUI, no global state).

Curves show one line per strategy: the mean over seeds at each round (x = the mean budget over seeds at that
round), a band of ± one standard deviation over seeds, each seed as a thin line, and the full-data Dice as a
dashed line when a reference is known.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, MaxNLocator

from alseg.report.results import COST_AXES

__all__ = [
    "DPI",
    "cost_axes_figure",
    "cost_figure",
    "learning_curves_figure",
    "metrics_figure",
    "new_figure",
    "ppm_figure",
    "strategy_colors",
    "to_png",
]

DPI = 100
REFERENCE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.3}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, laid out with constrained layout."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def strategy_colors(strategies: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A fixed colour per strategy (in the order given), the same on every figure."""
    cmap = colormaps["tab10" if len(strategies) <= 10 else "tab20"]
    return {s: tuple(cmap(i % cmap.N)) for i, s in enumerate(strategies)}


def _marker(strategy: str, colors: Mapping[str, tuple[float, ...]]) -> str:
    """A marker per strategy (so that overlapping curves stay distinguishable)."""
    keys = list(colors)
    return MARKERS[keys.index(strategy) % len(MARKERS)] if strategy in keys else "o"


def _grid(n_panels: int, ncols: int, panel_w: float = 4.6, panel_h: float = 3.4) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = new_figure(panel_w * ncols, panel_h * nrows + 0.9)
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _curve_panel(
    ax: Axes,
    rows: pd.DataFrame,
    x: str,
    y: str,
    colors: Mapping[str, tuple[float, ...]],
    x_scale: float = 1.0,
    y_scale: float = 1.0,
) -> None:
    """Mean ± std over seeds of ``y`` against ``x`` per strategy, each seed as a thin line."""
    for strategy, sdf in rows.groupby("strategy", sort=True):
        color = colors.get(str(strategy), (0.3, 0.3, 0.3, 1.0))
        for _, edf in sdf.groupby("experiment", sort=True):
            edf = edf.sort_values("round")
            ax.plot(edf[x] * x_scale, edf[y] * y_scale, color=color, alpha=0.25, linewidth=0.8)
        agg = sdf.groupby("round").agg(
            xm=(x, "mean"), ym=(y, "mean"), ys=(y, lambda v: float(np.nanstd(v, ddof=1)) if v.notna().sum() > 1 else 0)
        )
        agg = agg.sort_index()
        xm, ym, ys = agg["xm"] * x_scale, agg["ym"] * y_scale, agg["ys"].fillna(0.0) * y_scale
        ax.plot(xm, ym, color=color, marker=_marker(str(strategy), colors), markersize=5, linewidth=2)
        if (ys > 0).any():
            ax.fill_between(xm, ym - ys, ym + ys, color=color, alpha=0.18, linewidth=0)
    ax.grid(True, alpha=0.3)


def _legend(
    fig: Figure,
    strategies: Sequence[str],
    colors: Mapping[str, tuple[float, ...]],
    n_seeds: Mapping[str, int],
    reference: float | None,
) -> None:
    handles = [
        Line2D(
            [], [], color=colors[s], marker=_marker(s, colors), linewidth=2, label=f"{s} ({_seeds(n_seeds.get(s, 0))})"
        )
        for s in strategies
    ]
    if reference is not None:
        handles.append(Line2D([], [], **REFERENCE_STYLE, label=f"full data (Dice {reference:.3f})"))
    handles.append(Line2D([], [], color="grey", alpha=0.4, linewidth=6, label="± 1 std over seeds"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False, fontsize=10)


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def _x_axis(ax: Axes, x: str, label: str) -> None:
    ax.set_xlabel(label)
    if x in ("round", "regions"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if x in ("voxels", "fg_voxels", "corrected_voxels"):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if x == "strokes":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _n_seeds(rows: pd.DataFrame) -> dict[str, int]:
    return {str(s): int(df["experiment"].nunique()) for s, df in rows.groupby("strategy")}


DICE_LABEL = "Dice (held-out, foreground mean)"
BUDGETS = [
    ("round", "round", 1.0),
    ("regions", "annotated regions", 1.0),
    ("voxels", "annotated voxels", 1.0),
    ("fg_fraction", "annotated foreground (% of the pool's foreground voxels)", 100.0),
]


def learning_curves_figure(
    rows: pd.DataFrame,
    colors: Mapping[str, tuple[float, ...]],
    reference: float | None,
    title: str,
    cost_axis: str = "voxels",
) -> bytes:
    """Dice against rounds, regions, the cost axis (``cost_axis``, default annotated voxels) and the annotated
    share of the pool's foreground (one setting)."""
    strategies = sorted(rows["strategy"].unique())
    budgets = [b if b[0] != "voxels" else (cost_axis, COST_AXES[cost_axis], 1.0) for b in BUDGETS]
    fig, axes = _grid(len(budgets), 2, 5.6, 3.6)
    for ax, (x, label, scale) in zip(axes, budgets, strict=True):
        _curve_panel(ax, rows, x, "dice", colors, x_scale=scale)
        if reference is not None:
            ax.axhline(reference, **REFERENCE_STYLE)
        _x_axis(ax, x, label)
        ax.set_ylabel(DICE_LABEL)
        ax.set_title(f"Dice vs {label.split(' (')[0]}", fontsize=11)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    _legend(fig, strategies, colors, _n_seeds(rows), reference)
    return to_png(fig)


def cost_axes_figure(
    rows: pd.DataFrame, colors: Mapping[str, tuple[float, ...]], reference: float | None, title: str
) -> bytes:
    """Dice against each cost axis (:data:`alseg.report.results.COST_AXES`), one panel per axis (one setting).

    A run without a measure of an axis (NaN) is left out of that panel, and the panel's title says how many were.
    """
    strategies = sorted(rows["strategy"].unique())
    fig, axes = _grid(len(COST_AXES), 2, 5.6, 3.6)
    for ax, (x, label) in zip(axes, COST_AXES.items(), strict=True):
        has = rows.groupby("experiment")[x].transform(lambda v: bool(v.notna().all()))
        shown = rows[has.astype(bool)]
        left_out = rows["experiment"].nunique() - shown["experiment"].nunique()
        ax.set_title(f"Dice vs {label}" + (f" ({left_out} runs without it left out)" if left_out else ""), fontsize=11)
        _x_axis(ax, x, label)
        ax.set_ylabel(DICE_LABEL)
        if shown.empty:
            ax.text(0.5, 0.5, "no run has this measure", ha="center", va="center", transform=ax.transAxes)
            continue
        _curve_panel(ax, shown, x, "dice", colors)
        if reference is not None:
            ax.axhline(reference, **REFERENCE_STYLE)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    _legend(fig, strategies, colors, _n_seeds(rows), reference)
    return to_png(fig)


def metrics_figure(
    rows: pd.DataFrame,
    colors: Mapping[str, tuple[float, ...]],
    labels: Mapping[str, str],
    title: str,
    reference_rows: pd.DataFrame | None = None,
) -> bytes:
    """Per-round 2D Dice, HD95 (mm) and Dice per class (one setting)."""
    strategies = sorted(rows["strategy"].unique())
    panels: list[tuple[str, str, str]] = [
        ("dice2d", "2D Dice (per slice, foreground mean)", "2D Dice per round"),
        ("hd95", "HD95 (mm, foreground mean)", "HD95 per round (lower is better)"),
    ]
    for lab, name in labels.items():
        if f"dice_{lab}" in rows.columns:
            panels.append((f"dice_{lab}", f"Dice of class {lab} ({name})", f"Dice of class {lab}: {name}"))
    fig, axes = _grid(len(panels), 4, 4.3, 3.3)
    for ax, (col, ylabel, ptitle) in zip(axes, panels, strict=True):
        _curve_panel(ax, rows, "round", col, colors)
        if reference_rows is not None and len(reference_rows) and col in reference_rows:
            val = float(reference_rows[col].mean())
            if math.isfinite(val):
                ax.axhline(val, **REFERENCE_STYLE)
        _x_axis(ax, "round", "round")
        ax.set_ylabel(ylabel)
        ax.set_title(ptitle, fontsize=10)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    ref = None
    if reference_rows is not None and len(reference_rows):
        ref = float(reference_rows["dice"].mean())
    _legend(fig, strategies, colors, _n_seeds(rows), ref if ref is not None and math.isfinite(ref) else None)
    return to_png(fig)


def cost_figure(
    rows: pd.DataFrame, colors: Mapping[str, tuple[float, ...]], labels: Mapping[str, str], title: str
) -> bytes:
    """Annotation cost per round: voxels, foreground, foreground share, slices and cases touched."""
    rows = rows.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        rows["fg_share"] = rows["fg_voxels"] / rows["voxels"]
    strategies = sorted(rows["strategy"].unique())
    panels: list[tuple[str, str, float]] = [
        ("voxels", "annotated voxels", 1.0),
        ("fg_voxels", "annotated foreground voxels", 1.0),
        ("fg_fraction", "% of the pool's foreground annotated", 100.0),
        ("fg_share", "foreground share of annotated voxels (%)", 100.0),
        ("slices_touched", "slices touched", 1.0),
        ("cases_touched", "cases touched", 1.0),
    ]
    for lab, name in labels.items():
        if f"fg_fraction_{lab}" in rows.columns:
            panels.append((f"fg_fraction_{lab}", f"% of the pool's class {lab} ({name}) annotated", 100.0))
    fig, axes = _grid(len(panels), 4, 4.3, 3.3)
    for ax, (col, ylabel, scale) in zip(axes, panels, strict=True):
        _curve_panel(ax, rows, "round", col, colors, y_scale=scale)
        _x_axis(ax, "round", "round")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(ylabel[0].upper() + ylabel[1:], fontsize=10)
        if col in ("voxels", "fg_voxels"):
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    fig.suptitle(title, fontsize=12, fontweight="bold")
    _legend(fig, strategies, colors, _n_seeds(rows), None)
    return to_png(fig)


def ppm_figure(
    matrices: Sequence[tuple[pd.DataFrame, pd.Series, str]],
) -> bytes:
    """Heat maps of pairwise penalty matrices; the last row of each is Φ (column means, lower is better)."""
    k = max(len(m) for m, _, _ in matrices)
    side = max(3.2, 0.75 * k + 1.6)
    fig = new_figure(side * len(matrices) + 1.4, side + 0.6)
    axes = list(np.atleast_1d(fig.subplots(1, len(matrices), squeeze=False)).ravel())
    cmap = colormaps["Reds"].with_extremes(bad="#f0f0f0")
    im = None
    for ax, (matrix, phi, title) in zip(axes, matrices, strict=True):
        data = matrix.to_numpy(dtype=float).copy()
        np.fill_diagonal(data, np.nan)
        full = np.vstack([data, phi.to_numpy(dtype=float)[None, :]])
        im = ax.imshow(np.ma.masked_invalid(full), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), v in np.ndenumerate(full):
            if i == j and i < len(data):
                continue
            text = "–" if not math.isfinite(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if v > 0.6 else "black")
        ax.axhline(len(data) - 0.5, color="black", linewidth=2)
        ax.set_xticks(range(len(matrix.columns)), [str(c) for c in matrix.columns], rotation=35, ha="right")
        ax.set_yticks(range(len(full)), [*(str(c) for c in matrix.index), "Φ (column mean)"])
        ax.set_xlabel("beaten strategy (column)")
        ax.set_ylabel("winning strategy (row)")
        ax.set_title(title, fontsize=11)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of budget points where row beats column")
    return to_png(fig)
