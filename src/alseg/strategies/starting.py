"""The starting budget (nnActive): class-covering boxes, then ``random_fg33`` boxes.

For each class, background included, rarest first (fewest unused pool cases containing it, counted again after
every class; ties by label value):
two boxes centred (clamped) on a random voxel of that class, in two different cases. Every class box lies
in its own case: a case that holds a class box is removed from every class's list (as nnActive does), so the
starting data spreads over as many cases as it can. A class found in fewer than two pool cases, or left with
fewer than two unused cases, gets fewer boxes, with a warning in the log. Then boxes drawn like
``random_fg33`` (shuffled case cycle, one box per case per pass) fill the budget up to ``size``. Every draw
comes from a generator keyed by ``STARTING_BUDGET_KEY`` rather than the strategy's key, so every strategy
starts from the same regions under the same seed and runs are paired.
"""

from __future__ import annotations

import dataclasses
import logging

from alseg.data.regions import Region
from alseg.scoring.boxes import Candidate
from alseg.strategies.base import NotEnoughCandidatesError, QueryContext, regions_from_candidates
from alseg.strategies.random import FG33, ForegroundSampler, sample_centred_boxes

STARTING_BUDGET_KEY = "starting_budget"
BOXES_PER_CLASS = 2
BACKGROUND = 0

log = logging.getLogger("alseg.starting")


def starting_budget(ctx: QueryContext, size: int) -> list[Region]:
    """``size`` non-overlapping regions covering every class present in the pool (needs ground truth).

    Independent of ``ctx.strategy_key``. The class boxes lie in distinct cases. A class present in one case
    gets one box there, a class present in no case none. When ``size`` is smaller than two boxes per class,
    the rarest classes are covered first.
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
    for label in labels:
        if len(cases_with[label]) < BOXES_PER_CLASS:
            log.warning(
                "starting budget: class %d occurs in %d pool case(s), fewer than the %d the class-covering start "
                "asks for; it gets %d box(es)",
                label,
                len(cases_with[label]),
                BOXES_PER_CLASS,
                len(cases_with[label]),
            )
    rng = sctx.rng("classes")
    chosen: list[Candidate] = []
    used: set[str] = set()
    todo = [label for label in labels if cases_with[label]]
    while todo:
        # rarest first, counted again after every class: cases already used no longer count (as nnActive)
        label = min(todo, key=lambda c: (sum(1 for cid in cases_with[c] if cid not in used), c))
        todo.remove(label)
        remaining = [c for c in cases_with[label] if c not in used]
        n_label = 0
        while n_label < BOXES_PER_CLASS and remaining and len(chosen) < size:
            case_id = remaining.pop(int(rng.integers(len(remaining))))
            voxel = sampler.draw_voxel(case_id, sampler.class_mask(case_id, label, "class"), rng)
            if voxel is None:  # every voxel of this class in this case is already covered
                continue
            start = sampler.centre_start(case_id, voxel)
            sampler.take(case_id, start)
            used.add(case_id)
            info = {"stage": "class", "kind": "class", "label": label, "centre": list(voxel)}
            chosen.append(Candidate(case_id, start, float("nan"), info))
            n_label += 1
        wanted = min(BOXES_PER_CLASS, len(cases_with[label]))
        if n_label < wanted and len(chosen) < size:
            log.warning(
                "starting budget: class %d got %d of %d boxes: its other cases already hold a box of another "
                "class (each class box lies in its own case)",
                label,
                n_label,
                wanted,
            )

    n_fill = size - len(chosen)
    if n_fill > 0:
        try:
            fill = sample_centred_boxes(sampler, sctx.rng("fill"), FG33, n_fill)
        except NotEnoughCandidatesError as err:
            raise NotEnoughCandidatesError(size, len(chosen) + err.available) from err
        chosen.extend(Candidate(c.case_id, c.start, c.score, {"stage": "fill", **c.info}) for c in fill)
    return regions_from_candidates(chosen, sctx, STARTING_BUDGET_KEY)
