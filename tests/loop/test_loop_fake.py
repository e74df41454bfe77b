"""The whole loop with the fake backend on a synthetic dataset: runs, status, regions, training labels, resume
after SIGKILL at every kind of stage boundary, idempotent reruns, config mismatch and the lock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from alseg.config import load_config
from alseg.data.dataset import load_dataset, split_holdout
from alseg.data.regions import Box, annotated_mask
from alseg.errors import ExperimentError
from alseg.loop.create import open_or_create
from alseg.loop.drivers import run_experiment
from alseg.loop.status import experiment_status
from alseg.store.layout import DB_FILE, KILL_ENV
from alseg.store.state import ExperimentLockedError, ExperimentState
from conftest import TESTS_DIR, RecordingFactory, lock_held_by_another_process, make_config, write_config
from fake_backend import PREPARED_FILE, read_model

STRATEGIES = ("random_fg33", "entropy")
ROUNDS, QUERY = 3, 4  # as in conftest.config_dict
IGNORE = 3  # max label (2) + 1
STATUS_KEYS = {"round", "n_regions", "annotated_voxels", "annotated_fg_voxels", "dice_mean", "dice_per_class"}


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


@pytest.fixture(scope="module")
def finished(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run per strategy: {strategy: (exp_dir, factory)}; the dataset is only read."""
    os.environ.pop(KILL_ENV, None)
    root = tmp_path_factory.mktemp("finished")
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        factory = RecordingFactory()
        exp = run_experiment(make_config(_synthetic_template, strategy=strategy), root / strategy, factory)
        out[strategy] = (exp, factory)
    return out


def _regions(exp_dir: Path) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
    st = ExperimentState(exp_dir / DB_FILE)
    try:
        return [(g.region.case_id, g.region.box.start, g.region.box.size, g.round) for g in st.regions()]
    finally:
        st.close()


def _integrity(exp_dir: Path) -> str:
    conn = sqlite3.connect(exp_dir / DB_FILE)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --------------------------------------------------------------------------- full runs
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_full_run_and_status(finished: dict[str, Any], strategy: str) -> None:
    exp, factory = finished[strategy]
    status = experiment_status(exp)
    assert status["complete"] and status["strategy"] == strategy and status["rounds_planned"] == ROUNDS
    rows = status["rounds"]
    assert [row["round"] for row in rows] == list(range(ROUNDS))
    for r, row in enumerate(rows):
        assert STATUS_KEYS <= set(row)
        assert row["n_regions"] == QUERY * (r + 1)  # cumulative
        assert row["n_regions_added"] == QUERY
        assert row["annotated_voxels"] == QUERY * (r + 1) * 8**3
        assert 0 < row["annotated_fg_voxels"] <= row["annotated_voxels"]
        assert row["dice_mean"] == pytest.approx(1.0)  # the fake backend predicts the ground truth itself
        assert set(row["dice_per_class"]) == {"1", "2"}
        assert row["stages_done"] == ["query", "annotate", "train", "evaluate"]
        assert (exp / "rounds" / f"{r:03d}" / "evaluation.json").is_file()
        query = json.loads((exp / "rounds" / f"{r:03d}" / "query.json").read_text())
        assert query["strategy"] == ("starting_budget" if r == 0 else strategy)
        assert len(query["regions"]) == QUERY
    # fg voxels are cumulative too
    assert [row["annotated_fg_voxels"] for row in rows] == sorted(row["annotated_fg_voxels"] for row in rows)
    json.dumps(status)  # JSON-able as is

    kinds = [c[0] for c in factory.calls]
    assert kinds.count("prepare") == 1 and kinds.count("train") == ROUNDS
    # evaluation + the prefill of rounds 1.. (the cases with regions) + pool scoring
    n_predict = ROUNDS + (ROUNDS - 1) + (ROUNDS - 1 if strategy == "entropy" else 0)
    assert kinds.count("predict") == n_predict


def test_both_strategies_share_split_and_starting_budget(finished: dict[str, Any]) -> None:
    exps = [finished[s][0] for s in STRATEGIES]
    splits = []
    for exp in exps:
        st = ExperimentState(exp / DB_FILE)
        splits.append(st.split())
        st.close()
    assert splits[0] == splits[1]
    r0 = [sorted(g for g in _regions(exp) if g[3] == 0) for exp in exps]
    assert r0[0] == r0[1]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_regions_never_overlap(finished: dict[str, Any], strategy: str) -> None:
    exp, _ = finished[strategy]
    regions = _regions(exp)
    assert len(regions) == ROUNDS * QUERY
    assert len({g[:3] for g in regions}) == len(regions)
    st = ExperimentState(exp / DB_FILE)
    pool, test = st.split()
    st.close()
    by_case: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = defaultdict(list)
    for cid, start, size, _ in regions:
        assert cid in pool and cid not in test
        by_case[cid].append((start, size))
    for cid, boxes in by_case.items():
        mask = np.zeros((24, 28, 20), dtype=np.int32)
        for start, size in boxes:
            assert all(a >= 0 and a + s <= n for a, s, n in zip(start, size, mask.shape, strict=True)), (cid, start)
            mask[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))] += 1
        assert mask.max() == 1, f"overlapping regions in {cid}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_labels(finished: dict[str, Any], strategy: str) -> None:
    exp, _ = finished[strategy]
    st = ExperimentState(exp / DB_FILE)
    pool, test = st.split()
    st.close()
    ds = load_dataset(load_config(exp / "config.yaml").dataset)
    regions = _regions(exp)
    for r in range(ROUNDS):
        model = read_model(exp / "rounds" / f"{r:03d}" / "model")
        assert model["init_from"] == (None if r == 0 else str(exp / "rounds" / f"{r - 1:03d}" / "model"))
        boxes: dict[str, list[Box]] = defaultdict(list)
        for cid, start, size, rr in regions:
            if rr <= r:
                boxes[cid].append(Box(start, size))
        # exactly the cases with something annotated; never a test case
        assert set(model["cases"]) == set(boxes)
        assert not set(model["cases"]) & set(test)
        if r == 0:
            assert set(pool) - set(boxes), "expected some pool cases without annotation in round 0"
        for cid, rec in model["cases"].items():
            label_path = Path(rec["label"])
            assert label_path.is_relative_to(exp / "rounds")
            assert hashlib.sha256(label_path.read_bytes()).hexdigest() == rec["label_sha256"]
            assert [Path(p) for p in rec["images"]] == ds.image_files(cid)
            part = _read(label_path)
            gt = ds.read_label(cid)
            mask = annotated_mask(gt.shape, boxes[cid])
            np.testing.assert_array_equal(part[mask], gt[mask])
            assert np.all(part[~mask] == IGNORE)
            img = sitk.ReadImage(str(label_path))
            assert ds.geometry(cid).spacing == tuple(reversed(img.GetSpacing()))

    prepared = json.loads((exp / "nnunet" / PREPARED_FILE).read_text())
    assert prepared["ignore_value"] == IGNORE
    r0_cases = {cid for cid, *_ in (g for g in regions if g[3] == 0)}
    assert set(prepared["cases"]) == r0_cases
    for path in prepared["cases"].values():  # planning labels: background instead of the ignore value
        assert set(np.unique(_read(Path(path)))) <= {0, 1, 2}


# --------------------------------------------------------------------------- resume after SIGKILL
_KILLED_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from fake_backend import make_fake_backend
    from alseg.config import load_config
    from alseg.loop.drivers import run_experiment
    run_experiment(load_config(Path(sys.argv[2])), Path(sys.argv[3]), backend_factory=make_fake_backend)
    print("finished without being killed")
    """
)


@pytest.mark.parametrize(
    ("kill_at", "not_done"),
    [
        ("query.before_commit:1", (1, "query")),
        ("annotate.before_commit:1", (1, "annotate")),
        ("train.before_commit:2", (2, "train")),
        ("evaluate.predicting:1", (1, "evaluate")),
    ],
)
def test_resume_after_sigkill_matches_uninterrupted_run(
    finished: dict[str, Any], _synthetic_template: Path, tmp_path: Path, kill_at: str, not_done: tuple[int, str]
) -> None:
    ref_exp, _ = finished["entropy"]
    cfg_path = write_config(tmp_path / "config.yaml", _synthetic_template, strategy="entropy")
    exp = tmp_path / "exp"
    env = {**os.environ, KILL_ENV: kill_at}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(TESTS_DIR), str(cfg_path), str(exp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    st = ExperimentState(exp / DB_FILE)
    assert not st.stage_done(*not_done)
    r, stage = not_done
    if stage != "query":
        assert st.stage_done(r, "query")
    st.close()

    factory = RecordingFactory()
    run_experiment(load_config(cfg_path), exp, factory)
    assert factory.calls, "the resumed run did nothing"

    got, want = _regions(exp), _regions(ref_exp)
    assert len(got) == len({g[:3] for g in got}) == ROUNDS * QUERY  # no duplicates
    assert sorted(got) == sorted(want)
    assert _integrity(exp) == "ok"
    status, ref_status = experiment_status(exp), experiment_status(ref_exp)
    assert status["complete"]
    for row, ref in zip(status["rounds"], ref_status["rounds"], strict=True):
        for key in STATUS_KEYS:
            assert row[key] == ref[key], (key, row, ref)
    for r in range(ROUNDS):
        model = read_model(exp / "rounds" / f"{r:03d}" / "model")
        ref_model = read_model(ref_exp / "rounds" / f"{r:03d}" / "model")
        assert sorted(model["cases"]) == sorted(ref_model["cases"])
    assert not list(exp.rglob("*.partial"))


# --------------------------------------------------------------------------- reruns, config mismatch, lock
def _snapshot(exp: Path) -> tuple[dict[str, str], list[str]]:
    files = {
        str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(exp.rglob("*"))
        if p.is_file() and p.name != ".lock" and not p.name.startswith(DB_FILE)
    }
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        dump = sorted(conn.iterdump())
    finally:
        conn.close()
    return files, dump


def _no_backend(*args: Any) -> Any:
    raise AssertionError("a finished experiment must not start the backend")


def test_rerunning_a_finished_experiment_changes_nothing(finished: dict[str, Any], tmp_path: Path) -> None:
    src, _ = finished["random_fg33"]
    exp = tmp_path / "exp"
    shutil.copytree(src, exp)
    before = _snapshot(exp)
    run_experiment(load_config(exp / "config.yaml"), exp, _no_backend)  # same config given again
    run_experiment(None, exp, _no_backend)  # or none: the stored one
    after = _snapshot(exp)
    assert after[0] == before[0]
    assert after[1] == before[1]


@pytest.mark.parametrize(("key", "value"), [("query_size", 5), ("strategy", "random"), ("seed", 1)])
def test_reopening_with_a_different_config_names_the_key(
    finished: dict[str, Any], _synthetic_template: Path, key: str, value: Any
) -> None:
    exp, _ = finished["random_fg33"]
    before = _snapshot(exp)
    cfg = make_config(_synthetic_template, **{key: value})
    with pytest.raises(ExperimentError, match=key) as info:
        open_or_create(cfg, exp)
    assert str(exp) in str(info.value)
    with pytest.raises(ExperimentError, match=key):
        run_experiment(cfg, exp, _no_backend)
    assert _snapshot(exp) == before


def test_a_second_process_on_the_same_experiment_is_refused(finished: dict[str, Any]) -> None:
    exp, _ = finished["random_fg33"]
    with lock_held_by_another_process(exp) as holder:
        with pytest.raises(ExperimentLockedError) as info:
            run_experiment(None, exp, _no_backend)
        assert str(exp) in str(info.value) and str(holder.pid) in str(info.value)


def test_split_is_deterministic(finished: dict[str, Any], _synthetic_template: Path) -> None:
    ds = load_dataset(_synthetic_template)
    exp, _ = finished["entropy"]
    st = ExperimentState(exp / DB_FILE)
    pool, test = st.split()
    st.close()
    assert (pool, test) == split_holdout(ds.case_ids, 0.25, 0)
    assert len(test) == 2 and len(pool) == 6 and not set(pool) & set(test)
    assert split_holdout(reversed(ds.case_ids), 0.25, 0) == (pool, test)
    assert split_holdout(ds.case_ids, 0.25, 1) != (pool, test)
