"""Tests for alseg.data.dataset: layouts, geometry, validation errors, hold-out split, demo data."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from alseg.data.dataset import (
    Dataset,
    DatasetError,
    Geometry,
    demo_dataset_path,
    load_dataset,
    read_geometry,
    split_holdout,
    validate_dataset,
)

SHAPE = (8, 10, 12)  # z, y, x
SPACING = (2.0, 1.5, 1.0)  # z, y, x (array order)
SHARED_HIPPOCAMPUS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "hippocampus"
LOCAL_HIPPOCAMPUS = Path("/work/shared/datasets/hippocampus")
FULL_HIPPOCAMPUS = SHARED_HIPPOCAMPUS if SHARED_HIPPOCAMPUS.exists() else LOCAL_HIPPOCAMPUS


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def write_volume(
    path: Path,
    array: np.ndarray,
    spacing: tuple[float, ...] = SPACING,
    origin: tuple[float, ...] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> Path:
    """Write ``array`` (z, y, x) with ``spacing`` in array order."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(reversed(spacing)))
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def make_label(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    lab[2:5, 3:7, 4:9] = 1
    lab[5:7, 3:7, 4:9] = 2
    lab[rng.integers(0, shape[0]), 0, 0] = 1
    return lab


def make_image(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)


def make_msd(root: Path, n: int = 3, labels: dict[str, str] | None = None) -> Path:
    """MSD layout: imagesTr/case.nii.gz, labelsTr/case.nii.gz, dataset.json with a training list."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        case = f"case_{i:03d}"
        write_volume(root / "imagesTr" / f"{case}.nii.gz", make_image(i))
        write_volume(root / "labelsTr" / f"{case}.nii.gz", make_label(i))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {
        "name": "TinyMSD",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": labels or {"0": "background", "1": "A", "2": "B"},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_nnunet(
    root: Path,
    n: int = 3,
    channels: tuple[str, ...] = ("T1",),
    labels: dict[str, object] | None = None,
    with_labels: bool = True,
) -> Path:
    """nnU-Net v2 layout: imagesTr/case_XXXX.nii.gz, labelsTr/case.nii.gz."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        case = f"tiny_{i:03d}"
        for c in range(len(channels)):
            write_volume(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", make_image(10 * i + c))
        if with_labels:
            write_volume(root / "labelsTr" / f"{case}.nii.gz", make_label(i))
    meta = {
        "name": "TinyV2",
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": labels or {"background": 0, "A": 1, "B": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def validation_error(root: Path, **kwargs: object) -> DatasetError:
    ds = load_dataset(root, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(DatasetError) as info:
        validate_dataset(ds)
    return info.value


# ------------------------------------------------------------------------------------------------
# loading both layouts
# ------------------------------------------------------------------------------------------------


def test_msd_layout_loads_and_validates(tmp_path: Path) -> None:
    ds = load_dataset(make_msd(tmp_path))
    assert isinstance(ds, Dataset)
    assert ds.layout == "msd"
    assert ds.name == "TinyMSD"
    assert ds.case_ids == ["case_000", "case_001", "case_002"]
    assert ds.labels == {0: "background", 1: "A", 2: "B"}
    assert ds.foreground_labels == (1, 2)
    assert ds.n_channels == 1
    assert ds.file_ending == ".nii.gz"
    assert ds.image_files("case_001") == [tmp_path.resolve() / "imagesTr" / "case_001.nii.gz"]
    assert ds.label_file("case_001") == tmp_path.resolve() / "labelsTr" / "case_001.nii.gz"
    assert ds.has_label("case_001")
    validate_dataset(ds)

    geom = ds.geometry("case_000")
    assert geom.shape == SHAPE
    assert geom.spacing == pytest.approx(SPACING)
    img = ds.read_image("case_000")
    assert img.shape == (1, *SHAPE) and img.dtype == np.float32
    np.testing.assert_allclose(img[0], make_image(0))
    lab = ds.read_label("case_000")
    assert lab.shape == SHAPE and lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, make_label(0))


def test_nnunet_layout_loads_and_validates(tmp_path: Path) -> None:
    ds = load_dataset(make_nnunet(tmp_path))
    assert ds.layout == "nnunetv2"
    assert ds.case_ids == ["tiny_000", "tiny_001", "tiny_002"]
    assert ds.labels == {0: "background", 1: "A", 2: "B"}
    assert ds.foreground_labels == (1, 2)
    assert ds.n_channels == 1
    assert ds.image_files("tiny_002") == [tmp_path.resolve() / "imagesTr" / "tiny_002_0000.nii.gz"]
    assert ds.label_file("tiny_002") == tmp_path.resolve() / "labelsTr" / "tiny_002.nii.gz"
    validate_dataset(ds)
    np.testing.assert_array_equal(ds.read_label("tiny_001"), make_label(1))


def test_nnunet_multichannel(tmp_path: Path) -> None:
    ds = load_dataset(make_nnunet(tmp_path, channels=("T1", "T2", "FLAIR")))
    assert ds.n_channels == 3
    assert ds.channel_names == {0: "T1", 1: "T2", 2: "FLAIR"}
    files = ds.image_files("tiny_000")
    assert [f.name for f in files] == [f"tiny_000_{c:04d}.nii.gz" for c in range(3)]
    validate_dataset(ds)
    img = ds.read_image("tiny_001")
    assert img.shape == (3, *SHAPE) and img.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(img[c], make_image(10 + c))


def test_nnunet_missing_channel_file(tmp_path: Path) -> None:
    make_nnunet(tmp_path, channels=("T1", "T2"))
    missing = tmp_path / "imagesTr" / "tiny_001_0001.nii.gz"
    missing.unlink()
    err = validation_error(tmp_path)
    assert "tiny_001_0001.nii.gz" in str(err)
    assert "does not exist" in str(err)


def test_annotation_mode_without_labels(tmp_path: Path) -> None:
    make_nnunet(tmp_path, with_labels=False)
    ds = load_dataset(tmp_path, require_labels=False)
    assert ds.case_ids == ["tiny_000", "tiny_001", "tiny_002"]
    assert ds.label_file("tiny_000") is None
    assert not ds.has_label("tiny_000")
    validate_dataset(ds)
    # the same dataset is invalid when labels are required
    err = validation_error(tmp_path)
    assert "tiny_000.nii.gz" in str(err)


def test_msd_annotation_mode_partial_labels(tmp_path: Path) -> None:
    make_msd(tmp_path)
    (tmp_path / "labelsTr" / "case_001.nii.gz").unlink()
    ds = load_dataset(tmp_path, require_labels=False)
    validate_dataset(ds)
    assert [ds.has_label(c) for c in ds.case_ids] == [True, False, True]


def test_msd_v1_style_split_channels(tmp_path: Path) -> None:
    """nnU-Net v1 convention: listed as case.nii.gz, stored as case_0000.nii.gz."""
    make_msd(tmp_path, n=2)
    for p in (tmp_path / "imagesTr").iterdir():
        p.rename(p.with_name(p.name.replace(".nii.gz", "_0000.nii.gz")))
    ds = load_dataset(tmp_path)
    assert ds.image_files("case_000")[0].name == "case_000_0000.nii.gz"
    validate_dataset(ds)


def test_float_label_with_integer_values_is_ok(tmp_path: Path) -> None:
    make_msd(tmp_path)
    write_volume(tmp_path / "labelsTr" / "case_001.nii.gz", make_label(1).astype(np.float32))
    ds = load_dataset(tmp_path)
    validate_dataset(ds)
    lab = ds.read_label("case_001")
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, make_label(1))


def test_uint8_image_is_read_as_float32(tmp_path: Path) -> None:
    make_msd(tmp_path)
    write_volume(tmp_path / "imagesTr" / "case_002.nii.gz", np.full(SHAPE, 7, dtype=np.uint8))
    ds = load_dataset(tmp_path)
    validate_dataset(ds)
    img = ds.read_image("case_002")
    assert img.dtype == np.float32 and float(img.max()) == 7.0


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------


def test_geometry_matches_and_difference(tmp_path: Path) -> None:
    a = read_geometry(write_volume(tmp_path / "a.nii.gz", make_image(0)))
    assert a.shape == SHAPE
    assert a.spacing == pytest.approx(SPACING)
    assert a.ndim == 3
    b = Geometry(a.shape, tuple(s + 1e-6 for s in a.spacing), a.origin, a.direction)
    assert a.matches(b)
    assert a.difference(b) == ""
    c = Geometry(a.shape, (2.0, 1.5, 1.1), a.origin, a.direction)
    assert not a.matches(c)
    assert "spacing" in a.difference(c) and "1.1" in a.difference(c)
    d = Geometry((8, 10, 13), a.spacing, a.origin, a.direction)
    assert "shape (8, 10, 12) vs (8, 10, 13)" in a.difference(d)
    # copy_to round trip
    img = a.copy_to(sitk.GetImageFromArray(np.zeros(SHAPE, np.float32)))
    assert Geometry.from_sitk(img).matches(a)


def test_geometry_is_cached(tmp_path: Path) -> None:
    ds = load_dataset(make_msd(tmp_path))
    g1 = ds.geometry("case_000")
    assert ds.geometry("case_000") is g1


# ------------------------------------------------------------------------------------------------
# bad inputs: every error names the file and the offending value
# ------------------------------------------------------------------------------------------------


def test_missing_label_file(tmp_path: Path) -> None:
    make_msd(tmp_path)
    (tmp_path / "labelsTr" / "case_002.nii.gz").unlink()
    err = validation_error(tmp_path)
    assert "case_002.nii.gz" in str(err)
    assert "does not exist" in str(err)
    assert len(err.problems) == 1


def test_shape_mismatch(tmp_path: Path) -> None:
    make_msd(tmp_path)
    write_volume(tmp_path / "labelsTr" / "case_001.nii.gz", np.zeros((8, 10, 13), np.uint8))
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_001.nii.gz" in msg
    assert "shape (8, 10, 13) vs (8, 10, 12)" in msg


def test_spacing_mismatch(tmp_path: Path) -> None:
    make_msd(tmp_path)
    write_volume(tmp_path / "labelsTr" / "case_000.nii.gz", make_label(0), spacing=(3.0, 1.5, 1.0))
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_000.nii.gz" in msg
    assert "spacing (3, 1.5, 1) vs (2, 1.5, 1)" in msg


def test_origin_mismatch(tmp_path: Path) -> None:
    make_msd(tmp_path)
    write_volume(tmp_path / "labelsTr" / "case_000.nii.gz", make_label(0), origin=(5.0, 0.0, 0.0))
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_000.nii.gz" in msg
    assert "origin (5, 0, 0) vs (0, 0, 0)" in msg


def test_direction_mismatch(tmp_path: Path) -> None:
    make_msd(tmp_path)
    flipped = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    write_volume(tmp_path / "labelsTr" / "case_002.nii.gz", make_label(2), direction=flipped)
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_002.nii.gz" in msg
    assert "direction (-1, 0, 0, 0, -1, 0, 0, 0, 1)" in msg


def test_channel_geometry_mismatch(tmp_path: Path) -> None:
    make_nnunet(tmp_path, channels=("T1", "T2"))
    write_volume(tmp_path / "imagesTr" / "tiny_000_0001.nii.gz", make_image(0), spacing=(1.0, 1.0, 1.0))
    msg = str(validation_error(tmp_path))
    assert "tiny_000_0001.nii.gz" in msg and "spacing" in msg


def test_undeclared_label_values(tmp_path: Path) -> None:
    make_msd(tmp_path)
    lab = make_label(1)
    lab[0, 0, 1] = 3
    lab[0, 0, 2] = 7
    write_volume(tmp_path / "labelsTr" / "case_001.nii.gz", lab)
    msg = str(validation_error(tmp_path))
    assert "case_001.nii.gz" in msg
    assert "undeclared label values [3, 7]" in msg
    assert "[0, 1, 2]" in msg
    # can be switched off
    validate_dataset(load_dataset(tmp_path), check_label_values=False)


def test_non_integer_float_label(tmp_path: Path) -> None:
    make_msd(tmp_path)
    lab = make_label(0).astype(np.float32)
    lab[1, 1, 1] = 0.5
    write_volume(tmp_path / "labelsTr" / "case_000.nii.gz", lab)
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_000.nii.gz" in msg
    assert "non-integer values [0.5]" in msg
    with pytest.raises(DatasetError, match="non-integer"):
        load_dataset(tmp_path).read_label("case_000")


def test_truncated_gzip(tmp_path: Path) -> None:
    make_msd(tmp_path)
    path = tmp_path / "imagesTr" / "case_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    err = validation_error(tmp_path)
    assert "imagesTr/case_001.nii.gz" in str(err)
    assert "truncated" in str(err)


def test_truncated_real_nifti_label(tmp_path: Path) -> None:
    """SimpleITK silently reads truncated .nii.gz files; validate must not."""
    make_msd(tmp_path)
    path = tmp_path / "labelsTr" / "case_000.nii.gz"
    src = demo_dataset_path() / "labelsTr" / "hippocampus_001.nii.gz"
    write_volume(path, sitk.GetArrayFromImage(sitk.ReadImage(str(src))).astype(np.uint8))
    write_volume(
        tmp_path / "imagesTr" / "case_000.nii.gz",
        sitk.GetArrayFromImage(sitk.ReadImage(str(src))).astype(np.float32),
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_000.nii.gz" in msg and "truncated" in msg


def test_corrupt_gzip_data(tmp_path: Path) -> None:
    make_msd(tmp_path)
    path = tmp_path / "imagesTr" / "case_002.nii.gz"
    data = bytearray(path.read_bytes())
    data[40:60] = b"\xff" * 20
    path.write_bytes(bytes(data))
    msg = str(validation_error(tmp_path))
    assert "imagesTr/case_002.nii.gz" in msg


def test_uncompressed_truncated_nifti(tmp_path: Path) -> None:
    make_msd(tmp_path)
    path = tmp_path / "labelsTr" / "case_002.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 100]))  # valid gzip, too little NIfTI data
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_002.nii.gz" in msg and "truncated NIfTI data" in msg


@pytest.mark.parametrize("kind", ["png", "text"])
def test_non_nifti_named_nii_gz(tmp_path: Path, kind: str) -> None:
    make_msd(tmp_path)
    path = tmp_path / "labelsTr" / "case_001.nii.gz"
    if kind == "png":
        png = tmp_path / "x.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.uint8)), str(png))
        shutil.move(png, path)
    else:
        path.write_text("this is not an image\n")
    msg = str(validation_error(tmp_path))
    assert "labelsTr/case_001.nii.gz" in msg
    assert "cannot be read as a NIfTI file" in msg
    with pytest.raises(DatasetError, match=r"case_001\.nii\.gz"):
        load_dataset(tmp_path).read_label("case_001")


def test_empty_dataset(tmp_path: Path) -> None:
    make_msd(tmp_path, n=0)
    err = validation_error(tmp_path)
    assert "no cases" in str(err)
    assert "dataset.json" in str(err)

    v2 = make_nnunet(tmp_path / "v2", n=0)
    err = validation_error(v2)
    assert "no cases" in str(err) and "imagesTr" in str(err)


def test_missing_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json") as info:
        load_dataset(tmp_path)
    assert str(tmp_path.resolve()) in str(info.value)


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text('{"name": "x", "labels": {')
    with pytest.raises(DatasetError, match="invalid JSON") as info:
        load_dataset(tmp_path)
    assert "dataset.json" in str(info.value)


def test_unknown_json_layout(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text('{"name": "x"}')
    with pytest.raises(DatasetError, match="channel_names"):
        load_dataset(tmp_path)


def test_ignore_label_rejected(tmp_path: Path) -> None:
    make_nnunet(tmp_path, labels={"background": 0, "A": 1, "ignore": 2})
    with pytest.raises(DatasetError, match="ignore") as info:
        load_dataset(tmp_path)
    assert "dataset.json" in str(info.value)


def test_region_labels_rejected(tmp_path: Path) -> None:
    make_nnunet(tmp_path, labels={"background": 0, "whole": [1, 2], "core": 2})
    with pytest.raises(DatasetError, match="region") as info:
        load_dataset(tmp_path)
    assert "[1, 2]" in str(info.value)


def test_non_consecutive_labels_rejected(tmp_path: Path) -> None:
    make_msd(tmp_path, labels={"0": "background", "1": "A", "3": "C"})
    with pytest.raises(DatasetError, match=r"\[0, 1, 3\]"):
        load_dataset(tmp_path)


def test_msd_multichannel_4d_rejected(tmp_path: Path) -> None:
    make_msd(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="multi-channel MSD 4D files are not supported"):
        load_dataset(tmp_path)


def test_stray_file_in_nnunet_images(tmp_path: Path) -> None:
    make_nnunet(tmp_path)
    write_volume(tmp_path / "imagesTr" / "nochannel.nii.gz", make_image(0))
    msg = str(validation_error(tmp_path))
    assert "nochannel.nii.gz" in msg and "_{channel:04d}" in msg


def test_all_problems_collected_and_capped(tmp_path: Path) -> None:
    make_msd(tmp_path, n=25)
    for p in (tmp_path / "labelsTr").iterdir():
        p.unlink()
    err = validation_error(tmp_path)
    assert len(err.problems) == 25
    assert "has 25 problem(s)" in str(err)
    assert "... and 5 more" in str(err)


def test_unknown_case_id(tmp_path: Path) -> None:
    ds = load_dataset(make_msd(tmp_path))
    with pytest.raises(KeyError, match="nope"):
        ds.image_files("nope")


# ------------------------------------------------------------------------------------------------
# hold-out split
# ------------------------------------------------------------------------------------------------


def test_split_deterministic_and_order_independent() -> None:
    ids = [f"c{i:03d}" for i in range(40)]
    pool, test = split_holdout(ids, 0.25, seed=3)
    assert split_holdout(ids, 0.25, seed=3) == (pool, test)
    shuffled = list(np.random.default_rng(1).permutation(ids))
    assert split_holdout(shuffled, 0.25, seed=3) == (pool, test)
    assert split_holdout(tuple(reversed(ids)), 0.25, seed=3) == (pool, test)
    assert split_holdout(ids, 0.25, seed=4) != (pool, test)


def test_split_sizes_disjoint_and_covering() -> None:
    ids = [f"c{i:03d}" for i in range(40)]
    for fraction, n_test in [(0.25, 10), (0.1, 4), (0.5, 20), (0.01, 1)]:
        pool, test = split_holdout(ids, fraction, seed=0)
        assert len(test) == n_test
        assert not set(pool) & set(test)
        assert sorted(pool + test) == ids
        assert pool == sorted(pool) and test == sorted(test)


def test_split_small_inputs() -> None:
    pool, test = split_holdout(["b", "a"], 0.25)
    assert len(test) == 1 and len(pool) == 1
    assert sorted(pool + test) == ["a", "b"]
    with pytest.raises(DatasetError, match="at least 2"):
        split_holdout(["a"])
    with pytest.raises(DatasetError, match="at least 2"):
        split_holdout([])
    with pytest.raises(DatasetError, match="fraction"):
        split_holdout(["a", "b", "c"], fraction=1.5)
    with pytest.raises(DatasetError, match="more than once"):
        split_holdout(["a", "a", "b"])


# ------------------------------------------------------------------------------------------------
# bundled demo data and the full shared dataset
# ------------------------------------------------------------------------------------------------


def test_demo_dataset() -> None:
    root = demo_dataset_path()
    assert root.is_dir()
    assert (root / "LICENSE.txt").is_file() and (root / "README.md").is_file()
    assert "CC BY-SA 4.0" in (root / "README.md").read_text()
    ds = load_dataset(root)
    assert ds.layout == "msd"
    assert len(ds.case_ids) == 40
    assert ds.case_ids[0] == "hippocampus_001"
    assert set(ds.labels) == {0, 1, 2}
    assert ds.foreground_labels == (1, 2)
    validate_dataset(ds)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 40 and len(meta["training"]) == 40
    lab = ds.read_label(ds.case_ids[0])
    assert set(np.unique(lab).tolist()) == {0, 1, 2}


def test_demo_files_match_checksums() -> None:
    import hashlib

    root = demo_dataset_path()
    lines = (root / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == 80
    for line in lines:
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.skipif(not FULL_HIPPOCAMPUS.exists(), reason="shared Hippocampus dataset not available")
def test_full_shared_hippocampus() -> None:
    ds = load_dataset(FULL_HIPPOCAMPUS)
    assert len(ds.case_ids) == 260
    assert ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    validate_dataset(ds)


@pytest.mark.parametrize("bad", ["../../escape", "a/b", "..", "with space", "tab\\there", "ümlaut"])
def test_case_ids_from_a_dataset_json_are_checked(tmp_path: Path, bad: str) -> None:
    """An nnU-Net dataset.json may name its cases ('dataset' entries); an id that is not a safe file name is a
    clear error naming it, before anything uses it in a path."""
    root = make_nnunet(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {
        bad: {"images": ["imagesTr/tiny_000_0000.nii.gz"], "label": "labelsTr/tiny_000.nii.gz"},
        "tiny_001": {"images": ["imagesTr/tiny_001_0000.nii.gz"], "label": "labelsTr/tiny_001.nii.gz"},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="letters, digits") as info:
        load_dataset(root)
    assert repr(bad) in str(info.value) and str(root.resolve()) in str(info.value)


def test_ordinary_case_ids_are_accepted(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {
        "Case-01.v2_a": {"images": ["imagesTr/tiny_000_0000.nii.gz"], "label": "labelsTr/tiny_000.nii.gz"},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    assert load_dataset(root).case_ids == ["Case-01.v2_a"]
