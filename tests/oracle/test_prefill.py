"""Corrective pre-annotation and the cost measures: the work package's ``prefill/{case}.nii.gz`` (the previous
round's model prediction inside the round's regions), corrected voxels and correction strokes per region, recorded
at import (with the annotator and minutes) and in simulation alike, and their sums in ``alseg status --json``.

The backend here predicts the ground truth except at known voxels (:func:`predicted_label`), laid out so that the
corrected voxels and strokes of any box can be counted by construction."""

from __future__ import annotations

import getpass
import json
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from annotator import annotate
from typer.testing import CliRunner

from alseg.cli import app
from alseg.config import ExperimentConfig, load_config
from alseg.data.dataset import Dataset, load_dataset
from alseg.data.regions import Box
from alseg.loop.drivers import advance_experiment, run_experiment
from alseg.loop.status import experiment_status
from alseg.oracle.importer import AnnotationImportError, import_labels
from alseg.store.layout import DB_FILE, KILL_ENV
from alseg.store.state import ExperimentState, StoredRegion
from conftest import SYN_LABELS, make_config, write_dataset_json, write_volume
from fake_backend import FakeBackend

TILE = 6  # the error pattern repeats every TILE voxels along each axis
N_CHANNELS = 4  # one more than the declared labels 0, 1, 2: the model may predict an undeclared value 3


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


# --------------------------------------------------------------------------- a backend with known errors
def _pattern(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three sets of voxels, no two of them 26- (8-) adjacent across sets or tiles:

    A: every index = 0 (mod TILE), single voxels; B: pairs along the last axis, first axes = 3 and last axis in
    {3, 4} (mod TILE); C: first axis = 3, the others = 0 (mod TILE), single voxels."""
    idx = [i % TILE for i in np.indices(shape)]
    a = np.logical_and.reduce([i == 0 for i in idx])
    b = np.logical_and.reduce([i == 3 for i in idx[:-1]] + [(idx[-1] == 3) | (idx[-1] == 4)])
    c = np.logical_and.reduce([idx[0] == 3] + [i == 0 for i in idx[1:]])
    return a, b, c


def predicted_label(gt: np.ndarray) -> np.ndarray:
    """The model's prediction: the ground truth, except (gt + 1) % 3 on A, (gt + 2) % 3 on B and 3 on C."""
    a, b, c = _pattern(gt.shape)
    pred = gt.astype(np.int64).copy()
    pred[a] = (gt[a].astype(np.int64) + 1) % 3
    pred[b] = (gt[b].astype(np.int64) + 2) % 3
    pred[c] = 3
    return pred


def expected_cost(gt: np.ndarray, box: Box) -> tuple[int, int]:
    """Corrected voxels and strokes of ``box`` against the prefill of :func:`predicted_label`, by construction:
    every A voxel and every B voxel differs from the ground truth; a C voxel becomes 0 in the prefill (3 is not a
    declared label) and differs where the ground truth is foreground. A and C voxels are one stroke each, a B
    pair one stroke (even when the box cuts it)."""
    a, b, c = (m[box.slices()] for m in _pattern(gt.shape))
    c_fg = c & (gt[box.slices()] != 0)
    b_idx = np.argwhere(b) + np.asarray(box.start)
    b_groups = {(*map(int, v[:-1]), int(v[-1]) // TILE) for v in b_idx}
    n_a, n_b, n_c = int(a.sum()), int(b.sum()), int(c_fg.sum())
    return n_a + n_b + n_c, n_a + len(b_groups) + n_c


class ErrBackend(FakeBackend):
    """The fake backend, predicting :func:`predicted_label` (four channels)."""

    def probabilities(self, case_id: str, model_seed: int, n_samples: int = 1) -> np.ndarray:
        pred = predicted_label(self.ds.read_label(case_id))
        onehot = np.moveaxis(np.eye(N_CHANNELS, dtype=np.float32)[pred], -1, 0)
        return np.repeat((0.7 * onehot + 0.3 / N_CHANNELS)[None], n_samples, axis=0)


def err_backend(cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> ErrBackend:
    return ErrBackend(cfg, ds, exp_dir)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _costs(exp: Path) -> tuple[list[StoredRegion], dict[int, dict[str, Any]]]:
    st = ExperimentState(exp / DB_FILE)
    try:
        return st.regions(), st.region_costs()
    finally:
        st.close()


def _package(exp: Path, r: int) -> Path:
    return exp / "rounds" / f"{r:03d}" / "to_annotate"


def _human_to_round(dataset: Path, root: Path, rounds_done: int, **overrides: Any) -> Path:
    """A human-oracle experiment whose rounds ``0 .. rounds_done - 1`` are labelled (the ground truth in the boxes)
    and trained; round ``rounds_done`` waits for labels."""
    exp = root / "exp"
    cfg = make_config(dataset, **{"strategy": "entropy", "oracle": "human", **overrides})
    run_experiment(cfg, exp, err_backend)
    for r in range(rounds_done):
        annotate(exp, r, root / f"labels_{r}")
        import_labels(exp, root / f"labels_{r}", annotator="setup")
        advance_experiment(exp, backend_factory=err_backend)
    return exp


# --------------------------------------------------------------------------- the work package's prefill
@pytest.fixture(scope="module")
def human_two_rounds(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _human_to_round(_synthetic_template, tmp_path_factory.mktemp("prefill_human"), 2)


def test_round_0_has_no_prefill(human_two_rounds: Path) -> None:
    package = _package(human_two_rounds, 0)
    assert not (package / "prefill").exists()
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["prefill"] == "none" and manifest["prefill_model_round"] is None
    assert all(case["prefill"] is None for case in manifest["cases"])
    assert "prefill/" not in (package / "README.txt").read_text()


@pytest.mark.parametrize("r", [1, 2])
def test_prefill_is_the_previous_model_inside_the_rounds_regions(human_two_rounds: Path, r: int) -> None:
    exp = human_two_rounds
    ds = load_dataset(load_config(exp / "config.yaml").dataset)
    package = _package(exp, r)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["prefill"] == "model" and manifest["prefill_model_round"] == r - 1
    assert "prefill/{case}.nii.gz" in (package / "README.txt").read_text()
    regions, _ = _costs(exp)
    boxes: dict[str, list[Box]] = defaultdict(list)
    for g in regions:
        if g.round == r:
            boxes[g.region.case_id].append(g.region.box)
    assert sorted(p.name for p in (package / "prefill").iterdir()) == sorted(f"{c}.nii.gz" for c in boxes)
    for case in manifest["cases"]:
        cid = case["case_id"]
        assert case["prefill"] == f"prefill/{cid}.nii.gz"
        img = sitk.ReadImage(str(ds.image_files(cid)[0]))
        pre_img = sitk.ReadImage(str(package / case["prefill"]))
        for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(pre_img, attr)() == getattr(img, attr)()
        pre = sitk.GetArrayFromImage(pre_img)
        assert set(np.unique(pre).tolist()) <= {0, 1, 2}
        pred = predicted_label(ds.read_label(cid))
        inside = np.zeros(pre.shape, dtype=bool)
        for box in boxes[cid]:
            inside[box.slices()] = True
        assert np.all(pre[~inside] == 0)
        want = np.where(pred == 3, 0, pred)  # the undeclared value 3 becomes background
        np.testing.assert_array_equal(pre[inside], want[inside])
        assert np.any(pred[inside] == 3) or np.any(pred[inside] != ds.read_label(cid)[inside])


def test_prefill_false_writes_none(_synthetic_template: Path, tmp_path: Path) -> None:
    exp = _human_to_round(_synthetic_template, tmp_path, 1, prefill=False, rounds=2)
    package = _package(exp, 1)
    assert not (package / "prefill").exists()
    assert json.loads((package / "manifest.json").read_text())["prefill"] == "none"
    # the annotator starts from background: corrected voxels are the foreground voxels, strokes their pieces
    annotate(exp, 1, tmp_path / "labels_1")
    import_labels(exp, tmp_path / "labels_1")
    regions, costs = _costs(exp)
    ds = load_dataset(load_config(exp / "config.yaml").dataset)
    for g in regions:
        c = costs[g.id]
        assert c["prefill"] == "none"
        assert c["corrected_voxels"] == sum((g.fg_voxels or {}).values())
        assert c["strokes"] == _components(ds.read_label(g.region.case_id)[g.region.box.slices()] != 0)


def _components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask, structure=np.ones((3,) * mask.ndim))[1])


# --------------------------------------------------------------------------- a hand-made correction, 3D and 2D
def _write_like(path: Path, array: np.ndarray, like: Path) -> None:
    ref = sitk.ReadImage(str(like))
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.CopyInformation(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def _hand_made_import(exp: Path, tmp_path: Path, edits: list[tuple[int, ...]], kept: list[tuple[int, ...]]) -> Any:
    """Replace the prefill of the first region's case by a hand-made one (``kept``: voxels of label 2, offsets in
    the region, left as they are) and return labels that equal the prefills except at ``edits`` (offsets in that
    region): where the prefill is 0 the label is 1, elsewhere 0. The other cases' labels equal their prefills."""
    package = _package(exp, 1)
    regions = [g for g in _costs(exp)[0] if g.round == 1]
    first = regions[0]
    cid, start = first.region.case_id, np.asarray(first.region.box.start)
    prefill_file = package / "prefill" / f"{cid}.nii.gz"
    hand = np.zeros_like(_read(prefill_file))
    for off in kept:
        hand[tuple(start + off)] = 2
    for off in edits[-1:]:  # the last edit removes a voxel of the prefill
        hand[tuple(start + off)] = 1
    _write_like(prefill_file, hand, prefill_file)
    labels = tmp_path / "hand_labels"
    for case in json.loads((package / "manifest.json").read_text())["cases"]:
        pre = _read(package / case["prefill"])
        lab = pre.copy()
        if case["case_id"] == cid:
            for off in edits:
                v = tuple(start + off)
                lab[v] = 1 if pre[v] == 0 else 0
        _write_like(labels / f"{case['case_id']}.nii.gz", lab, package / case["prefill"])
    return labels, first, regions


def test_hand_made_correction_3d(_synthetic_template: Path, tmp_path: Path) -> None:
    exp = _human_to_round(_synthetic_template, tmp_path, 1, rounds=2)
    cube = [(z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)]  # 8 voxels, one stroke
    diagonal = [(4, 4, 4), (5, 5, 5)]  # touching at a corner only: one stroke with 26 neighbours, two with 6
    single = [(7, 0, 7)]  # the prefill has label 1 here; the annotator removes it
    kept = [(2, 6, 0), (3, 6, 0), (3, 7, 1)]  # prefill voxels the annotator keeps
    labels, first, regions = _hand_made_import(exp, tmp_path, cube + diagonal + single, kept)
    report = import_labels(exp, labels, annotator="carol", minutes=7.5)
    assert report.annotator == "carol" and report.minutes == 7.5
    _, costs = _costs(exp)
    assert costs[first.id] == {
        "corrected_voxels": 8 + 2 + 1,
        "strokes": 3,
        "prefill": "model",
        "annotator": "carol",
        "import_id": costs[first.id]["import_id"],
    }
    for g in regions[1:]:  # returned as prefilled: nothing corrected
        assert (costs[g.id]["corrected_voxels"], costs[g.id]["strokes"], costs[g.id]["prefill"]) == (0, 0, "model")


@pytest.fixture
def dataset_2d(tmp_path: Path) -> Path:
    root = tmp_path / "ds2d"
    training = []
    for i in range(8):
        lab = np.zeros((40, 36), dtype=np.uint8)
        lab[8 + i : 26, 6:18] = 1
        lab[8 + i : 26, 18:28] = 2
        img = (lab * 40.0 + np.random.default_rng(i).normal(100.0, 10.0, lab.shape)).astype(np.float32)
        write_volume(root / "imagesTr" / f"flat_{i:03d}.nii.gz", img, (0.8, 0.8))
        write_volume(root / "labelsTr" / f"flat_{i:03d}.nii.gz", lab, (0.8, 0.8))
        training.append({"image": f"./imagesTr/flat_{i:03d}.nii.gz", "label": f"./labelsTr/flat_{i:03d}.nii.gz"})
    write_dataset_json(root, training, SYN_LABELS, name="Flat")
    return root


def test_hand_made_correction_2d(dataset_2d: Path, tmp_path: Path) -> None:
    exp = _human_to_round(dataset_2d, tmp_path, 1, rounds=2, region_size=[8, 8])
    square = [(0, 0), (0, 1), (1, 0), (1, 1)]  # one stroke
    diagonal = [(3, 3), (4, 4)]  # touching at a corner: one stroke with 8 neighbours, two with 4
    single = [(7, 7)]
    labels, first, _ = _hand_made_import(exp, tmp_path, square + diagonal + single, kept=[(0, 6), (1, 6)])
    import_labels(exp, labels)
    _, costs = _costs(exp)
    assert (costs[first.id]["corrected_voxels"], costs[first.id]["strokes"]) == (4 + 2 + 1, 3)


# --------------------------------------------------------------------------- simulation
@pytest.fixture(scope="module")
def simulated_runs(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("prefill_sim")
    return {
        on: run_experiment(make_config(_synthetic_template, prefill=on), root / f"prefill_{on}", err_backend)
        for on in (True, False)
    }


def test_simulated_costs_are_counted_against_the_model(simulated_runs: dict[bool, Path]) -> None:
    exp = simulated_runs[True]
    ds = load_dataset(load_config(exp / "config.yaml").dataset)
    regions, costs = _costs(exp)
    assert len(regions) == 12 and set(costs) == {g.id for g in regions}
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for g in regions:
        gt = ds.read_label(g.region.case_id)
        c = costs[g.id]
        if g.round == 0:  # no model yet: against background
            want = (sum((g.fg_voxels or {}).values()), _components(gt[g.region.box.slices()] != 0), "none")
        else:
            want = (*expected_cost(gt, g.region.box), "model")
        assert (c["corrected_voxels"], c["strokes"], c["prefill"]) == want, g
        assert c["annotator"] == "simulated" and c["import_id"] is None
        sums[g.round][0] += want[0]
        sums[g.round][1] += want[1]
    assert all(sums[r][0] > 0 for r in (1, 2))
    rows = experiment_status(exp)["rounds"]
    for row in rows:
        r = row["round"]
        assert row["n_regions_measured"] == 4 * (r + 1)
        assert (row["corrected_voxels_added"], row["strokes_added"]) == tuple(sums[r])
        assert row["corrected_voxels"] == sum(sums[k][0] for k in range(r + 1))
        assert row["strokes"] == sum(sums[k][1] for k in range(r + 1))
    result = CliRunner().invoke(app, ["status", str(exp), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rounds"][-1]["corrected_voxels"] == rows[-1]["corrected_voxels"]


def test_simulated_prefill_changes_nothing_that_is_trained_on(simulated_runs: dict[bool, Path]) -> None:
    dumps = {}
    for on, exp in simulated_runs.items():
        conn = sqlite3.connect(exp / DB_FILE)
        try:
            dumps[on] = (
                conn.execute("SELECT round, case_id, sha256 FROM label_files ORDER BY round, case_id").fetchall(),
                conn.execute(
                    "SELECT round, case_id, box_start, box_size, fg_voxels FROM regions ORDER BY id"
                ).fetchall(),
            )
        finally:
            conn.close()
    assert dumps[True] == dumps[False] and len(dumps[True][0]) > 0
    regions, costs = _costs(simulated_runs[False])
    for g in regions:  # prefill off: every round against background
        assert costs[g.id]["prefill"] == "none"
        assert costs[g.id]["corrected_voxels"] == sum((g.fg_voxels or {}).values())


def test_correction_strokes_use_full_connectivity() -> None:
    from alseg.evaluation.correction import correction_cost, correction_strokes

    lab = np.zeros((3, 4, 4), dtype=np.uint8)
    lab[0, 0, 0] = lab[1, 1, 1] = 1  # corner neighbours: one stroke
    lab[2, 3, 3] = 2
    pre = np.zeros_like(lab)
    pre[2, 3, 3] = 2  # already right
    cost = correction_cost(lab, pre, Box((0, 0, 0), (3, 4, 4)), "model")
    assert (cost.corrected_voxels, cost.strokes) == (2, 1)
    assert correction_strokes(np.eye(4, dtype=bool)) == 1  # 2D: the diagonal is one 8-connected stroke
    with pytest.raises(ValueError, match="prefill must be one of"):
        correction_cost(lab, pre, Box((0, 0, 0), (1, 1, 1)), "maybe")


# --------------------------------------------------------------------------- annotators, minutes, status
def test_annotator_and_minutes(_synthetic_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = tmp_path / "exp"
    run_experiment(make_config(_synthetic_template, strategy="entropy", oracle="human", rounds=2), exp, err_backend)
    cases = [c["case_id"] for c in json.loads((_package(exp, 0) / "manifest.json").read_text())["cases"]]
    annotate(exp, 0, tmp_path / "a", cases=cases[:1])
    annotate(exp, 0, tmp_path / "b", cases=cases[1:2])
    annotate(exp, 0, tmp_path / "c", cases=cases[2:])
    monkeypatch.setattr(getpass, "getuser", lambda: "login-name")
    runner = CliRunner()

    def alseg(*args: str) -> Any:
        return runner.invoke(app, [*args])

    # a negative, infinite or non-numeric --minutes is refused before anything changes
    conn = sqlite3.connect(exp / DB_FILE)
    before = sorted(conn.iterdump())
    for bad in ("-1", "inf", "nan"):
        result = alseg("import", str(exp), str(tmp_path / "a"), f"--minutes={bad}")
        assert result.exit_code == 1, result.output
        assert "--minutes" in result.output and "a number >= 0" in result.output and "nothing imported" in result.output
    result = alseg("import", str(exp), str(tmp_path / "a"), "--annotator", "  ")
    assert result.exit_code == 1 and "--annotator" in result.output
    assert sorted(conn.iterdump()) == before
    conn.close()
    with pytest.raises(AnnotationImportError, match=r"--minutes -2: expected"):
        import_labels(exp, tmp_path / "a", minutes=-2)

    result = alseg("import", str(exp), str(tmp_path / "a"), "--annotator", "alice", "--minutes", "10")
    assert result.exit_code == 0, result.output
    assert "annotator: alice, 10 minutes" in result.output
    result = alseg("import", str(exp), str(tmp_path / "b"))  # default: the login name, no minutes
    assert result.exit_code == 0, result.output
    result = alseg("import", str(exp), str(tmp_path / "c"), "--annotator", "alice", "--minutes", "2.5")
    assert result.exit_code == 0, result.output
    result = alseg("import", str(exp), str(tmp_path / "c"), "--minutes", "4")  # nothing new: minutes not recorded
    assert result.exit_code == 0 and "--minutes not recorded" in result.output
    assert advance_experiment(exp, backend_factory=err_backend) is not None

    # a correction of round 0 by bob replaces the measures of the case's regions
    changed = cases[1]
    path = tmp_path / "b" / f"{changed}.nii.gz"
    arr = _read(path)
    mask = _read(_package(exp, 0) / "masks" / f"{changed}_regions.nii.gz") > 0
    arr[mask] = 2
    _write_like(tmp_path / "fix" / f"{changed}.nii.gz", arr, path)
    result = alseg("import", str(exp), str(tmp_path / "fix"), "--round", "0", "--replace", "--annotator", "bob")
    assert result.exit_code == 0, result.output

    regions, costs = _costs(exp)
    by_annotator: dict[str, list[StoredRegion]] = defaultdict(list)
    for g in regions:
        if g.round == 0:
            by_annotator[costs[g.id]["annotator"]].append(g)
    assert {g.region.case_id for g in by_annotator["alice"]} == {cases[0], *cases[2:]}
    assert {g.region.case_id for g in by_annotator["bob"]} == {changed}
    assert "login-name" not in by_annotator  # replaced by bob's correction
    for g in by_annotator["bob"]:  # round 0: no prefill, so every voxel set to 2 is corrected
        assert costs[g.id]["corrected_voxels"] == g.n_voxels and costs[g.id]["strokes"] == 1

    status = json.loads(alseg("status", str(exp), "--json").output)
    people = {a["annotator"]: a for a in status["annotation"]["annotators"]}
    assert set(people) == {"alice", "bob", "login-name"}
    alice, bob, login = people["alice"], people["bob"], people["login-name"]
    assert (alice["imports"], alice["minutes"], alice["imports_without_minutes"]) == (2, 12.5, 0)
    assert (bob["imports"], bob["minutes"], bob["imports_without_minutes"]) == (1, None, 1)
    assert (login["imports"], login["regions"], login["voxels"], login["minutes"]) == (1, 0, 0, None)
    for name, rs in by_annotator.items():
        e = people[name]
        assert e["regions"] == len(rs) and e["voxels"] == sum(g.n_voxels for g in rs)
        assert e["corrected_voxels"] == sum(costs[g.id]["corrected_voxels"] for g in rs)
        assert e["strokes"] == sum(costs[g.id]["strokes"] for g in rs)
    rows = {r["region_id"]: r for r in status["annotation"]["regions"]}
    for g in regions:
        if g.id in costs:
            assert rows[g.id]["annotator"] == costs[g.id]["annotator"]
            assert rows[g.id]["corrected_voxels"] == costs[g.id]["corrected_voxels"]
    text = alseg("status", str(exp)).output
    assert "annotators" in text and "alice" in text and "12.5" in text
