"""The experiment notices what changes under it: the dataset's files are fingerprinted at creation and checked on
every resume. A changed, missing or added case stops the resume with a message naming it, and changes nothing;
``accept_dataset_change`` records the change and goes on; a moved dataset is taken when it holds the same files
(``dataset=NEW_PATH``), and a touched file with the same content is no change. Also the command line's options."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import alseg.data.fingerprint as fingerprint_module
from alseg.cli import app
from alseg.config import load_config
from alseg.data.images import sha256_file
from alseg.errors import ExperimentError
from alseg.loop.create import open_or_create
from alseg.loop.drivers import run_experiment
from alseg.store.layout import CHANGES_META, CONFIG_FILE, DB_FILE, FINGERPRINT_META, KILL_ENV, LOG_FILE
from alseg.store.state import ExperimentState
from conftest import RecordingFactory, make_config, synthetic_image, synthetic_label, write_config, write_volume
from fake_backend import FakeBackend

N_FILES = 16  # conftest's synthetic dataset: 8 cases, one image and one label each
runner = CliRunner()


class _Stop(RuntimeError):
    pass


class _StopAfterRound0(RecordingFactory):
    """Backends that train round 0 and fail on round 1: the experiment is left between rounds, resumable."""

    def __call__(self, cfg: Any, ds: Any, exp_dir: Path) -> FakeBackend:
        class Stopping(FakeBackend):
            def train(self, cases: Any, out_dir: Path, *args: Any, **kwargs: Any) -> Any:
                if Path(out_dir).parent.name != "000":
                    raise _Stop("stopped after round 0 (test)")
                return super().train(cases, out_dir, *args, **kwargs)

        backend = Stopping(cfg, ds, exp_dir)
        self.backends.append(backend)
        return backend


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


@pytest.fixture
def between_rounds(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """An experiment on ``synthetic_dataset`` whose round 0 is done and round 1 is not."""
    exp = tmp_path / "exp"
    with pytest.raises(_Stop):
        run_experiment(make_config(synthetic_dataset), exp, _StopAfterRound0())
    return exp


def _state(exp: Path) -> ExperimentState:
    return ExperimentState(exp / DB_FILE)


def _split(exp: Path) -> tuple[list[str], list[str]]:
    st = _state(exp)
    try:
        return st.split()
    finally:
        st.close()


def _meta(exp: Path, key: str) -> Any:
    st = _state(exp)
    try:
        value = st.get_meta(key)
    finally:
        st.close()
    return None if value is None else json.loads(value)


def _region_cases(exp: Path) -> set[str]:
    st = _state(exp)
    try:
        return {g.region.case_id for g in st.regions()}
    finally:
        st.close()


def _snapshot(exp: Path) -> dict[str, str]:
    """Every file of the experiment (the lock file aside) with its SHA-256: the database file included."""
    return {
        str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(exp.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _rounds_evaluated(exp: Path) -> list[int]:
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        return [r for (r,) in conn.execute("SELECT round FROM metrics ORDER BY round")]
    finally:
        conn.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- a changed held-out label
def test_changed_held_out_label_stops_the_resume_and_changes_nothing(
    between_rounds: Path, synthetic_dataset: Path
) -> None:
    exp = between_rounds
    _, test = _split(exp)
    case = test[0]
    write_volume(synthetic_dataset / "labelsTr" / f"{case}.nii.gz", synthetic_label(77))  # another label
    before = _snapshot(exp)
    assert DB_FILE in before

    with pytest.raises(ExperimentError) as info:
        run_experiment(make_config(synthetic_dataset), exp, RecordingFactory())
    msg = str(info.value)
    assert f"{case} (held-out): changed label labelsTr/{case}.nii.gz" in msg
    assert str(exp) in msg and str(synthetic_dataset.resolve()) in msg
    assert "restore the files" in msg and "--accept-dataset-change" in msg
    assert "Dice of later rounds" in msg  # what accepting would mean
    with pytest.raises(ExperimentError, match=case):
        run_experiment(None, exp, RecordingFactory())  # the stored config: the same check
    assert _snapshot(exp) == before
    assert _rounds_evaluated(exp) == [0]


def test_accepting_a_changed_held_out_label_records_it_and_goes_on(
    between_rounds: Path, synthetic_dataset: Path
) -> None:
    exp = between_rounds
    _, test = _split(exp)
    case = test[0]
    label = synthetic_dataset / "labelsTr" / f"{case}.nii.gz"
    write_volume(label, synthetic_label(77))

    run_experiment(make_config(synthetic_dataset), exp, RecordingFactory(), accept_dataset_change=True)
    assert _rounds_evaluated(exp) == [0, 1, 2]  # it went on to the end
    changes = _meta(exp, CHANGES_META)
    assert len(changes) == 1
    entry = changes[0]
    assert entry["dataset"] == str(synthetic_dataset.resolve()) and entry["time"]
    assert entry["changes"] == [
        {
            "case_id": case,
            "status": "changed",
            "files": [{"kind": "label", "change": "changed", "name": f"labelsTr/{case}.nii.gz"}],
            "what": f"changed label labelsTr/{case}.nii.gz",
            "role": "held-out",
        }
    ]
    assert entry["left_split"] == {}
    logged = (exp / LOG_FILE).read_text()
    assert "WARNING" in logged and f"{case} (held-out): changed label" in logged
    assert "does not compare with earlier rounds" in logged
    # the stored fingerprint is the new label: the next resume goes on without a word
    assert _meta(exp, FINGERPRINT_META)["cases"][case]["label"]["sha256"] == sha256_file(label)
    run_experiment(None, exp, RecordingFactory())
    assert len(_meta(exp, CHANGES_META)) == 1
    assert _split(exp)[1] == test  # the held-out set is the same cases


# --------------------------------------------------------------------------- removed and added cases
def test_removed_pool_image_names_the_case(between_rounds: Path, synthetic_dataset: Path) -> None:
    exp = between_rounds
    pool, _ = _split(exp)
    annotated = _region_cases(exp)
    free = next(c for c in pool if c not in annotated)
    (synthetic_dataset / "imagesTr" / f"{free}.nii.gz").unlink()
    before = _snapshot(exp)
    with pytest.raises(ExperimentError) as info:  # an ExperimentError, not a KeyError
        run_experiment(make_config(synthetic_dataset), exp, RecordingFactory())
    assert f"{free} (pool): missing image file imagesTr/{free}.nii.gz" in str(info.value)
    assert "--accept-dataset-change" in str(info.value)
    assert _snapshot(exp) == before

    # accepted: the case leaves the pool (no region was selected on it) and the run goes on
    run_experiment(make_config(synthetic_dataset), exp, RecordingFactory(), accept_dataset_change=True)
    assert _rounds_evaluated(exp) == [0, 1, 2]
    assert _split(exp)[0] == [c for c in pool if c != free]
    assert _meta(exp, CHANGES_META)[0]["left_split"] == {free: "pool"}
    assert f"left the pool (no regions were selected on them): {free}" in (exp / LOG_FILE).read_text()


def test_removed_pool_case_with_regions_is_refused_even_when_accepted(
    between_rounds: Path, synthetic_dataset: Path
) -> None:
    exp = between_rounds
    annotated = sorted(_region_cases(exp))
    case = annotated[0]
    meta_file = synthetic_dataset / "dataset.json"
    meta = json.loads(meta_file.read_text())
    meta["training"] = [e for e in meta["training"] if case not in e["image"]]
    meta["numTraining"] = len(meta["training"])
    meta_file.write_text(json.dumps(meta))
    before = _snapshot(exp)
    for accept in (False, True):
        with pytest.raises(ExperimentError) as info:
            run_experiment(make_config(synthetic_dataset), exp, RecordingFactory(), accept_dataset_change=accept)
        msg = _one_line(str(info.value))
        assert f"{case} (pool): case no longer in the dataset" in msg
        assert f"pool case {case} has regions selected in round(s) 0" in msg
        assert f"restore the files of {case}" in msg
        assert ("even with --accept-dataset-change" in msg) is not accept
        assert _snapshot(exp) == before


def test_added_case_is_reported(between_rounds: Path, synthetic_dataset: Path) -> None:
    exp = between_rounds
    lab = synthetic_label(8)
    write_volume(synthetic_dataset / "imagesTr" / "syn_008.nii.gz", synthetic_image(lab, 8))
    write_volume(synthetic_dataset / "labelsTr" / "syn_008.nii.gz", lab)
    meta_file = synthetic_dataset / "dataset.json"
    meta = json.loads(meta_file.read_text())
    meta["training"].append({"image": "./imagesTr/syn_008.nii.gz", "label": "./labelsTr/syn_008.nii.gz"})
    meta["numTraining"] = len(meta["training"])
    meta_file.write_text(json.dumps(meta))
    pool, test = _split(exp)
    before = _snapshot(exp)
    with pytest.raises(ExperimentError) as info:
        run_experiment(make_config(synthetic_dataset), exp, RecordingFactory())
    assert "syn_008: new case" in str(info.value) and "1 case differs:" in str(info.value)
    assert _snapshot(exp) == before

    run_experiment(make_config(synthetic_dataset), exp, RecordingFactory(), accept_dataset_change=True)
    assert _split(exp) == (pool, test)  # the split is fixed at creation: the new case is not used
    assert "new cases are not used" in (exp / LOG_FILE).read_text()
    assert "syn_008" in _meta(exp, FINGERPRINT_META)["cases"]


def test_many_changes_are_shown_up_to_twenty(between_rounds: Path, synthetic_dataset: Path) -> None:
    exp = between_rounds
    meta_file = synthetic_dataset / "dataset.json"
    meta = json.loads(meta_file.read_text())
    for i in range(100, 125):  # 25 new cases (files listed, never read: the check stops first)
        lab = synthetic_label(i)
        write_volume(synthetic_dataset / "imagesTr" / f"syn_{i}.nii.gz", synthetic_image(lab, i))
        meta["training"].append({"image": f"./imagesTr/syn_{i}.nii.gz"})
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ExperimentError) as info:
        open_or_create(None, exp)
    msg = str(info.value)
    assert "25 cases differ:" in msg and "... and 5 more" in msg
    assert "syn_119: new case" in msg and "syn_120" not in msg


# --------------------------------------------------------------------------- a moved dataset
def _copy_elsewhere(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copyfile)  # new modification times
    return dst


def test_moved_dataset_is_taken_when_it_holds_the_same_files(
    between_rounds: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    exp = between_rounds
    old = synthetic_dataset.resolve()
    new = _copy_elsewhere(synthetic_dataset, tmp_path / "moved" / "Synthetic").resolve()
    shutil.rmtree(synthetic_dataset)

    # the old path: the folder is gone; the hint says what to do
    with pytest.raises(ExperimentError, match="if it moved, pass --dataset NEW_PATH"):
        run_experiment(make_config(old), exp, RecordingFactory())
    # a config naming the new path without --dataset: today's "different config" error, with the hint
    with pytest.raises(ExperimentError) as info:
        run_experiment(make_config(new), exp, RecordingFactory())
    assert "created with a different config" in str(info.value) and "pass --dataset NEW_PATH" in str(info.value)
    assert load_config(exp / CONFIG_FILE).dataset == old

    # the old config and --dataset NEW: taken, config.yaml names the new folder, the run goes on
    run_experiment(make_config(old), exp, RecordingFactory(), dataset=new)
    assert load_config(exp / CONFIG_FILE).dataset == new
    assert yaml.safe_load((exp / CONFIG_FILE).read_text())["dataset"] == str(new)
    assert _rounds_evaluated(exp) == [0, 1, 2]
    (entry,) = _meta(exp, CHANGES_META)
    assert entry["moved_from"] == str(old) and entry["dataset"] == str(new) and entry["changes"] == []
    assert f"the dataset moved from {old} to {new}" in (exp / LOG_FILE).read_text()
    fp = _meta(exp, FINGERPRINT_META)
    assert fp["root"] == str(new)
    image = new / "imagesTr" / "syn_000.nii.gz"
    assert fp["cases"]["syn_000"]["images"][0]["mtime_ns"] == image.stat().st_mtime_ns
    # from now on the new path is the experiment's: the new config, or none, resumes
    run_experiment(make_config(new), exp, RecordingFactory())
    run_experiment(None, exp, RecordingFactory())


def test_moved_dataset_with_a_different_file_is_refused(
    between_rounds: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    exp = between_rounds
    new = _copy_elsewhere(synthetic_dataset, tmp_path / "moved" / "Synthetic").resolve()
    pool, _ = _split(exp)
    case = pool[-1]
    write_volume(new / "imagesTr" / f"{case}.nii.gz", synthetic_image(synthetic_label(5), 555))
    before = _snapshot(exp)
    with pytest.raises(ExperimentError) as info:
        run_experiment(make_config(synthetic_dataset), exp, RecordingFactory(), dataset=new)
    msg = str(info.value)
    assert f"the dataset at {new} does not hold the files the experiment was created with" in msg
    assert f"{case} (pool): changed image imagesTr/{case}.nii.gz" in msg
    assert f"--dataset {new} --accept-dataset-change" in msg
    assert _snapshot(exp) == before
    assert load_config(exp / CONFIG_FILE).dataset == synthetic_dataset.resolve()


# --------------------------------------------------------------------------- touched files, old experiments
def test_touched_files_with_the_same_content_are_no_change(
    between_rounds: Path, synthetic_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = between_rounds
    files = sorted(p for p in synthetic_dataset.rglob("*.nii.gz"))
    assert len(files) == N_FILES
    for p in files:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 3600 * 10**9))
    hashed: list[Path] = []
    real = fingerprint_module.sha256_file
    monkeypatch.setattr(fingerprint_module, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))

    run_experiment(make_config(synthetic_dataset), exp, RecordingFactory())
    assert sorted(hashed) == files  # each touched file read once, to see that its content is the same
    assert _rounds_evaluated(exp) == [0, 1, 2]
    assert _meta(exp, CHANGES_META) is None  # no change recorded
    assert "WARNING" not in (exp / LOG_FILE).read_text()
    fp = _meta(exp, FINGERPRINT_META)
    for p in files:
        case = p.name.removesuffix(".nii.gz")
        entry = fp["cases"][case]["images" if p.parent.name == "imagesTr" else "label"]
        entry = entry[0] if isinstance(entry, list) else entry
        assert entry["mtime_ns"] == p.stat().st_mtime_ns  # the new times are stored

    hashed.clear()
    run_experiment(None, exp, RecordingFactory())  # the next resume reads no file
    assert hashed == []


def test_an_experiment_without_fingerprint_gets_one(between_rounds: Path, synthetic_dataset: Path) -> None:
    exp = between_rounds
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        with conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (FINGERPRINT_META,))
    finally:
        conn.close()
    run_experiment(make_config(synthetic_dataset), exp, RecordingFactory())
    assert _rounds_evaluated(exp) == [0, 1, 2]
    fp = _meta(exp, FINGERPRINT_META)
    assert sorted(fp["cases"]) == [f"syn_{i:03d}" for i in range(8)]
    assert "created before alseg recorded its dataset's files" in (exp / LOG_FILE).read_text()


def test_creation_stores_the_fingerprint_and_a_failure_writes_nothing(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = tmp_path / "exp"
    open_or_create(make_config(synthetic_dataset), exp)
    fp = _meta(exp, FINGERPRINT_META)
    assert fp["root"] == str(synthetic_dataset.resolve()) and len(fp["cases"]) == 8

    def fail(path: Any) -> str:
        raise OSError("unreadable (test)")

    monkeypatch.setattr(fingerprint_module, "sha256_file", fail)
    with pytest.raises(OSError, match="unreadable"):
        open_or_create(make_config(synthetic_dataset), tmp_path / "exp2")
    assert not (tmp_path / "exp2").exists()
    # the creation lock file (".exp2.lock") stays; nothing else
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exp2")] == [".exp2.lock"]


# --------------------------------------------------------------------------- the command line
def _invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_run_help_lists_the_options() -> None:
    result = _invoke("run", "--help")
    assert result.exit_code == 0, result.output
    assert "--dataset" in result.output and "--accept-dataset-change" in result.output


def test_cli_run_stops_on_a_changed_dataset_and_goes_on_when_accepted(
    between_rounds: Path, synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alseg.backends.nnunet as nnunet_pkg
    from fake_backend import make_fake_backend

    monkeypatch.setattr(nnunet_pkg, "make_backend", lambda cfg, ds, work: make_fake_backend(cfg, ds, work.parent))
    exp = between_rounds
    _, test = _split(exp)
    case = test[-1]
    write_volume(synthetic_dataset / "labelsTr" / f"{case}.nii.gz", synthetic_label(78))
    cfg_file = write_config(tmp_path / "config.yaml", synthetic_dataset)

    result = _invoke("run", cfg_file, "--out", exp)
    out = _one_line(result.output)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "error:" in out
    assert f"{case} (held-out): changed label labelsTr/{case}.nii.gz" in out
    assert _rounds_evaluated(exp) == [0]

    result = _invoke("run", cfg_file, "--out", exp, "--accept-dataset-change")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and case in result.output
    assert _rounds_evaluated(exp) == [0, 1, 2]
    assert _meta(exp, CHANGES_META)[0]["changes"][0]["case_id"] == case


def test_cli_run_with_a_moved_dataset(
    between_rounds: Path, synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alseg.backends.nnunet as nnunet_pkg
    from fake_backend import make_fake_backend

    monkeypatch.setattr(nnunet_pkg, "make_backend", lambda cfg, ds, work: make_fake_backend(cfg, ds, work.parent))
    exp = between_rounds
    cfg_file = write_config(tmp_path / "config.yaml", synthetic_dataset)
    new = _copy_elsewhere(synthetic_dataset, tmp_path / "moved" / "Synthetic").resolve()
    shutil.rmtree(synthetic_dataset)
    result = _invoke("run", cfg_file, "--out", exp)
    assert result.exit_code == 1 and "--dataset NEW_PATH" in _one_line(result.output), result.output
    result = _invoke("run", cfg_file, "--out", exp, "--dataset", new)
    assert result.exit_code == 0, result.output
    assert load_config(exp / CONFIG_FILE).dataset == new
    assert _rounds_evaluated(exp) == [0, 1, 2]


def test_moving_an_experiment_without_fingerprint_needs_accept(
    between_rounds: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    exp = between_rounds
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        with conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (FINGERPRINT_META,))
    finally:
        conn.close()
    new = _copy_elsewhere(synthetic_dataset, tmp_path / "moved" / "Synthetic").resolve()
    before = _snapshot(exp)
    with pytest.raises(ExperimentError, match="cannot check that") as info:
        run_experiment(None, exp, RecordingFactory(), dataset=new)
    assert f"--dataset {new} --accept-dataset-change" in str(info.value)
    assert _snapshot(exp) == before
    run_experiment(None, exp, RecordingFactory(), dataset=new, accept_dataset_change=True)
    assert load_config(exp / CONFIG_FILE).dataset == new
    assert _meta(exp, FINGERPRINT_META)["root"] == str(new)
    assert _rounds_evaluated(exp) == [0, 1, 2]


def test_full_data_reference_is_checked_too(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alseg.backends.nnunet as nnunet_pkg
    from alseg.loop.full_data import run_full_data
    from fake_backend import make_fake_backend

    monkeypatch.setattr(nnunet_pkg, "make_backend", lambda cfg, ds, work: make_fake_backend(cfg, ds, work.parent))
    exp = tmp_path / "full"
    run_full_data(make_config(synthetic_dataset), exp, RecordingFactory())
    _, test = _split(exp)
    write_volume(synthetic_dataset / "labelsTr" / f"{test[0]}.nii.gz", synthetic_label(79))
    cfg_file = write_config(tmp_path / "config.yaml", synthetic_dataset)
    result = _invoke("run", cfg_file, "--out", exp, "--full-data")
    out = _one_line(result.output)
    assert result.exit_code == 1, result.output
    assert f"{test[0]} (held-out): changed label" in out and "--full-data --accept-dataset-change" in out
    result = _invoke("run", cfg_file, "--out", exp, "--full-data", "--accept-dataset-change")
    assert result.exit_code == 0, result.output
    assert _meta(exp, CHANGES_META)[0]["changes"][0]["case_id"] == test[0]
