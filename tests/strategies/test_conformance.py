"""Conformance suite run over every registered strategy, and the synthetic pool the strategy tests share.

``make_pool`` / ``make_context`` build a tiny pool: 4 cases of 24³, boxes of 8³ on a stride-4 grid, a ground
truth with a common foreground class 1 and a rare class 2 (two cases), some annotated boxes, and K seeded
probability samples per case.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from alseg.data.regions import Box, Region, annotated_mask
from alseg.strategies.base import (
    CasePrediction,
    Needs,
    NotEnoughCandidatesError,
    PoolView,
    QueryContext,
    Strategy,
)
from alseg.strategies.registry import STRATEGIES, get_strategy, list_strategies

SHAPE = (24, 24, 24)
BOX = (8, 8, 8)
STRIDE = (4, 4, 4)
CASE_IDS = ("case_0", "case_1", "case_2", "case_3")
RARE_CASES = ("case_1", "case_3")
FOREGROUND = (1, 2)
N_SAMPLES = 3
N_CLASSES = 3

#: strategies whose query does not depend on the seed; every other registered key must
DETERMINISTIC = {"entropy", "bald", "mean_std", "coreset"}


@dataclass
class SyntheticPool:
    """Arrays behind a synthetic :class:`PoolView` (tests may edit them before calling ``view()``)."""

    ground_truth: dict[str, np.ndarray]
    annotated_boxes: dict[str, list[Box]]
    probs: dict[str, np.ndarray]
    shape: tuple[int, ...] = SHAPE
    box_size: tuple[int, ...] = BOX
    stride: tuple[int, ...] = STRIDE
    foreground_labels: tuple[int, ...] = FOREGROUND
    n_predictions_streamed: list[int] = field(default_factory=lambda: [0])

    @property
    def case_ids(self) -> list[str]:
        return list(self.ground_truth)

    def annotated(self, case_id: str) -> np.ndarray:
        return annotated_mask(self.shape, self.annotated_boxes[case_id])

    def predictions(self) -> Iterator[CasePrediction]:
        for case_id in self.case_ids:
            self.n_predictions_streamed[0] += 1
            # features for the embedding strategies: the ground truth one-hot plus seeded noise (4 + 3 channels)
            rng = np.random.default_rng(zlib.crc32(case_id.encode()))
            gt = self.ground_truth[case_id]
            onehot = np.stack([gt == c for c in range(N_CLASSES)]).astype(np.float32)
            features = np.concatenate([onehot, rng.normal(size=(1, *gt.shape)).astype(np.float32)])
            last = onehot + 0.1 * rng.normal(size=onehot.shape).astype(np.float32)
            yield CasePrediction(case_id, self.probs[case_id], features, {"last_features": last})

    def view(self) -> PoolView:
        counts: dict[int, int] = {}
        for case_id in self.case_ids:
            labels = self.ground_truth[case_id][self.annotated(case_id)]
            for value, n in zip(*np.unique(labels, return_counts=True), strict=True):
                counts[int(value)] = counts.get(int(value), 0) + int(n)
        return PoolView(
            case_ids=self.case_ids,
            shapes={c: self.shape for c in self.case_ids},
            box_sizes={c: self.box_size for c in self.case_ids},
            stride=self.stride,
            foreground_labels=self.foreground_labels,
            annotated=self.annotated,
            annotated_class_voxels=counts,
            ground_truth=self.ground_truth.__getitem__,
            predictions=self.predictions,
            region_gradients=self.region_gradients,
            n_gradient_params=32,
        )

    def region_gradients(self, case_id: str, boxes: Sequence[Box], index: np.ndarray | None) -> np.ndarray:
        """Synthetic gradient embeddings: the region's class fractions plus seeded noise (32 numbers)."""
        gt = self.ground_truth[case_id]
        rows = []
        for b in boxes:
            rng = np.random.default_rng([zlib.crc32(case_id.encode()), *b.start])
            fractions = [float((gt[b.slices()] == c).mean()) for c in range(N_CLASSES)]
            rows.append(np.concatenate([fractions, rng.normal(size=32 - N_CLASSES)]).astype(np.float32))
        g = np.stack(rows)
        return g if index is None else g[:, index]

    def plant(self, case_id: str, start: Sequence[int], kind: str = "uniform") -> Box:
        """Make the box at ``start`` maximally uncertain: 'uniform' (max PE) or 'disagree' (max BALD)."""
        box = Box(tuple(start), self.box_size)
        probs = self.probs[case_id]
        if kind == "uniform":
            probs[(slice(None), slice(None), *box.slices())] = 1.0 / probs.shape[1]
        elif kind == "disagree":
            for k in range(probs.shape[0]):
                probs[(k, slice(None), *box.slices())] = 0.0
                probs[(k, k % probs.shape[1], *box.slices())] = 1.0
        else:
            raise ValueError(kind)
        return box


def _ball(shape: Sequence[int], centre: Sequence[int], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return dist2 <= radius**2


def make_pool(seed: int = 0, n_samples: int = N_SAMPLES, confidence: float = 3.0) -> SyntheticPool:
    """The synthetic pool: class 1 (a ball) in every case, class 2 (a 3³ cube) in ``RARE_CASES`` only."""
    rng = np.random.default_rng(seed)
    ground_truth, annotated, probs = {}, {}, {}
    for i, case_id in enumerate(CASE_IDS):
        gt = np.zeros(SHAPE, dtype=np.uint8)
        centre = rng.integers(8, 16, size=3)
        gt[_ball(SHAPE, centre, 4.5)] = 1
        if case_id in RARE_CASES:  # away from the annotated boxes of odd cases
            gt[4:7, 2:5, 16:19] = 2
        ground_truth[case_id] = gt
        annotated[case_id] = [Box((0, 0, 0), BOX)] if i % 2 == 0 else [Box((16, 8, 16), BOX), Box((0, 16, 4), BOX)]
        logits = rng.normal(size=(n_samples, N_CLASSES, *SHAPE)).astype(np.float32) * confidence
        logits[:, 0] += confidence  # mostly confident background
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs[case_id] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return SyntheticPool(ground_truth, annotated, probs)


def make_context(
    pool: SyntheticPool | PoolView,
    strategy_key: str = "test",
    seed: int = 0,
    query_size: int = 6,
    round_index: int = 1,
    n_per_case: int = 20,
) -> QueryContext:
    view = pool.view() if isinstance(pool, SyntheticPool) else pool
    return QueryContext(view, query_size, round_index, 5, seed, strategy_key, n_per_case)


def nearly_full_pool() -> SyntheticPool:
    """Every voxel annotated except one box-sized hole at (4, 8, 12) in case_0: room for exactly one box."""
    pool = make_pool()
    for case_id in pool.case_ids:
        pool.annotated_boxes[case_id] = [Box((0, 0, 0), SHAPE)]
    # the complement of the hole [4:12, 8:16, 12:20] in six slabs
    pool.annotated_boxes["case_0"] = [
        Box((0, 0, 0), (4, 24, 24)),
        Box((12, 0, 0), (12, 24, 24)),
        Box((4, 0, 0), (8, 8, 24)),
        Box((4, 16, 0), (8, 8, 24)),
        Box((4, 8, 0), (8, 8, 12)),
        Box((4, 8, 20), (8, 8, 4)),
    ]
    return pool


def check_regions(regions: Sequence[Region], ctx: QueryContext) -> None:
    """Right count, right box size, inside the image, no overlap with annotated voxels or each other."""
    pool = ctx.pool
    assert len(regions) == ctx.query_size
    for r in regions:
        assert r.case_id in pool.case_ids
        assert r.box.size == pool.box_size(r.case_id)
        assert r.box.inside(pool.shapes[r.case_id]), r
        assert not pool.annotated(r.case_id)[r.box.slices()].any(), f"{r} overlaps annotated voxels"
    for a, b in itertools.combinations(regions, 2):
        assert not (a.case_id == b.case_id and a.box.overlaps(b.box)), f"{a} overlaps {b}"


def _strategy_or_skip(key: str, params: dict | None = None) -> Strategy:
    return get_strategy(key, params)


KEYS = sorted(STRATEGIES)


@pytest.fixture(scope="module")
def pool() -> SyntheticPool:
    return make_pool()


@pytest.mark.parametrize("key", KEYS)
def test_declares_key_description_needs(key: str) -> None:
    strategy = get_strategy(key)
    assert isinstance(strategy, Strategy)
    assert type(strategy).key == strategy.key == key
    assert strategy.description and "\n" not in strategy.description
    assert dataclasses.is_dataclass(strategy)
    assert isinstance(strategy.needs, Needs)


@pytest.mark.parametrize("key", KEYS)
def test_params_round_trip_through_json(key: str) -> None:
    strategy = get_strategy(key)
    params = json.loads(json.dumps(strategy.params()))
    assert params == strategy.params()
    assert get_strategy(key, params).params() == strategy.params()


@pytest.mark.parametrize("key", KEYS)
def test_query_honours_the_contract(key: str, pool: SyntheticPool) -> None:
    strategy = _strategy_or_skip(key)
    ctx = make_context(pool, key)
    regions = strategy.query(ctx)
    check_regions(regions, ctx)
    for r in regions:
        assert r.info["strategy"] == key and r.info["round"] == ctx.round_index


@pytest.mark.parametrize("key", KEYS)
def test_same_seed_same_regions(key: str, pool: SyntheticPool) -> None:
    strategy = _strategy_or_skip(key)
    first = [r.key for r in strategy.query(make_context(pool, key, seed=7))]
    again = [r.key for r in get_strategy(key, strategy.params()).query(make_context(pool, key, seed=7))]
    assert first == again


@pytest.mark.parametrize("key", [k for k in KEYS if k not in DETERMINISTIC])
def test_other_seed_changes_stochastic_choice(key: str, pool: SyntheticPool) -> None:
    strategy = _strategy_or_skip(key)
    base = [r.key for r in strategy.query(make_context(pool, key, seed=0))]
    others = [[r.key for r in strategy.query(make_context(pool, key, seed=s))] for s in (1, 2, 3)]
    assert any(o != base for o in others), f"{key!r} ignores the seed (list it in DETERMINISTIC if intended)"


@pytest.mark.parametrize("key", KEYS)
def test_too_few_candidates_is_an_error(key: str) -> None:
    strategy = _strategy_or_skip(key)
    ctx = make_context(nearly_full_pool(), key, query_size=3)
    with pytest.raises(NotEnoughCandidatesError) as err:
        strategy.query(ctx)
    assert err.value.requested == 3
    assert err.value.available == 1


@pytest.mark.parametrize("key", KEYS)
def test_exactly_the_remaining_room_is_enough(key: str) -> None:
    strategy = _strategy_or_skip(key)
    ctx = make_context(nearly_full_pool(), key, query_size=1)
    [region] = strategy.query(ctx)
    assert region.key == ("case_0", (4, 8, 12), BOX)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"valid keys: .*entropy.*random"):
        get_strategy("no_such_strategy")


def test_unknown_param_is_named() -> None:
    with pytest.raises(ValueError, match=r"no parameter.*beta.*p_uniform"):
        get_strategy("random_fg66", {"beta": 2.0})
    with pytest.raises(ValueError, match=r"no parameter.*beta.*none"):
        get_strategy("entropy", {"beta": 2.0})


def test_list_strategies_covers_registry() -> None:
    listed = list_strategies()
    assert [k for k, _ in listed] == sorted(STRATEGIES)
    assert {"random", "random_fg33", "random_fg66", "entropy", "bald", "mean_std"} <= set(STRATEGIES)
    assert all(isinstance(d, str) and d for _, d in listed)
