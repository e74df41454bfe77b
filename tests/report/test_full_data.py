"""The full-data reference: every pool case whole in one round, the schedule of the last model, a marker."""

from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from alseg.config import load_config
from alseg.data.dataset import load_dataset, split_holdout
from alseg.loop.drivers import run_experiment
from alseg.loop.full_data import FULL_DATA_META, is_full_data, run_full_data
from alseg.store.layout import CONFIG_FILE, DB_FILE
from alseg.store.state import ExperimentState
from conftest import RecordingFactory, make_config
from fake_backend import read_model


def test_full_data_reference(_synthetic_template: Path, tmp_path: Path) -> None:
    factory = RecordingFactory()
    cfg = make_config(_synthetic_template, strategy="entropy", rounds=3)
    exp = run_full_data(cfg, tmp_path / "full", factory)
    ds = load_dataset(_synthetic_template)
    pool, test = split_holdout(ds.case_ids, 0.25, 0)

    stored = load_config(exp / CONFIG_FILE)
    assert stored.unit == "case" and stored.rounds == 1 and stored.starting_budget == len(pool)
    # cpu profile: warm start, 12 epochs from scratch then 8 per round -> the last model saw 12 + 2 * 8
    assert stored.schedule is not None and stored.schedule.first_round_epochs == 12 + 2 * 8
    assert stored.dataset == cfg.dataset.resolve() and stored.split_seed == cfg.split_seed

    state = ExperimentState(exp / DB_FILE)
    try:
        regions = state.regions()
        marker = json.loads(state.get_meta(FULL_DATA_META) or "null")
        metrics = state.metrics()
        assert state.split() == (pool, test)
    finally:
        state.close()
    assert sorted(r.region.case_id for r in regions) == pool
    assert all(r.region.box.size == ds.geometry(r.region.case_id).shape for r in regions)
    assert all(r.status == "annotated" for r in regions)
    assert marker["epochs"] == 28 and marker["source"]["strategy"] == "entropy"
    assert list(metrics) == [0] and metrics[0]["cost"]["fg_fraction"] == 1.0
    assert is_full_data(exp)

    # trained once, on every pool case, with complete labels (no ignore value anywhere)
    kinds = [c[0] for c in factory.calls]
    assert kinds.count("train") == 1
    model = read_model(exp / "rounds" / "000" / "model")
    assert sorted(model["cases"]) == pool
    for case in model["cases"].values():
        lab = sitk.GetArrayFromImage(sitk.ReadImage(case["label"]))
        assert lab.max() <= 2

    # resuming a finished reference does nothing
    again = RecordingFactory()
    run_full_data(cfg, exp, again)
    assert [c[0] for c in again.calls].count("train") == 0


def test_full_data_schedule_without_warm_start(_synthetic_template: Path, tmp_path: Path) -> None:
    schedule = {"epochs": 5, "iterations_per_epoch": 2, "warm_start": False}
    cfg = make_config(_synthetic_template, rounds=4, schedule=schedule)
    exp = run_full_data(cfg, tmp_path / "full", RecordingFactory())
    stored = load_config(exp / CONFIG_FILE)
    assert stored.schedule is not None and stored.schedule.first_round_epochs == 5


def test_is_full_data_false_for_runs(_synthetic_template: Path, tmp_path: Path) -> None:
    exp = run_experiment(make_config(_synthetic_template, rounds=1), tmp_path / "run", RecordingFactory())
    assert not is_full_data(exp) and not is_full_data(tmp_path / "nothing")
