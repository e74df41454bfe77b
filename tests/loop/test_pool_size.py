"""``pool_size``: a fixed, seeded subset of the pool; the held-out cases stay; the full-data reference uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from alseg.config import ConfigError
from alseg.data.dataset import load_dataset, split_holdout
from alseg.data.split import pool_subset
from alseg.loop.drivers import run_experiment
from alseg.loop.full_data import run_full_data
from alseg.report.results import dataset_key
from alseg.store.layout import DB_FILE
from alseg.store.state import ExperimentState
from conftest import RecordingFactory, make_config


def test_pool_subset_is_fixed_sorted_and_checked() -> None:
    pool = [f"c{i:02d}" for i in range(20)]
    a = pool_subset(pool, 8, 0)
    assert a == pool_subset(list(reversed(pool)), 8, 0) == sorted(a) and len(set(a)) == 8 and set(a) <= set(pool)
    assert pool_subset(pool, 8, 1) != a
    assert set(a) <= set(pool_subset(pool, 12, 0))  # the first cases of one permutation
    assert pool_subset(pool, None, 0) == pool
    with pytest.raises(ValueError, match="pool_size is 21 but the pool holds 20 cases"):
        pool_subset(pool, 21, 0)


def test_experiment_and_reference_use_the_subset(_synthetic_template: Path, tmp_path: Path) -> None:
    ds = load_dataset(_synthetic_template)
    full_pool, test = split_holdout(ds.case_ids, 0.25, 0)
    cfg = make_config(_synthetic_template, pool_size=4, rounds=2, query_size=3)
    exp = run_experiment(cfg, tmp_path / "exp", RecordingFactory())
    state = ExperimentState(exp / DB_FILE)
    try:
        pool, held_out = state.split()
        queried = {g.region.case_id for g in state.regions()}
    finally:
        state.close()
    assert pool == pool_subset(full_pool, 4, 0) and held_out == test and queried <= set(pool)
    ref = run_full_data(cfg, tmp_path / "ref", RecordingFactory())
    state = ExperimentState(ref / DB_FILE)
    try:
        assert sorted({g.region.case_id for g in state.regions()}) == pool
    finally:
        state.close()
    assert dataset_key(cfg).endswith(", pool 4")
    with pytest.raises(ConfigError, match=r"key 'pool_size': pool_size is 99 but the pool holds 6 cases"):
        run_experiment(make_config(_synthetic_template, pool_size=99), tmp_path / "bad", RecordingFactory())
    assert not (tmp_path / "bad").exists()
