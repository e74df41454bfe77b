"""SIGKILL at 24 points of ``run``, ``query`` and ``import`` in annotation mode (chosen by a seeded generator among
every fault point of a 3-round experiment), each followed by the same command again: the experiment ends identical
to an uninterrupted one (same regions, same imported files and labels, same training labels, same metrics) and the
database passes its integrity check after every kill. Fake backend, subprocesses for the killed commands."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from annotator import annotate

from alseg.config import load_config
from alseg.loop.drivers import advance_experiment, run_experiment
from alseg.oracle.importer import import_labels
from alseg.store.layout import DB_FILE, KILL_ENV
from conftest import TESTS_DIR, write_config
from fake_backend import make_fake_backend

ROUNDS = 3
N_KILLS, N_GROUPS, SEED = 24, 3, 20261122
ORACLE_TESTS_DIR = Path(__file__).resolve().parent

# the commands of one experiment, in order: (command, round)
STEPS: list[tuple[str, int]] = [("run", 0)] + [s for r in range(ROUNDS) for s in (("import", r), ("query", r))]


def _query_points(r: int) -> list[str]:
    return [
        f"{p}:{r}" for p in ("query.selected", "query.before_commit", "export.mask_written", "export.before_rename")
    ]


def points_of(step: tuple[str, int]) -> list[str]:
    """The fault points a step passes, in the order it passes them."""
    kind, r = step
    if kind == "run":
        return _query_points(0)
    if kind == "import":
        return [f"{p}:{r}" for p in ("import.validated", "import.copied", "import.before_commit")]
    after = _query_points(r + 1) if r + 1 < ROUNDS else []
    return [f"annotate.before_commit:{r}", f"train.before_commit:{r}", f"evaluate.predicting:{r}", *after]


ALL_POINTS = [p for step in STEPS for p in points_of(step)]
_chosen = sorted(np.random.default_rng(SEED).choice(len(ALL_POINTS), size=N_KILLS, replace=False).tolist())
GROUPS = [[ALL_POINTS[i] for i in _chosen[g::N_GROUPS]] for g in range(N_GROUPS)]  # each in the order reached

_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from fake_backend import make_fake_backend
    from alseg.config import load_config
    from alseg.loop.drivers import advance_experiment
    from alseg.loop.drivers import run_experiment
    from alseg.oracle.importer import import_labels
    command, exp, arg = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    if command == "run":
        run_experiment(load_config(arg), exp, backend_factory=make_fake_backend)
    elif command == "query":
        advance_experiment(exp, backend_factory=make_fake_backend)
    else:
        import_labels(exp, arg)
    print("finished without being killed")
    """
)


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


def _integrity(exp: Path) -> None:
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def drive(root: Path, dataset: Path, kills: list[str]) -> Path:
    """Run a whole human-oracle experiment step by step; before each step, kill it at the points it passes."""
    exp = root / "exp"
    cfg_path = write_config(root / "cfg.yaml", dataset, strategy="entropy", rounds=ROUNDS)
    data = yaml.safe_load(cfg_path.read_text())
    data["oracle"] = "human"
    cfg_path.write_text(yaml.safe_dump(data))
    queue = list(kills)
    for step in STEPS:
        kind, r = step
        labels = root / f"labels_{r}"
        if kind == "import":  # the annotator's work is not part of alseg: never killed
            annotate(exp, r, labels, n_outside=3, seed=r)
        while queue and queue[0] in points_of(step):
            point = queue.pop(0)
            arg = cfg_path if kind == "run" else labels
            proc = subprocess.run(
                [sys.executable, "-c", _SCRIPT, str(TESTS_DIR), kind, str(exp), str(arg)],
                env={**os.environ, KILL_ENV: point, "PYTHONPATH": str(ORACLE_TESTS_DIR)},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == -signal.SIGKILL, (point, proc.stdout + proc.stderr[-3000:])
            _integrity(exp)
        if kind == "run":
            run_experiment(load_config(cfg_path), exp, make_fake_backend)
        elif kind == "import":
            import_labels(exp, labels)
        else:
            advance_experiment(exp, backend_factory=make_fake_backend)
    assert not queue, f"kill points never reached: {queue}"
    return exp


def fingerprint(exp: Path) -> dict[str, Any]:
    """Everything that must match an uninterrupted run (paths relative, nothing that names the folder)."""
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        q = conn.execute
        out: dict[str, Any] = {
            "regions": q(
                "SELECT id, round, case_id, box_start, box_size, status, fg_voxels, annotated_by FROM regions "
                "ORDER BY id"
            ).fetchall(),
            "imported": q(
                "SELECT id, round, case_id, path, sha256, n_outside, replaced_by FROM imported_files ORDER BY id"
            ).fetchall(),
            "label_files": q("SELECT round, case_id, path, sha256 FROM label_files ORDER BY round, case_id").fetchall(),
            "stages": q("SELECT round, stage, status FROM stages ORDER BY round, stage").fetchall(),
            "metrics": q("SELECT round, data FROM metrics ORDER BY round").fetchall(),
            "split": q("SELECT case_id, role FROM split ORDER BY case_id").fetchall(),
        }
    finally:
        conn.close()
    files: dict[str, str] = {}
    for p in sorted((exp / "rounds").rglob("*")):
        rel = str(p.relative_to(exp))
        if p.is_symlink():
            files[rel] = "link -> " + os.readlink(p)
        elif p.is_dir():
            files[rel] = "dir"
        elif p.name == "manifest.json":
            manifest = json.loads(p.read_text())
            manifest.pop("experiment")
            files[rel] = json.dumps(manifest, sort_keys=True)
        elif p.name == "README.txt" or p.parent.name == "model":
            files[rel] = "present"  # they name the experiment folder
        else:
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    out["files"] = files
    return out


@pytest.fixture(scope="module")
def reference(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    os.environ.pop(KILL_ENV, None)
    exp = drive(tmp_path_factory.mktemp("kill_reference"), _synthetic_template, [])
    return fingerprint(exp)


def test_the_kill_points_cover_run_query_and_import() -> None:
    chosen = [p for g in GROUPS for p in g]
    assert len(set(chosen)) == len(chosen) >= 20
    assert {p.split(".")[0] for p in chosen} >= {"query", "export", "import", "annotate", "train"}


@pytest.mark.parametrize("group", range(N_GROUPS), ids=[",".join(g) for g in GROUPS])
def test_sigkill_then_rerun_ends_like_an_uninterrupted_experiment(
    reference: dict[str, Any], _synthetic_template: Path, tmp_path: Path, group: int
) -> None:
    exp = drive(tmp_path, _synthetic_template, GROUPS[group])
    _integrity(exp)
    got = fingerprint(exp)
    for key in reference:
        assert got[key] == reference[key], key
    leftovers = [p for p in exp.rglob("*") if ".tmp" in p.name or ".partial" in p.name or ".to_annotate." in p.name]
    assert not leftovers
    # and the reference's work is all done: every region labelled, nothing open
    assert all(row[5] == "annotated" for row in got["regions"]) and len(got["regions"]) == ROUNDS * 4
