"""The strategy interface: what a query strategy sees, what it declares it needs, and what it returns.

The loop never switches on a strategy's type: it reads ``needs`` and prepares a :class:`QueryContext`
accordingly (model predictions streamed case by case, features, ground truth for simulation baselines).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from alseg.backends.base import CasePrediction
from alseg.data.regions import Box, Region
from alseg.errors import AlsegError

__all__ = ["CasePrediction", "Needs", "NotEnoughCandidatesError", "PoolView", "QueryContext", "Strategy", "make_rng"]


@dataclass(frozen=True)
class Needs:
    """What a strategy needs from the model and the data."""

    probabilities: bool = False  # streamed probability samples (K, C, *spatial) per pool case
    min_samples: int = 1  # K >= this (BALD needs 2 or more)
    samples: bool = True  # reads the K samples; False: one deterministic prediction (K = 1) is all it uses
    features: bool = False  # bottleneck features per case
    gradients: bool = False  # per-region gradient embeddings
    gradient_layers: str = "bottleneck"  # which weights the gradients are taken of: "bottleneck" or "decoder"
    ground_truth: bool = False  # reads the simulated oracle's labels (simulation baselines only)


@dataclass
class PoolView:
    """The pool as a strategy sees it. Arrays are in array index order (SimpleITK / nnU-Net order)."""

    case_ids: list[str]
    shapes: Mapping[str, tuple[int, ...]]
    box_sizes: Mapping[str, tuple[int, ...]]
    stride: tuple[int, ...]
    foreground_labels: tuple[int, ...]
    annotated: Callable[[str], np.ndarray]  # case_id -> bool mask of voxels already annotated
    annotated_class_voxels: Mapping[int, int] = field(default_factory=dict)
    ground_truth: Callable[[str], np.ndarray] | None = None
    predictions: Callable[[], Iterator[CasePrediction]] | None = None
    # (case_id, boxes, flat parameter indices or None) -> (len(boxes), D) gradient embeddings; see USIM
    region_gradients: Callable[[str, Sequence[Box], np.ndarray | None], np.ndarray] | None = None
    n_gradient_params: int = 0

    def box_size(self, case_id: str) -> tuple[int, ...]:
        return self.box_sizes[case_id]

    def case_stride(self, case_id: str) -> tuple[int, ...]:
        """The grid stride for a case: never more than the box's extent on an axis (so every slice of a
        ``unit: slice`` pool is a candidate), and 1 on axes whose box spans the whole image."""
        return tuple(
            1 if b >= n else max(1, min(s, b))
            for s, b, n in zip(self.stride, self.box_sizes[case_id], self.shapes[case_id], strict=True)
        )


@dataclass
class QueryContext:
    """Everything one query of one round gets."""

    pool: PoolView
    query_size: int
    round_index: int
    n_rounds: int
    seed: int
    strategy_key: str
    n_per_case: int = 20

    def rng(self, stage: str) -> np.random.Generator:
        return make_rng(self.seed, self.round_index, self.strategy_key, stage)


def make_rng(seed: int, round_index: int, key: str, stage: str) -> np.random.Generator:
    """A generator derived from (experiment seed, round, strategy key, stage); never global state."""
    words = [int(seed) & 0xFFFFFFFF, int(round_index), zlib.crc32(key.encode()), zlib.crc32(stage.encode())]
    return np.random.default_rng(np.random.SeedSequence(words))


@runtime_checkable
class Strategy(Protocol):
    """A query strategy: ``query`` returns exactly ``ctx.query_size`` non-overlapping regions."""

    key: ClassVar[str]
    description: ClassVar[str]
    needs: ClassVar[Needs]

    def query(self, ctx: QueryContext) -> list[Region]: ...

    def params(self) -> dict[str, Any]: ...


class NotEnoughCandidatesError(AlsegError, ValueError):
    """Fewer free candidate regions are left than the query asks for."""

    def __init__(self, requested: int, available: int, where: str = "the pool") -> None:
        super().__init__(
            f"query asks for {requested} regions but only {available} non-overlapping candidates are left "
            f"in {where}; lower query_size or the number of rounds"
        )
        self.requested = requested
        self.available = available


def regions_from_candidates(candidates: Sequence[Any], ctx: QueryContext, strategy_key: str) -> list[Region]:
    """Turn scoring candidates into regions, recording the strategy and round in their info."""
    out = []
    for c in candidates:
        info = {"strategy": strategy_key, "round": ctx.round_index, **c.info}
        out.append(Region(c.case_id, Box(c.start, ctx.pool.box_size(c.case_id)), float(c.score), info))
    return out
