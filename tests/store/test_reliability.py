"""Failures a long annotation project meets, each a clear message with nothing lost (issue 12): a full disk
while training, an unreadable database, a file system without locks or on the network, a durable model."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alseg.backends.nnunet.backend import BackendError
from alseg.cli import app
from alseg.errors import AlsegError
from alseg.loop.drivers import run_experiment
from alseg.store.layout import DB_FILE, LOG_FILE, filesystem_type, warn_if_network_filesystem
from alseg.store.state import ExperimentLockedError, ExperimentState, ExperimentStateError, experiment_lock
from conftest import RecordingFactory, make_config, write_config
from fake_backend import FakeBackend, make_fake_backend


def _snapshot(exp: Path) -> dict[str, str]:
    """Every file of an experiment (the lock and the log aside) with its SHA-256."""
    out = {}
    for p in sorted(exp.rglob("*")):
        if p.is_file() and p.name not in (".lock", LOG_FILE) and not p.name.startswith(DB_FILE):
            out[str(p.relative_to(exp))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _stages(exp: Path) -> list[tuple]:
    with sqlite3.connect(exp / DB_FILE) as conn:
        return sorted(conn.execute("SELECT round, stage, status FROM stages").fetchall())


class _DiskFullBackend(FakeBackend):
    """Trains like the fake backend until round ``full_at``, whose training finds the disk full."""

    full_at = 1

    def train(self, cases, out_dir, seed, init_from=None, **kw):  # type: ignore[no-untyped-def]
        if Path(out_dir).parent.name == f"{self.full_at:03d}":
            raise BackendError(
                f"nnU-Net train ran out of disk space in {out_dir}.partial (see {out_dir}.partial/train.log); free "
                "space there and run the same command again: the round's training starts over, nothing annotated "
                "is lost"
            )
        return super().train(cases, out_dir, seed, init_from, **kw)


def test_disk_full_while_training_stops_cleanly_and_resumes(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = make_config(synthetic_dataset, strategy="entropy")
    exp = tmp_path / "exp"
    with pytest.raises(BackendError, match="ran out of disk space") as info:
        run_experiment(cfg, exp, lambda c, d, e: _DiskFullBackend(c, d, e))
    assert isinstance(info.value, AlsegError)
    # round 1 annotated, its training not committed; the traceback went to the log, not lost
    assert (1, "annotate", "done") in _stages(exp) and (1, "train", "done") not in _stages(exp)
    assert "Traceback" in (exp / LOG_FILE).read_text()
    before = _snapshot(exp)
    run_experiment(cfg, exp, RecordingFactory())  # space freed: the same command goes on
    assert {k: v for k, v in _snapshot(exp).items() if k in before and "model" not in k} == {
        k: v for k, v in before.items() if "model" not in k
    }
    assert (2, "evaluate", "done") in _stages(exp)
    reference = tmp_path / "ref"
    run_experiment(cfg, reference, RecordingFactory())
    with sqlite3.connect(exp / DB_FILE) as a, sqlite3.connect(reference / DB_FILE) as b:
        query = "SELECT round, case_id, box_start, box_size, status FROM regions ORDER BY id"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_the_command_line_prints_one_message_and_logs_the_traceback(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alseg.loop.drivers as drivers

    cfg_file = write_config(tmp_path / "cfg.yaml", synthetic_dataset, strategy="entropy")
    exp = tmp_path / "exp"
    real = drivers.run_experiment
    monkeypatch.setattr(
        drivers, "run_experiment", lambda cfg, out, **kw: real(cfg, out, lambda c, d, e: _DiskFullBackend(c, d, e))
    )
    result = CliRunner().invoke(app, ["run", str(cfg_file), "--out", str(exp)])
    assert result.exit_code == 1
    assert "error:" in result.output and "ran out of disk space" in result.output
    assert "Traceback" not in result.output
    assert "Traceback" in (exp / LOG_FILE).read_text()


def test_an_unreadable_database_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / DB_FILE
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ExperimentStateError, match=r"cannot be read .* Restore it") as info:
        ExperimentState(db)
    assert str(db) in str(info.value)
    assert db.read_bytes() == b"this is not a database" * 100  # nothing written


def test_a_file_system_without_locks_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ExperimentLockedError, match=r"cannot take a lock on this file system.*local disk"):
        with experiment_lock(tmp_path):
            pass


MOUNTS = """\
/dev/vda / ext4 rw 0 0
server:/export /mnt/shared nfs4 rw 0 0
/dev/vdb /mnt/shared/local ext4 rw 0 0
"""


def test_network_file_systems_are_recognised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert filesystem_type(Path("/mnt/shared/study/exp"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/mnt/shared/local/exp"), MOUNTS) == "ext4"  # the longest mount point wins
    assert filesystem_type(Path("/home/me/exp"), MOUNTS) == "ext4"
    with caplog.at_level("WARNING", logger="alseg"):
        assert warn_if_network_filesystem(Path("/mnt/shared/study/exp"), MOUNTS) == "nfs4"
        assert warn_if_network_filesystem(Path("/home/me/exp"), MOUNTS) is None
    assert "network file system (nfs4)" in caplog.text and "local disk" in caplog.text


def test_a_finished_model_is_flushed_before_it_is_committed(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file a commit points to went through fsync first: labels, query.json, evaluation.json."""
    import alseg.durable as durable

    synced: set[str] = set()
    real_file, real_dir = durable.fsync_file, durable.fsync_dir

    def fsync_file(path: str | Path) -> None:
        synced.add(Path(path).name)
        real_file(path)

    monkeypatch.setattr(durable, "fsync_file", fsync_file)
    monkeypatch.setattr(durable, "fsync_dir", real_dir)
    exp = tmp_path / "exp"
    run_experiment(make_config(synthetic_dataset, rounds=1), exp, make_fake_backend)
    label_files = {p.name for p in (exp / "rounds" / "000" / "labels").iterdir()}
    tmp_names = {n for n in synced if n.endswith(".tmp.nii.gz")}
    assert len(tmp_names) == len(label_files)  # each label went through fsync under its temporary name


def test_a_second_first_run_of_the_same_folder_stops_before_writing(synthetic_dataset: Path, tmp_path: Path) -> None:
    from alseg.loop.create import creation_lock_path, open_or_create
    from alseg.store.state import file_lock

    cfg = make_config(synthetic_dataset)
    exp = tmp_path / "exp"
    with file_lock(creation_lock_path(exp), "held by the test"):  # a first run creating the folder right now
        with pytest.raises(ExperimentLockedError, match="in use by process"):
            open_or_create(cfg, exp)
    assert not exp.exists()
    assert not list(tmp_path.glob(".exp.creating-*"))
    open_or_create(cfg, exp)  # the lock released: created
    assert (exp / DB_FILE).is_file()


def test_a_killed_creation_leaves_nothing_the_next_one_keeps(synthetic_dataset: Path, tmp_path: Path) -> None:
    from alseg.loop.create import open_or_create

    leftover = tmp_path / ".exp.creating-999999"  # a creation killed before its rename
    leftover.mkdir()
    (leftover / DB_FILE).write_bytes(b"half written")
    open_or_create(make_config(synthetic_dataset), tmp_path / "exp")
    assert not leftover.exists()
    assert not list(tmp_path.glob(".exp.creating-*"))
    ExperimentState(tmp_path / "exp" / DB_FILE).close()  # the real one is readable


def test_import_checks_the_header_geometry_before_reading_voxels(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import SimpleITK as sitk

    import alseg.oracle.label_files as label_files
    from alseg.data.images import DatasetError, read_geometry
    from alseg.oracle.label_files import check_label_file

    image = next((synthetic_dataset / "imagesTr").glob("*.nii.gz"))
    expected = read_geometry(image)
    wrong = sitk.Image([s + 3 for s in expected.shape[::-1]], sitk.sitkUInt8)  # another grid
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(wrong, str(path))

    def no_voxels(*a: object, **k: object) -> None:
        raise AssertionError("voxel data read before the header was checked")

    monkeypatch.setattr(label_files, "check_integrity", no_voxels)
    monkeypatch.setattr(label_files, "label_array", no_voxels)
    monkeypatch.setattr(label_files, "count_nonfinite", no_voxels)
    with pytest.raises(DatasetError, match=r"geometry differs.*shape"):
        check_label_file(path, expected, {0: "background", 1: "a"}, "case")


def test_a_full_disk_while_writing_labels_is_one_message_and_the_run_resumes(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alseg.loop.drivers as drivers
    import alseg.oracle.simulated as simulated

    cfg_file = write_config(tmp_path / "cfg.yaml", synthetic_dataset, strategy="entropy")
    exp = tmp_path / "exp"
    real_run, real_write = drivers.run_experiment, simulated.write_label_nifti

    def full_in_round_1(path, array, geometry):  # type: ignore[no-untyped-def]
        if Path(path).parent.parent.name == "001":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, array, geometry)

    monkeypatch.setattr(simulated, "write_label_nifti", full_in_round_1)
    monkeypatch.setattr(drivers, "run_experiment", lambda cfg, out, **kw: real_run(cfg, out, make_fake_backend, **kw))
    result = CliRunner().invoke(app, ["run", str(cfg_file), "--out", str(exp)])
    assert result.exit_code == 1
    assert "the disk is full (No space left on device)" in result.output and "rounds/001/labels" in result.output
    assert "Traceback" not in result.output and "Traceback" in (exp / LOG_FILE).read_text()
    assert ("001", "annotate", "done") not in {(f"{r:03d}", s, st) for r, s, st in _stages(exp)}
    monkeypatch.setattr(simulated, "write_label_nifti", real_write)  # space freed: the same command finishes
    result = CliRunner().invoke(app, ["run", str(cfg_file), "--out", str(exp)])
    assert result.exit_code == 0, result.output
    assert (2, "evaluate", "done") in _stages(exp)
