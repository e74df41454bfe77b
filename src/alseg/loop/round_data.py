"""What the stages of a round compute from the state and the label files (kept out of the runner).

- :func:`check_regions`: a strategy's regions are in the pool, inside their case and free;
- :func:`annotated_case_classes`: the classes of each case's annotated voxels (a folds ensemble's split);
- :func:`write_planning_labels`: the labels nnU-Net plans from;
- :func:`annotation_cost`: the annotation cost up to a round, counted in the training labels.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from alseg.backends.base import TrainingCase
from alseg.data.dataset import Dataset
from alseg.data.images import read_label_array, write_label_nifti
from alseg.data.regions import Box, Region, annotated_mask
from alseg.errors import ExperimentError
from alseg.evaluation.metrics import CostAccumulator
from alseg.store.state import ExperimentState


def check_regions(
    r: int, regions: list[Region], expected: int, pool: set[str], ds: Dataset, annotated: dict[str, list[Box]]
) -> None:
    """``expected`` regions, each in a pool case, inside it, and overlapping no annotated box nor each other."""
    if len(regions) != expected:
        raise ExperimentError(f"round {r}: strategy returned {len(regions)} regions, expected {expected}")
    boxes: dict[str, list[Box]] = defaultdict(list, {c: list(b) for c, b in annotated.items()})
    for g in regions:
        if g.case_id not in pool:
            raise ExperimentError(f"round {r}: region in case {g.case_id!r}, which is not in the pool")
        if not g.box.inside(ds.geometry(g.case_id).shape):
            raise ExperimentError(f"round {r}: region {g.box} lies outside case {g.case_id}")
        clash = [b for b in boxes.get(g.case_id, []) if b.overlaps(g.box)]
        if clash:
            raise ExperimentError(f"round {r}: region {g.box} of {g.case_id} overlaps annotated {clash[0]}")
        boxes[g.case_id].append(g.box)


def annotated_case_classes(state: ExperimentState, cases: dict[str, Any], r: int) -> dict[str, set[int]]:
    """The classes in each case's annotated voxels up to round ``r``, background included as nnActive counts it
    (for a folds ensemble: each class in at least two folds)."""
    case_classes: dict[str, set[int]] = {cid: set() for cid in cases}
    for sr in state.regions(max_round=r, status="annotated"):
        if sr.region.case_id in case_classes:
            counts = {int(lab): int(n) for lab, n in (sr.fg_voxels or {}).items()}
            found = {lab for lab, n in counts.items() if n > 0}
            if sr.region.box.n_voxels > sum(counts.values()):
                found.add(0)
            case_classes[sr.region.case_id] |= found
    return case_classes


def write_planning_labels(
    plan_dir: Path, cases: dict[str, TrainingCase], ds: Dataset, ignore_value: int
) -> dict[str, TrainingCase]:
    """The round's training labels with background for the ignore value, written to ``plan_dir``."""
    planning: dict[str, TrainingCase] = {}
    for cid, case in cases.items():
        lab = read_label_array(case.label)
        path = Path(plan_dir) / f"{cid}.nii.gz"
        write_label_nifti(path, np.where(lab == ignore_value, 0, lab).astype(np.uint8), ds.geometry(cid))
        planning[cid] = TrainingCase(case.images, path)
    return planning


def annotation_cost(
    exp_dir: Path, state: ExperimentState, ds: Dataset, slice_axis: int | None, r: int
) -> dict[str, Any]:
    """Regions, voxels and foreground voxels labelled up to round ``r``, counted in the training labels the
    oracle wrote (whoever labelled them), against the pool's foreground counted at creation."""
    pool_fg = {int(k): v for k, v in json.loads(state.get_meta("pool_fg_voxels") or "{}").items()}
    acc = CostAccumulator(ds.foreground_labels, pool_fg or None, slice_axis)
    labelled: dict[str, list[Box]] = defaultdict(list)
    for sr in state.regions(max_round=r, status="annotated"):
        labelled[sr.region.case_id].append(sr.region.box)
    files = state.latest_label_files(r)
    for cid, bs in labelled.items():
        lab = read_label_array(Path(exp_dir) / files[cid])
        acc.add_case(cid, annotated_mask(lab.shape, bs), lab)
    return acc.result(sum(len(b) for b in labelled.values()))
