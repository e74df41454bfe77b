"""Uncertainty strategies: top boxes by the mean of a voxel uncertainty map (entropy, bald, mean_std).

Scoring streams the pool case by case: a case's voxel map is reduced to box means on its stride grid,
non-maximum suppression keeps at most ``n_per_case`` non-overlapping free boxes, and the map is dropped.
The best ``query_size`` candidates over all cases are the query.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from alseg.data.regions import Region
from alseg.scoring.boxes import Candidate, box_means, free_positions, greedy_nms, random_packing, top_k
from alseg.strategies.base import Needs, NotEnoughCandidatesError, QueryContext, regions_from_candidates
from alseg.uncertainty.measures import bald, mean_std, predictive_entropy

#: probability samples (K, C, *spatial) -> voxel map (*spatial)
VoxelMap = Callable[[np.ndarray], np.ndarray]


@dataclass
class CaseGrid:
    """One pool case as a scoring strategy sees it: probability samples and its grid of free box starts.

    ``free`` is the case's stride grid, True where a box shares no voxel with annotated voxels; it is meant to
    be shared (and updated in place by :func:`greedy_nms`) by every selection made in the case.
    """

    case_id: str
    probs: np.ndarray  # (K, C, *spatial)
    box_size: tuple[int, ...]
    stride: tuple[int, ...]
    free: np.ndarray

    def box_means(self, voxel_map: np.ndarray) -> np.ndarray:
        """Mean of a voxel map over every box on the case's stride grid."""
        return box_means(voxel_map, self.box_size, self.stride)

    def grid_index(self, start: Sequence[int]) -> tuple[int, ...]:
        """The grid index of a box start (a multiple of the stride)."""
        return tuple(int(p) // int(st) for p, st in zip(start, self.stride, strict=True))


def stream_cases(ctx: QueryContext, min_samples: int = 1) -> Iterator[CaseGrid]:
    """Stream ``ctx.pool.predictions()`` as checked :class:`CaseGrid` objects, one case at a time."""
    pool = ctx.pool
    if pool.predictions is None:
        raise ValueError("this strategy needs probability samples, but the pool view has no predictions")
    for pred in pool.predictions():
        case_id = pred.case_id
        if case_id not in pool.shapes:
            raise ValueError(f"prediction for case {case_id!r}, which is not in the pool")
        shape = tuple(pool.shapes[case_id])
        probs = np.asarray(pred.probs)
        if probs.ndim != 2 + len(shape) or probs.shape[2:] != shape:
            raise ValueError(f"probabilities of case {case_id!r} have shape {probs.shape}, expected (K, C, *{shape})")
        if probs.shape[0] < min_samples:
            raise ValueError(
                f"probabilities of case {case_id!r} have K = {probs.shape[0]} samples, this measure needs "
                f"K >= {min_samples}"
            )
        box, stride = tuple(pool.box_size(case_id)), tuple(pool.case_stride(case_id))
        free = free_positions(pool.annotated(case_id), box, stride)
        yield CaseGrid(case_id, probs, box, stride, free)


def score_pool(
    ctx: QueryContext,
    voxel_map: VoxelMap,
    info: Mapping[str, Any] | None = None,
    min_samples: int = 1,
) -> list[Candidate]:
    """Per case: ``voxel_map`` → box means → greedy non-overlapping free boxes (≤ ``ctx.n_per_case``).

    Streams ``ctx.pool.predictions()`` and keeps only the candidates, never the maps.
    """
    candidates: list[Candidate] = []
    for case in stream_cases(ctx, min_samples):
        scores = case.box_means(voxel_map(case.probs))
        candidates.extend(
            greedy_nms(case.case_id, scores, case.box_size, case.stride, case.free, ctx.n_per_case, dict(info or {}))
        )
    return candidates


def score_units(
    ctx: QueryContext,
    voxel_map: VoxelMap,
    info: Mapping[str, Any] | None = None,
    min_samples: int = 1,
) -> list[Candidate]:
    """Every free unit of the pool, scored by the box mean of ``voxel_map`` (no pre-filter by score).

    Per case the units are a random maximal packing of non-overlapping boxes in the free space
    (:func:`~alseg.scoring.boxes.random_packing` on the case's stride grid, drawn from
    ``ctx.rng("units/<case>")``): with ``unit: slice`` that is every free slice, with ``unit: case`` every
    free case, with boxes a random tiling of what is not annotated. The units depend only on the annotation
    state and the seed, never on the model, so a strategy that samples among them (stochastic batches, USIM)
    sees the whole pool rather than the base measure's per-case favourites.
    """
    candidates: list[Candidate] = []
    for case in stream_cases(ctx, min_samples):
        starts = random_packing(case.free, case.box_size, case.stride, ctx.rng(f"units/{case.case_id}"))
        if not starts:
            continue
        scores = case.box_means(voxel_map(case.probs))
        for start in sorted(starts):
            score = float(scores[case.grid_index(start)])
            candidates.append(Candidate(case.case_id, start, score, {**(info or {}), "pool": "all"}))
    return candidates


def top_regions(ctx: QueryContext, candidates: Sequence[Candidate], strategy_key: str) -> list[Region]:
    """The best ``ctx.query_size`` candidates as regions; too few is a :class:`NotEnoughCandidatesError`."""
    if len(candidates) < ctx.query_size:
        raise NotEnoughCandidatesError(ctx.query_size, len(candidates))
    return regions_from_candidates(top_k(candidates, ctx.query_size), ctx, strategy_key)


@dataclass
class EntropyStrategy:
    """Top boxes by mean predictive entropy."""

    key: ClassVar[str] = "entropy"
    description: ClassVar[str] = "top boxes by mean predictive entropy (PE)"
    needs: ClassVar[Needs] = Needs(probabilities=True)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def query(self, ctx: QueryContext) -> list[Region]:
        return top_regions(ctx, score_pool(ctx, predictive_entropy, {"measure": "pe"}), self.key)


@dataclass
class BaldStrategy:
    """Top boxes by mean BALD (mutual information); needs K >= 2 samples."""

    key: ClassVar[str] = "bald"
    description: ClassVar[str] = "top boxes by mean BALD / mutual information (K >= 2 samples)"
    needs: ClassVar[Needs] = Needs(probabilities=True, min_samples=2)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def query(self, ctx: QueryContext) -> list[Region]:
        candidates = score_pool(ctx, bald, {"measure": "bald"}, min_samples=self.needs.min_samples)
        return top_regions(ctx, candidates, self.key)


@dataclass
class MeanStdStrategy:
    """Top boxes by mean over classes of the standard deviation over samples (Kendall et al.)."""

    key: ClassVar[str] = "mean_std"
    description: ClassVar[str] = "top boxes by mean class-averaged std over samples (Mean STD)"
    needs: ClassVar[Needs] = Needs(probabilities=True, min_samples=2)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def query(self, ctx: QueryContext) -> list[Region]:
        candidates = score_pool(ctx, mean_std, {"measure": "mean_std"}, min_samples=self.needs.min_samples)
        return top_regions(ctx, candidates, self.key)
