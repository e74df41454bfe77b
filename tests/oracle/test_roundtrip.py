"""The annotation round trip: ``run``/``query`` export a work package, a script plays the annotator by copying the
ground truth into the requested regions (and some voxels outside them), ``import`` records the files, and the next
round trains on exactly those labels. Fake backend on synthetic data; one real nnU-Net round trip on Hippocampus."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from annotator import annotate
from typer.testing import CliRunner

from alseg.cli import app
from alseg.config import ConfigError, load_config
from alseg.data.dataset import load_dataset
from alseg.data.regions import Box, annotated_mask
from alseg.errors import ExperimentError
from alseg.loop.drivers import advance_experiment, run_experiment
from alseg.loop.status import experiment_status
from alseg.oracle.importer import AnnotationImportError, import_labels
from alseg.oracle.package import index_to_world
from alseg.store.layout import DB_FILE, KILL_ENV
from alseg.store.state import ExperimentLockedError, ExperimentState
from conftest import RecordingFactory, lock_held_by_another_process, make_config, write_config
from fake_backend import make_fake_backend, read_model

ROUNDS, QUERY = 3, 4
IGNORE = 3
N_OUTSIDE = 5


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _human_cfg(dataset: Path, **overrides: Any) -> Any:
    return make_config(dataset, **{"strategy": "entropy", "oracle": "human", **overrides})


@pytest.fixture(scope="module")
def round_trip(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A whole human-oracle experiment: run, then per round annotate / import / query. Records what it saw."""
    os.environ.pop(KILL_ENV, None)
    root = tmp_path_factory.mktemp("round_trip")
    exp = root / "exp"
    factory = RecordingFactory()
    run_experiment(_human_cfg(_synthetic_template), exp, factory)
    assert not factory.calls, "round 0 of the human oracle needs no model"
    reports, waiting, labels = [], [], []
    for r in range(ROUNDS):
        folder = root / f"labels_{r}"
        labels.append(annotate(exp, r, folder, n_outside=N_OUTSIDE, seed=r))
        reports.append(import_labels(exp, folder))
        waiting.append(advance_experiment(exp, backend_factory=factory))
    return {"exp": exp, "reports": reports, "waiting": waiting, "labels": labels, "factory": factory}


def test_work_package(round_trip: dict[str, Any]) -> None:
    exp = round_trip["exp"]
    ds = load_dataset(load_config(exp / "config.yaml").dataset)
    st = ExperimentState(exp / DB_FILE)
    try:
        for r in range(ROUNDS):
            package = exp / "rounds" / f"{r:03d}" / "to_annotate"
            manifest = json.loads((package / "manifest.json").read_text())
            regions = st.regions(round_index=r)
            assert sorted(e["region_id"] for e in manifest["regions"]) == [g.id for g in regions]
            assert manifest["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
            with open(package / "manifest.csv") as f:
                rows = f.read().splitlines()
            assert rows[0].startswith("region_id,round,case_id,mask_value,start,size")
            assert len(rows) == 1 + len(regions)
            by_id = {g.id: g for g in regions}
            for case in manifest["cases"]:
                cid = case["case_id"]
                img = sitk.ReadImage(str(package / case["images"][0]))
                assert (package / case["images"][0]).resolve() == ds.image_files(cid)[0].resolve()
                mask_img = sitk.ReadImage(str(package / case["mask"]))
                for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
                    assert getattr(mask_img, attr)() == getattr(img, attr)()
                mask = sitk.GetArrayFromImage(mask_img)
                expected = np.zeros_like(mask)
                entries = [e for e in manifest["regions"] if e["case_id"] == cid]
                for e in entries:
                    box = by_id[e["region_id"]].region.box
                    assert (tuple(e["start"]), tuple(e["size"])) == (box.start, box.size)
                    expected[box.slices()] = e["mask_value"]
                    # world coordinates: SimpleITK's index order is x, y, z
                    first = img.TransformIndexToPhysicalPoint([int(v) for v in e["index_min_xyz"]])
                    last = img.TransformIndexToPhysicalPoint([int(v) for v in e["index_max_xyz"]])
                    np.testing.assert_allclose(e["world_min_lps_mm"], np.minimum(first, last), atol=1e-3)
                    np.testing.assert_allclose(e["world_max_lps_mm"], np.maximum(first, last), atol=1e-3)
                    assert e["index_min_xyz"] == list(box.start[::-1])
                np.testing.assert_array_equal(mask, expected)
                assert sorted(case["regions"]) == sorted(e["region_id"] for e in entries)
    finally:
        st.close()


def test_world_coordinates_follow_an_oblique_direction() -> None:
    from alseg.data.dataset import Geometry

    img = sitk.Image([7, 6, 5], sitk.sitkUInt8)
    img.SetSpacing((0.5, 1.5, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    geo = Geometry.from_sitk(img)
    for index_zyx in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        want = img.TransformIndexToPhysicalPoint([int(v) for v in index_zyx[::-1]])
        np.testing.assert_allclose(index_to_world(geo, index_zyx), want, atol=1e-9)


def test_import_report_and_idempotence(round_trip: dict[str, Any]) -> None:
    exp = round_trip["exp"]
    for r, report in enumerate(round_trip["reports"]):
        assert report.round_index == r
        assert {i["case_id"] for i in report.imported} == set(round_trip["labels"][r])
        assert not report.open_regions
        outside = [w for w in report.warnings if "outside its requested regions" in w]
        assert len(outside) == len(round_trip["labels"][r])
        for w in outside:
            assert f"{N_OUTSIDE} labelled voxels outside" in w and "ignored" in w
        for w in set(report.warnings) - set(outside):  # the only other warning: a region left all background
            assert "is all background (0); imported as background" in w
    # importing the same files again changes nothing
    st = ExperimentState(exp / DB_FILE)
    before = sorted(st.conn.iterdump())
    st.close()
    for r in range(ROUNDS):
        report = import_labels(exp, Path(next(iter(round_trip["labels"][r].values()))).parent)
        assert not report.changed
    st = ExperimentState(exp / DB_FILE)
    assert sorted(st.conn.iterdump()) == before
    st.close()


def test_next_round_trains_on_exactly_the_imported_labels(round_trip: dict[str, Any]) -> None:
    exp = round_trip["exp"]
    ds = load_dataset(load_config(exp / "config.yaml").dataset)
    st = ExperimentState(exp / DB_FILE)
    try:
        for r in range(ROUNDS):
            model = read_model(exp / "rounds" / f"{r:03d}" / "model")
            boxes: dict[str, list[Box]] = defaultdict(list)
            for g in st.regions(max_round=r):
                assert g.status == "annotated"
                boxes[g.region.case_id].append(g.region.box)
            assert set(model["cases"]) == set(boxes)
            for cid, rec in model["cases"].items():
                part = _read(Path(rec["label"]))
                mask = annotated_mask(part.shape, boxes[cid])
                # the annotator copied the ground truth into the regions (stray voxels outside are ignored)
                np.testing.assert_array_equal(part[mask], ds.read_label(cid)[mask])
                assert np.all(part[~mask] == IGNORE)
                # and it is what the imported files say inside the regions
                for g in st.regions(max_round=r):
                    if g.region.case_id == cid:
                        imported = _read(exp / str(g.annotated_by))
                        np.testing.assert_array_equal(part[g.region.box.slices()], imported[g.region.box.slices()])
        files = st.imported_files()
        assert len(files) == sum(len(x) for x in round_trip["labels"])
        for f in files:
            stored = exp / f["path"]
            assert stored.is_file() and f["replaced_by"] is None and f["n_outside"] == N_OUTSIDE
            import hashlib

            assert hashlib.sha256(stored.read_bytes()).hexdigest() == f["sha256"]
    finally:
        st.close()
    assert round_trip["waiting"][-1] is None
    for w in round_trip["waiting"][:-1]:
        assert w is not None and w.exported_now


def test_status_shows_every_region_done_by_its_file(round_trip: dict[str, Any]) -> None:
    exp = round_trip["exp"]
    status = experiment_status(exp)
    assert status["complete"] and status["oracle"] == "human"
    ann = status["annotation"]
    assert ann["waiting_round"] is None
    assert len(ann["regions"]) == ROUNDS * QUERY
    for row in ann["regions"]:
        assert row["state"] == ("done (all background)" if row["all_background"] else "done")
        assert row["source"] == str(round_trip["labels"][row["round"]][row["case_id"]].resolve())
        assert row["file"].startswith(f"rounds/{row['round']:03d}/imported/{row['case_id']}.")
    for row in status["rounds"]:
        assert row["dice_mean"] is not None and row["annotated_fg_voxels"] > 0
    result = CliRunner().invoke(app, ["status", str(exp)])
    assert result.exit_code == 0, result.output
    assert "annotation: 12 done" in " ".join(result.output.split())


# --------------------------------------------------------------------------- open regions, --allow-open, --replace
@pytest.fixture
def waiting_exp(_synthetic_template: Path, tmp_path: Path) -> Path:
    exp = tmp_path / "exp"
    run_experiment(_human_cfg(_synthetic_template), exp, RecordingFactory())
    return exp


def _snapshot(exp: Path) -> tuple[dict[str, str], list[str]]:
    import hashlib

    files = {
        str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(exp.rglob("*"))
        if p.is_file() and p.name not in (".lock", "alseg.log") and not p.name.startswith(DB_FILE)
    }
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        return files, sorted(conn.iterdump())
    finally:
        conn.close()


def test_open_regions_stay_open_and_query_refuses(waiting_exp: Path, tmp_path: Path) -> None:
    exp = waiting_exp
    manifest = json.loads((exp / "rounds/000/to_annotate/manifest.json").read_text())
    cases = [c["case_id"] for c in manifest["cases"]]
    labelled, missing = cases[:-1], cases[-1]
    annotate(exp, 0, tmp_path / "l1", cases=labelled)
    report = import_labels(exp, tmp_path / "l1")
    assert [cid for _, cid in report.open_regions] == [missing] * len(manifest["cases"][-1]["regions"])
    rows = experiment_status(exp)["annotation"]["regions"]
    assert {r["case_id"] for r in rows if r["state"] == "waiting"} == {missing}
    before = _snapshot(exp)
    with pytest.raises(ExperimentError, match=r"round 0: 1 of 4 regions are still open: .*--allow-open") as info:
        advance_experiment(exp, backend_factory=make_fake_backend)
    assert missing in str(info.value)
    assert _snapshot(exp) == before
    # CLI: the same refusal, exit code 1
    result = CliRunner().invoke(app, ["query", str(exp)])
    assert result.exit_code == 1 and "still open" in result.output
    # the missing case comes later: only it is imported
    annotate(exp, 0, tmp_path / "l2", cases=[missing])
    report = import_labels(exp, tmp_path / "l2")
    assert [i["case_id"] for i in report.imported] == [missing] and not report.open_regions
    assert advance_experiment(exp, backend_factory=make_fake_backend) is not None


def test_allow_open_trains_on_the_labelled_regions_and_closes_the_rest(waiting_exp: Path, tmp_path: Path) -> None:
    exp = waiting_exp
    manifest = json.loads((exp / "rounds/000/to_annotate/manifest.json").read_text())
    cases = [c["case_id"] for c in manifest["cases"]]
    annotate(exp, 0, tmp_path / "l1", cases=cases[:2])
    import_labels(exp, tmp_path / "l1")
    waiting = advance_experiment(exp, allow_open=True, backend_factory=make_fake_backend)
    assert waiting is not None and waiting.round_index == 1
    model = read_model(exp / "rounds/000/model")
    assert sorted(model["cases"]) == sorted(cases[:2])
    rows = experiment_status(exp)["annotation"]["regions"]
    closed = {r["case_id"] for r in rows if r["state"] == "closed unlabelled"}
    assert closed == set(cases[2:])
    # a late file for a closed region is no longer accepted (unless its case is in the new round too)
    in_round_1 = {r["case_id"] for r in rows if r["round"] == 1}
    late = [c for c in cases[2:] if c not in in_round_1]
    if late:
        annotate(exp, 0, tmp_path / "late", cases=late)
        with pytest.raises(AnnotationImportError, match="is not in the round's work package"):
            import_labels(exp, tmp_path / "late")


def test_changed_file_needs_replace_and_keeps_the_old_one(waiting_exp: Path, tmp_path: Path) -> None:
    exp = waiting_exp
    files = annotate(exp, 0, tmp_path / "labels")
    import_labels(exp, tmp_path / "labels")
    cid, path = next(iter(files.items()))
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    mask = _read(exp / "rounds/000/to_annotate/masks" / f"{cid}_regions.nii.gz") > 0
    arr[mask] = 2  # the annotator changes their mind
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, str(path), useCompression=True)
    with pytest.raises(AnnotationImportError, match="pass --replace"):
        import_labels(exp, tmp_path / "labels")
    report = import_labels(exp, tmp_path / "labels", replace=True)
    assert [i["case_id"] for i in report.imported] == [cid] and report.imported[0]["replaced"]
    assert sorted(report.unchanged) == sorted(c for c in files if c != cid)
    st = ExperimentState(exp / DB_FILE)
    rows = [f for f in st.imported_files() if f["case_id"] == cid]
    st.close()
    assert len(rows) == 2 and rows[0]["replaced_by"] == rows[1]["id"] and rows[1]["replaced_by"] is None
    assert (exp / rows[0]["path"]).is_file() and (exp / rows[1]["path"]).is_file()
    advance_experiment(exp, backend_factory=make_fake_backend)
    label = _read(exp / "rounds/000/labels" / f"{cid}.nii.gz")
    assert np.all(label[mask] == 2)


def test_a_second_process_is_refused(waiting_exp: Path, tmp_path: Path) -> None:
    annotate(waiting_exp, 0, tmp_path / "labels")
    with lock_held_by_another_process(waiting_exp):
        before = _snapshot(waiting_exp)
        with pytest.raises(ExperimentLockedError, match="in use by process"):
            import_labels(waiting_exp, tmp_path / "labels")
        with pytest.raises(ExperimentLockedError, match="in use by process"):
            advance_experiment(waiting_exp, backend_factory=make_fake_backend)
        assert _snapshot(waiting_exp) == before


# --------------------------------------------------------------------------- datasets without ground truth
def test_images_only_dataset_starts_in_annotation_mode(_synthetic_template: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(_synthetic_template, ds)
    shutil.rmtree(ds / "labelsTr")
    meta = json.loads((ds / "dataset.json").read_text())
    meta["training"] = []  # the cases come from imagesTr
    (ds / "dataset.json").write_text(json.dumps(meta))
    exp = tmp_path / "exp"
    factory = RecordingFactory()
    # no oracle key: a dataset without labels is annotated by people (prefill and stop set predicted from images)
    cfg_path = write_config(tmp_path / "cfg.yaml", ds, strategy="random", rounds=2)
    result = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(exp)])
    assert result.exit_code == 0, result.output
    assert "wait for labels" in " ".join(result.output.split())
    cfg = load_config(exp / "config.yaml")
    assert cfg.oracle == "human"
    st = ExperimentState(exp / DB_FILE)
    pool, test = st.split()
    assert len(pool) == 8 and test == [] and len(st.regions(round_index=0)) == QUERY
    st.close()
    # the annotator draws labels by hand (here: label 1 in the first half of each box)
    manifest = json.loads((exp / "rounds/000/to_annotate/manifest.json").read_text())
    labels = tmp_path / "labels"
    labels.mkdir()
    for case in manifest["cases"]:
        mask_img = sitk.ReadImage(str(exp / "rounds/000/to_annotate" / case["mask"]))
        lab = (sitk.GetArrayFromImage(mask_img) > 0).astype(np.uint8)
        lab[: lab.shape[0] // 2] = 0
        out = sitk.GetImageFromArray(lab)
        out.CopyInformation(mask_img)
        sitk.WriteImage(out, str(labels / f"{case['case_id']}.nii.gz"))
    result = CliRunner().invoke(app, ["import", str(exp), str(labels)])
    assert result.exit_code == 0, result.output
    assert "every region is labelled" in result.output
    waiting = advance_experiment(exp, backend_factory=factory)
    assert waiting is not None and waiting.round_index == 1
    status = experiment_status(exp)
    assert status["rounds"][0]["stages_done"] == ["query", "annotate", "train", "evaluate"]
    assert status["rounds"][0]["dice_mean"] is None  # nothing to evaluate on


def test_partly_labelled_dataset_holds_out_labelled_cases(_synthetic_template: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(_synthetic_template, ds)
    for i in range(5):
        (ds / "labelsTr" / f"syn_{i:03d}.nii.gz").unlink()
    exp = tmp_path / "exp"
    with pytest.raises(Exception, match="label file of case"):  # simulated needs every label
        run_experiment(make_config(ds, strategy="entropy"), exp, RecordingFactory())
    run_experiment(_human_cfg(ds), exp, RecordingFactory())
    st = ExperimentState(exp / DB_FILE)
    pool, test = st.split()
    st.close()
    assert test and set(test) <= {"syn_005", "syn_006", "syn_007"}
    assert set(pool) == {f"syn_{i:03d}" for i in range(8)} - set(test)


def test_ground_truth_strategies_are_refused_for_people(_synthetic_template: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reads the ground truth"):
        run_experiment(_human_cfg(_synthetic_template, strategy="random_fg33"), tmp_path / "exp", RecordingFactory())
    assert not (tmp_path / "exp").exists()


def test_query_and_import_refuse_a_simulated_experiment(_synthetic_template: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    run_experiment(make_config(_synthetic_template, rounds=1), exp, RecordingFactory())
    with pytest.raises(ExperimentError, match="oracle: simulated"):
        advance_experiment(exp, backend_factory=make_fake_backend)
    with pytest.raises(ExperimentError, match="oracle: simulated"):
        import_labels(exp, tmp_path)


# --------------------------------------------------------------------------- starting regions from a file
@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_starting_regions_from_a_file(_synthetic_template: Path, tmp_path: Path, fmt: str) -> None:
    regions = [("syn_000", (0, 0, 0), (8, 8, 8)), ("syn_000", (8, 0, 0), None), ("syn_003", (4, 5, 6), (6, 6, 6))]
    path = tmp_path / f"start.{fmt}"
    if fmt == "json":
        rows = [{"case_id": c, "start": list(s), **({"size": list(z)} if z else {})} for c, s, z in regions]
        path.write_text(json.dumps({"regions": rows}))
    else:
        lines = ["case_id,start,size"] + [
            f"{c},{' '.join(map(str, s))},{' '.join(map(str, z or ()))}" for c, s, z in regions
        ]
        path.write_text("\n".join(lines) + "\n")
    exp = tmp_path / "exp"
    cfg_path = write_config(tmp_path / "cfg.yaml", _synthetic_template, strategy="entropy", oracle="human")
    data = yaml.safe_load(cfg_path.read_text())
    data["starting_regions"] = path.name  # relative to the config file
    cfg_path.write_text(yaml.safe_dump(data))
    run_experiment(load_config(cfg_path), exp, RecordingFactory())
    st = ExperimentState(exp / DB_FILE)
    got = [(g.region.case_id, g.region.box.start, g.region.box.size) for g in st.regions(round_index=0)]
    st.close()
    assert got == [(c, s, z or (8, 8, 8)) for c, s, z in regions]
    run_experiment(load_config(cfg_path), exp, RecordingFactory())  # resuming with the same config is fine


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"case_id": "syn_000", "start": [0, 0, 0]}, {"case_id": "syn_000", "start": [4, 4, 4]}], "overlaps"),
        ([{"case_id": "syn_000", "start": [20, 0, 0]}], "lies outside"),
        ([{"case_id": "nope", "start": [0, 0, 0]}], "not a case of the dataset"),
        ([{"case_id": "syn_000", "start": [0, 0]}], "must have 3 entries"),
        ([{"case_id": "syn_000", "start": [0.5, 0, 0]}], "expected integers"),
        ([], "no regions"),
    ],
)
def test_bad_starting_regions_are_refused(
    _synthetic_template: Path, tmp_path: Path, rows: list[dict[str, Any]], message: str
) -> None:
    path = tmp_path / "start.json"
    path.write_text(json.dumps(rows))
    cfg = _human_cfg(_synthetic_template, starting_regions=str(path))
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, tmp_path / "exp", RecordingFactory())
    assert not (tmp_path / "exp").exists()


# --------------------------------------------------------------------------- real nnU-Net
@pytest.mark.nnunet
def test_round_trip_with_real_nnunet(demo_cases: Any, tmp_path: Path) -> None:
    """Two rounds on 8 Hippocampus cases with the real backend, through the command line."""
    dataset = demo_cases(8)
    cfg = {
        "dataset": str(dataset),
        "strategy": "entropy",
        "oracle": "human",
        "seed": 3,
        "rounds": 2,
        "query_size": 4,
        "profile": "cpu",
        "device": "cpu",
        "num_threads": 2,
        "schedule": {"epochs": 1, "iterations_per_epoch": 4, "warm_start": True},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    exp = tmp_path / "exp"

    def alseg(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "alseg.cli", *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    out = alseg("run", str(cfg_path), "--out", str(exp))
    assert "wait for labels" in " ".join(out.stderr.split())
    for r in range(2):
        files = annotate(exp, r, tmp_path / f"labels_{r}", n_outside=10, seed=r)
        out = alseg("import", str(exp), str(tmp_path / f"labels_{r}"))
        assert "every region is labelled" in out.stdout
        assert "10 labelled voxels outside" in out.stderr
        alseg("query", str(exp))
        assert (exp / "rounds" / f"{r:03d}" / "model" / "fold_all" / "checkpoint_final.pth").is_file()
        # nnU-Net trained on exactly the imported labels: the training labels it got are the partial labels
        ds = load_dataset(dataset)
        for cid in files:
            part = _read(exp / "rounds" / f"{r:03d}" / "labels" / f"{cid}.nii.gz")
            gt = ds.read_label(cid)
            known = part != IGNORE
            np.testing.assert_array_equal(part[known], gt[known])
    status = json.loads(alseg("status", str(exp), "--json").stdout)
    assert status["complete"] and all(r["state"] == "done" for r in status["annotation"]["regions"])
    assert status["rounds"][-1]["dice_mean"] is not None
