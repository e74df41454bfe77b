"""Random baselines: uniform box positions (``random``) and foreground-aware boxes (``random_fg*``).

``random`` draws box positions uniformly on each case's stride grid. ``random_fg33`` / ``random_fg66``
(nnActive's "Random 33% / 66% FG") draw each box as one of three kinds: a start drawn uniformly among the
free starts, or a box centred (clamped inside the image) on a voxel of a foreground class present in the
case's ground truth, or on a voxel of that class's border. Cases are visited in a shuffled order, cycled,
one box per case per pass. They read the ground truth, so they are simulation baselines only.

Non-overlap is exact in both: a position is drawn only among boxes that share no voxel with an annotated
region or with a box already drawn in this query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from alseg.data.regions import Region
from alseg.scoring.boxes import Candidate, block_box, free_positions
from alseg.strategies.base import (
    Needs,
    NotEnoughCandidatesError,
    PoolView,
    QueryContext,
    regions_from_candidates,
)

#: the kinds of box centre a ``random_fg`` draw can ask for, in the order of its probabilities
CENTRE_KINDS = ("uniform", "class", "border")
FG33 = (4 / 6, 1 / 6, 1 / 6)
FG66 = (1 / 3, 1 / 3, 1 / 3)


@dataclass
class RandomStrategy:
    """Uniform box positions on the stride grid, non-overlapping.

    Each draw picks a case uniformly among the cases that still have a free position, then a free position
    of that case uniformly.
    """

    key: ClassVar[str] = "random"
    description: ClassVar[str] = "uniform random box positions (no model needed)"
    needs: ClassVar[Needs] = Needs()

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def query(self, ctx: QueryContext) -> list[Region]:
        pool = ctx.pool
        rng = ctx.rng("positions")
        free: dict[str, np.ndarray] = {}
        for case_id in pool.case_ids:
            grid = free_positions(pool.annotated(case_id), pool.box_size(case_id), pool.case_stride(case_id))
            if grid.any():
                free[case_id] = grid
        open_cases = [c for c in pool.case_ids if c in free]
        chosen: list[Candidate] = []
        while len(chosen) < ctx.query_size:
            if not open_cases:
                raise NotEnoughCandidatesError(ctx.query_size, len(chosen))
            case_id = open_cases[int(rng.integers(len(open_cases)))]
            grid = free[case_id]
            flat = np.flatnonzero(grid)
            pos = np.unravel_index(int(flat[int(rng.integers(flat.size))]), grid.shape)
            stride = pool.case_stride(case_id)
            start = tuple(int(p) * s for p, s in zip(pos, stride, strict=True))
            chosen.append(Candidate(case_id, start, float("nan"), {"draw": len(chosen)}))
            block_box(grid, start, pool.box_size(case_id), stride)
            if not grid.any():
                open_cases.remove(case_id)
        return regions_from_candidates(chosen, ctx, self.key)


@dataclass
class _CaseState:
    """One case's drawing state: ground truth and the stride-1 grid of free box starts."""

    labels: np.ndarray
    box_size: tuple[int, ...]
    free: np.ndarray  # stride-1 grid: True where a box starting there overlaps nothing taken
    clamp_index: tuple[np.ndarray, ...]  # per axis: voxel index -> start of the box centred (clamped) there
    eligible_: np.ndarray | None = None
    borders_: dict[int, np.ndarray] | None = None

    def start_for(self, voxel: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(idx[v]) for idx, v in zip(self.clamp_index, voxel, strict=True))

    @property
    def eligible(self) -> np.ndarray:
        """Voxels whose centred, clamped box is free (image shaped)."""
        if self.eligible_ is None:
            self.eligible_ = self.free[np.ix_(*self.clamp_index)]
        return self.eligible_

    def border(self, label: int) -> np.ndarray:
        """Voxels of ``label`` minus its binary erosion by a radius-1 ball."""
        if self.borders_ is None:
            self.borders_ = {}
        if label not in self.borders_:
            mask = self.labels == label
            ball = ndimage.generate_binary_structure(mask.ndim, 1)
            self.borders_[label] = mask & ~ndimage.binary_erosion(mask, structure=ball)
        return self.borders_[label]

    def take(self, start: Sequence[int]) -> None:
        block_box(self.free, start, self.box_size, (1,) * len(start))
        self.eligible_ = None


class ForegroundSampler:
    """Draws boxes from the ground truth, never overlapping annotated voxels or earlier draws (nnActive).

    A box is one of three kinds: ``uniform``, a start drawn uniformly among the case's free box starts
    (nnActive's ``_obtain_random_patch_for_img`` with its retries: a uniform start, redrawn until it overlaps
    nothing); ``class`` / ``border``, centred (clamped inside the image) on a voxel of a foreground class or
    of its border (nnActive's ``_obtain_random_patch_from_locs``). Cases are visited in one shuffled order,
    cycled, one box per case per pass (nnActive's infinite iterator over the shuffled image names); a case
    with no free start left drops out of the cycle.

    Case states are built on first use and dropped once a case is full, so only the cases drawn from are
    held in memory. Shared by ``random_fg*`` and the starting budget, so that both keep one non-overlap
    state when used together.
    """

    def __init__(self, pool: PoolView) -> None:
        if pool.ground_truth is None:
            raise ValueError("this strategy reads the ground truth, but the pool view has none (simulation only)")
        self.pool = pool
        self._ground_truth = pool.ground_truth
        self._states: dict[str, _CaseState] = {}
        self._present: dict[str, set[int]] = {}
        self._cycle: list[str] | None = None
        self._position = 0

    def state(self, case_id: str) -> _CaseState:
        if case_id not in self._states:
            pool = self.pool
            shape, box = tuple(pool.shapes[case_id]), tuple(pool.box_size(case_id))
            labels = np.asarray(self._ground_truth(case_id))
            if labels.shape != shape:
                raise ValueError(f"ground truth of case {case_id!r} has shape {labels.shape}, expected {shape}")
            clamp = tuple(
                np.clip(np.arange(n) - s // 2, 0, n - s).astype(np.intp) for n, s in zip(shape, box, strict=True)
            )
            free = free_positions(pool.annotated(case_id), box, 1)
            self._states[case_id] = _CaseState(labels, box, free, clamp)
        return self._states[case_id]

    def next_case(self, rng: np.random.Generator) -> str | None:
        """The next case of the cycle with a free box start (None when every case is full).

        The first call shuffles the pool's cases with ``rng``; later calls walk that order round and round.
        """
        if self._cycle is None:
            self._cycle = [self.pool.case_ids[int(i)] for i in rng.permutation(len(self.pool.case_ids))]
        while self._cycle:
            self._position %= len(self._cycle)
            case_id = self._cycle[self._position]
            if self.state(case_id).free.any():
                self._position += 1
                return case_id
            self._cycle.pop(self._position)
            del self._states[case_id]
        return None

    def present_labels(self, case_id: str) -> set[int]:
        """Label values present in a case's ground truth (cached)."""
        if case_id not in self._present:
            state = self._states.get(case_id)
            labels = state.labels if state is not None else np.asarray(self._ground_truth(case_id))
            self._present[case_id] = {int(v) for v in np.unique(labels)}
        return self._present[case_id]

    def draw_voxel(self, case_id: str, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, ...] | None:
        """A uniform voxel of ``mask`` whose centred box is free; None if there is none."""
        eligible = self.state(case_id).eligible & mask
        flat = np.flatnonzero(eligible)
        if flat.size == 0:
            return None
        index = int(flat[int(rng.integers(flat.size))])
        return tuple(int(v) for v in np.unravel_index(index, eligible.shape))

    def draw_start(self, case_id: str, rng: np.random.Generator) -> tuple[int, ...] | None:
        """A box start drawn uniformly among the case's free starts; None if there is none."""
        flat = np.flatnonzero(self.state(case_id).free)
        if flat.size == 0:
            return None
        index = int(flat[int(rng.integers(flat.size))])
        return tuple(int(v) for v in np.unravel_index(index, self.state(case_id).free.shape))

    def class_mask(self, case_id: str, label: int, kind: str) -> np.ndarray:
        state = self.state(case_id)
        if kind == "class":
            return state.labels == label
        if kind == "border":
            return state.border(label)
        raise ValueError(f"unknown centre kind {kind!r}; expected 'class' or 'border'")

    def take(self, case_id: str, start: Sequence[int]) -> None:
        """Take the box starting at ``start``."""
        self.state(case_id).take(start)

    def centre_start(self, case_id: str, voxel: Sequence[int]) -> tuple[int, ...]:
        """The start of the box centred (clamped inside the image) on ``voxel``."""
        return self.state(case_id).start_for(voxel)

    def draw_box(self, case_id: str, kind: str, rng: np.random.Generator) -> tuple[tuple[int, ...], dict[str, Any]]:
        """A free box of ``kind`` in a case (which must have a free start), with its explanation.

        For 'class' / 'border' the class is drawn uniformly among the foreground classes present in the
        case that still have an eligible voxel of that kind, and the box is centred on a uniform eligible voxel
        of it; if no class has one, the box falls back to a uniform start (recorded as ``fallback``).
        """
        info: dict[str, Any] = {"kind": kind}
        if kind != "uniform":
            present = self.present_labels(case_id)
            eligible = self.state(case_id).eligible
            classes = [
                int(label)
                for label in self.pool.foreground_labels
                if label in present and (self.class_mask(case_id, label, kind) & eligible).any()
            ]
            if classes:
                label = classes[int(rng.integers(len(classes)))]
                voxel = self.draw_voxel(case_id, self.class_mask(case_id, label, kind), rng)
                assert voxel is not None
                return self.centre_start(case_id, voxel), {**info, "label": label, "centre": list(voxel)}
            info = {"kind": "uniform", "fallback": kind}
        start = self.draw_start(case_id, rng)
        if start is None:
            raise ValueError(f"case {case_id!r} has no free box position left")
        return start, info


def check_centre_probabilities(probabilities: Sequence[float]) -> np.ndarray:
    p = np.asarray(probabilities, dtype=float)
    if p.shape != (len(CENTRE_KINDS),) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(
            f"centre probabilities {tuple(probabilities)} must be {len(CENTRE_KINDS)} non-negative numbers "
            f"for {CENTRE_KINDS} with a positive sum"
        )
    if abs(p.sum() - 1) > 1e-6:
        raise ValueError(f"centre probabilities {tuple(probabilities)} must sum to 1, they sum to {p.sum()}")
    return p / p.sum()


def sample_centred_boxes(
    sampler: ForegroundSampler,
    rng: np.random.Generator,
    probabilities: Sequence[float],
    n_boxes: int,
) -> list[Candidate]:
    """``n_boxes`` boxes, one per case of the sampler's cycle, each of a kind drawn with ``probabilities``.

    Raises :class:`NotEnoughCandidatesError` with the number placed when the pool runs out of room.
    """
    p = check_centre_probabilities(probabilities)
    out: list[Candidate] = []
    while len(out) < n_boxes:
        case_id = sampler.next_case(rng)
        if case_id is None:
            raise NotEnoughCandidatesError(n_boxes, len(out))
        kind = CENTRE_KINDS[int(rng.choice(len(CENTRE_KINDS), p=p))]
        start, info = sampler.draw_box(case_id, kind, rng)
        sampler.take(case_id, start)
        out.append(Candidate(case_id, start, float("nan"), info))
    return out


@dataclass
class RandomForegroundStrategy:
    """Boxes at a uniform free start, or centred on a foreground voxel or a foreground border voxel (nnActive).

    The three probabilities are parameters; ``random_fg33`` (4/6, 1/6, 1/6) and ``random_fg66``
    (1/3 each) are the registered presets.
    """

    p_uniform: float = FG33[0]
    p_class: float = FG33[1]
    p_border: float = FG33[2]

    key: ClassVar[str] = "random_fg33"
    description: ClassVar[str] = "uniform boxes / boxes centred on class / border voxels, 4/6 : 1/6 : 1/6 (reads GT)"
    needs: ClassVar[Needs] = Needs(ground_truth=True)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        check_centre_probabilities((self.p_uniform, self.p_class, self.p_border))

    def query(self, ctx: QueryContext) -> list[Region]:
        probabilities = (self.p_uniform, self.p_class, self.p_border)
        check_centre_probabilities(probabilities)
        sampler = ForegroundSampler(ctx.pool)
        chosen = sample_centred_boxes(sampler, ctx.rng("centres"), probabilities, ctx.query_size)
        return regions_from_candidates(chosen, ctx, self.key)
