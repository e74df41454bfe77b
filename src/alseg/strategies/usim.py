"""USIMC and USIMF (seed 001): uncertain, diverse and representative batches by submodular mutual information.

1. Candidates X_U, scored by the class-weighted MC-dropout uncertainty u = Σ_fg w_c var_k p_c (box mean).
   ``pool="all"`` (default, as the paper: the whole unlabelled pool): every free unit of the pool
   (:func:`~alseg.strategies.uncertainty.score_units`: every free slice with ``unit: slice``, a seeded random
   maximal packing of non-overlapping free boxes per case with boxes). ``pool="top"``: per case the
   ``n_per_case`` best non-overlapping free boxes by u (non-maximum suppression). No two candidates overlap.
2. Gradient embeddings of every candidate: ∂/∂W of the cross-entropy against the argmax pseudo-label summed
   over the region (the backend's ``region_gradients``). The weights W depend on the variant (``needs``
   asks the backend for them, :attr:`Needs.gradient_layers`):

   - USIMC: the bottleneck's last convolution (``"bottleneck"``), reduced to at most ``max_dim`` numbers by
     a seeded choice of coordinates;
   - USIMF: the convolutions of every decoder stage (``"decoder"``, ALUNET's ``layer_used='decoder'``), of
     which ``max_dim`` parameters are drawn without replacement ∝ the diagonal empirical Fisher F, with F =
     the mean of g² over up to ``fisher_subset_size`` candidates drawn ∝ u (not one sample's g², the bug in
     the published code).
3. :func:`alseg.selection.usim.select_usim`: query set X_Q (Q draws ∝ u, Q by the knee), similarity pool × X_Q
   (cosine for USIMC, Fisher kernel gᵀF⁻¹g for USIMF) rescaled to [0, 1], FLQMI by stochastic greedy
   (naive below 1,000 candidates), η = 1.

Every draw is seeded through ``ctx.rng``: ``units/<case>`` (the pool), ``parameters`` (the embedded
parameters) and ``usim`` (query set, greedy).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from alseg.data.regions import Box, Region
from alseg.scoring.boxes import Candidate
from alseg.selection.usim import fisher_parameter_subset, sample_query_set, select_usim
from alseg.strategies.base import Needs, NotEnoughCandidatesError, QueryContext
from alseg.strategies.uncertainty import score_pool, score_units
from alseg.uncertainty.measures import class_weighted_variance, usim_class_weights

#: candidate pools: every free unit, or the per-case NMS top of u
POOLS = ("all", "top")
SIMILARITIES = ("cosine", "fisher")


@dataclass
class USIMStrategy:
    """USIM over region gradient embeddings; ``similarity`` 'cosine' (USIMC) or 'fisher' (USIMF)."""

    similarity: Literal["cosine", "fisher"] = "cosine"
    pool: Literal["all", "top"] = "all"
    eta: float = 1.0
    epsilon: float = 0.01
    max_dim: int = 10_000
    fisher_subset_size: int = 64

    key: ClassVar[str] = "usim_c"
    description: ClassVar[str] = "USIMC: FLQMI over cosine of region gradient embeddings, query set ∝ uncertainty"

    @property
    def needs(self) -> Needs:
        """K >= 2 samples and region gradients: of the decoder for USIMF, of the bottleneck for USIMC."""
        layers = "decoder" if self.similarity == "fisher" else "bottleneck"
        return Needs(probabilities=True, min_samples=2, gradients=True, gradient_layers=layers)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Parameter errors, raised when the experiment is created."""
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r} for {self.key}; valid: {', '.join(SIMILARITIES)}")
        if self.pool not in POOLS:
            raise ValueError(
                f"unknown pool {self.pool!r} for {self.key}; valid: 'all' (every free unit of the pool) or "
                "'top' (the per-case best non-overlapping boxes by uncertainty)"
            )
        for name in ("max_dim", "fisher_subset_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < float(self.epsilon) < 1 or float(self.eta) < 0:
            raise ValueError(f"epsilon must lie in (0, 1) and eta be >= 0, got epsilon {self.epsilon}, eta {self.eta}")

    def query(self, ctx: QueryContext) -> list[Region]:
        self.check()
        pool = ctx.pool
        if pool.region_gradients is None:
            raise ValueError(f"{self.key} needs region gradients, which the backend did not provide")
        weights = usim_class_weights(pool.annotated_class_voxels, pool.foreground_labels)
        score = score_units if self.pool == "all" else score_pool
        candidates = sorted(
            score(
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
        record = {
            "pool": self.pool,
            "n_candidates": len(candidates),
            "gradient_layers": self.needs.gradient_layers,
            "n_gradient_params": int(pool.n_gradient_params),
            "n_embedded_params": int(emb.shape[1]),
        }
        embedded = embedded_parameters(pool.region_gradients, pool.n_gradient_params, index)
        if embedded is not None:
            record["embedded_parameters"] = embedded
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
                **record,
            }
            out.append(Region(c.case_id, Box(c.start, pool.box_size(c.case_id)), float(gain), info))
        return out

    def _parameter_index(self, ctx: QueryContext, candidates: list[Candidate], u: np.ndarray) -> np.ndarray | None:
        """The flat parameter positions to embed (sorted), or None for all of them (``n <= max_dim``)."""
        n = ctx.pool.n_gradient_params
        if n <= self.max_dim:
            return None
        rng = ctx.rng("parameters")
        if self.similarity == "cosine":
            return np.sort(rng.choice(n, size=self.max_dim, replace=False))
        # USIMF: diagonal Fisher on up to fisher_subset_size candidates drawn ∝ u, then parameters ∝ F
        idx, _ = sample_query_set(u, min(self.fisher_subset_size, len(u)), rng)
        fisher = self._fisher_diagonal(ctx, [candidates[i] for i in idx.tolist()])
        chosen = fisher_parameter_subset(fisher, self.max_dim, rng)
        if chosen.size == 0:  # every gradient of the subset is zero: nothing to weigh by, draw uniformly
            chosen = rng.choice(n, size=self.max_dim, replace=False)
        return np.sort(chosen)

    @staticmethod
    def _fisher_diagonal(ctx: QueryContext, candidates: list[Candidate]) -> np.ndarray:
        """F = mean over ``candidates`` of g² (float64), summed case by case: the full-length gradients of
        all of them (millions of decoder parameters each) are never held at once."""
        total: np.ndarray | None = None
        for case_id, rows in _by_case(candidates).items():
            boxes = [Box(candidates[i].start, ctx.pool.box_size(case_id)) for i in rows]
            g = np.asarray(ctx.pool.region_gradients(case_id, boxes, None))  # type: ignore[misc]
            if not np.isfinite(g).all():
                raise ValueError(f"region gradients of case {case_id!r} are not finite")
            sq = np.einsum("ij,ij->j", g, g, dtype=np.float64)
            total = sq if total is None else total + sq
        assert total is not None
        return total / len(candidates)

    @staticmethod
    def _embeddings(ctx: QueryContext, candidates: list[Candidate], index: np.ndarray | None) -> np.ndarray:
        out: np.ndarray | None = None
        for case_id, rows in _by_case(candidates).items():
            boxes = [Box(candidates[i].start, ctx.pool.box_size(case_id)) for i in rows]
            g = ctx.pool.region_gradients(case_id, boxes, index)  # type: ignore[misc]
            if out is None:
                out = np.zeros((len(candidates), g.shape[1]), dtype=np.float32)
            out[rows] = g
        assert out is not None
        return out


def _by_case(candidates: list[Candidate]) -> dict[str, list[int]]:
    """Candidate indices grouped by case, cases in sorted order."""
    by_case: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(candidates):
        by_case[c.case_id].append(i)
    return {case_id: by_case[case_id] for case_id in sorted(by_case)}


def embedded_parameters(embedder: Any, n_params: int, index: np.ndarray | None) -> dict[str, int] | None:
    """How many embedded parameters each module contributes, from the embedder's ``parameter_ranges``
    (``(parameter name, start, stop)``; a parameter ``<module>.weight`` counts for ``<module>``), or None
    when the embedder does not say."""
    ranges = getattr(embedder, "parameter_ranges", None)
    if not ranges:
        return None
    positions = np.arange(int(n_params)) if index is None else np.asarray(index, dtype=np.int64)
    counts: dict[str, int] = {}
    for name, start, stop in ranges:
        k = int(np.count_nonzero((positions >= int(start)) & (positions < int(stop))))
        if k:
            module = str(name).rsplit(".", 1)[0] if str(name).endswith((".weight", ".bias")) else str(name)
            counts[module] = counts.get(module, 0) + k
    return counts
