"""The simulated oracle: the dataset's ground truth inside the round's regions, the ignore value elsewhere.

It also measures what a person correcting the prefill would change (:mod:`alseg.evaluation.correction`): from
round 1 on, unless ``prefill: false``, against the previous round's model prediction inside the round's regions;
otherwise against background. The training labels are the ground truth either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from alseg.data.dataset import Dataset
from alseg.data.labels import partial_label, write_label_nifti
from alseg.data.prefill import PREFILL_MODEL, PREFILL_NONE, prefill_label
from alseg.data.regions import Box, annotated_mask
from alseg.evaluation.correction import RegionCost, correction_cost
from alseg.oracle.base import Annotation, ModelSegmentations, Waiting, checked_segmentations
from alseg.store.layout import round_dir
from alseg.store.state import ExperimentState, StoredRegion


class SimulatedOracle:
    """Annotates from ground truth: research runs that simulate the annotator."""

    kind: ClassVar[str] = "simulated"
    has_ground_truth: ClassVar[bool] = True

    def __init__(
        self,
        exp_dir: Path,
        ds: Dataset,
        state: ExperimentState,
        ignore_value: int,
        ground_truth: Callable[[str], np.ndarray],
        *,
        segmentations: ModelSegmentations | None = None,
    ) -> None:
        self.dir = Path(exp_dir)
        self.ds = ds
        self.state = state
        self.ignore_value = ignore_value
        self.ground_truth = ground_truth
        self.segmentations = segmentations

    def annotate(self, round_index: int, allow_open: bool = False) -> Annotation | Waiting:
        """For each case with a region this round: the ground truth inside every region of the case so far;
        the correction cost of each region of the round against its prefill."""
        r = round_index
        chosen = self.state.regions(round_index=r)
        boxes: dict[str, list[Box]] = {}
        for sr in self.state.regions(max_round=r):
            boxes.setdefault(sr.region.case_id, []).append(sr.region.box)
        label_dir = round_dir(self.dir, r) / "labels"
        files: dict[str, tuple[str, str]] = {}
        fg: dict[int, dict[str, int]] = {}
        costs: dict[int, RegionCost] = {}
        cases = sorted({sr.region.case_id for sr in chosen})
        predicted = prefill_segmentations(self.segmentations, r, cases, self.ds)
        kind = PREFILL_NONE if predicted is None else PREFILL_MODEL
        for case_id in tqdm(cases, desc=f"round {r}: annotate", unit="case", leave=False):
            gt = self.ground_truth(case_id)
            mine = [sr for sr in chosen if sr.region.case_id == case_id]
            costs.update(measure_case(gt, None if predicted is None else next(predicted), mine, self.ds.labels))
            mask = annotated_mask(gt.shape, boxes[case_id])
            path = label_dir / f"{case_id}.nii.gz"
            sha = write_label_nifti(path, partial_label(gt, mask, self.ignore_value), self.ds.geometry(case_id))
            files[case_id] = (str(path.relative_to(self.dir)), sha)
            for sr in mine:
                sel = gt[sr.region.box.slices()]
                fg[sr.id] = {str(lab): int(np.count_nonzero(sel == lab)) for lab in self.ds.foreground_labels}
        detail = {"cases": len(files), "prefill": kind}
        return Annotation(files, fg, "simulated", detail, costs=costs)


def prefill_segmentations(
    segmentations: ModelSegmentations | None, round_index: int, case_ids: Sequence[str], ds: Dataset
) -> Iterator[np.ndarray] | None:
    """The segmentations the regions of round ``round_index`` in ``case_ids`` (in that order) start from: the
    model of the round before predicts them (:func:`~alseg.oracle.base.checked_segmentations`); None in round 0
    or without ``segmentations`` (``prefill: false``), when every region starts from background."""
    if round_index == 0 or segmentations is None:
        return None
    return checked_segmentations(segmentations, round_index - 1, case_ids, ds)


def measure_case(
    label: np.ndarray,
    segmentation: np.ndarray | None,
    regions: Sequence[StoredRegion],
    labels: Mapping[int, str],
) -> dict[int, RegionCost]:
    """The correction cost of a case's regions of one round: ``label`` (the ground truth) against the prefill made
    from ``segmentation`` (the model's prediction inside the regions, declared ``labels`` only), or against
    background when ``segmentation`` is None. Returns ``{region id: cost}``."""
    if segmentation is None:
        return {sr.id: correction_cost(label, None, sr.region.box, PREFILL_NONE) for sr in regions}
    prefill = prefill_label(segmentation, [sr.region.box for sr in regions], labels)
    return {sr.id: correction_cost(label, prefill, sr.region.box, PREFILL_MODEL) for sr in regions}
