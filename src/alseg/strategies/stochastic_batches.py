"""Stochastic batches (Gaillochet et al., seed 002): uncertainty scored per random batch instead of per region.

The pool (``pool``):

- ``"all"`` (default, the paper: ``Batch ~ Uniform(D_U, B)`` over every unlabelled sample, as in
  StochasticBatchAL and ALUNET's STB): every free unit of the pool, from
  :func:`~alseg.strategies.uncertainty.score_units`. With ``unit: slice`` (the papers' unit) these are all
  free slices, with ``unit: case`` all free cases. For 3D boxes the pool is a random maximal packing of
  non-overlapping boxes in each case's free space, drawn from the experiment's generator. Why a packing rather
  than a fixed tiling: every free position can become a unit (a fixed tiling would never offer a box that
  straddles its grid lines), the units never overlap (so any group is a valid query), and the packing depends
  only on the seed and the annotation state, never on the model, so the randomness covers where in a case a
  box lies as well as which cases. Each unit is scored by the base measure's box mean.
- ``"top"``: the base strategy's own candidates (per-case non-maximum suppression by the base score, at most
  ``n_per_case`` per case), which alseg used before; it turns stochastic batches back towards plain
  uncertainty sampling and is kept only as an explicit option.

The units are put in a fixed order (case id, then position), shuffled with ``ctx.rng("shuffle")`` and cut
into disjoint groups of ``query_size`` (the incomplete last group is dropped). Each group is scored by the
mean (or max / sum) of its members' scores and the best group is the query (ties: the lowest group index).
By default every complete group is used, Q = floor(|units| / query_size) as in seeds 001 / 002;
``n_groups`` keeps only the first n.

Bases: ``entropy``, ``bald``, ``mean_std`` (the box means of their voxel maps) and ``clasp_pe``. No paper
combines stochastic batches with ClaSP; alseg defines it as follows. With ``pool: all`` each unit is scored by
the box mean of the sum of ClaSP's class maps, Σ_fg PE · p̄_c = PE · (predicted foreground probability): the
predictive entropy where the model sees foreground, which keeps ClaSP's preference for uncertain foreground
in one number per unit. With ``pool: top`` the candidates are ClaSP's class-stratified boxes (every
foreground class map u_c and the PE map, visited in random order per case with one shared free grid) scored
by the noise-free box means S of the map that picked them. Either way stochastic batches replaces ClaSP's
quota, power noise and β schedule.
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
from alseg.strategies.uncertainty import VoxelMap, score_pool, score_units
from alseg.uncertainty.measures import bald, mean_probabilities, mean_std, predictive_entropy

Reduction = Literal["mean", "max", "sum"]
REDUCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda s: s.mean(axis=1),
    "max": lambda s: s.max(axis=1),
    "sum": lambda s: s.sum(axis=1),
}
POOLS = ("all", "top")


def _foreground_entropy(ctx: QueryContext) -> VoxelMap:
    labels = [int(c) for c in ctx.pool.foreground_labels]

    def fg_pe(probs: np.ndarray) -> np.ndarray:
        mean = mean_probabilities(probs)
        return predictive_entropy(mean[None]) * mean[labels].sum(axis=0)

    return fg_pe


def _clasp_top(ctx: QueryContext) -> list[Candidate]:
    by_map = clasp_candidates(ctx, beta=None)
    return [c for of_map in by_map.values() for c in of_map]


@dataclass(frozen=True)
class Base:
    """A base measure: its voxel map (for the whole pool), the K it needs and its own candidates ('top')."""

    measure: str
    min_samples: int
    voxel_map: Callable[[QueryContext], VoxelMap]
    top: Callable[[QueryContext], list[Candidate]] | None = None

    def candidates(self, ctx: QueryContext, pool: str) -> list[Candidate]:
        info = {"measure": self.measure}
        if pool == "all":
            return score_units(ctx, self.voxel_map(ctx), info, self.min_samples)
        if self.top is not None:
            return self.top(ctx)
        return score_pool(ctx, self.voxel_map(ctx), info, self.min_samples)


BASES: dict[str, Base] = {
    "entropy": Base("pe", 1, lambda ctx: predictive_entropy),
    "bald": Base("bald", 2, lambda ctx: bald),
    "mean_std": Base("mean_std", 2, lambda ctx: mean_std),
    "clasp_pe": Base("foreground_pe", 1, _foreground_entropy, top=_clasp_top),
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
    """Stochastic batches over a base measure: the best of random disjoint groups of query_size units."""

    base: str = "entropy"
    reduction: Reduction = "mean"
    n_groups: int | None = None
    pool: Literal["all", "top"] = "all"

    key: ClassVar[str] = "stochastic_batches"
    description: ClassVar[str] = "best-scoring (mean) of random disjoint groups of all free units (base: entropy)"

    @property
    def needs(self) -> Needs:
        """Probabilities, with the K the base needs (an instance attribute: it depends on ``base``)."""
        base = BASES.get(self.base)
        return Needs(probabilities=True, min_samples=base.min_samples if base else 1)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Parameter errors, raised when the experiment is created."""
        if self.base not in BASES:
            raise ValueError(f"unknown base strategy {self.base!r} for stochastic_batches; valid: {sorted(BASES)}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; expected one of {sorted(REDUCTIONS)}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r} for stochastic_batches; expected one of {POOLS}")
        if self.n_groups is not None and (not isinstance(self.n_groups, int) or self.n_groups <= 0):
            raise ValueError(f"n_groups must be a positive integer or None (every complete group), got {self.n_groups}")

    def query(self, ctx: QueryContext) -> list[Region]:
        self.check()
        candidates = sorted(BASES[self.base].candidates(ctx, self.pool), key=lambda c: (c.case_id, c.start))
        groups = make_groups(len(candidates), ctx.query_size, ctx.rng("shuffle"), self.n_groups)
        if len(groups) == 0:
            raise NotEnoughCandidatesError(ctx.query_size, len(candidates))
        scores = group_scores([c.score for c in candidates], groups, self.reduction)
        best = int(np.argmax(scores))  # first maximum: the lowest group index
        extra = {
            "base": self.base,
            "pool": self.pool,
            "n_units": len(candidates),
            "group_index": best,
            "group_score": float(scores[best]),
            "n_groups": len(groups),
            "reduction": self.reduction,
        }
        chosen = [candidates[int(i)] for i in groups[best]]
        chosen = [dataclasses.replace(c, info={**c.info, **extra}) for c in chosen]
        return regions_from_candidates(chosen, ctx, self.key)
