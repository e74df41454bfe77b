"""``uncertainty.ensemble: folds`` in the loop (fake backend): the loop passes each annotated case's classes,
the members' validation folds put every class of two or more cases into two folds, member k trains on the
complement of fold k, and the same seed gives the same folds in every round."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alseg.data.dataset import load_dataset
from alseg.data.regions import Box
from alseg.loop.drivers import run_experiment
from alseg.store.layout import DB_FILE, KILL_ENV
from alseg.store.state import ExperimentState
from conftest import RecordingFactory, make_config
from fake_backend import read_model

ROUNDS = 3
FOLDS = {"source": "ensemble", "n_samples": 2, "ensemble": "folds"}


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


def _run(dataset: Path, out: Path, uncertainty: dict[str, Any]) -> Path:
    cfg = make_config(dataset, strategy="bald", rounds=ROUNDS, uncertainty=uncertainty)
    return run_experiment(cfg, out, RecordingFactory())


def _expected_classes(exp: Path, dataset: Path, r: int) -> dict[str, set[int]]:
    """Labels of the ground truth inside each case's regions of rounds <= r, background included (nnActive)."""
    ds = load_dataset(dataset)
    st = ExperimentState(exp / DB_FILE)
    try:
        boxes: dict[str, list[Box]] = defaultdict(list)
        for g in st.regions(max_round=r):
            boxes[g.region.case_id].append(g.region.box)
    finally:
        st.close()
    out = {}
    for cid, bs in boxes.items():
        gt = ds.read_label(cid)
        out[cid] = {int(v) for b in bs for v in np.unique(gt[b.slices()])}
    return out


@pytest.fixture(scope="module")
def folds_runs(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folds")
    return _run(_synthetic_template, root / "a", FOLDS), _run(_synthetic_template, root / "b", FOLDS)


def test_members_train_on_the_complement_of_folds_with_every_class_twice(
    folds_runs: tuple[Path, Path], _synthetic_template: Path
) -> None:
    exp, _ = folds_runs
    for r in range(ROUNDS):
        model = read_model(exp / "rounds" / f"{r:03d}" / "model")
        expected = _expected_classes(exp, _synthetic_template, r)
        cases = set(model["cases"])
        assert cases == set(expected)
        assert {cid: set(v) for cid, v in model["case_classes"].items()} == expected

        folds = model["validation_folds"]
        assert len(folds) == 2 and all(folds)
        flat = [cid for fold in folds for cid in fold]
        assert sorted(flat) == sorted(cases)  # disjoint and covering
        for c in {c for v in expected.values() for c in v}:
            holders = [cid for cid, v in expected.items() if c in v]
            in_folds = {j for j, fold in enumerate(folds) if set(fold) & set(holders)}
            assert len(in_folds) >= min(2, len(holders)), (r, c, folds)

        members = model["members"]
        assert [m["fold"] for m in members] == [0, 1]
        for k, m in enumerate(members):
            assert set(m["val_cases"]) == set(folds[k])
            assert set(m["train_cases"]) == cases - set(folds[k])


def test_the_same_seed_gives_the_same_folds(folds_runs: tuple[Path, Path]) -> None:
    a, b = folds_runs
    for r in range(ROUNDS):
        fa = read_model(a / "rounds" / f"{r:03d}" / "model")["validation_folds"]
        fb = read_model(b / "rounds" / f"{r:03d}" / "model")["validation_folds"]
        assert fa == fb


def test_seed_ensembles_get_no_case_classes(_synthetic_template: Path, tmp_path: Path) -> None:
    exp = _run(_synthetic_template, tmp_path / "seeds", {"source": "ensemble", "n_samples": 2})
    model = read_model(exp / "rounds" / "000" / "model")
    assert model["case_classes"] is None and "validation_folds" not in model
