"""USIM's candidate pool X_U: ``pool="all"`` (every free unit, as seed 001) against ``pool="top"`` (per-case NMS).

The synthetic pool is built so that the class-weighted MC variance u is zero everywhere except in one planted
box per case (all K samples agree elsewhere; inside the box they disagree). The per-case top-1 of u is then that
box by construction, so the expectations come from the construction, not from the code under test. The
candidates a strategy considers are read off the boxes it asks gradient embeddings for.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
from test_conformance import BOX, SyntheticPool, make_context, make_pool

from alseg.data.regions import Box
from alseg.strategies.registry import get_strategy
from alseg.strategies.usim import USIMStrategy

#: one free box per case (clear of the annotated boxes of make_pool), made the only uncertain place
PLANTED = {"case_0": (12, 12, 12), "case_1": (4, 0, 0), "case_2": (16, 16, 8), "case_3": (8, 12, 0)}


def planted_pool() -> SyntheticPool:
    pool = make_pool()
    for case_id, probs in pool.probs.items():
        probs[:] = probs[:1]  # every sample equals the first: zero variance everywhere
        box = pool.plant(case_id, PLANTED[case_id], "disagree")
        assert not pool.annotated(case_id)[box.slices()].any()
    return pool


class Recorder:
    """Wraps a pool's region_gradients and remembers every box it is asked for."""

    def __init__(self, pool: SyntheticPool) -> None:
        self.pool = pool
        self.boxes: set[tuple[str, tuple[int, ...]]] = set()

    def __call__(self, case_id: str, boxes: Sequence[Box], index: np.ndarray | None) -> np.ndarray:
        self.boxes.update((case_id, tuple(b.start)) for b in boxes)
        return self.pool.region_gradients(case_id, boxes, index)


def considered(key: str, pool_kind: str, seed: int = 0) -> tuple[set[tuple[str, tuple[int, ...]]], list]:
    pool = planted_pool()
    recorder = Recorder(pool)
    view = dataclasses.replace(pool.view(), region_gradients=recorder)
    ctx = make_context(view, key, seed=seed, query_size=2, n_per_case=1)
    regions = get_strategy(key, {"pool": pool_kind}).query(ctx)
    return recorder.boxes, regions


def overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(abs(x - y) < s for x, y, s in zip(a, b, BOX, strict=True))


@pytest.mark.parametrize("key", ["usim_c", "usim_f"])
def test_top_pool_is_the_per_case_best_box(key: str) -> None:
    boxes, regions = considered(key, "top")
    assert boxes == set(PLANTED.items())
    assert all(r.info["pool"] == "top" and r.info["n_candidates"] == len(PLANTED) for r in regions)


@pytest.mark.parametrize("key", ["usim_c", "usim_f"])
def test_all_pool_reaches_beyond_the_per_case_top(key: str) -> None:
    boxes, regions = considered(key, "all")
    beyond = {(c, s) for c, s in boxes if not overlaps(s, PLANTED[c])}  # u = 0 there: never a top-1 box
    assert beyond, "pool='all' should consider boxes outside every case's top-k"
    assert len(boxes) > len(PLANTED)
    assert {c for c, _ in beyond} == set(PLANTED)  # in every case
    assert all(r.info["pool"] == "all" and r.info["n_candidates"] == len(boxes) for r in regions)


def test_all_pool_is_a_non_overlapping_maximal_packing_of_the_free_grid() -> None:
    pool = planted_pool()
    boxes, _ = considered("usim_c", "all")
    stride = pool.stride
    for case_id in PLANTED:
        mine = [s for c, s in boxes if c == case_id]
        annotated = pool.annotated(case_id)
        for a, b in itertools.combinations(mine, 2):
            assert not overlaps(a, b)
        for s in mine:
            assert not annotated[tuple(slice(p, p + n) for p, n in zip(s, BOX, strict=True))].any()
        # maximal: every free grid position overlaps a chosen box (otherwise one more box would fit)
        ranges = [range(0, n - b + 1, st) for n, b, st in zip(pool.shape, BOX, stride, strict=True)]
        for start in itertools.product(*ranges):
            if annotated[tuple(slice(p, p + n) for p, n in zip(start, BOX, strict=True))].any():
                continue
            assert any(overlaps(start, s) for s in mine), (case_id, start)


def test_all_pool_is_seeded() -> None:
    first, _ = considered("usim_c", "all", seed=3)
    again, _ = considered("usim_c", "all", seed=3)
    assert first == again
    assert any(considered("usim_c", "all", seed=s)[0] != first for s in (4, 5, 6))


def test_pool_default_is_all_and_is_validated() -> None:
    assert get_strategy("usim_c").params()["pool"] == "all"
    assert get_strategy("usim_f").params()["pool"] == "all"
    ctx = make_context(planted_pool(), "usim_c", query_size=2)
    with pytest.raises(ValueError, match=r"unknown pool 'every'.*'all'.*'top'"):
        USIMStrategy(pool="every").query(ctx)  # type: ignore[arg-type]


def test_needs_ask_for_the_variant_s_layers() -> None:
    assert get_strategy("usim_c").needs.gradient_layers == "bottleneck"
    assert get_strategy("usim_f").needs.gradient_layers == "decoder"
    assert USIMStrategy(similarity="fisher").needs.gradient_layers == "decoder"
    for key in ("usim_c", "usim_f"):
        needs = get_strategy(key).needs
        assert needs.gradients and needs.probabilities and needs.min_samples >= 2
