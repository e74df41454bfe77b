"""What each strategy is for: uncertainty strategies find planted uncertainty, the foreground baselines find
foreground, the starting budget covers every class and is the same for every strategy."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy import ndimage

from alseg.strategies.base import NotEnoughCandidatesError
from alseg.strategies.registry import get_strategy
from alseg.strategies.starting import STARTING_BUDGET_KEY, starting_budget


def _load_synthetic() -> ModuleType:
    """The synthetic pool helpers of test_conformance.py, loaded by path (independent of pytest's rootdir)."""
    name = "_alseg_tests_strategies_synthetic"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_conformance.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


syn = _load_synthetic()
BOX, SHAPE, RARE_CASES = syn.BOX, syn.SHAPE, syn.RARE_CASES
make_pool, make_context, check_regions = syn.make_pool, syn.make_context, syn.check_regions


# --- uncertainty strategies ---------------------------------------------------------------------------------


def test_entropy_picks_the_planted_high_entropy_box() -> None:
    pool = make_pool()
    pool.plant("case_2", (12, 12, 12), "uniform")
    regions = get_strategy("entropy").query(make_context(pool, "entropy"))
    assert regions[0].key == ("case_2", (12, 12, 12), BOX)
    assert regions[0].score == pytest.approx(math.log(3), rel=1e-5)
    assert regions[0].info["measure"] == "pe"
    scores = [r.score for r in regions]
    assert scores == sorted(scores, reverse=True)


def test_entropy_ignores_uncertainty_in_annotated_voxels() -> None:
    pool = make_pool()
    pool.plant("case_0", (0, 0, 0), "uniform")  # case_0 has (0, 0, 0) annotated
    ctx = make_context(pool, "entropy")
    regions = get_strategy("entropy").query(ctx)
    check_regions(regions, ctx)
    assert regions[0].score < 0.9 * math.log(3)


@pytest.mark.parametrize("key", ["bald", "mean_std"])
def test_sample_disagreement_is_found(key: str) -> None:
    pool = make_pool()
    pool.plant("case_3", (4, 4, 4), "disagree")
    regions = get_strategy(key).query(make_context(pool, key))
    assert regions[0].key == ("case_3", (4, 4, 4), BOX)
    assert regions[0].info["measure"] == key


def test_n_per_case_limits_candidates_per_case() -> None:
    pool = make_pool()
    regions = get_strategy("entropy").query(make_context(pool, "entropy", query_size=4, n_per_case=1))
    assert sorted(r.case_id for r in regions) == pool.case_ids
    with pytest.raises(NotEnoughCandidatesError) as err:
        get_strategy("entropy").query(make_context(pool, "entropy", query_size=5, n_per_case=1))
    assert err.value.available == 4


def test_predictions_are_streamed_once_per_query() -> None:
    pool = make_pool()
    get_strategy("bald").query(make_context(pool, "bald"))
    assert pool.n_predictions_streamed[0] == len(pool.case_ids)


def test_bald_refuses_a_single_sample() -> None:
    pool = make_pool(n_samples=1)
    with pytest.raises(ValueError, match="K >= 2"):
        get_strategy("bald").query(make_context(pool, "bald"))
    assert len(get_strategy("entropy").query(make_context(pool, "entropy"))) == 6


# --- random baselines ---------------------------------------------------------------------------------------


def test_random_uses_the_stride_grid() -> None:
    regions = get_strategy("random").query(make_context(make_pool(), "random", query_size=10))
    assert all(s % st == 0 for r in regions for s, st in zip(r.box.start, syn.STRIDE, strict=True))


def _foreground_fraction(key: str, pool, seeds: range, **params) -> float:  # type: ignore[no-untyped-def]
    fractions = []
    for seed in seeds:
        for r in get_strategy(key, params).query(make_context(pool, key, seed=seed)):
            fractions.append(float((pool.ground_truth[r.case_id][r.box.slices()] > 0).mean()))
    return float(np.mean(fractions))


def test_random_fg66_finds_more_foreground_than_random() -> None:
    pool = make_pool()
    seeds = range(10)
    uniform = _foreground_fraction("random", pool, seeds)
    fg66 = _foreground_fraction("random_fg66", pool, seeds)
    fg33 = _foreground_fraction("random_fg33", pool, seeds)
    assert fg66 > 2 * uniform
    assert fg66 > fg33 > uniform


def test_class_centres_lie_on_their_class_and_inside_the_box() -> None:
    pool = make_pool()
    strategy = get_strategy("random_fg33", {"p_uniform": 0.0, "p_class": 1.0, "p_border": 0.0})
    regions = strategy.query(make_context(pool, "random_fg33", query_size=8))
    on_class = [r for r in regions if r.info["kind"] == "class"]
    assert len(on_class) >= 4
    # once a case's foreground is covered, its draws fall back to uniform centres
    assert all(r.info["fallback"] == "class" for r in regions if r.info["kind"] != "class")
    for r in on_class:
        centre = tuple(r.info["centre"])
        assert pool.ground_truth[r.case_id][centre] == r.info["label"] in (1, 2)
        assert all(a <= c < b for a, c, b in zip(r.box.start, centre, r.box.stop, strict=True))


def test_border_centres_lie_on_the_class_border() -> None:
    pool = make_pool()
    strategy = get_strategy("random_fg66", {"p_uniform": 0.0, "p_class": 0.0, "p_border": 1.0})
    regions = strategy.query(make_context(pool, "random_fg66", query_size=8))
    ball = ndimage.generate_binary_structure(3, 1)
    on_border = [r for r in regions if r.info["kind"] == "border"]
    assert len(on_border) >= 4
    for r in on_border:
        mask = pool.ground_truth[r.case_id] == r.info["label"]
        border = mask & ~ndimage.binary_erosion(mask, structure=ball)
        assert border[tuple(r.info["centre"])] and not border.all()


def test_foreground_inside_annotated_voxels_falls_back_to_uniform() -> None:
    pool = make_pool()
    for case_id in pool.case_ids:
        gt = np.zeros(SHAPE, dtype=np.uint8)
        gt[pool.annotated(case_id)] = 1  # all foreground is already annotated
        pool.ground_truth[case_id] = gt
    strategy = get_strategy("random_fg66", {"p_uniform": 0.0, "p_class": 1.0, "p_border": 0.0})
    ctx = make_context(pool, "random_fg66")
    regions = strategy.query(ctx)
    check_regions(regions, ctx)
    assert all(r.info == {**r.info, "kind": "uniform", "fallback": "class"} for r in regions)


def test_centre_probabilities_are_checked() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        get_strategy("random_fg33", {"p_uniform": 0.5, "p_class": 0.1, "p_border": 0.1})


def test_foreground_baselines_need_ground_truth() -> None:
    view = dataclasses.replace(make_pool().view(), ground_truth=None)
    with pytest.raises(ValueError, match="ground truth"):
        get_strategy("random_fg66").query(make_context(view, "random_fg66"))


# --- starting budget ----------------------------------------------------------------------------------------


def test_starting_budget_covers_every_class_rarest_first(caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool()
    ctx = make_context(pool, "entropy", query_size=10)
    with caplog.at_level("WARNING", logger="alseg"):
        regions = starting_budget(ctx, 10)
    check_regions(regions, ctx)
    by_class = [r for r in regions if r.info["stage"] == "class"]
    # class 2 is in two cases, background and class 1 in all four (tie broken by label value); every class box
    # takes a case of its own, so after 2 and 0 no case is left for class 1 (4 cases), which the log says
    assert [r.info["label"] for r in by_class] == [2, 2, 0, 0]
    assert {r.case_id for r in by_class[:2]} == set(RARE_CASES)
    assert len({r.case_id for r in by_class}) == 4
    for label in (0, 2):
        mine = [r for r in by_class if r.info["label"] == label]
        assert all((pool.ground_truth[r.case_id][r.box.slices()] == label).any() for r in mine)
    assert "class 1 got 0 of 2 boxes" in caplog.text
    assert all(r.info["stage"] == "fill" for r in regions[4:])
    assert all(r.info["strategy"] == STARTING_BUDGET_KEY for r in regions)


def test_starting_budget_class_boxes_lie_in_distinct_cases(caplog: pytest.LogCaptureFixture) -> None:
    """With cases to spare every class gets two boxes, each in a case of its own; a class found in one case
    only is reported."""
    pool = make_pool()
    extra = {f"case_{i}": pool.ground_truth["case_0"].copy() for i in range(4, 8)}
    for case_id, gt in extra.items():
        pool.ground_truth[case_id] = gt
        pool.annotated_boxes[case_id] = []
        pool.probs[case_id] = pool.probs["case_0"]
    lone = pool.ground_truth["case_7"]
    lone[lone == 2] = 1
    lone[:2, :2, :2] = 3  # class 3 occurs in case_7 only
    pool.foreground_labels = (1, 2, 3)
    with caplog.at_level("WARNING", logger="alseg"):
        regions = starting_budget(make_context(pool, "entropy", query_size=12), 12)
    by_class = [r for r in regions if r.info["stage"] == "class"]
    assert [r.info["label"] for r in by_class][:1] == [3]
    assert sorted(r.info["label"] for r in by_class) == [0, 0, 1, 1, 2, 2, 3]
    assert len({r.case_id for r in by_class}) == len(by_class)
    assert "class 3 occurs in 1 pool case(s)" in caplog.text


def test_starting_budget_is_the_same_for_every_strategy() -> None:
    pool = make_pool()
    keys = {k: [r.key for r in starting_budget(make_context(pool, k, seed=3), 10)] for k in ("entropy", "random")}
    assert keys["entropy"] == keys["random"]
    other_seed = [r.key for r in starting_budget(make_context(pool, "entropy", seed=4), 10)]
    assert other_seed != keys["entropy"]


def test_small_starting_budget_covers_the_rarest_classes_first() -> None:
    regions = starting_budget(make_context(make_pool()), 3)
    assert [r.info["label"] for r in regions] == [2, 2, 0]


def test_starting_budget_too_large_for_the_pool() -> None:
    with pytest.raises(NotEnoughCandidatesError) as err:
        starting_budget(make_context(syn.nearly_full_pool()), 3)
    assert (err.value.requested, err.value.available) == (3, 1)
