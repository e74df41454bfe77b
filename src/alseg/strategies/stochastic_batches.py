"""Stochastic batches (Gaillochet et al., seed 002): uncertainty scored per random batch instead of per region.

The candidates are the base strategy's non-overlapping boxes with their base scores (per-case non-maximum
suppression, at most ``n_per_case`` per case). They are put in a fixed order (case id, then position),
shuffled with ``ctx.rng("shuffle")`` and cut into disjoint groups of ``query_size`` (the incomplete last
group is dropped). Each group is scored by the mean (or max / sum) of its members' scores and the best group
is the query (ties: the lowest group index). By default every complete group is used,
Q = floor(|candidates| / query_size) as in seeds 001 / 002; ``n_groups`` keeps only the first n.

Bases: ``entropy``, ``bald``, ``mean_std`` (the box means of their voxel maps) and ``clasp_pe``. For
``clasp_pe`` the candidates are ClaSP's class-stratified boxes (every foreground class map u_c and the PE
map, visited in random order per case with one shared free grid) scored by their noise-free box means
S of the map that picked them: stochastic batches replaces ClaSP's quota, power noise and β schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from alseg.data.regions import Region
from alseg.scoring.boxes import Candidate
from alseg.strategies.base import Needs, NotEnoughCandidatesError, QueryContext, regions_from_candidates
from alseg.strategies.clasp import clasp_candidates
from alseg.strategies.uncertainty import score_pool
from alseg.uncertainty.measures import bald, mean_std, predictive_entropy

Reduction = Literal["mean", "max", "sum"]
REDUCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda s: s.mean(axis=1),
    "max": lambda s: s.max(axis=1),
    "sum": lambda s: s.sum(axis=1),
}


def _entropy(ctx: QueryContext) -> list[Candidate]:
    return score_pool(ctx, predictive_entropy, {"measure": "pe"})


def _bald(ctx: QueryContext) -> list[Candidate]:
    return score_pool(ctx, bald, {"measure": "bald"}, min_samples=2)


def _mean_std(ctx: QueryContext) -> list[Candidate]:
    return score_pool(ctx, mean_std, {"measure": "mean_std"}, min_samples=2)


def _clasp_pe(ctx: QueryContext) -> list[Candidate]:
    by_map = clasp_candidates(ctx, beta=None)
    return [c for of_map in by_map.values() for c in of_map]


#: base key -> (candidates with base scores, samples K the base needs)
BASES: dict[str, tuple[Callable[[QueryContext], list[Candidate]], int]] = {
    "entropy": (_entropy, 1),
    "bald": (_bald, 2),
    "mean_std": (_mean_std, 2),
    "clasp_pe": (_clasp_pe, 1),
}


def make_groups(
    n_candidates: int, group_size: int, rng: np.random.Generator, n_groups: int | None = None
) -> np.ndarray:
    """Disjoint random groups: ``(n, group_size)`` candidate indices from one permutation of ``rng``.

    n = floor(n_candidates / group_size), or the first ``n_groups`` of those when given.
    """
    if group_size <= 0:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    if n_groups is not None and n_groups <= 0:
        raise ValueError(f"n_groups must be >= 1 or None (every complete group), got {n_groups}")
    n = n_candidates // group_size
    if n_groups is not None:
        n = min(n, n_groups)
    perm = rng.permutation(n_candidates)
    return perm[: n * group_size].reshape(n, group_size)


def group_scores(scores: Sequence[float] | np.ndarray, groups: np.ndarray, reduction: str = "mean") -> np.ndarray:
    """One score per group: the ``reduction`` ('mean' | 'max' | 'sum') of its members' scores."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {sorted(REDUCTIONS)}")
    values = np.asarray(scores, dtype=np.float64)[groups]
    return REDUCTIONS[reduction](values)


@dataclass
class StochasticBatchesStrategy:
    """Stochastic batches over a base scoring strategy: the best of random disjoint groups of query_size."""

    base: str = "entropy"
    reduction: Reduction = "mean"
    n_groups: int | None = None

    key: ClassVar[str] = "stochastic_batches"
    description: ClassVar[str] = "best-scoring (mean) of random disjoint groups of candidate boxes (base: entropy)"

    @property
    def needs(self) -> Needs:
        """Probabilities, with the K the base needs (an instance attribute: it depends on ``base``)."""
        return Needs(probabilities=True, min_samples=BASES.get(self.base, (None, 1))[1])

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def query(self, ctx: QueryContext) -> list[Region]:
        if self.base not in BASES:
            raise ValueError(f"unknown base strategy {self.base!r} for stochastic_batches; valid: {sorted(BASES)}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; expected one of {sorted(REDUCTIONS)}")
        candidates = sorted(BASES[self.base][0](ctx), key=lambda c: (c.case_id, c.start))
        groups = make_groups(len(candidates), ctx.query_size, ctx.rng("shuffle"), self.n_groups)
        if len(groups) == 0:
            raise NotEnoughCandidatesError(ctx.query_size, len(candidates))
        scores = group_scores([c.score for c in candidates], groups, self.reduction)
        best = int(np.argmax(scores))  # first maximum: the lowest group index
        extra = {
            "base": self.base,
            "group_index": best,
            "group_score": float(scores[best]),
            "n_groups": len(groups),
            "reduction": self.reduction,
        }
        chosen = [candidates[int(i)] for i in groups[best]]
        chosen = [dataclasses.replace(c, info={**c.info, **extra}) for c in chosen]
        return regions_from_candidates(chosen, ctx, self.key)
