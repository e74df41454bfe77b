"""The starting budget (nnActive): class-covering boxes, then ``random_fg33`` boxes.

For each class, background included, rarest first (fewest pool cases containing it; ties by label value):
two boxes centred (clamped) on a random voxel of that class, in two different cases. Then boxes drawn like
``random_fg33`` fill the budget up to ``size``. Every draw comes from a generator keyed by
``STARTING_BUDGET_KEY`` rather than the strategy's key, so every strategy starts from the same regions under
the same seed and runs are paired.
"""

from __future__ import annotations

import dataclasses

from alseg.data.regions import Region
from alseg.scoring.boxes import Candidate
from alseg.strategies.base import NotEnoughCandidatesError, QueryContext, regions_from_candidates
from alseg.strategies.random import FG33, ForegroundSampler, sample_centred_boxes

STARTING_BUDGET_KEY = "starting_budget"
BOXES_PER_CLASS = 2
BACKGROUND = 0


def starting_budget(ctx: QueryContext, size: int) -> list[Region]:
    """``size`` non-overlapping regions covering every class present in the pool (needs ground truth).

    Independent of ``ctx.strategy_key``. A class present in only one case gets one box there; a class
    present in no case gets none. When ``size`` is smaller than two boxes per class, the rarest classes
    are covered first.
    """
    if size < 0:
        raise ValueError(f"starting budget size must be >= 0, got {size}")
    sctx = dataclasses.replace(ctx, strategy_key=STARTING_BUDGET_KEY)
    pool = sctx.pool
    sampler = ForegroundSampler(pool)

    labels = sorted({BACKGROUND, *(int(c) for c in pool.foreground_labels)})
    cases_with: dict[int, list[str]] = {label: [] for label in labels}
    for case_id in pool.case_ids:
        present = sampler.present_labels(case_id)
        for label in labels:
            if label in present:
                cases_with[label].append(case_id)
    order = sorted((label for label in labels if cases_with[label]), key=lambda c: (len(cases_with[c]), c))

    rng = sctx.rng("classes")
    chosen: list[Candidate] = []
    for label in order:
        remaining = list(cases_with[label])
        n_label = 0
        while n_label < BOXES_PER_CLASS and remaining and len(chosen) < size:
            case_id = remaining.pop(int(rng.integers(len(remaining))))
            voxel = sampler.draw_voxel(case_id, sampler.class_mask(case_id, label, "class"), rng)
            if voxel is None:  # every voxel of this class in this case is already covered
                continue
            start = sampler.take(case_id, voxel)
            info = {"stage": "class", "kind": "class", "label": label, "centre": list(voxel)}
            chosen.append(Candidate(case_id, start, float("nan"), info))
            n_label += 1

    n_fill = size - len(chosen)
    if n_fill > 0:
        try:
            fill = sample_centred_boxes(sampler, sctx.rng("fill"), FG33, n_fill)
        except NotEnoughCandidatesError as err:
            raise NotEnoughCandidatesError(size, len(chosen) + err.available) from err
        chosen.extend(Candidate(c.case_id, c.start, c.score, {"stage": "fill", **c.info}) for c in fill)
    return regions_from_candidates(chosen, sctx, STARTING_BUDGET_KEY)
