"""Bad input to ``alseg import``, table-driven: each case gets a clear error naming the file and the problem (or the
defined behaviour), and leaves the experiment exactly as it was (every file and the whole database)."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from annotator import annotate
from typer.testing import CliRunner

import alseg.oracle.importer as files_mod
from alseg.cli import app
from alseg.config import load_config
from alseg.data.dataset import load_dataset
from alseg.errors import ExperimentError
from alseg.loop.drivers import run_experiment
from alseg.oracle.importer import AnnotationImportError, import_labels
from alseg.store.layout import DB_FILE, KILL_ENV
from conftest import RecordingFactory, make_config

ROUND = 0


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


@pytest.fixture(scope="module")
def template(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A human-oracle experiment waiting for round 0's labels, and good label files for it."""
    os.environ.pop(KILL_ENV, None)
    root = tmp_path_factory.mktemp("import_errors")
    exp = root / "exp"
    run_experiment(
        make_config(_synthetic_template, strategy="entropy", oracle="human", rounds=2), exp, RecordingFactory()
    )
    labels = root / "labels"
    annotate(exp, ROUND, labels)
    return exp, labels


@dataclass
class Ctx:
    exp: Path
    labels: Path
    manifest: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels_arg: Path | None = None

    @property
    def case(self) -> str:
        return self.manifest["cases"][0]["case_id"]

    @property
    def file(self) -> Path:
        return self.labels / f"{self.case}.nii.gz"

    def image(self) -> sitk.Image:
        return sitk.ReadImage(str(self.file))

    def write(self, array: np.ndarray, name: str | None = None, **geometry: Any) -> Path:
        like = self.image()
        img = sitk.GetImageFromArray(array)
        if array.shape == sitk.GetArrayViewFromImage(like).shape[: array.ndim] and img.GetDimension() == 3:
            img.CopyInformation(like)
        for key, value in geometry.items():
            getattr(img, f"Set{key}")(value)
        path = self.labels / (name or self.file.name)
        sitk.WriteImage(img, str(path), useCompression=path.name.endswith(".gz"))
        return path

    def array(self) -> np.ndarray:
        return sitk.GetArrayFromImage(self.image())


def _fresh_copy(template: tuple[Path, Path], tmp_path: Path) -> Ctx:
    """A copy of the waiting experiment and of its good label files, to break."""
    exp = tmp_path / "exp"
    shutil.copytree(template[0], exp, symlinks=True)
    labels = tmp_path / "labels"
    shutil.copytree(template[1], labels)
    return Ctx(exp, labels, json.loads((exp / "rounds/000/to_annotate/manifest.json").read_text()))


def _snapshot(exp: Path) -> tuple[dict[str, str], list[str]]:
    files = {
        str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(exp.rglob("*"))
        if p.name != ".lock" and not p.name.startswith(DB_FILE)
    }
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        dump = sorted(conn.iterdump())
    finally:
        conn.close()
    return files, dump


# --------------------------------------------------------------------------- the bad inputs
def corrupt_gzip(c: Ctx) -> None:
    data = bytearray(c.file.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = b"\xff" * 16
    c.file.write_bytes(bytes(data))


def truncated_gzip(c: Ctx) -> None:
    data = c.file.read_bytes()
    c.file.write_bytes(data[: len(data) // 2])


def not_nifti_gzipped(c: Ctx) -> None:
    c.file.write_bytes(gzip.compress(b"this is a text file, not an image\n" * 20))


def not_nifti_plain(c: Ctx) -> None:
    c.file.write_text("case,region\n1,2\n")


def other_format(c: Ctx) -> None:
    shutil.move(c.file, c.labels / f"{c.case}.nrrd")


def wrong_shape(c: Ctx) -> None:
    arr = c.array()[:-2]
    like = c.image()
    c.write(arr, Spacing=like.GetSpacing(), Origin=like.GetOrigin(), Direction=like.GetDirection())


def wrong_spacing(c: Ctx) -> None:
    c.write(c.array(), Spacing=(2.0, 2.0, 2.0))


def wrong_orientation(c: Ctx) -> None:
    c.write(c.array(), Direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def wrong_origin(c: Ctx) -> None:
    c.write(c.array(), Origin=(10.0, 0.0, 0.0))


def nan_values(c: Ctx) -> None:
    arr = c.array().astype(np.float32)
    arr[0, 0, 0] = np.nan
    c.write(arr)


def float_non_integer(c: Ctx) -> None:
    arr = c.array().astype(np.float32)
    arr[1, 1, 1] = 0.5
    c.write(arr)


def negative_label(c: Ctx) -> None:
    arr = c.array().astype(np.int16)
    arr[2, 2, 2] = -1
    c.write(arr)


def above_declared_max(c: Ctx) -> None:
    arr = c.array()
    arr[3, 3, 3] = 3  # the ignore value alseg uses: not a declared label either
    arr[3, 3, 4] = 7
    c.write(arr)


def vector_label(c: Ctx) -> None:
    arr = np.stack([c.array()] * 3, axis=-1)
    like = c.image()
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.CopyInformation(like)
    sitk.WriteImage(img, str(c.file), useCompression=True)


def empty_dir(c: Ctx) -> None:
    for p in c.labels.iterdir():
        p.unlink()


def only_hidden_files(c: Ctx) -> None:
    for p in c.labels.iterdir():
        p.rename(p.with_name("." + p.name))


def case_not_in_round(c: Ctx) -> None:
    state = sqlite3.connect(c.exp / DB_FILE)
    in_round = {r[0] for r in state.execute("SELECT case_id FROM regions")}
    pool = [r[0] for r in state.execute("SELECT case_id FROM split WHERE role = 'pool'")]
    state.close()
    other = next(cid for cid in pool if cid not in in_round)
    shutil.copyfile(c.file, c.labels / f"{other}.nii.gz")


def unknown_case(c: Ctx) -> None:
    shutil.copyfile(c.file, c.labels / "no_such_case.nii.gz")


def two_files_for_one_case(c: Ctx) -> None:
    sitk.WriteImage(c.image(), str(c.labels / f"{c.case}.nii"))


def link_outside(c: Ctx) -> None:
    ds = load_dataset(load_config(c.exp / "config.yaml").dataset)
    c.file.unlink()
    c.file.symlink_to(ds.expected_label_file(c.case))  # e.g. the ground truth itself


def link_into_experiment(c: Ctx) -> None:
    c.file.unlink()
    c.file.symlink_to(c.exp / "rounds" / "000" / "to_annotate" / "masks" / f"{c.case}_regions.nii.gz")


def dir_inside_experiment(c: Ctx) -> None:
    c.labels_arg = c.exp / "rounds" / "000" / "to_annotate" / "masks"


def dir_missing(c: Ctx) -> None:
    c.labels_arg = c.labels / "nope"


def dir_is_a_file(c: Ctx) -> None:
    c.labels_arg = c.file


def outside_voxels_strict(c: Ctx) -> None:
    arr = c.array()
    mask = sitk.GetArrayFromImage(
        sitk.ReadImage(str(c.exp / "rounds/000/to_annotate/masks" / f"{c.case}_regions.nii.gz"))
    )
    idx = np.flatnonzero(mask.ravel() == 0)[:7]
    arr.ravel()[idx] = 1
    c.write(arr)
    c.kwargs["strict"] = True


def changed_without_replace(c: Ctx) -> None:
    import_labels(c.exp, c.labels)  # the first import succeeds; the snapshot is taken after it
    arr = c.array()
    arr[arr == 1] = 2
    arr[0, 0, 0] = 0
    c.write(arr)
    mask = sitk.GetArrayFromImage(
        sitk.ReadImage(str(c.exp / "rounds/000/to_annotate/masks" / f"{c.case}_regions.nii.gz"))
    )
    inside = np.argwhere(mask > 0)[0]
    arr[tuple(inside)] = 1 if arr[tuple(inside)] != 1 else 2
    c.write(arr)


def simulated_experiment(c: Ctx) -> None:
    cfg = c.exp / "config.yaml"
    cfg.write_text(cfg.read_text().replace("oracle: human", "oracle: simulated"))


def disk_full(c: Ctx) -> None:
    calls = {"n": 0}
    real = files_mod.copy_label_file

    def copy(src: Path, dst: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first file is copied, the second hits a full disk
            with open(dst.with_name(f".{dst.name}.partial.tmp"), "wb") as f:
                f.write(b"half")
            os.unlink(dst.with_name(f".{dst.name}.partial.tmp"))
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real(src, dst)

    c.kwargs["_patch_copy"] = copy


Case = tuple[str, Callable[[Ctx], None], type[Exception], list[str]]
CASES: list[Case] = [
    ("corrupt gzip", corrupt_gzip, AnnotationImportError, ["{file}", "gzip"]),
    ("truncated gzip", truncated_gzip, AnnotationImportError, ["{file}", "truncated"]),
    ("gzipped non-NIfTI", not_nifti_gzipped, AnnotationImportError, ["{file}", "cannot be read as a NIfTI file"]),
    ("plain non-NIfTI", not_nifti_plain, AnnotationImportError, ["{file}", "gzip"]),
    ("not a NIfTI name", other_format, AnnotationImportError, ["{case}.nrrd", "not a NIfTI file name"]),
    ("wrong shape", wrong_shape, AnnotationImportError, ["{file}", "geometry differs", "shape (22, 28, 20)"]),
    ("wrong spacing", wrong_spacing, AnnotationImportError, ["{file}", "spacing (2, 2, 2) vs (1.5, 1, 1.25)"]),
    ("wrong orientation", wrong_orientation, AnnotationImportError, ["{file}", "direction"]),
    ("wrong origin", wrong_origin, AnnotationImportError, ["{file}", "origin (10, 0, 0)"]),
    ("NaN values", nan_values, AnnotationImportError, ["{file}", "NaN"]),
    ("float non-integer", float_non_integer, AnnotationImportError, ["{file}", "non-integer values [0.5]"]),
    ("negative label", negative_label, AnnotationImportError, ["{file}", "undeclared label values [-1]"]),
    ("label above max", above_declared_max, AnnotationImportError, ["{file}", "undeclared label values [3, 7]"]),
    ("vector label", vector_label, AnnotationImportError, ["{file}", "3 components per voxel"]),
    ("empty folder", empty_dir, AnnotationImportError, ["holds no label files"]),
    ("only hidden files", only_hidden_files, AnnotationImportError, ["holds no label files"]),
    ("case not in round", case_not_in_round, AnnotationImportError, ["is not in the round's work package"]),
    ("unknown case", unknown_case, AnnotationImportError, ["no_such_case.nii.gz", "is not a case of the dataset"]),
    ("two files for a case", two_files_for_one_case, AnnotationImportError, ["has two label files"]),
    ("link to outside", link_outside, AnnotationImportError, ["{file}", "outside", "copy the file"]),
    ("link into experiment", link_into_experiment, AnnotationImportError, ["{file}", "outside"]),
    ("folder inside experiment", dir_inside_experiment, AnnotationImportError, ["inside the experiment"]),
    ("folder missing", dir_missing, AnnotationImportError, ["does not exist"]),
    ("folder is a file", dir_is_a_file, AnnotationImportError, ["is not a folder"]),
    ("outside voxels, strict", outside_voxels_strict, AnnotationImportError, ["7 labelled voxels outside", "--strict"]),
    ("changed, no --replace", changed_without_replace, AnnotationImportError, ["{file}", "pass --replace"]),
    ("simulated experiment", simulated_experiment, ExperimentError, ["oracle: simulated"]),
    ("disk full", disk_full, AnnotationImportError, ["disk is full", "nothing was imported"]),
]


@pytest.mark.parametrize(("name", "mutate", "error", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_leaves_the_experiment_unchanged(
    template: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    mutate: Callable[[Ctx], None],
    error: type[Exception],
    expected: list[str],
) -> None:
    ctx = _fresh_copy(template, tmp_path)
    exp, labels = ctx.exp, ctx.labels
    mutate(ctx)
    patch = ctx.kwargs.pop("_patch_copy", None)
    if patch is not None:
        monkeypatch.setattr(files_mod, "copy_label_file", patch)
    before = _snapshot(exp)
    with pytest.raises(error) as info:
        import_labels(exp, ctx.labels_arg or labels, **ctx.kwargs)
    message = str(info.value)
    for text in expected:
        text = text.format(file=ctx.file, case=ctx.case)
        assert text in message, f"{text!r} not in {message!r}"
    assert "Traceback" not in message
    assert _snapshot(exp) == before, "the failed import changed the experiment"
    assert not list(exp.rglob("*.tmp")), "a temporary file was left behind"


def test_every_problem_is_reported_at_once(template: tuple[Path, Path], tmp_path: Path) -> None:
    ctx = _fresh_copy(template, tmp_path)
    exp, labels = ctx.exp, ctx.labels
    wrong_spacing(ctx)
    unknown_case(ctx)
    (labels / "notes.txt").write_text("hello")
    with pytest.raises(AnnotationImportError) as info:
        import_labels(exp, labels)
    assert len(info.value.problems) == 3
    for text in ("spacing", "no_such_case", "notes.txt"):
        assert text in str(info.value)


def test_cli_reports_bad_input_cleanly(template: tuple[Path, Path], tmp_path: Path) -> None:
    ctx = _fresh_copy(template, tmp_path)
    exp, labels = ctx.exp, ctx.labels
    negative_label(ctx)
    before = _snapshot(exp)
    result = CliRunner().invoke(app, ["import", str(exp), str(labels)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    flat = " ".join(result.output.split())
    assert "error:" in flat and "undeclared label values [-1]" in flat and "Traceback" not in flat
    assert _snapshot(exp) == before


def test_nan_intensities_in_an_image_are_refused_at_creation(tmp_path: Path, _synthetic_template: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(_synthetic_template, ds)
    shutil.rmtree(ds / "labelsTr")  # images only: annotation mode
    image = ds / "imagesTr" / "syn_000.nii.gz"
    img = sitk.ReadImage(str(image))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(image), useCompression=True)
    from alseg.data.dataset import DatasetError

    with pytest.raises(DatasetError, match="NaN"):
        run_experiment(make_config(ds, strategy="entropy"), tmp_path / "exp", RecordingFactory())
    assert not (tmp_path / "exp").exists()
