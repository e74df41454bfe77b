"""What the stochastic strategies are for, on synthetic maps where the answer is known: power sampling
interpolates between uniform and greedy, soft-rank reads only ranks, ClaSP PE covers a rare class and turns
greedy as β grows, stochastic batches returns the best group of a seeded shuffle."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from alseg.data.regions import Box
from alseg.scoring.boxes import Candidate
from alseg.strategies.base import NotEnoughCandidatesError, make_rng
from alseg.strategies.clasp import PE_MAP, ClaspPEStrategy, scheduled_beta, split_query
from alseg.strategies.power import power_noise, softrank_select
from alseg.strategies.registry import get_strategy
from alseg.strategies.stochastic_batches import StochasticBatchesStrategy
from alseg.strategies.uncertainty import score_pool, score_units
from alseg.uncertainty.measures import bald, predictive_entropy


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
BOX = syn.BOX
make_pool, make_context, check_regions = syn.make_pool, syn.make_context, syn.check_regions


def _keys(regions) -> set:  # type: ignore[no-untyped-def]
    return {r.key for r in regions}


# --- power_pe / power_bald ----------------------------------------------------------------------------------


def test_power_noise_of_a_zero_score_is_finite() -> None:
    noised, gumbel = power_noise(np.zeros(5), beta=1.0, rng=np.random.default_rng(0))
    assert np.all(np.isfinite(noised)) and gumbel.shape == (5,)


@pytest.mark.parametrize(("key", "greedy"), [("power_pe", "entropy"), ("power_bald", "bald")])
def test_power_with_huge_beta_is_the_greedy_top_k(key: str, greedy: str) -> None:
    pool = make_pool()
    expected = _keys(get_strategy(greedy).query(make_context(pool, greedy)))
    for seed in range(3):
        ctx = make_context(pool, key, seed=seed)
        regions = get_strategy(key, {"beta": 1e9}).query(ctx)
        check_regions(regions, ctx)
        assert _keys(regions) == expected
        for r in regions:
            assert r.info["beta"] == 1e9
            assert r.score == pytest.approx(math.log(r.info["box_score"]) + r.info["gumbel"] / 1e9)


def test_power_pe_with_tiny_beta_is_near_uniform() -> None:
    pool = make_pool()
    pool.plant("case_2", (12, 12, 12), "uniform")  # by far the best box for entropy
    greedy = _keys(get_strategy("entropy").query(make_context(pool, "entropy")))
    overlaps, seen, planted = [], set(), 0
    for seed in range(20):
        regions = get_strategy("power_pe", {"beta": 1e-4}).query(make_context(pool, "power_pe", seed=seed))
        overlaps.append(len(_keys(regions) & greedy))
        seen |= _keys(regions)
        planted += ("case_2", (12, 12, 12), BOX) in _keys(regions)
    # uniform over ~500 grid positions: the greedy boxes are hit about 6 · 6 / 500 times per query
    assert np.mean(overlaps) < 1.0
    assert planted <= 3
    assert len(seen) > 80  # 120 draws, nearly all distinct
    # a large beta (s^50: log 3 against ~0.75 for the runner-up) draws the planted box nearly always
    planted_sharp = sum(
        ("case_2", (12, 12, 12), BOX)
        in _keys(get_strategy("power_pe", {"beta": 50.0}).query(make_context(pool, "power_pe", seed=s)))
        for s in range(20)
    )
    assert planted_sharp >= 18


def test_power_rejects_a_bad_beta() -> None:
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        get_strategy("power_pe", {"beta": 0.0}).query(make_context(make_pool(), "power_pe"))


# --- softrank_bald ------------------------------------------------------------------------------------------


def test_softrank_reads_only_the_ranks() -> None:
    def cands(scores: list[float]) -> list[Candidate]:
        return [Candidate(f"case_{i}", (0, 0, 0), s) for i, s in enumerate(scores)]

    close = cands([0.50, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43])
    far = cands([1e6, 10.0, 0.1, 1e-3, 1e-4, 1e-5, 1e-6, 1e-9])  # same order, very different values
    for seed in range(10):
        a, _, _ = softrank_select(close, 3, np.random.default_rng(seed))
        b, _, _ = softrank_select(far, 3, np.random.default_rng(seed))
        assert [c.case_id for c in a] == [c.case_id for c in b]
        assert [c.score for c in a] == [c.score for c in b]
    # power sampling, in contrast, follows the values: the 1e6 candidate always wins
    noised, _ = power_noise(np.array([c.score for c in far]), 1.0, np.random.default_rng(0))
    assert int(np.argmax(noised)) == 0


def test_softrank_bald_records_pool_ranks_and_soft_scores() -> None:
    pool = make_pool()
    ctx = make_context(pool, "softrank_bald", n_per_case=5)
    regions = get_strategy("softrank_bald").query(ctx)
    check_regions(regions, ctx)
    wide = score_pool(dataclasses.replace(ctx, n_per_case=10), bald, min_samples=2)
    assert len(wide) > 4 * 5  # 2 · n_per_case candidates per case
    ranked = [(c.case_id, c.start) for c in sorted(wide, key=Candidate.sort_key)]
    for r in regions:
        assert ranked.index((r.case_id, r.box.start)) + 1 == r.info["rank"]
        assert r.score == pytest.approx(-math.log(r.info["rank"]) + r.info["gumbel"])
    scores = [r.score for r in regions]
    assert scores == sorted(scores, reverse=True)


# --- clasp_pe -----------------------------------------------------------------------------------------------


def test_beta_schedule_of_the_published_configuration() -> None:
    assert [round(scheduled_beta(t, 5), 2) for t in range(4)] == [1.0, 3.16, 10.0, 31.62]
    assert scheduled_beta(0, 1) == scheduled_beta(0, 2) == 1.0  # R = 1 / 2: no division by zero
    assert scheduled_beta(-1, 5) == 1.0 and scheduled_beta(10, 5) == 100.0  # clamped outside the rounds
    sig = [scheduled_beta(t, 9, schedule="sigmoid") for t in range(8)]
    assert sig[0] == pytest.approx(1.0) and all(a < b for a, b in itertools.pairwise(sig)) and sig[-1] < 100
    with pytest.raises(ValueError, match="unknown beta schedule"):
        scheduled_beta(1, 5, schedule="linear")  # type: ignore[arg-type]


def test_clasp_records_the_scheduled_beta() -> None:
    pool = make_pool()
    for round_index in (1, 2, 3, 4):
        ctx = make_context(pool, "clasp_pe", round_index=round_index)
        regions = get_strategy("clasp_pe").query(ctx)
        check_regions(regions, ctx)
        expected = 100 ** ((round_index - 1) / 4)
        assert all(r.info["beta"] == pytest.approx(expected) for r in regions)


def test_query_split_between_classes_and_pe() -> None:
    counts = {1: 0, 2: 0}
    for seed in range(20):
        quotas = split_query(6, (1, 2), 0.66, np.random.default_rng(seed))
        assert quotas[PE_MAP] == 6 - 3 and sum(quotas.values()) == 6
        assert sorted([quotas[1], quotas[2]]) == [1, 2]
        counts[max((1, 2), key=quotas.__getitem__)] += 1
    assert min(counts.values()) > 0  # the remainder goes to randomly chosen classes
    assert split_query(10, (1, 2, 3), 0.66, np.random.default_rng(0)) == {1: 2, 2: 2, 3: 2, PE_MAP: 4}
    assert split_query(5, (), 0.66, np.random.default_rng(0)) == {PE_MAP: 5}


def test_clasp_fills_each_class_quota() -> None:
    pool = make_pool()
    ctx = make_context(pool, "clasp_pe", query_size=10)
    regions = get_strategy("clasp_pe").query(ctx)
    check_regions(regions, ctx)
    quotas = split_query(10, (1, 2), 0.66, ctx.rng("quota"))
    by_class = {c: sum(r.info["class"] == c for r in regions) for c in (1, 2, None)}
    assert by_class == {1: quotas[1], 2: quotas[2], None: quotas[PE_MAP]}


RARE_BOX = Box((0, 4, 4), BOX)


def _rare_class_pool():  # type: ignore[no-untyped-def]
    """Confident background everywhere; a large bg/class-1 blob of maximal 2-class entropy (all of case_0,
    x >= 16 of case_1), and in case_1 one box of rare class 2 with moderate entropy (p = 0.9 / 0 / 0.1)."""
    pool = make_pool()
    confident = np.array([0.999, 0.0005, 0.0005], dtype=np.float32)[None, :, None, None, None]
    blob = np.array([0.5, 0.5, 0.0], dtype=np.float32)[None, :, None, None, None]
    for case_id in pool.case_ids:
        pool.probs[case_id] = np.broadcast_to(confident, pool.probs[case_id].shape).copy()
    pool.probs["case_0"][:] = blob
    pool.probs["case_1"][:, :, 16:] = blob
    pool.probs["case_1"][(slice(None), slice(None), *RARE_BOX.slices())] = np.array([0.9, 0.0, 0.1], dtype=np.float32)[
        None, :, None, None, None
    ]
    return pool


def test_clasp_covers_a_rare_class_that_pe_ignores() -> None:
    # n_per_case = 4 keeps the per-case caps small next to the blob, as in real images much larger than a box
    # (in a 3x3x3-box image a PE map visited first could take the rare box once the blob is full)
    pool = _rare_class_pool()
    ctx = make_context(pool, "entropy", n_per_case=4)
    pe_regions = get_strategy("entropy").query(ctx)
    assert all(r.score == pytest.approx(math.log(2), rel=1e-4) for r in pe_regions)  # all in the blob
    assert not any(r.case_id == "case_1" and r.box.overlaps(RARE_BOX) for r in pe_regions)
    for round_index in (1, 4):
        for seed in range(10):
            ctx = make_context(pool, "clasp_pe", seed=seed, round_index=round_index, n_per_case=4)
            regions = get_strategy("clasp_pe").query(ctx)
            check_regions(regions, ctx)
            rare = [r for r in regions if r.case_id == "case_1" and r.box.overlaps(RARE_BOX)]
            assert rare and all(r.info["class"] == 2 for r in rare), (round_index, seed)


def test_clasp_turns_greedy_as_beta_grows() -> None:
    pool = make_pool()
    strategy = ClaspPEStrategy(beta_max=1e8)
    greedy_early = greedy_late = 0
    for seed in range(10):
        for round_index in (1, 4):  # beta = 1, then 1e8 ** (3 / 4) = 1e6
            ctx = make_context(pool, "clasp_pe", seed=seed, round_index=round_index)
            same = _keys(strategy.query(ctx)) == _keys(strategy.select(ctx, beta=None))
            if round_index == 1:
                greedy_early += same
            else:
                greedy_late += same
    assert greedy_late >= 9
    assert greedy_early <= 2


def test_clasp_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="fg_share"):
        get_strategy("clasp_pe", {"fg_share": 1.5}).query(make_context(make_pool(), "clasp_pe"))
    with pytest.raises(ValueError, match="beta_max"):
        get_strategy("clasp_pe", {"beta_max": -1.0}).query(make_context(make_pool(), "clasp_pe"))


# --- stochastic_batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_kind", ["all", "top"])
@pytest.mark.parametrize("reduction", ["mean", "max", "sum"])
def test_stochastic_batches_returns_the_best_group(reduction: str, pool_kind: str) -> None:
    pool = make_pool()
    key = "stochastic_batches"
    units = score_units if pool_kind == "all" else score_pool
    for seed in range(3):
        ctx = make_context(pool, key, seed=seed)
        regions = get_strategy(key, {"reduction": reduction, "pool": pool_kind}).query(ctx)
        check_regions(regions, ctx)
        # recompute by hand: candidates in (case, position) order, one permutation, groups of query_size
        cands = sorted(units(ctx, predictive_entropy), key=lambda c: (c.case_id, c.start))
        n_groups = len(cands) // ctx.query_size
        perm = make_rng(seed, ctx.round_index, key, "shuffle").permutation(len(cands))
        groups = [perm[g * ctx.query_size : (g + 1) * ctx.query_size] for g in range(n_groups)]
        reduce = {"mean": np.mean, "max": np.max, "sum": np.sum}[reduction]
        values = [float(reduce([cands[i].score for i in g])) for g in groups]
        best = int(np.argmax(values))
        assert [r.key[:2] for r in regions] == [(cands[i].case_id, cands[i].start) for i in groups[best]]
        assert all(r.info["group_index"] == best and r.info["n_groups"] == n_groups for r in regions)
        assert regions[0].info["group_score"] == pytest.approx(max(values))
        assert float(reduce([r.score for r in regions])) == pytest.approx(max(values))


def test_stochastic_batches_n_groups_and_bases() -> None:
    pool = make_pool()
    key = "stochastic_batches"
    ctx = make_context(pool, key)
    [first] = [StochasticBatchesStrategy(n_groups=1).query(ctx)]
    assert all(r.info["group_index"] == 0 and r.info["n_groups"] == 1 for r in first)
    best = StochasticBatchesStrategy().query(ctx)
    assert best[0].info["group_score"] >= first[0].info["group_score"]
    for base in ("bald", "mean_std", "clasp_pe"):
        strategy = StochasticBatchesStrategy(base=base)
        regions = strategy.query(ctx)
        check_regions(regions, ctx)
        assert all(r.info["base"] == base for r in regions)
    assert StochasticBatchesStrategy(base="bald").needs.min_samples == 2
    assert StochasticBatchesStrategy(base="clasp_pe").needs.min_samples == 1
    with pytest.raises(ValueError, match=r"unknown base strategy 'random'.*entropy"):
        StochasticBatchesStrategy(base="random").query(ctx)
    with pytest.raises(ValueError, match="unknown reduction"):
        StochasticBatchesStrategy(reduction="median").query(ctx)  # type: ignore[arg-type]


def test_stochastic_batches_needs_one_complete_group() -> None:
    ctx = make_context(make_pool(), "stochastic_batches", query_size=6, n_per_case=1)
    with pytest.raises(NotEnoughCandidatesError) as err:
        StochasticBatchesStrategy(pool="top").query(ctx)  # 4 candidates: no complete group of 6
    assert (err.value.requested, err.value.available) == (6, 4)
    n_units = len(score_units(ctx, predictive_entropy))
    big = make_context(make_pool(), "stochastic_batches", query_size=n_units + 1)
    with pytest.raises(NotEnoughCandidatesError) as err:
        StochasticBatchesStrategy().query(big)
    assert (err.value.requested, err.value.available) == (n_units + 1, n_units)
