"""Galleries of queried regions: one slice through each region's centre with its box and the ground truth.

The sample is deterministic: the strategy's own regions (rounds ≥ 1; round 0 is the starting budget, the
same for every strategy), ordered by setting, seed, round and region id, taken at evenly spaced positions.
Images and labels come from the dataset named in each experiment's config (``load_dataset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle

from alseg.data.dataset import Dataset, DatasetError, load_dataset
from alseg.report.plots import new_figure, to_png
from alseg.report.results import Results

__all__ = ["GalleryItem", "label_colors", "render_gallery", "sample_regions"]

MAX_REGIONS = 12
NCOLS = 4
BOX_COLOR = "#ffd400"
LABEL_COLORS = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#00ced1"]


def label_colors(labels: list[int]) -> dict[int, str]:
    return {lab: LABEL_COLORS[i % len(LABEL_COLORS)] for i, lab in enumerate(sorted(labels))}


@dataclass(frozen=True)
class GalleryItem:
    """One region to show."""

    experiment: str
    setting: str
    seed: int
    round: int
    case_id: str
    start: tuple[int, ...]
    size: tuple[int, ...]
    score: float


def sample_regions(results: Results, strategy: str, n: int = MAX_REGIONS) -> list[GalleryItem]:
    """At most ``n`` of ``strategy``'s queried regions (rounds ≥ 1), evenly spread, deterministic."""
    regs = results.regions
    regs = regs[(regs["strategy"] == strategy) & (regs["round"] >= 1)]
    if regs.empty:
        return []
    regs = regs.sort_values(["setting", "seed", "round", "region_id"]).reset_index(drop=True)
    idx = np.unique(np.linspace(0, len(regs) - 1, num=min(n, len(regs))).round().astype(int))
    return [
        GalleryItem(
            str(r.experiment),
            str(r.setting),
            int(r.seed),
            int(r.round),
            str(r.case_id),
            tuple(r.start),
            tuple(r.size),
            float(r.score),
        )
        for r in regs.iloc[idx].itertuples(index=False)
    ]


def _window(img: np.ndarray) -> tuple[float, float]:
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _panel(ax: Any, ds: Dataset, item: GalleryItem, slice_axis: int, colors: dict[int, str], cache: dict) -> None:
    key = (str(ds.root), item.case_id)
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        image = ds.read_image(item.case_id)[0]
        cache[key] = (image, ds.read_label(item.case_id), ds.geometry(item.case_id).spacing, _window(image))
    img, lab, spacing, (lo, hi) = cache[key]
    if img.ndim == 3:
        ax_i = slice_axis
        index = item.start[ax_i] + item.size[ax_i] // 2
        img2, lab2 = np.take(img, index, axis=ax_i), np.take(lab, index, axis=ax_i)
        rows_ax, cols_ax = [a for a in range(3) if a != ax_i]
        where = f"slice {index} (axis {ax_i})"
    else:
        img2, lab2 = img, lab
        rows_ax, cols_ax = 0, 1
        where = "2D image"
    aspect = float(spacing[rows_ax]) / float(spacing[cols_ax])
    ax.imshow(img2, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    for value, color in colors.items():
        mask = lab2 == value
        if mask.any():
            overlay = np.ma.masked_where(~mask, np.ones_like(lab2, dtype=float))
            ax.imshow(overlay, cmap=ListedColormap([color]), alpha=0.35, aspect=aspect, interpolation="nearest")
            ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.0)
    r0, c0 = item.start[rows_ax], item.start[cols_ax]
    rect = Rectangle(
        (c0 - 0.5, r0 - 0.5), item.size[cols_ax], item.size[rows_ax], fill=False, edgecolor=BOX_COLOR, linewidth=2
    )
    ax.add_patch(rect)
    ax.set_xticks([])
    ax.set_yticks([])
    score = "" if not np.isfinite(item.score) else f", score {item.score:.3g}"
    ax.set_title(f"{item.case_id}, {where}\nseed {item.seed}, round {item.round}{score}", fontsize=8.5)


def render_gallery(results: Results, strategy: str, n: int = MAX_REGIONS) -> tuple[bytes | None, list[str]]:
    """PNG of ``strategy``'s sampled regions and notes on what could not be shown."""
    items = sample_regions(results, strategy, n)
    if not items:
        return None, [f"{strategy}: no regions queried by the strategy yet (round 0 is the shared starting budget)"]
    by_path = {str(e.path): e for e in results.experiments}
    datasets: dict[Path, Dataset | None] = {}
    notes: list[str] = []
    shown: list[tuple[GalleryItem, Dataset, int]] = []
    for item in items:
        rec = by_path[item.experiment]
        root = Path(rec.config.dataset)
        if root not in datasets:
            try:
                datasets[root] = load_dataset(root)
            except DatasetError as err:
                datasets[root] = None
                notes.append(f"dataset of {rec.path} cannot be read, its regions are not shown: {err}")
        ds = datasets[root]
        if ds is not None:
            shown.append((item, ds, rec.config.slice_axis))
    if not shown:
        return None, notes
    labels = sorted({lab for _, ds, _ in shown for lab in ds.foreground_labels})
    colors = label_colors(labels)
    ncols = min(NCOLS, len(shown))
    nrows = int(np.ceil(len(shown) / ncols))
    fig = new_figure(3.3 * ncols, 3.2 * nrows + 0.7)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    cache: dict = {}
    for ax, (item, ds, slice_axis) in zip(axes, shown, strict=False):
        try:
            _panel(ax, ds, item, slice_axis, colors, cache)
        except (DatasetError, OSError, KeyError, IndexError) as err:
            ax.set_axis_off()
            ax.set_title(f"{item.case_id}: cannot show ({err})", fontsize=8)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    names = {}
    for _, ds, _ in shown:
        names.update(ds.labels)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=BOX_COLOR, linewidth=2, label="queried region (box)")]
    handles += [
        Line2D([], [], color=colors[lab], linewidth=4, label=f"ground truth {lab}: {names.get(lab, lab)}")
        for lab in labels
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    fig.suptitle(f"{strategy}: {len(shown)} queried regions", fontsize=11, fontweight="bold")
    return to_png(fig), notes


def regions_table(results: Results, strategy: str) -> pd.DataFrame:
    """The sampled regions as a table (for captions and CSV)."""
    return pd.DataFrame([item.__dict__ for item in sample_regions(results, strategy)])
