"""``alseg remeasure``: the correction measures of an existing experiment, computed again from its stored models
(simulated) or imported files (human), equal what the run recorded; resumable, refused while the experiment runs,
and a missing model is named before anything changes.

The backend predicts the ground truth with a few voxels flipped, seeded by the case and the model's training seed,
so every round's measures are non-zero and depend on which model predicted them."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from alseg.cli import app
from alseg.config import ExperimentConfig, load_config
from alseg.data.dataset import Dataset, load_dataset
from alseg.errors import ExperimentError
from alseg.loop.drivers import advance_experiment, run_experiment
from alseg.loop.remeasure import remeasure_experiment
from alseg.oracle.importer import import_labels
from alseg.store.layout import DB_FILE, KILL_ENV
from alseg.store.state import ExperimentLockedError
from conftest import TESTS_DIR, lock_held_by_another_process, make_config
from fake_backend import MODEL_FILE, FakeBackend

sys.path.insert(0, str(TESTS_DIR / "oracle"))
from annotator import annotate

ROUNDS = 3
FLIP = 0.08  # share of voxels the model gets wrong


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


def flipped_prediction(gt: np.ndarray, case_id: str, model_seed: int) -> np.ndarray:
    """The model's argmax: the ground truth, with a seeded share of voxels moved to the next label (mod 3)."""
    rng = np.random.default_rng([zlib.crc32(case_id.encode()), model_seed & 0xFFFFFFFF])
    return np.where(rng.random(gt.shape) < FLIP, (gt.astype(np.int64) + 1) % 3, gt.astype(np.int64))


class FlipBackend(FakeBackend):
    """Predicts :func:`flipped_prediction` (confidently: argmax is it in every sample)."""

    def probabilities(self, case_id: str, model_seed: int, n_samples: int = 1) -> np.ndarray:
        pred = flipped_prediction(self.ds.read_label(case_id), case_id, model_seed)
        onehot = np.moveaxis(np.eye(3, dtype=np.float32)[pred], -1, 0)
        return np.repeat((0.8 * onehot + 0.2 / 3)[None], n_samples, axis=0)


class CountingFactory:
    """Makes :class:`FlipBackend` and counts the cases it is asked to predict."""

    def __init__(self) -> None:
        self.backends: list[FlipBackend] = []

    def __call__(self, cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> FlipBackend:
        self.backends.append(FlipBackend(cfg, ds, exp_dir))
        return self.backends[-1]

    @property
    def predicted(self) -> list[str]:
        return [cid for b in self.backends for kind, ids in b.calls if kind == "predict" for cid in ids]


def _rows(exp: Path) -> dict[int, tuple[Any, ...]]:
    """``{region id: (round, corrected voxels, strokes, prefill, annotator, import id)}``, read with sqlite3."""
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        rows = conn.execute(
            "SELECT g.id, g.round, c.corrected_voxels, c.strokes, c.prefill, c.annotator, c.import_id "
            "FROM regions g JOIN region_costs c ON c.region_id = g.id ORDER BY g.id"
        ).fetchall()
    finally:
        conn.close()
    return {int(r[0]): tuple(r[1:]) for r in rows}


def _delete_costs(exp: Path, rounds: tuple[int, ...] | None = None) -> None:
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        if rounds is None:
            conn.execute("DELETE FROM region_costs")
        else:
            marks = ",".join("?" * len(rounds))
            conn.execute(
                f"DELETE FROM region_costs WHERE region_id IN (SELECT id FROM regions WHERE round IN ({marks}))",
                rounds,
            )
        conn.commit()
    finally:
        conn.close()


def _sums(rows: dict[int, tuple[Any, ...]]) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for rnd, cv, st, *_ in rows.values():
        a, b = out.get(rnd, (0, 0))
        out[rnd] = (a + cv, b + st)
    return out


@pytest.fixture(scope="module")
def simulated_run(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A finished simulated run and the measures it recorded."""
    exp = tmp_path_factory.mktemp("remeasure") / "exp"
    run_experiment(make_config(_synthetic_template, rounds=ROUNDS), exp, CountingFactory())
    return exp, _rows(exp)


@pytest.fixture
def run_copy(simulated_run: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    exp, recorded = simulated_run
    copy = tmp_path / "exp"
    shutil.copytree(exp, copy)
    return copy, recorded


def test_the_recorded_measures_are_against_the_previous_model(simulated_run: tuple[Path, dict]) -> None:
    """What the run recorded, checked by hand: round r's regions against the flipped prediction of the model
    of round r - 1 (its training seed read from the model folder), 26-connected strokes; round 0 against
    background."""
    exp, recorded = simulated_run
    ds = load_dataset(load_config(exp / "config.yaml").dataset)
    conn = sqlite3.connect(exp / DB_FILE)
    regions = conn.execute("SELECT id, round, case_id, box_start, box_size FROM regions").fetchall()
    conn.close()
    assert len(recorded) == len(regions) == 4 * ROUNDS
    for rid, rnd, cid, start, size in regions:
        gt = ds.read_label(cid).astype(np.int64)
        sl = tuple(slice(a, a + n) for a, n in zip(json.loads(start), json.loads(size), strict=True))
        if rnd == 0:
            prefill, kind = np.zeros_like(gt), "none"
        else:
            seed = json.loads((exp / "rounds" / f"{rnd - 1:03d}" / "model" / MODEL_FILE).read_text())["seed"]
            prefill, kind = flipped_prediction(gt, cid, seed), "model"
        changed = gt[sl] != prefill[sl]
        strokes = int(ndimage.label(changed, structure=np.ones((3, 3, 3)))[1])
        assert recorded[rid][1:4] == (int(changed.sum()), strokes, kind), (rid, rnd)
    sums = _sums(recorded)
    assert all(sums[r][0] > 0 and sums[r][1] > 0 for r in range(ROUNDS))


def test_remeasure_reproduces_the_recorded_measures(run_copy: tuple[Path, dict]) -> None:
    exp, recorded = run_copy
    _delete_costs(exp)
    assert _rows(exp) == {}
    factory = CountingFactory()
    seen: list[int] = []
    results = remeasure_experiment(exp, backend_factory=factory, report=lambda m: seen.append(m.round_index))
    assert _rows(exp) == recorded
    assert seen == [m.round_index for m in results] == list(range(ROUNDS))
    sums = _sums(recorded)
    for m in results:
        assert not m.skipped and m.before is None and m.n_regions == 4
        assert (m.corrected_voxels, m.strokes) == sums[m.round_index]
        assert m.prefill == (("none",) if m.round_index == 0 else ("model",))
    assert "no measures before" in results[0].line()
    # rounds 1 and 2 predicted their regions' cases (with the models of rounds 0 and 1); round 0 needs no model
    assert factory.predicted == sorted(_cases_of(exp, 1)) + sorted(_cases_of(exp, 2))


def _cases_of(exp: Path, r: int) -> set[str]:
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        return {c for (c,) in conn.execute("SELECT case_id FROM regions WHERE round = ?", (r,))}
    finally:
        conn.close()


def test_measured_rounds_are_skipped_unless_forced(run_copy: tuple[Path, dict]) -> None:
    exp, recorded = run_copy
    _delete_costs(exp, (2,))
    factory = CountingFactory()
    results = remeasure_experiment(exp, backend_factory=factory)
    assert [m.skipped for m in results] == [True, True, False]
    assert sorted(factory.predicted) == sorted(_cases_of(exp, 2))  # only round 2 was predicted
    assert _rows(exp) == recorded
    assert results[0].before == _sums(recorded)[0] and "already measured" in results[0].line()

    again = CountingFactory()
    assert all(m.skipped for m in remeasure_experiment(exp, backend_factory=again))
    assert again.predicted == []  # nothing to do: no backend started

    forced = remeasure_experiment(exp, force=True, backend_factory=CountingFactory())
    assert not any(m.skipped for m in forced)
    assert all(m.before == (m.corrected_voxels, m.strokes) for m in forced)
    assert "recorded before: the same" in forced[1].line()
    assert _rows(exp) == recorded


def test_remeasure_replaces_wrong_measures(run_copy: tuple[Path, dict]) -> None:
    exp, recorded = run_copy
    conn = sqlite3.connect(exp / DB_FILE)
    conn.execute("UPDATE region_costs SET corrected_voxels = corrected_voxels + 5, strokes = 0")
    conn.commit()
    conn.close()
    results = remeasure_experiment(exp, force=True, backend_factory=CountingFactory())
    assert _rows(exp) == recorded
    wrong = results[1].before
    assert (
        wrong is not None and wrong[1] == 0 and f"recorded before: {wrong[0]} corrected voxels, 0" in results[1].line()
    )


def test_a_missing_model_is_named_and_nothing_changes(run_copy: tuple[Path, dict]) -> None:
    exp, _ = run_copy
    _delete_costs(exp, (0, 2))
    before = _rows(exp)
    model = exp / "rounds" / "001" / "model"
    shutil.move(model, exp / "elsewhere")
    with pytest.raises(ExperimentError) as info:
        remeasure_experiment(exp, backend_factory=CountingFactory())
    message = str(info.value)
    assert str(model) in message and "model of round 1" in message and "nothing was changed" in message
    assert _rows(exp) == before  # round 0 needs no model, but nothing is measured before the check


def test_a_running_experiment_is_refused(run_copy: tuple[Path, dict]) -> None:
    exp, _ = run_copy
    _delete_costs(exp)
    with lock_held_by_another_process(exp) as holder:
        with pytest.raises(ExperimentLockedError) as info:
            remeasure_experiment(exp, backend_factory=CountingFactory())
        assert str(exp) in str(info.value) and str(holder.pid) in str(info.value) and "in use" in str(info.value)
        result = CliRunner().invoke(app, ["remeasure", str(exp)])
        assert result.exit_code == 1 and "in use by process" in result.output
    assert _rows(exp) == {}


def test_cli_prints_a_line_per_round(run_copy: tuple[Path, dict]) -> None:
    """Round 0 is measured against background, so the command line (nnU-Net backend) needs no model for it."""
    exp, recorded = run_copy
    _delete_costs(exp, (0,))
    result = CliRunner().invoke(app, ["remeasure", str(exp)])
    assert result.exit_code == 0, result.output
    sums = _sums(recorded)
    assert f"round 0: 4 regions, {sums[0][0]} corrected voxels, {sums[0][1]} strokes (against background" in (
        result.output
    )
    assert f"round 2: 4 regions, {sums[2][0]} corrected voxels, {sums[2][1]} strokes (already measured" in (
        result.output
    )
    assert "1 of 3 rounds measured, 2 skipped" in result.output
    assert _rows(exp) == recorded
    result = CliRunner().invoke(app, ["remeasure", str(exp.parent / "nope")])
    assert result.exit_code == 1 and "is not an alseg experiment" in result.output


# --------------------------------------------------------------------------- people
def test_human_experiment_is_measured_from_its_imported_files(_synthetic_template: Path, tmp_path: Path) -> None:
    """Labels imported by two annotators against the prefill of the work packages: remeasured from the imported
    copies, the numbers are the import's; the annotator and import are kept (``unknown`` once the rows are
    gone)."""
    exp = tmp_path / "human"
    cfg = make_config(_synthetic_template, strategy="entropy", oracle="human", rounds=ROUNDS)
    factory = CountingFactory()
    run_experiment(cfg, exp, factory)
    for r in range(2):
        annotate(exp, r, tmp_path / f"labels_{r}")
        import_labels(exp, tmp_path / f"labels_{r}", annotator=("ana", "bo")[r], minutes=10.0 + r)
        advance_experiment(exp, backend_factory=factory)
    recorded = _rows(exp)
    assert {rec[0] for rec in recorded.values()} == {0, 1}
    assert {rec[3] for rec in recorded.values() if rec[0] == 1} == {"model"}
    assert _sums(recorded)[1][0] > 0  # the annotator returned the ground truth; the prefill was flipped

    forced = remeasure_experiment(exp, force=True, backend_factory=CountingFactory())
    assert [m.round_index for m in forced] == [0, 1] and _rows(exp) == recorded

    _delete_costs(exp)
    again = CountingFactory()
    results = remeasure_experiment(exp, backend_factory=again)
    assert again.predicted == []  # from the files alone
    rows = _rows(exp)
    assert {rid: rec[:4] for rid, rec in rows.items()} == {rid: rec[:4] for rid, rec in recorded.items()}
    assert {rec[4] for rec in rows.values()} == {"unknown"} and {rec[5] for rec in rows.values()} == {None}
    assert [(m.corrected_voxels, m.strokes) for m in results] == [_sums(recorded)[r] for r in (0, 1)]

    # a package whose prefill file is gone: that case's regions are measured against background, with a warning
    prefill = sorted((exp / "rounds" / "001" / "to_annotate" / "prefill").iterdir())[0]
    prefill.unlink()
    warned = remeasure_experiment(exp, force=True, backend_factory=CountingFactory())[1]
    case_id = prefill.name.removesuffix(".nii.gz")
    kinds = ("model", "none") if _cases_of(exp, 1) - {case_id} else ("none",)
    assert warned.prefill == kinds and len(warned.warnings) == 1 and str(prefill) in warned.warnings[0]
    conn = sqlite3.connect(exp / DB_FILE)
    fg = dict(conn.execute("SELECT id, fg_voxels FROM regions WHERE round = 1 AND case_id = ?", (case_id,)).fetchall())
    conn.close()
    rows = _rows(exp)
    assert fg and all(rows[rid][1] == sum(json.loads(f).values()) and rows[rid][3] == "none" for rid, f in fg.items())


def test_human_experiment_with_a_missing_imported_file(_synthetic_template: Path, tmp_path: Path) -> None:
    exp = tmp_path / "human"
    run_experiment(make_config(_synthetic_template, strategy="entropy", oracle="human"), exp, CountingFactory())
    annotate(exp, 0, tmp_path / "labels_0")
    import_labels(exp, tmp_path / "labels_0", annotator="ana")
    _delete_costs(exp)
    imported = sorted((exp / "rounds" / "000" / "imported").iterdir())
    imported[0].unlink()
    with pytest.raises(ExperimentError) as info:
        remeasure_experiment(exp, backend_factory=CountingFactory())
    assert str(imported[0]) in str(info.value) and "imported label file of round 0" in str(info.value)
    assert _rows(exp) == {}
