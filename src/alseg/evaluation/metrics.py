"""Per-case segmentation metrics and annotation cost (definitions: shared/reference/evaluation.md).

All arrays are label maps (integer) in numpy index order; ``spacing`` is given in the same axis order
as the array axes (millimetres per voxel).

Conventions
-----------
- Dice (3D and 2D): ``2TP / (2TP + FP + FN)``; both empty -> NaN (left out of means and counted).
- HD95: 95th percentile of the symmetric surface distances in mm, i.e. of the pooled set of distances
  from every surface voxel of the prediction to the ground-truth surface and from every surface voxel of
  the ground truth to the prediction surface (the MedPy ``hd95`` definition). Surfaces and distances come
  from MONAI (``get_mask_edges`` / ``get_surface_distance``). Both empty -> 0.0; exactly one empty -> NaN.
  ``hd95_mode="max"`` gives MONAI's ``compute_hausdorff_distance(percentile=95)`` instead (maximum of the
  two directed 95th percentiles).
- JSON: per-class dictionaries produced by :func:`evaluate_case` and :func:`summarise_cases` use
  ``str(label)`` keys; :func:`json_safe` turns NaN/inf into ``None``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "CostAccumulator",
    "annotation_cost",
    "dice_2d",
    "dice_per_class",
    "dice_per_slice",
    "dump_json",
    "evaluate_case",
    "foreground_counts",
    "hd95_per_class",
    "json_safe",
    "nanmean_or_nan",
    "summarise_cases",
]

HD95Mode = Literal["pooled", "max"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def nanmean_or_nan(values: Iterable[float]) -> float:
    """Mean of the finite-or-inf, non-NaN values; NaN (no warning) when there are none."""
    arr = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    return pred, gt


def _dice_from_counts(tp: float, fp: float, fn: float) -> float:
    denom = 2.0 * tp + fp + fn
    return float("nan") if denom == 0 else float(2.0 * tp / denom)


# --------------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------------
def dice_per_class(pred: np.ndarray, gt: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """3D Dice ``2TP/(2TP+FP+FN)`` per label; NaN where prediction and ground truth are both empty."""
    pred, gt = _check_pair(pred, gt)
    out: dict[int, float] = {}
    for label in labels:
        p = pred == label
        g = gt == label
        tp = int(np.count_nonzero(p & g))
        fp = int(np.count_nonzero(p)) - tp
        fn = int(np.count_nonzero(g)) - tp
        out[int(label)] = _dice_from_counts(tp, fp, fn)
    return out


def dice_per_slice(pred: np.ndarray, gt: np.ndarray, label: int, axis: int = 0) -> np.ndarray:
    """2D Dice of ``label`` for every slice along ``axis`` (length = ``pred.shape[axis]``).

    Slices where both the ground truth and the prediction are empty are NaN.
    """
    pred, gt = _check_pair(pred, gt)
    if pred.ndim < 2:
        raise ValueError("dice_per_slice needs at least 2D arrays")
    p = np.moveaxis(pred == label, axis, 0).reshape(pred.shape[axis], -1)
    g = np.moveaxis(gt == label, axis, 0).reshape(gt.shape[axis], -1)
    tp = np.count_nonzero(p & g, axis=1).astype(np.float64)
    denom = np.count_nonzero(p, axis=1) + np.count_nonzero(g, axis=1)
    out = np.full(tp.shape, np.nan)
    nz = denom > 0
    out[nz] = 2.0 * tp[nz] / denom[nz]
    return out


def dice_2d(pred: np.ndarray, gt: np.ndarray, labels: Sequence[int], axis: int = 0) -> dict[int, float]:
    """2D Dice per label: mean over the slices along ``axis`` where gt or prediction is non-empty.

    NaN for a label with no such slice.
    """
    return {int(lab): nanmean_or_nan(dice_per_slice(pred, gt, lab, axis=axis)) for lab in labels}


# --------------------------------------------------------------------------------------------------
# HD95
# --------------------------------------------------------------------------------------------------
def _surface_distances(p: np.ndarray, g: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred->gt, gt->pred) in mm via MONAI. Both masks must be non-empty."""
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    with warnings.catch_warnings():
        # MONAI 1.5/1.6 warns about the deprecated ``always_return_as_numpy`` even when it is not passed
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        # 6-connected erosion XOR (scipy), cropped to the union's bounding box
        edges_p, edges_g = get_mask_edges(p, g, crop=True)
    sp = [float(s) for s in spacing]
    d_pg = np.asarray(get_surface_distance(edges_p, edges_g, distance_metric="euclidean", spacing=sp))
    d_gp = np.asarray(get_surface_distance(edges_g, edges_p, distance_metric="euclidean", spacing=sp))
    return d_pg.astype(np.float64), d_gp.astype(np.float64)


def hd95_per_class(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    percentile: float = 95.0,
    mode: HD95Mode = "pooled",
) -> dict[int, float]:
    """HD95 per label in millimetres (spacing in array axis order).

    ``mode="pooled"`` (default, the evaluation.md definition): percentile of the union of both directed
    surface-distance sets. ``mode="max"``: max of the two directed percentiles (MONAI's
    ``compute_hausdorff_distance``). Both empty -> 0.0; exactly one empty -> NaN.
    """
    pred, gt = _check_pair(pred, gt)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing has {len(spacing)} entries but the arrays are {pred.ndim}D")
    if mode not in ("pooled", "max"):
        raise ValueError(f"mode must be 'pooled' or 'max', got {mode!r}")
    out: dict[int, float] = {}
    for label in labels:
        p = pred == label
        g = gt == label
        has_p, has_g = bool(p.any()), bool(g.any())
        if not has_p and not has_g:
            out[int(label)] = 0.0
            continue
        if has_p != has_g:
            out[int(label)] = float("nan")
            continue
        d_pg, d_gp = _surface_distances(p, g, spacing)
        if mode == "pooled":
            out[int(label)] = float(np.percentile(np.concatenate([d_pg, d_gp]), percentile))
        else:
            out[int(label)] = float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))
    return out


# --------------------------------------------------------------------------------------------------
# per case / summary
# --------------------------------------------------------------------------------------------------
def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    slice_axis: int = 0,
    hd95_mode: HD95Mode = "pooled",
) -> dict[str, Any]:
    """All per-case metrics. Per-class dictionaries are keyed by ``str(label)``.

    Returns ``{"dice": {..}, "dice_2d": {..}, "hd95": {..}, "dice_fg_mean", "dice2d_fg_mean",
    "hd95_fg_mean"}`` where the ``*_fg_mean`` entries are means over the classes ignoring NaN
    (NaN when all classes are NaN).
    """
    d3 = dice_per_class(pred, gt, labels)
    d2 = dice_2d(pred, gt, labels, axis=slice_axis)
    hd = hd95_per_class(pred, gt, labels, spacing, mode=hd95_mode)
    return {
        "dice": {str(k): v for k, v in d3.items()},
        "dice_2d": {str(k): v for k, v in d2.items()},
        "hd95": {str(k): v for k, v in hd.items()},
        "dice_fg_mean": nanmean_or_nan(d3.values()),
        "dice2d_fg_mean": nanmean_or_nan(d2.values()),
        "hd95_fg_mean": nanmean_or_nan(hd.values()),
    }


def _as_float(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _summarise_metric(cases: Sequence[Mapping[str, Any]], key: str) -> tuple[float, dict[str, float], int]:
    """(mean over cases of per-case class means, per-class means over cases, number of NaN entries)."""
    per_class: dict[str, list[float]] = {}
    case_means: list[float] = []
    n_nan = 0
    for case in cases:
        values = {str(k): _as_float(v) for k, v in case[key].items()}
        for k, v in values.items():
            per_class.setdefault(k, []).append(v)
        n_nan += sum(1 for v in values.values() if math.isnan(v))
        case_means.append(nanmean_or_nan(values.values()))
    return (
        nanmean_or_nan(case_means),
        {k: nanmean_or_nan(v) for k, v in per_class.items()},
        n_nan,
    )


def summarise_cases(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`evaluate_case` outputs over the test cases of a round.

    ``dice_mean`` is nnU-Net's foreground mean: mean over cases of each case's mean over classes, NaN
    classes left out (and counted in ``n_nan_dice``). Same for 2D Dice and HD95. Per-class entries are
    keyed by ``str(label)``. Values may be NaN; pass the result through :func:`json_safe` for JSON.
    """
    cases = list(cases)
    d_mean, d_cls, n_nan_d = _summarise_metric(cases, "dice")
    d2_mean, d2_cls, n_nan_d2 = _summarise_metric(cases, "dice_2d")
    h_mean, h_cls, n_nan_h = _summarise_metric(cases, "hd95")
    return {
        "n_cases": len(cases),
        "dice_mean": d_mean,
        "dice_per_class": d_cls,
        "n_nan_dice": n_nan_d,
        "dice2d_mean": d2_mean,
        "dice2d_per_class": d2_cls,
        "n_nan_dice2d": n_nan_d2,
        "hd95_mean": h_mean,
        "hd95_per_class": h_cls,
        "n_nan_hd95": n_nan_h,
    }


def json_safe(obj: Any) -> Any:
    """Recursively convert to JSON-friendly Python types: NaN/inf -> None, numpy -> Python, keys -> str."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def dump_json(obj: Any, path: str | Path, indent: int = 2) -> None:
    """Write ``json_safe(obj)`` as strict JSON (no NaN literals)."""
    Path(path).write_text(json.dumps(json_safe(obj), indent=indent, allow_nan=False))


# --------------------------------------------------------------------------------------------------
# annotation cost
# --------------------------------------------------------------------------------------------------
def foreground_counts(gt: np.ndarray, labels: Sequence[int]) -> dict[int, int]:
    """Number of voxels of each label in a ground-truth label map."""
    gt = np.asarray(gt)
    return {int(lab): int(np.count_nonzero(gt == lab)) for lab in labels}


class CostAccumulator:
    """Accumulates the annotation cost of one round, case by case.

    Args:
        labels: foreground labels.
        pool_fg_voxels: total foreground voxels of the pool, either per label (mapping) or in total (int);
            ``None`` -> the foreground fraction is NaN.
        slice_axis: axis along which "slices touched" are counted.

    ``add_case`` with an already-added ``case_id`` replaces that case's contribution (so a case's
    cumulative mask can be re-added cheaply). ``gt=None`` -> foreground counts for that case are unknown
    and the foreground figures of the result become NaN/None.
    """

    def __init__(
        self,
        labels: Sequence[int],
        pool_fg_voxels: Mapping[int, int] | int | None = None,
        slice_axis: int = 0,
    ) -> None:
        self.labels = [int(lab) for lab in labels]
        self.slice_axis = slice_axis
        if isinstance(pool_fg_voxels, Mapping):
            self.pool_fg_total: int | None = int(sum(int(pool_fg_voxels[lab]) for lab in self.labels))
            self.pool_fg_per_class: dict[int, int] | None = {lab: int(pool_fg_voxels[lab]) for lab in self.labels}
        else:
            self.pool_fg_total = None if pool_fg_voxels is None else int(pool_fg_voxels)
            self.pool_fg_per_class = None
        # case_id -> (annotated voxels, slices touched, fg per class or None)
        self._cases: dict[Hashable, tuple[int, int, dict[int, int] | None]] = {}

    def add_case(self, case_id: Hashable, annotated_mask: np.ndarray, gt: np.ndarray | None = None) -> None:
        mask = np.asarray(annotated_mask, dtype=bool)
        n_vox = int(np.count_nonzero(mask))
        if mask.ndim >= 2:
            other = tuple(a for a in range(mask.ndim) if a != self.slice_axis % mask.ndim)
            n_slices = int(np.count_nonzero(mask.any(axis=other)))
        else:
            n_slices = int(n_vox > 0)
        fg: dict[int, int] | None = None
        if gt is not None:
            gt = np.asarray(gt)
            if gt.shape != mask.shape:
                raise ValueError(f"annotated mask {mask.shape} and gt {gt.shape} differ in shape")
            sel = gt[mask]
            fg = {lab: int(np.count_nonzero(sel == lab)) for lab in self.labels}
        self._cases[case_id] = (n_vox, n_slices, fg)

    @property
    def n_cases(self) -> int:
        return len(self._cases)

    def result(self, n_regions: int) -> dict[str, Any]:
        """Cost of the round. Per-class entries keyed by ``str(label)``."""
        n_vox = sum(c[0] for c in self._cases.values())
        n_slices = sum(c[1] for c in self._cases.values())
        cases_touched = sum(1 for c in self._cases.values() if c[0] > 0)
        known = all(c[2] is not None for c in self._cases.values())
        fg_per_class: dict[str, int] | None = None
        fg_total: int | None = None
        if known:
            fg_per_class = {str(lab): sum(c[2][lab] for c in self._cases.values() if c[2]) for lab in self.labels}
            fg_total = sum(fg_per_class.values())
        fraction = float("nan")
        fraction_per_class: dict[str, float] | None = None
        if fg_total is not None and self.pool_fg_total:
            fraction = fg_total / self.pool_fg_total
        if fg_per_class is not None and self.pool_fg_per_class is not None:
            fraction_per_class = {
                str(lab): (
                    fg_per_class[str(lab)] / self.pool_fg_per_class[lab]
                    if self.pool_fg_per_class[lab]
                    else float("nan")
                )
                for lab in self.labels
            }
        if self.pool_fg_total is not None and self.pool_fg_total == 0:
            warnings.warn("pool has no foreground voxels; foreground fraction is NaN", stacklevel=2)
        return {
            "regions": int(n_regions),
            "annotated_voxels": n_vox,
            "annotated_fg_voxels": fg_total,
            "annotated_fg_voxels_per_class": fg_per_class,
            "fg_fraction": fraction,
            "fg_fraction_per_class": fraction_per_class,
            "slices_touched": n_slices,
            "cases_touched": cases_touched,
        }


def annotation_cost(
    annotated: Mapping[Hashable, np.ndarray],
    labels: Sequence[int],
    n_regions: int,
    gts: Mapping[Hashable, np.ndarray] | None = None,
    pool_fg_voxels: Mapping[int, int] | int | None = None,
    slice_axis: int = 0,
) -> dict[str, Any]:
    """One-shot version of :class:`CostAccumulator` over ``{case_id: annotated bool mask}``.

    If ``pool_fg_voxels`` is None and ``gts`` is given, the pool total is taken from ``gts`` (which then
    must cover the whole pool, not only the annotated cases).
    """
    if pool_fg_voxels is None and gts is not None:
        totals = dict.fromkeys((int(lab) for lab in labels), 0)
        for g in gts.values():
            for lab, n in foreground_counts(g, labels).items():
                totals[lab] += n
        pool_fg_voxels = totals
    acc = CostAccumulator(labels, pool_fg_voxels=pool_fg_voxels, slice_axis=slice_axis)
    for case_id, mask in annotated.items():
        acc.add_case(case_id, mask, None if gts is None else gts[case_id])
    return acc.result(n_regions)
