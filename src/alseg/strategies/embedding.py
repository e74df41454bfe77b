"""Core-Set and BADGE: diversity through region embeddings (seed 001's baselines).

Candidates are the free boxes of each pool case on a grid whose stride is ``stride_fraction`` of the box size
(half a box by default: a stride-1 grid would give thousands of near-identical embeddings per case).
Embeddings are box sums / means of per-voxel maps, so one box filter per channel gives all of a case's
candidates at once, and the case's maps are dropped before the next case streams in.

- ``coreset``: the region feature is the encoder bottleneck averaged over the box; greedy k-center starting
  from the features of the regions annotated so far.
- ``badge`` (BADGE-LL): the region embedding is the last layer's gradient for the cross-entropy against the
  argmax pseudo-label, in closed form Σ_x (p(x) − onehot(ŷ(x))) ⊗ h(x) over the box (h = the last layer's
  input features); k-means++ seeding on these embeddings.

Chosen regions never overlap: after each pick the candidates overlapping it are removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from alseg.data.regions import Box, Region
from alseg.scoring.boxes import box_means, box_sums, free_positions
from alseg.selection.kcenter import min_sq_distances
from alseg.strategies.base import CasePrediction, Needs, NotEnoughCandidatesError, QueryContext


@dataclass
class _Pool:
    case_ids: list[str] = field(default_factory=list)
    starts: list[tuple[int, ...]] = field(default_factory=list)
    sizes: list[tuple[int, ...]] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    annotated: list[np.ndarray] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        return np.concatenate(self.embeddings).astype(np.float32) if self.embeddings else np.zeros((0, 0), np.float32)

    def annotated_matrix(self) -> np.ndarray:
        return np.concatenate(self.annotated).astype(np.float32) if self.annotated else np.zeros((0, 0), np.float32)


def check_stride_fraction(fraction: float) -> None:
    if not isinstance(fraction, int | float) or not 0 < float(fraction) <= 1:
        raise ValueError(f"stride_fraction must be a number in (0, 1] (a fraction of the box), got {fraction!r}")


def _grid_stride(box: tuple[int, ...], shape: tuple[int, ...], fraction: float) -> tuple[int, ...]:
    return tuple(1 if b >= n else max(1, round(b * fraction)) for b, n in zip(box, shape, strict=True))


def _collect(ctx: QueryContext, fraction: float, per_voxel: Any, reduce: str) -> _Pool:
    """Stream the pool; for each case build candidate embeddings (and those of its annotated voxels' boxes)."""
    pool = ctx.pool
    if pool.predictions is None:
        raise ValueError("this strategy needs model predictions, but the pool view has none")
    out = _Pool()
    for pred in pool.predictions():
        cid = pred.case_id
        shape = tuple(pool.shapes[cid])
        box = pool.box_size(cid)
        stride = _grid_stride(box, shape, fraction)
        maps = per_voxel(pred)  # (D, *spatial)
        filt = box_means if reduce == "mean" else box_sums
        emb = np.stack([filt(m, box, stride) for m in maps])  # (D, *grid)
        annotated = pool.annotated(cid)
        free = free_positions(annotated, box, stride)
        idx = np.argwhere(free)
        if len(idx):
            out.case_ids.extend([cid] * len(idx))
            out.starts.extend(tuple(int(i) * s for i, s in zip(row, stride, strict=True)) for row in idx)
            out.sizes.extend([box] * len(idx))
            out.embeddings.append(emb[(slice(None), *idx.T)].T)
        if annotated.any():
            # the annotated regions: every box position (stride 1) lying entirely inside annotated voxels, which
            # includes each annotated box itself; embedded directly, at most 64 per case
            inside = np.argwhere(box_sums(annotated.astype(np.float32), box, 1) >= np.prod(box) - 0.5)[:64]
            reducer = np.mean if reduce == "mean" else np.sum
            rows = [
                reducer(
                    maps[(slice(None), *Box(tuple(int(v) for v in p), box).slices())].reshape(len(maps), -1), axis=1
                )
                for p in inside
            ]
            if rows:
                out.annotated.append(np.stack(rows))
    return out


def _take(pool: _Pool, order_fn: Any, ctx: QueryContext, key: str) -> list[Region]:
    """Pick one candidate at a time with ``order_fn(available_mask) -> (index, info)``, dropping overlaps."""
    n = len(pool.case_ids)
    available = np.ones(n, dtype=bool)
    by_case: dict[str, list[int]] = {}
    for i, cid in enumerate(pool.case_ids):
        by_case.setdefault(cid, []).append(i)
    chosen: list[Region] = []
    for _ in range(ctx.query_size):
        if not available.any():
            raise NotEnoughCandidatesError(ctx.query_size, len(chosen), "the pool (non-overlapping candidates)")
        j, info = order_fn(available)
        box = Box(pool.starts[j], pool.sizes[j])
        chosen.append(
            Region(
                pool.case_ids[j],
                box,
                float(info.get("score", np.nan)),
                {"strategy": key, "round": ctx.round_index, **info},
            )
        )
        for i in by_case[pool.case_ids[j]]:
            if available[i] and box.overlaps(Box(pool.starts[i], pool.sizes[i])):
                available[i] = False
    return chosen


@dataclass
class CoresetStrategy:
    """Greedy k-center on region features (encoder bottleneck averaged over the box), from the annotated ones."""

    stride_fraction: float = 0.5

    key: ClassVar[str] = "coreset"
    description: ClassVar[str] = "Core-Set: greedy k-center on bottleneck features of regions (seed 001)"
    needs: ClassVar[Needs] = Needs(probabilities=True, features=True, samples=False)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        check_stride_fraction(self.stride_fraction)

    def query(self, ctx: QueryContext) -> list[Region]:
        def per_voxel(pred: CasePrediction) -> np.ndarray:
            if pred.features is None:
                raise ValueError(f"coreset needs features, the backend gave none for case {pred.case_id!r}")
            return pred.features

        pool = _collect(ctx, self.stride_fraction, per_voxel, "mean")
        x = pool.matrix()
        a = pool.annotated_matrix()
        # distance of each candidate to its nearest centre; no centre yet: start next to the pool mean
        min_d = min_sq_distances(x, a) if a.size else None

        def order(available: np.ndarray) -> tuple[int, dict[str, Any]]:
            nonlocal min_d
            if min_d is None:
                to_mean = min_sq_distances(x, x.mean(axis=0, keepdims=True))
                j = int(np.argmin(np.where(available, to_mean, np.inf)))
                info = {"score": float("inf"), "distance_to_centres": None, "pick": "closest_to_mean"}
                min_d = min_sq_distances(x, x[j : j + 1])
            else:
                j = int(np.argmax(np.where(available, min_d, -1.0)))
                dist = float(np.sqrt(min_d[j]))
                info = {"score": dist, "distance_to_centres": dist, "pick": "farthest"}
                min_d = np.minimum(min_d, min_sq_distances(x, x[j : j + 1]))
            return j, info

        return _take(pool, order, ctx, self.key)


@dataclass
class BadgeStrategy:
    """BADGE-LL: k-means++ seeding on last-layer gradient embeddings of regions (closed form)."""

    stride_fraction: float = 0.5

    key: ClassVar[str] = "badge"
    description: ClassVar[str] = "BADGE (last layer): k-means++ on region gradient embeddings (seed 001)"
    needs: ClassVar[Needs] = Needs(probabilities=True, features=True, samples=False)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        check_stride_fraction(self.stride_fraction)

    def query(self, ctx: QueryContext) -> list[Region]:
        def per_voxel(pred: CasePrediction) -> np.ndarray:
            h = pred.extras.get("last_features")
            if h is None:
                raise ValueError(f"badge needs last-layer features, the backend gave none for case {pred.case_id!r}")
            p = pred.probs.mean(axis=0)  # (C, *spatial)
            residual = p.copy()
            y = np.argmax(p, axis=0)
            for c in range(p.shape[0]):
                residual[c] -= y == c
            # (C*F, *spatial): (p_c - onehot_c) * h_f
            return (residual[:, None] * h[None]).reshape(-1, *p.shape[1:])

        pool = _collect(ctx, self.stride_fraction, per_voxel, "sum")
        x = pool.matrix()
        rng = ctx.rng("kmeans++")
        d2 = np.full(len(x), np.inf)
        first = True

        def order(available: np.ndarray) -> tuple[int, dict[str, Any]]:
            nonlocal d2, first
            if first:  # BADGE starts from the largest gradient norm
                norms = np.where(available, np.einsum("ij,ij->i", x, x), -1.0)
                j = int(np.argmax(norms))
                first = False
                info = {"score": float(np.sqrt(max(norms[j], 0.0))), "pick": "max_norm"}
            else:
                w = np.where(available, d2, 0.0)
                total = float(w.sum())
                if total > 0 and np.isfinite(total):
                    j = int(rng.choice(len(x), p=w / total))
                else:
                    j = int(np.flatnonzero(available)[0])
                info = {"score": float(np.sqrt(d2[j])), "pick": "d2"}
            d2 = np.minimum(d2, min_sq_distances(x, x[j : j + 1]))
            return j, info

        return _take(pool, order, ctx, self.key)
