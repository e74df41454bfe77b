"""What an import means beyond the file checks: a region left all background (warned, flagged, refused with
``--strict``) and the correction of a finished round (``--round N --replace``): the earlier file kept, the regions
pointing to the new one, the next training on the corrected labels, the metrics kept and the report's note.
Fake backend on synthetic data; every expectation is computed here from the arrays written, not by alseg."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from annotator import annotate
from typer.testing import CliRunner

from alseg.cli import app
from alseg.loop.drivers import advance_experiment, run_experiment
from alseg.oracle.importer import AnnotationImportError, import_labels
from alseg.store.layout import DB_FILE, KILL_ENV
from alseg.store.state import ExperimentState
from conftest import RecordingFactory, make_config
from fake_backend import make_fake_backend, read_model

IGNORE = 3  # the ignore value of the synthetic dataset's training labels (labels 0, 1, 2)


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _write_like(array: np.ndarray, like: Path, out: Path) -> Path:
    ref = sitk.ReadImage(str(like))
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.CopyInformation(ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out), useCompression=True)
    return out


def _snapshot(exp: Path) -> tuple[dict[str, str], list[str]]:
    """Every file of the experiment (the log included) and the whole database."""
    files = {
        str(p.relative_to(exp)): _sha(p) if p.is_file() else "dir"
        for p in sorted(exp.rglob("*"))
        if p.name != ".lock" and not p.name.startswith(DB_FILE)
    }
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        return files, sorted(conn.iterdump())
    finally:
        conn.close()


def _manifest(exp: Path, r: int) -> dict[str, Any]:
    return json.loads((exp / "rounds" / f"{r:03d}" / "to_annotate" / "manifest.json").read_text())


def _box(entry: dict[str, Any]) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(entry["start"], entry["size"], strict=True))


def _human(dataset: Path, exp: Path, rounds: int) -> Path:
    cfg = make_config(dataset, strategy="entropy", oracle="human", rounds=rounds)
    run_experiment(cfg, exp, RecordingFactory())
    return exp


# --------------------------------------------------------------------------- regions left all background
def test_all_background_region_is_warned_flagged_and_refused_when_strict(
    _synthetic_template: Path, tmp_path: Path
) -> None:
    exp = _human(_synthetic_template, tmp_path / "exp", rounds=2)
    labels = tmp_path / "labels"
    files = annotate(exp, 0, labels)
    manifest = _manifest(exp, 0)
    # the annotator forgets the first region that has foreground in the ground truth: its box is left at 0
    forgotten = next(e for e in manifest["regions"] if np.any(_read(files[e["case_id"]])[_box(e)]))
    arr = _read(files[forgotten["case_id"]])
    arr[_box(forgotten)] = 0
    _write_like(arr, files[forgotten["case_id"]], files[forgotten["case_id"]])
    # the expected flags, from the files as written (the ground truth may leave other boxes empty too)
    empty = {e["region_id"] for e in manifest["regions"] if not np.any(_read(files[e["case_id"]])[_box(e)])}
    assert forgotten["region_id"] in empty
    case_of = {e["region_id"]: e["case_id"] for e in manifest["regions"]}

    # --strict refuses the file, naming case, region and file, and changes nothing
    before = _snapshot(exp)
    with pytest.raises(AnnotationImportError) as info:
        import_labels(exp, labels, strict=True)
    message = str(info.value)
    for rid in empty:
        path = files[case_of[rid]]
        assert f"{path}: region {rid} of case {case_of[rid]!r} (round 0) is all background (0)" in message
    assert "--strict refuses it" in message and message.startswith("nothing imported")
    assert _snapshot(exp) == before

    # without --strict: imported, with one warning per empty region in the report ...
    cli_exp = tmp_path / "cli_exp"
    shutil.copytree(exp, cli_exp, symlinks=True)
    report = import_labels(exp, labels)
    assert {i["case_id"] for i in report.imported} == set(files)
    warned = [w for w in report.warnings if "is all background (0)" in w]
    assert len(warned) == len(empty)
    for rid in empty:
        assert any(w.startswith(f"{files[case_of[rid]]}: region {rid} of case ") for w in warned)
    # ... in alseg.log, as WARNING lines ...
    log_lines = (exp / "alseg.log").read_text().splitlines()
    for rid in empty:
        hits = [ln for ln in log_lines if f"region {rid} of case" in ln and "all background" in ln]
        assert len(hits) == 1 and " WARNING " in hits[0]
    # ... and on the terminal of `alseg import`
    result = CliRunner().invoke(app, ["import", str(cli_exp), str(labels)])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"warning: {files[forgotten['case_id']]}: region {forgotten['region_id']} of case" in flat
    assert "import the file again with --replace" in flat

    # `alseg status`: flagged in --json and in the table
    result = CliRunner().invoke(app, ["status", str(exp), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["annotation"]["regions"]
    assert {r["region_id"] for r in rows if r["all_background"]} == empty
    for r in rows:
        assert r["state"] == ("done (all background)" if r["region_id"] in empty else "done")
    # the flag matches the recorded foreground counts
    st = ExperimentState(exp / DB_FILE)
    try:
        for g in st.regions(round_index=0):
            assert (g.id in empty) == (sum((g.fg_voxels or {}).values()) == 0)
    finally:
        st.close()
    table = " ".join(CliRunner().invoke(app, ["status", str(exp)], env={"COLUMNS": "300"}).output.split())
    assert "done (all background)" in table


# --------------------------------------------------------------------------- correcting a finished round
@pytest.fixture
def corrected(_synthetic_template: Path, tmp_path: Path) -> dict[str, Any]:
    """Round 0 labelled, imported and trained; round 1 queried and waiting. Then a file correcting round 0's labels
    of a case that round 1 does not ask for (every voxel of its round-0 boxes relabelled 2)."""
    os.environ.pop(KILL_ENV, None)
    exp = _human(_synthetic_template, tmp_path / "exp", rounds=2)
    originals = annotate(exp, 0, tmp_path / "labels0")
    import_labels(exp, tmp_path / "labels0")
    assert advance_experiment(exp, backend_factory=make_fake_backend) is not None
    m0, m1 = _manifest(exp, 0), _manifest(exp, 1)
    in_round_1 = {c["case_id"] for c in m1["cases"]}
    cid = next(c["case_id"] for c in m0["cases"] if c["case_id"] not in in_round_1)
    boxes = [_box(e) for e in m0["regions"] if e["case_id"] == cid]
    fixed = _read(originals[cid])
    for sl in boxes:
        fixed[sl] = 2
    fix_dir = tmp_path / "fix"
    _write_like(fixed, originals[cid], fix_dir / f"{cid}.nii.gz")
    st = ExperimentState(exp / DB_FILE)
    metrics0 = st.metrics()[0]
    st.close()
    return {
        "exp": exp,
        "root": tmp_path,
        "case": cid,
        "boxes": boxes,
        "fixed": fixed,
        "fix_dir": fix_dir,
        "original": originals[cid],
        "metrics0": metrics0,
        "m0": m0,
        "m1": m1,
    }


def test_refusals_change_nothing(corrected: dict[str, Any]) -> None:
    exp, fix_dir, cid = corrected["exp"], corrected["fix_dir"], corrected["case"]
    in_round_0 = {c["case_id"] for c in corrected["m0"]["cases"]}
    st = ExperimentState(exp / DB_FILE)
    pool, _ = st.split()
    st.close()
    other_dir = corrected["root"] / "other"
    other = next(c for c in pool if c not in in_round_0)
    other_dir.mkdir()
    shutil.copyfile(fix_dir / f"{cid}.nii.gz", other_dir / f"{other}.nii.gz")
    cases: list[tuple[Path, dict[str, Any], list[str]]] = [
        (fix_dir, {}, [f"case {cid!r} is not in round 1", "labelled in round 0", "pass `--round 0 --replace`"]),
        (fix_dir, {"round_index": 0}, ["round 0 is finished", "pass --replace as well", "--round 0 --replace"]),
        (fix_dir, {"round_index": 5, "replace": True}, ["--round 5", "has no round 5", "rounds with regions: 0, 1"]),
        (fix_dir, {"round_index": 1, "replace": True}, ["round 1 is not finished", "without --round"]),
        (other_dir, {"round_index": 0, "replace": True}, [f"case {other!r} has no regions in round 0"]),
    ]
    before = _snapshot(exp)
    for folder, kwargs, expected in cases:
        with pytest.raises(AnnotationImportError) as info:
            import_labels(exp, folder, **kwargs)
        for text in expected:
            assert text in str(info.value), (kwargs, str(info.value))
        assert _snapshot(exp) == before, kwargs
    # the command line: the same refusal, exit code 1
    result = CliRunner().invoke(app, ["import", str(exp), str(fix_dir), "--round", "0"])
    assert result.exit_code == 1 and "pass --replace as well" in " ".join(result.output.split())
    assert _snapshot(exp) == before


def test_correction_of_round_0_is_used_by_the_next_training(corrected: dict[str, Any]) -> None:
    exp, cid, fixed = corrected["exp"], corrected["case"], corrected["fixed"]
    fix_file = corrected["fix_dir"] / f"{cid}.nii.gz"
    st = ExperimentState(exp / DB_FILE)
    old_row = next(f for f in st.imported_files(round_index=0) if f["case_id"] == cid)
    old_label0 = dict(st.conn.execute("SELECT case_id, sha256 FROM label_files WHERE round = 0").fetchall())
    st.close()
    assert old_row["sha256"] == _sha(corrected["original"])

    result = CliRunner().invoke(app, ["import", str(exp), str(corrected["fix_dir"]), "--round", "0", "--replace"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"corrected {fix_file}: case {cid}, round 0" in flat and f"(replaces {old_row['path']})" in flat
    assert "round 1's training uses them" in flat
    # importing it again changes nothing
    again = import_labels(exp, corrected["fix_dir"], round_index=0, replace=True)
    assert not again.changed and again.unchanged == [cid]

    st = ExperimentState(exp / DB_FILE)
    try:
        rows = [f for f in st.imported_files() if f["case_id"] == cid]
        assert len(rows) == 2
        old, new = rows
        # the earlier file: kept on disk, still recorded with its checksum, superseded by the new one
        assert old["id"] == old_row["id"] and old["sha256"] == _sha(corrected["original"])
        assert (exp / old["path"]).is_file() and _sha(exp / old["path"]) == old["sha256"]
        assert old["replaced_by"] == new["id"] and new["replaced_by"] is None
        assert new["round"] == 0 and new["sha256"] == _sha(fix_file) == _sha(exp / new["path"])
        assert new["path"].startswith(f"rounds/000/imported/{cid}.")
        # the regions of the case in round 0 point to the new file; their foreground counts are the new ones
        for g in st.regions(round_index=0):
            if g.region.case_id != cid:
                continue
            assert g.annotated_by == new["path"]
            sub = fixed[g.region.box.slices()]
            assert g.fg_voxels == {"1": int(np.sum(sub == 1)), "2": int(np.sum(sub == 2))}
            assert g.fg_voxels["2"] == g.n_voxels
        assert [(c["round"], c["case_id"], c["at_round"]) for c in st.corrections()] == [(0, cid, 1)]
        # round 0's training labels are not rebuilt
        assert dict(st.conn.execute("SELECT case_id, sha256 FROM label_files WHERE round = 0").fetchall()) == (
            old_label0
        )
    finally:
        st.close()

    # round 1 is labelled and trained: its training label of the case holds the corrected voxels
    annotate(exp, 1, corrected["root"] / "labels1")
    import_labels(exp, corrected["root"] / "labels1")
    assert advance_experiment(exp, backend_factory=make_fake_backend) is None  # rounds: 2, complete
    model = read_model(exp / "rounds/001/model")
    given = model["cases"][cid]
    assert given["label_sha256"] == _sha(Path(given["label"]))
    label = _read(Path(given["label"]))
    expected = np.full(fixed.shape, IGNORE, dtype=label.dtype)
    for sl in corrected["boxes"]:  # the case's only regions (round 1 does not ask for it)
        expected[sl] = fixed[sl]
    np.testing.assert_array_equal(label, expected)
    # a case not corrected trains on its round-0 label as before
    in_round_1 = {x["case_id"] for x in corrected["m1"]["cases"]}
    for other in (c for c in model["cases"] if c != cid and c not in in_round_1):
        assert model["cases"][other]["label_sha256"] == old_label0[other]

    # round 0's metrics are as they were; status lists the correction
    st = ExperimentState(exp / DB_FILE)
    try:
        assert st.metrics()[0] == corrected["metrics0"]
    finally:
        st.close()
    status = json.loads(CliRunner().invoke(app, ["status", str(exp), "--json"]).stdout)
    assert [(c["round"], c["case_id"]) for c in status["annotation"]["corrections"]] == [(0, cid)]

    # the report says so
    from alseg.report.html import build_report

    out = corrected["root"] / "report.html"
    build_report([exp], out)
    page = out.read_text()
    assert f"labels of case {cid} in round 0 were corrected at round 1" in page

    # a complete experiment takes no more corrections: no training would use them
    before = _snapshot(exp)
    with pytest.raises(AnnotationImportError, match="the experiment is complete"):
        import_labels(exp, corrected["root"] / "labels1", round_index=1, replace=True)
    assert _snapshot(exp) == before
