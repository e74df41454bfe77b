"""USIMC and USIMF (seed 001): uncertain, diverse and representative batches by submodular mutual information.

1. Candidates: per pool case, the free boxes with the highest class-weighted MC-dropout uncertainty
   u = Σ_fg w_c var_k p_c (box mean), non-overlapping within the case (``n_per_case`` of them), so no two
   candidates overlap.
2. Gradient embeddings of every candidate: ∂/∂W of the cross-entropy against the argmax pseudo-label summed
   over the region, W = the bottleneck's last convolution (the backend's ``region_gradients``), restricted to
   at most ``max_dim`` parameters: a seeded choice of coordinates (USIMC), or parameters drawn ∝ the
   diagonal empirical Fisher F estimated on candidates drawn ∝ u (USIMF; F = mean of g², not one sample's g²).
3. :func:`alseg.selection.usim.select_usim`: query set X_Q (Q draws ∝ u, Q by the knee), similarity pool × X_Q
   (cosine for USIMC, Fisher kernel gᵀF⁻¹g for USIMF) rescaled to [0, 1], FLQMI by stochastic greedy
   (naive below 1,000 candidates), η = 1.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from alseg.data.regions import Box, Region
from alseg.scoring.boxes import Candidate
from alseg.selection.usim import empirical_fisher_diagonal, fisher_parameter_subset, sample_query_set, select_usim
from alseg.strategies.base import Needs, NotEnoughCandidatesError, QueryContext
from alseg.strategies.uncertainty import score_pool
from alseg.uncertainty.measures import class_weighted_variance, usim_class_weights


@dataclass
class USIMStrategy:
    """USIM over region gradient embeddings; ``similarity`` 'cosine' (USIMC) or 'fisher' (USIMF)."""

    similarity: Literal["cosine", "fisher"] = "cosine"
    eta: float = 1.0
    epsilon: float = 0.01
    max_dim: int = 10_000
    fisher_subset_size: int = 64

    key: ClassVar[str] = "usim_c"
    description: ClassVar[str] = "USIMC: FLQMI over cosine of region gradient embeddings, query set ∝ uncertainty"
    needs: ClassVar[Needs] = Needs(probabilities=True, min_samples=2, gradients=True)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def query(self, ctx: QueryContext) -> list[Region]:
        pool = ctx.pool
        if pool.region_gradients is None:
            raise ValueError(f"{self.key} needs region gradients, which the backend did not provide")
        weights = usim_class_weights(pool.annotated_class_voxels, pool.foreground_labels)
        candidates = sorted(
            score_pool(
                ctx,
                lambda p: class_weighted_variance(p, weights),
                {"measure": "class_weighted_variance"},
                min_samples=2,
            ),
            key=Candidate.sort_key,
        )
        if len(candidates) < ctx.query_size:
            raise NotEnoughCandidatesError(ctx.query_size, len(candidates))
        u = np.asarray([c.score for c in candidates], dtype=np.float64)
        index = self._parameter_index(ctx, candidates, u)
        emb = self._embeddings(ctx, candidates, index)
        result = select_usim(
            emb,
            u,
            ctx.query_size,
            ctx.rng("usim"),
            similarity=self.similarity,
            eta=self.eta,
            epsilon=self.epsilon,
            max_dim=self.max_dim,
        )
        in_query = dict(zip(result.query_indices.tolist(), result.query_counts.tolist(), strict=True))
        out = []
        for j, gain in zip(result.selected.tolist(), result.gains.tolist(), strict=True):
            c = candidates[j]
            info = {
                "strategy": self.key,
                "round": ctx.round_index,
                "uncertainty": c.score,
                "marginal_gain": float(gain),
                "in_query_set": int(in_query.get(j, 0)),
                "n_query": int(result.n_query),
                "method": result.method,
            }
            out.append(Region(c.case_id, Box(c.start, pool.box_size(c.case_id)), float(gain), info))
        return out

    def _parameter_index(self, ctx: QueryContext, candidates: list[Candidate], u: np.ndarray) -> np.ndarray | None:
        n = ctx.pool.n_gradient_params
        if n <= self.max_dim:
            return None
        rng = ctx.rng("parameters")
        if self.similarity == "cosine":
            return np.sort(rng.choice(n, size=self.max_dim, replace=False))
        # USIMF: diagonal Fisher on up to fisher_subset_size candidates drawn ∝ u, then parameters ∝ F
        idx, _ = sample_query_set(u, min(self.fisher_subset_size, len(u)), rng)
        grads = self._embeddings(ctx, [candidates[i] for i in idx.tolist()], None)
        return np.sort(fisher_parameter_subset(empirical_fisher_diagonal(grads), self.max_dim, rng))

    @staticmethod
    def _embeddings(ctx: QueryContext, candidates: list[Candidate], index: np.ndarray | None) -> np.ndarray:
        by_case: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(candidates):
            by_case[c.case_id].append(i)
        out: np.ndarray | None = None
        for case_id in sorted(by_case):
            rows = by_case[case_id]
            boxes = [Box(candidates[i].start, ctx.pool.box_size(case_id)) for i in rows]
            g = ctx.pool.region_gradients(case_id, boxes, index)  # type: ignore[misc]
            if out is None:
                out = np.zeros((len(candidates), g.shape[1]), dtype=np.float32)
            out[rows] = g
        assert out is not None
        return out
