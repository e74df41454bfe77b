"""The dataset fingerprint: what it records, and what the comparison finds (and reads) for each kind of change."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import alseg.data.fingerprint as fingerprint_module
from alseg.data.dataset import load_dataset
from alseg.data.fingerprint import compare_fingerprint, fingerprint_dataset, fingerprint_from_json, fingerprint_to_json
from conftest import synthetic_image, synthetic_label, write_volume

N_CASES = 8  # conftest's synthetic dataset: syn_000 .. syn_007, one image and one label each


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the fingerprint module hashes (the real hash still runs)."""
    calls: list[Path] = []
    real = fingerprint_module.sha256_file

    def counting(path: str | Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(fingerprint_module, "sha256_file", counting)
    return calls


def _touch(path: Path, seconds_later: int = 1000) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds_later * 10**9))


def test_fingerprint_records_every_file_relative_to_the_dataset(synthetic_dataset: Path) -> None:
    ds = load_dataset(synthetic_dataset)
    fp = fingerprint_dataset(ds)
    assert fp["root"] == str(synthetic_dataset.resolve())
    assert sorted(fp["cases"]) == [f"syn_{i:03d}" for i in range(N_CASES)]
    entry = fp["cases"]["syn_003"]
    image = synthetic_dataset / "imagesTr" / "syn_003.nii.gz"
    label = synthetic_dataset / "labelsTr" / "syn_003.nii.gz"
    assert entry["images"] == [
        {
            "name": "imagesTr/syn_003.nii.gz",
            "size": image.stat().st_size,
            "mtime_ns": image.stat().st_mtime_ns,
            "sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
        }
    ]
    assert entry["label"]["name"] == "labelsTr/syn_003.nii.gz"
    assert entry["label"]["sha256"] == hashlib.sha256(label.read_bytes()).hexdigest()
    assert fingerprint_from_json(fingerprint_to_json(fp)) == fp


def test_a_case_without_label_has_none(synthetic_dataset: Path) -> None:
    (synthetic_dataset / "labelsTr" / "syn_001.nii.gz").unlink()
    fp = fingerprint_dataset(load_dataset(synthetic_dataset, require_labels=False))
    assert fp["cases"]["syn_001"]["label"] is None
    assert fp["cases"]["syn_002"]["label"] is not None


def test_unchanged_dataset_is_not_read(synthetic_dataset: Path, hash_calls: list[Path]) -> None:
    ds = load_dataset(synthetic_dataset)
    fp = fingerprint_dataset(ds)
    assert len(hash_calls) == 2 * N_CASES
    hash_calls.clear()
    cmp = compare_fingerprint(fp, ds)
    assert cmp.changes == [] and cmp.refreshed == [] and cmp.hashed == 0
    assert hash_calls == []
    assert cmp.fingerprint == fp


def test_new_mtime_same_content_is_no_change(synthetic_dataset: Path, hash_calls: list[Path]) -> None:
    ds = load_dataset(synthetic_dataset)
    fp = fingerprint_dataset(ds)
    label = synthetic_dataset / "labelsTr" / "syn_002.nii.gz"
    _touch(label)
    hash_calls.clear()
    cmp = compare_fingerprint(fp, ds)
    assert cmp.changes == []
    assert cmp.refreshed == ["labelsTr/syn_002.nii.gz"]
    assert hash_calls == [label]  # only the touched file is read
    assert cmp.fingerprint["cases"]["syn_002"]["label"]["mtime_ns"] == label.stat().st_mtime_ns
    hash_calls.clear()
    again = compare_fingerprint(cmp.fingerprint, ds)  # with the refreshed times: nothing read
    assert again.changes == [] and hash_calls == []


def test_each_kind_of_change_is_named(synthetic_dataset: Path) -> None:
    ds = load_dataset(synthetic_dataset)
    fp = fingerprint_dataset(ds)
    root = synthetic_dataset
    write_volume(root / "labelsTr" / "syn_001.nii.gz", synthetic_label(101))  # changed label
    write_volume(root / "imagesTr" / "syn_002.nii.gz", synthetic_image(synthetic_label(2), 102))  # changed image
    (root / "imagesTr" / "syn_003.nii.gz").unlink()  # missing image
    (root / "labelsTr" / "syn_004.nii.gz").unlink()  # missing label
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = [e for e in meta["training"] if "syn_005" not in e["image"]]  # removed case
    lab = synthetic_label(9)
    write_volume(root / "imagesTr" / "syn_009.nii.gz", synthetic_image(lab, 9))  # new case
    write_volume(root / "labelsTr" / "syn_009.nii.gz", lab)
    meta["training"].append({"image": "./imagesTr/syn_009.nii.gz", "label": "./labelsTr/syn_009.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))

    cmp = compare_fingerprint(fp, load_dataset(root, require_labels=False))
    found = {c.case_id: c.describe() for c in cmp.changes}
    assert found == {
        "syn_001": "changed label labelsTr/syn_001.nii.gz",
        "syn_002": "changed image imagesTr/syn_002.nii.gz",
        "syn_003": "missing image file imagesTr/syn_003.nii.gz",
        "syn_004": "missing label file labelsTr/syn_004.nii.gz",
        "syn_005": "case no longer in the dataset",
        "syn_009": "new case",
    }
    by_id = {c.case_id: c for c in cmp.changes}
    assert by_id["syn_003"].image_missing and not by_id["syn_003"].label_missing
    assert by_id["syn_004"].label_missing and not by_id["syn_004"].image_missing
    assert by_id["syn_005"].image_missing and by_id["syn_005"].label_missing
    # the fingerprint returned is the dataset as it is now
    now = cmp.fingerprint["cases"]
    assert "syn_005" not in now and "syn_009" in now
    assert now["syn_003"]["images"] == [] and now["syn_004"]["label"] is None
    assert (
        now["syn_001"]["label"]["sha256"] == hashlib.sha256((root / "labelsTr/syn_001.nii.gz").read_bytes()).hexdigest()
    )


def test_a_label_that_appears_is_named(synthetic_dataset: Path) -> None:
    label = synthetic_dataset / "labelsTr" / "syn_006.nii.gz"
    kept = label.read_bytes()
    label.unlink()
    fp = fingerprint_dataset(load_dataset(synthetic_dataset, require_labels=False))
    label.write_bytes(kept)
    cmp = compare_fingerprint(fp, load_dataset(synthetic_dataset, require_labels=False))
    assert [(c.case_id, c.describe()) for c in cmp.changes] == [("syn_006", "new label file labelsTr/syn_006.nii.gz")]


def test_a_moved_copy_matches_by_content(synthetic_dataset: Path, tmp_path: Path, hash_calls: list[Path]) -> None:
    fp = fingerprint_dataset(load_dataset(synthetic_dataset))
    copy = tmp_path / "elsewhere" / "Synthetic"
    shutil.copytree(synthetic_dataset, copy, copy_function=shutil.copyfile)  # new modification times
    hash_calls.clear()
    cmp = compare_fingerprint(fp, load_dataset(copy), moved=True)
    assert cmp.changes == []
    assert len(hash_calls) == 2 * N_CASES  # every file read: times say nothing at a new place
    assert cmp.fingerprint["root"] == str(copy.resolve())
    assert cmp.fingerprint["cases"]["syn_000"]["images"][0]["name"] == "imagesTr/syn_000.nii.gz"

    write_volume(copy / "imagesTr" / "syn_004.nii.gz", synthetic_image(synthetic_label(4), 404))
    cmp = compare_fingerprint(fp, load_dataset(copy), moved=True)
    assert [(c.case_id, c.describe()) for c in cmp.changes] == [("syn_004", "changed image imagesTr/syn_004.nii.gz")]
