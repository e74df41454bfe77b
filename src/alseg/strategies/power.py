"""Power and soft-rank sampling (Kirsch et al., "Stochastic batch acquisition"; nnActive's PowerPE / PowerBALD /
SoftRankBALD): a score s becomes log s + G / β with G ~ Gumbel(0, 1), and the top-k of the noised scores is a
sample without replacement with probabilities ∝ s^β (Gumbel-top-k).

``power_pe`` / ``power_bald`` noise every box score on each case's stride grid, before the per-case
non-maximum suppression (as nnActive noises the aggregated score map), then take the best ``query_size``
over all cases. ``softrank_bald`` keeps 2·``n_per_case`` BALD candidates per case, ranks them over the whole
pool (r = 1 is the best) and draws with probabilities ∝ 1 / r: score −log r + G.

Every Gumbel draw comes from ``ctx.rng``; per-case draws are keyed by the case id, so they do not depend on
the order in which cases are streamed.

>>> import numpy as np
>>> noised, g = power_noise(np.array([1.0, 0.0]), beta=1e9, rng=np.random.default_rng(0))
>>> bool(abs(noised[0]) < 1e-6 and np.isfinite(noised[1]))
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from alseg.data.regions import Region
from alseg.scoring.boxes import Candidate, greedy_nms
from alseg.strategies.base import Needs, NotEnoughCandidatesError, QueryContext, regions_from_candidates
from alseg.strategies.uncertainty import VoxelMap, score_pool, stream_cases, top_regions
from alseg.uncertainty.measures import bald, predictive_entropy

#: scores are clamped to this before the log, so a zero score gives a finite (very low) log score
LOG_EPS = 1e-12


def check_beta(beta: float, name: str = "beta") -> float:
    """``beta`` as a float; it must be finite and > 0."""
    value = float(beta)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}")
    return value


def safe_log(scores: np.ndarray) -> np.ndarray:
    """log(max(s, LOG_EPS)) in float64; NaN stays NaN (never taken by the selection)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.log(np.maximum(s, LOG_EPS))


def power_noise(scores: np.ndarray, beta: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(log s + G / β, G)`` with G ~ Gumbel(0, 1) drawn from ``rng``, one draw per score."""
    beta = check_beta(beta)
    gumbel = rng.gumbel(0.0, 1.0, size=np.shape(scores))
    return safe_log(scores) + gumbel / beta, gumbel


def power_pool(ctx: QueryContext, voxel_map: VoxelMap, measure: str, beta: float, min_samples: int) -> list[Candidate]:
    """Per case: box means of ``voxel_map`` → power noise → greedy non-overlapping free boxes (≤ n_per_case).

    Candidate scores are the noised log scores; ``info`` records ``box_score`` (s), ``gumbel`` (G) and ``beta``.
    """
    beta = check_beta(beta)
    candidates: list[Candidate] = []
    for case in stream_cases(ctx, min_samples):
        scores = case.box_means(voxel_map(case.probs))
        noised, gumbel = power_noise(scores, beta, ctx.rng(f"gumbel/{case.case_id}"))
        chosen = greedy_nms(case.case_id, noised, case.box_size, case.stride, case.free, ctx.n_per_case)
        for c in chosen:
            idx = case.grid_index(c.start)
            info = {"measure": measure, "box_score": float(scores[idx]), "gumbel": float(gumbel[idx]), "beta": beta}
            candidates.append(dataclasses.replace(c, info=info))
    return candidates


@dataclass
class PowerPEStrategy:
    """PowerPE: Gumbel-top-k on log(mean PE of a box) + G / β, i.e. boxes sampled ∝ score^β."""

    beta: float = 1.0

    key: ClassVar[str] = "power_pe"
    description: ClassVar[str] = "boxes sampled without replacement ∝ (mean PE)^beta (Gumbel-top-k, beta = 1)"
    needs: ClassVar[Needs] = Needs(probabilities=True)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        check_beta(self.beta)

    def query(self, ctx: QueryContext) -> list[Region]:
        candidates = power_pool(ctx, predictive_entropy, "pe", self.beta, self.needs.min_samples)
        return top_regions(ctx, candidates, self.key)


@dataclass
class PowerBaldStrategy:
    """PowerBALD: Gumbel-top-k on log(mean BALD of a box) + G / β; needs K >= 2 samples."""

    beta: float = 1.0

    key: ClassVar[str] = "power_bald"
    description: ClassVar[str] = "boxes sampled without replacement ∝ (mean BALD)^beta (Gumbel-top-k, K >= 2)"
    needs: ClassVar[Needs] = Needs(probabilities=True, min_samples=2)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        check_beta(self.beta)

    def query(self, ctx: QueryContext) -> list[Region]:
        candidates = power_pool(ctx, bald, "bald", self.beta, self.needs.min_samples)
        return top_regions(ctx, candidates, self.key)


def softrank_select(
    candidates: Sequence[Candidate], k: int, rng: np.random.Generator
) -> tuple[list[Candidate], np.ndarray, np.ndarray]:
    """The soft-rank choice of ``k`` candidates: rank r over all (1 = best score), then top-k of −log r + G.

    Only the order of the scores matters, never their values. Returns the chosen candidates (best soft score
    first) with ``info`` extended by ``box_score``, ``rank`` and ``gumbel``, and the ranks and Gumbel draws of
    all candidates (in rank order).
    """
    if len(candidates) < k:
        raise NotEnoughCandidatesError(k, len(candidates))
    ranked = sorted(candidates, key=Candidate.sort_key)
    ranks = np.arange(1, len(ranked) + 1, dtype=np.float64)
    gumbel = rng.gumbel(0.0, 1.0, size=len(ranked))
    soft = -np.log(ranks) + gumbel
    order = np.lexsort((ranks, -soft))[:k]  # soft score descending, ties by rank
    chosen = []
    for i in order:
        c = ranked[int(i)]
        info = {**c.info, "box_score": c.score, "rank": int(ranks[i]), "gumbel": float(gumbel[i])}
        chosen.append(dataclasses.replace(c, score=float(soft[i]), info=info))
    return chosen, ranks, gumbel


@dataclass
class SoftRankBaldStrategy:
    """SoftRankBALD: 2·n_per_case BALD candidates per case, ranked over the pool; Gumbel-top-k on −log rank."""

    key: ClassVar[str] = "softrank_bald"
    description: ClassVar[str] = "boxes sampled without replacement ∝ 1 / (pool rank by mean BALD) (K >= 2)"
    needs: ClassVar[Needs] = Needs(probabilities=True, min_samples=2)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def query(self, ctx: QueryContext) -> list[Region]:
        wide = dataclasses.replace(ctx, n_per_case=2 * ctx.n_per_case)
        candidates = score_pool(wide, bald, {"measure": "bald"}, min_samples=self.needs.min_samples)
        chosen, _, _ = softrank_select(candidates, ctx.query_size, ctx.rng("gumbel"))
        return regions_from_candidates(chosen, ctx, self.key)
