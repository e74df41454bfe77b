"""End to end with the real nnU-Net v2 backend on real Hippocampus cases (the bundled demo subset).

A tiny schedule keeps it to a few minutes on 2 CPU cores. The kill test interrupts one experiment with
SIGKILL during querying, annotation, training and prediction, resumes it each time, and checks that it
ends with exactly the regions of an uninterrupted run with the same seed (``random_fg33`` does not depend on
the model, so the comparison is exact although nnU-Net training is not bit-reproducible).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from alseg.config import Schedule, load_config
from alseg.data.dataset import demo_dataset_path
from alseg.loop.create import recover_schedule

pytestmark = pytest.mark.nnunet

ROUNDS = 3


def write_config(path: Path, **overrides: object) -> Path:
    cfg = {
        "dataset": str(demo_dataset_path()),
        "strategy": "random_fg33",
        "seed": 7,
        "rounds": ROUNDS,
        "query_size": 8,
        "profile": "cpu",
        "device": "cpu",
        "num_threads": 2,
        "schedule": {"epochs": 1, "iterations_per_epoch": 4, "warm_start": True, "optimizer": "adam"},
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def alseg(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alseg.cli", *args], capture_output=True, text=True, env=env, check=False, **kw
    )


def region_set(exp: Path) -> list[tuple]:
    with sqlite3.connect(exp / "alseg.sqlite") as conn:
        rows = conn.execute("SELECT round, case_id, box_start, box_size, status FROM regions").fetchall()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return sorted(rows)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    write_config(root / "cfg.yaml")
    # a relative --out, as in the README's demo command: nnU-Net's worker runs in another directory
    proc = alseg("run", "cfg.yaml", "--out", "exp", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "exp"


def test_run_with_real_backend(reference_run: Path) -> None:
    exp = reference_run
    proc = alseg("status", str(exp), "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    rounds = status["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert [r["n_regions"] for r in rounds] == [8 * (i + 1) for i in range(ROUNDS)]
    for r in rounds:
        assert r["dice_mean"] is not None and 0.0 <= r["dice_mean"] <= 1.0
        assert set(r["dice_per_class"]) == {"1", "2"}
        assert r["annotated_voxels"] > 0
        assert r["stages_done"] == ["query", "annotate", "train", "evaluate"]
    # the models are real nnU-Net checkpoints, one per round
    for r in range(ROUNDS):
        model = exp / "rounds" / f"{r:03d}" / "model"
        assert (model / "fold_all" / "checkpoint_final.pth").stat().st_size > 100_000
        assert (model / "plans.json").exists()
    # partial labels: ground truth inside the boxes, the ignore label (3) elsewhere
    query = json.loads((exp / "rounds" / "000" / "query.json").read_text())
    first = query["regions"][0]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(exp / "rounds" / "000" / "labels" / f"{first['case_id']}.nii.gz")))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_dataset_path() / "labelsTr" / f"{first['case_id']}.nii.gz")))
    sl = tuple(slice(a, a + s) for a, s in zip(first["start"], first["size"], strict=True))
    assert np.array_equal(lab[sl], gt[sl])
    outside = np.ones(lab.shape, bool)
    for g in query["regions"]:
        if g["case_id"] == first["case_id"]:
            outside[tuple(slice(a, a + s) for a, s in zip(g["start"], g["size"], strict=True))] = False
    assert np.all(lab[outside] == 3)
    # the dataset.json given to nnU-Net declares the ignore label
    dj = json.loads((exp / "nnunet" / "dataset.json").read_text())
    assert dj["labels"]["ignore"] == 3
    # the schedule is stored resolved, and nnU-Net's own records of the trained rounds give it back (what an
    # experiment created before the schedule was stored resumes with)
    stored = load_config(exp / "config.yaml").schedule
    assert stored is not None and stored.optimizer == "adam" and stored.iterations_per_epoch == 4
    other = Schedule(epochs=99, iterations_per_epoch=99, optimizer="sgd", initial_lr=0.5, warm_start=False)
    recovered, source = recover_schedule(exp, other)
    assert source == "read from the models of round 0 and round 1"
    expected = {"epochs": 1, "iterations_per_epoch": 4, "optimizer": "adam", "warm_start": True}
    assert {k: getattr(recovered, k) for k in expected} == expected
    assert recovered.initial_lr == pytest.approx(1e-2)  # nnU-Net's default, the schedule sets none


def _worker_alive(exp: Path) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "alseg.backends.nnunet.worker" in cmd and str(exp) in cmd:
            return True
    return False


def kill_at(cfg: Path, exp: Path, point: str) -> None:
    env = dict(os.environ, ALSEG_KILL_AT=point)
    proc = alseg("run", str(cfg), "--out", str(exp), env=env)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
    region_set(exp)  # integrity check after every kill


def test_sigkill_anywhere_then_resume_gives_the_same_regions(reference_run: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml")
    exp = tmp_path / "exp"
    # 1) kills at named points, in the order the run reaches them: annotating, querying, predicting
    for point in ("annotate.before_commit:0", "query.selected:1", "evaluate.predicting:1", "query.before_commit:2"):
        kill_at(cfg, exp, point)
    # 2) a kill of the parent while nnU-Net trains (round 2 is the only one left to train)
    partial = exp / "rounds" / "002" / "model.partial" / "train.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "alseg.cli", "run", str(cfg), "--out", str(exp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (partial.exists() and "Epoch" in partial.read_text(errors="replace")):
        assert proc.poll() is None, "the run ended before training started"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    time.sleep(3)
    assert not _worker_alive(exp), "the nnU-Net training process outlived the killed run"
    # 3) a kill after training finished but before the stage committed: the complete model is reused
    kill_at(cfg, exp, "train.before_commit:2")
    checkpoint = exp / "rounds" / "002" / "model" / "fold_all" / "checkpoint_final.pth"
    before_resume = (hashlib.sha256(checkpoint.read_bytes()).hexdigest(), checkpoint.stat().st_mtime_ns)
    # 4) resume to the end
    done = alseg("run", str(cfg), "--out", str(exp))
    assert done.returncode == 0, done.stdout + done.stderr
    after = (hashlib.sha256(checkpoint.read_bytes()).hexdigest(), checkpoint.stat().st_mtime_ns)
    assert after == before_resume, "the complete model of round 2 was trained again instead of reused"
    assert region_set(exp) == region_set(reference_run)
    status = json.loads(alseg("status", str(exp), "--json").stdout)
    assert status["complete"] and len(status["rounds"]) == ROUNDS
    # running a finished experiment again changes nothing
    before = region_set(exp)
    again = alseg("run", str(cfg), "--out", str(exp))
    assert again.returncode == 0
    assert region_set(exp) == before


def test_second_process_is_refused(reference_run: Path, tmp_path: Path) -> None:
    from alseg.store.state import experiment_lock

    cfg = write_config(tmp_path / "cfg.yaml")
    with experiment_lock(reference_run):
        proc = alseg("run", str(cfg), "--out", str(reference_run))
    assert proc.returncode != 0
    assert "in use" in (proc.stderr + proc.stdout)


def _metrics(exp: Path) -> dict:
    with sqlite3.connect(exp / "alseg.sqlite") as conn:
        return {r: json.loads(m) for r, m in conn.execute("SELECT round, data FROM metrics")}


def test_resume_of_a_model_dependent_strategy_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """``entropy`` chooses with the model: killed while querying and after a finished training, the resumed
    run ends with the regions and held-out metrics of an uninterrupted run (training is deterministic on one
    CPU), and the finished model is reused, not trained again."""
    cfg = write_config(tmp_path / "cfg.yaml", strategy="entropy", rounds=2)
    ref = tmp_path / "ref"
    proc = alseg("run", str(cfg), "--out", str(ref))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exp = tmp_path / "exp"
    kill_at(cfg, exp, "train.before_commit:0")
    checkpoint = exp / "rounds" / "000" / "model" / "fold_all" / "checkpoint_final.pth"
    trained = (hashlib.sha256(checkpoint.read_bytes()).hexdigest(), checkpoint.stat().st_mtime_ns)
    kill_at(cfg, exp, "query.selected:1")
    done = alseg("run", str(cfg), "--out", str(exp))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (hashlib.sha256(checkpoint.read_bytes()).hexdigest(), checkpoint.stat().st_mtime_ns) == trained
    assert region_set(exp) == region_set(ref)
    assert _metrics(exp) == _metrics(ref)
