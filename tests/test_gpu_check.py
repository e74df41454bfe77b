"""The GPU check script (``benchmarks/gpu_check.py``) in its CPU ``--dry-run`` mode, with the real nnU-Net backend.

The dry run does everything the GPU check does except the CUDA checks: two 2-round ``alseg run`` experiments
with the ``gpu`` profile (``entropy``; ``bald`` with MC dropout at K = 10) on a few bundled Hippocampus cases,
the speed measurements and the extrapolation, written to one JSON. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.nnunet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_writes_the_gpu_check_json(dry_run: dict) -> None:
    r = dry_run
    for key in ("dry_run", "complete", "passed", "checks", "environment", "settings", "runs", "measured"):
        assert key in r, key
    assert {"extrapolated", "skipped", "errors", "provenance", "wall_seconds"} <= set(r)
    assert r["dry_run"] is True and r["passed"] is True and r["complete"] is True
    assert r["errors"] == []
    assert r["checks"] and all(r["checks"].values()), r["checks"]
    assert r["environment"]["device"] == "cpu" and r["environment"]["torch"]
    assert r["settings"]["profile"] == "gpu" and r["settings"]["mc_dropout_k"] == 10
    assert r["provenance"]["commit"]


def test_both_runs_reach_round_1_with_dice(dry_run: dict) -> None:
    for strategy in ("entropy", "bald"):
        run = dry_run["runs"][strategy]
        assert run["exit_code"] == 0
        rounds = run["rounds"]
        assert [x["round"] for x in rounds] == [0, 1]
        for x in rounds:
            assert x["dice_mean"] is not None and 0.0 <= x["dice_mean"] <= 1.0
            assert x["stages_done"] == ["query", "annotate", "train", "evaluate"]
            assert x["model"]["training_devices"] == ["cpu"]
            # nnU-Net's own network (the gpu profile), not the cpu profile's halved one
            assert x["model"]["features_per_stage"][0] == 32
    assert dry_run["runs"]["bald"]["uncertainty"] == {"source": "mc_dropout", "n_samples": 10}
    assert all(x["model"]["configuration"].endswith("_dropout") for x in dry_run["runs"]["bald"]["rounds"])


def test_measured_and_extrapolated_figures(dry_run: dict) -> None:
    m = dry_run["measured"]
    speeds = m["train_seconds_per_iteration"]
    for key in ("3d_fullres", "3d_fullres_dropout", "2d"):
        assert speeds[key]["seconds_per_iteration"] > 0, key
    assert "3d_fullres_nnunet_da_workers" not in speeds  # skipped in the dry run, and said so
    assert "train_da_workers" in dry_run["skipped"]
    pred = m["predict_3d_fullres"]
    assert pred["no_mirroring"]["seconds_per_case"] > 0 and pred["mirroring"]["seconds_per_case"] > 0
    assert pred["mirroring"]["mirror_axes"] == [0, 1, 2]
    mc = m["mc_dropout_3d_fullres"]
    assert mc["k"] == 10 and mc["samples_per_case"] == 10 and mc["seconds_per_case"] > 0
    assert "peak_gpu_memory_mib" in m
    ex = dry_run["extrapolated"]
    assert "method" in ex and "warning" in ex  # the dry run's hours are flagged as meaningless
    for key in ("gpu_profile_entropy_3d_fullres", "gpu_profile_bald_mc_dropout_3d_fullres"):
        assert ex["scenarios"][key]["hours"] > 0
    nna = ex["scenarios"]["nnactive_5_fold_ensemble_3d_fullres"]
    assert nna["training_iterations_per_round"] == 5 * 200 * 250 and nna["hours"] > 0


def test_missing_module_is_named(tmp_path: Path) -> None:
    """The script names a module missing on the run path before it runs anything (exit code 3)."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class B:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name == 'SimpleITK':\n"
        "            raise ModuleNotFoundError(\"No module named 'SimpleITK'\", name='SimpleITK')\n"
        "sys.meta_path.insert(0, B)\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "SimpleITK" in proc.stdout and "DEVELOPERS.md" in proc.stdout
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["passed"] is False
    assert any(p["missing_module"] == "SimpleITK" for e in r["errors"] for p in e.get("missing", []))
