"""A tiny study on a local Ray instance (2 CPUs) with the real nnU-Net backend on bundled Hippocampus cases.

One round-0 base task, two runs (1 CPU each, side by side) that wait for it, and the full-data reference. One
Ray worker is killed (SIGKILL) just before round 1's training commits: Ray retries the task and the run resumes
from its folder, ending with every round done.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import ray
import yaml

from alseg.store.layout import KILL_ENV, KILL_ONCE_ENV
from alseg.study.executors import RayExecutor
from alseg.study.runner import STUDY_FILE, run_study
from conftest import copy_demo_cases

pytestmark = pytest.mark.nnunet


def test_tiny_study_on_local_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = copy_demo_cases(tmp_path / "Hippocampus", 8)
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "ray-tiny",
                "dataset": str(data),
                "seeds": [3],
                "defaults": {"profile": "cpu", "device": "cpu"},
                "settings": {
                    "box16": {
                        "region_size": [16, 16, 16],
                        "query_size": 3,
                        "rounds": 2,
                        "schedule": {"epochs": 1, "iterations_per_epoch": 3, "optimizer": "adam"},
                    }
                },
                "strategies": ["random", "entropy"],
                "baseline": "random",
            }
        )
    )
    killed = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, "train.before_commit:1")  # the workers inherit it from this driver
    monkeypatch.setenv(KILL_ONCE_ENV, str(killed))
    lines: list[str] = []
    out = tmp_path / "out"
    try:
        outcome = run_study(study, out, executor=RayExecutor(cpus_per_run=1, num_cpus=2), say=lines.append)
    finally:
        ray.shutdown()
    assert not outcome.failed, outcome.failed
    assert sorted(outcome.finished) == ["box16/entropy/seed3", "box16/full_data", "box16/random/seed3"]
    assert killed.exists(), "no worker reached the kill point"
    assert "2 runs at a time" in lines[0]
    base = next(p for p in (out / "runs" / "box16" / "round0").iterdir() if p.is_dir() and not p.name.startswith("."))
    starts = 0
    for name in ("random", "entropy"):
        exp = out / "runs" / "box16" / name / "seed3"
        with sqlite3.connect(exp / "alseg.sqlite") as conn:
            stages = conn.execute("SELECT round, stage FROM stages WHERE status = 'done'").fetchall()
            r0 = conn.execute("SELECT case_id, box_start FROM regions WHERE round = 0 ORDER BY id").fetchall()
        with sqlite3.connect(base / "alseg.sqlite") as conn:
            assert r0 == conn.execute("SELECT case_id, box_start FROM regions ORDER BY id").fetchall()
        assert len(stages) == 8  # 4 stages x 2 rounds
        starts += (exp / "alseg.log").read_text().count("round 1: train\n")
    assert starts == 3  # the killed run's round-1 training ran twice: once killed, once after Ray's retry
    record = json.loads((out / STUDY_FILE).read_text())
    assert all(r.get("finished") for r in record["runs"].values())
    assert (out / "report.html").is_file()
