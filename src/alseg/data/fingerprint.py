"""What a dataset was: per case, each image file and the label file with its size, modification time and SHA-256.

An experiment stores the fingerprint of its dataset when it is created and compares the dataset with it when it
resumes (``alseg.loop.create``). The comparison is cheap where nothing changed: a file whose size and
modification time are the stored ones is taken as unchanged; only the others are hashed, and a file with the
stored hash but a new modification time is unchanged (the fingerprint returned carries the new time).

A fingerprint is a JSON-able mapping::

    {"version": 1, "root": "/abs/dataset",
     "cases": {"case_001": {"images": [{"name": "imagesTr/case_001.nii.gz", "size": 123,
                                        "mtime_ns": 1700000000000000000, "sha256": "..."}],
                            "label": {...} or null}}}

File names are relative to the dataset folder (absolute for a file outside it), so a dataset copied or moved
elsewhere has the same fingerprint apart from the modification times (``compare_fingerprint(..., moved=True)``
compares names, sizes and hashes only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alseg.data.dataset import Dataset
from alseg.data.images import sha256_file

__all__ = [
    "FINGERPRINT_VERSION",
    "CaseChange",
    "FileChange",
    "FingerprintComparison",
    "compare_fingerprint",
    "fingerprint_dataset",
    "fingerprint_from_json",
    "fingerprint_to_json",
    "n_files",
]

FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class FileChange:
    """One file of a case that differs from the fingerprint."""

    kind: str  # "image" or "label"
    change: str  # "changed", "missing" or "new"
    name: str  # relative to the dataset folder

    def describe(self) -> str:
        if self.change == "changed":
            return f"changed {self.kind} {self.name}"
        return f"{self.change} {self.kind} file {self.name}"


@dataclass(frozen=True)
class CaseChange:
    """A case that differs from the fingerprint: ``status`` is "changed", "new" (a case the fingerprint lacks) or
    "removed" (a case the dataset no longer lists); ``files`` says which files of a changed case differ."""

    case_id: str
    status: str
    files: tuple[FileChange, ...] = ()

    def describe(self) -> str:
        if self.status == "new":
            return "new case"
        if self.status == "removed":
            return "case no longer in the dataset"
        return ", ".join(f.describe() for f in self.files)

    def has(self, kind: str, change: str) -> bool:
        return any(f.kind == kind and f.change == change for f in self.files)

    @property
    def image_missing(self) -> bool:
        """No image to read: the case is gone or an image file is missing."""
        return self.status == "removed" or self.has("image", "missing")

    @property
    def label_missing(self) -> bool:
        """A label file that existed is gone (or the whole case is)."""
        return self.status == "removed" or self.has("label", "missing")

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "status": self.status,
            "files": [{"kind": f.kind, "change": f.change, "name": f.name} for f in self.files],
            "what": self.describe(),
        }


@dataclass
class FingerprintComparison:
    """The result of :func:`compare_fingerprint`.

    ``changes``: the cases that differ, sorted by case id. ``fingerprint``: the dataset as it is now (stored
    entries with refreshed modification times for unchanged files, fresh ones for changed and new files).
    ``refreshed``: files with the stored content but a new modification time. ``hashed``: how many files were
    hashed.
    """

    changes: list[CaseChange] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    refreshed: list[str] = field(default_factory=list)
    hashed: int = 0


def _name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX separators), or absolute where it lies outside ``root``."""
    norm = Path(os.path.normpath(path))
    try:
        return norm.relative_to(root).as_posix()
    except ValueError:
        return str(norm)


def _entry(path: Path, root: Path, st: os.stat_result | None = None) -> dict[str, Any]:
    st = path.stat() if st is None else st
    return {"name": _name(path, root), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def _case_files(ds: Dataset, case_id: str) -> tuple[list[Path], Path | None]:
    return ds.image_files(case_id), ds.label_file(case_id)


def fingerprint_dataset(ds: Dataset, case_ids: Iterable[str] | None = None) -> dict[str, Any]:
    """The fingerprint of ``ds`` (of ``case_ids`` only, if given): every file is read and hashed.

    Image files must exist (a dataset that passed ``validate_dataset``); a case without a label file gets
    ``"label": null``.
    """
    root = Path(ds.root)
    cases: dict[str, Any] = {}
    for cid in ds.case_ids if case_ids is None else case_ids:
        images, label = _case_files(ds, cid)
        cases[cid] = {
            "images": [_entry(p, root) for p in images],
            "label": None if label is None else _entry(label, root),
        }
    return {"version": FINGERPRINT_VERSION, "root": str(root), "cases": cases}


def fingerprint_to_json(fp: Mapping[str, Any]) -> str:
    return json.dumps(fp, sort_keys=True, separators=(",", ":"))


def fingerprint_from_json(text: str) -> dict[str, Any]:
    fp = json.loads(text)
    if not isinstance(fp, dict) or not isinstance(fp.get("cases"), dict):
        raise ValueError("not a dataset fingerprint (expected a mapping with 'cases')")
    return fp


def n_files(fp: Mapping[str, Any]) -> int:
    """How many files a fingerprint records."""
    return sum(len(c["images"]) + (c["label"] is not None) for c in fp["cases"].values())


class _Comparer:
    def __init__(self, root: Path, moved: bool) -> None:
        self.root = root
        self.moved = moved
        self.hashed = 0
        self.refreshed: list[str] = []

    def file(
        self, kind: str, stored: Mapping[str, Any] | None, path: Path | None
    ) -> tuple[FileChange | None, dict[str, Any] | None]:
        """Compare one file with its stored entry: (the change or None, the entry for the new fingerprint)."""
        if path is None or not path.is_file():
            if stored is None:
                return None, None
            name = stored["name"] if path is None else _name(path, self.root)
            return FileChange(kind, "missing", name), None
        st = path.stat()
        name = _name(path, self.root)
        if stored is None:
            self.hashed += 1
            return FileChange(kind, "new", name), _entry(path, self.root, st)
        same_name, same_size = name == stored["name"], st.st_size == stored["size"]
        if same_name and same_size and st.st_mtime_ns == stored["mtime_ns"] and not self.moved:
            return None, dict(stored)  # the cheap check: not read
        self.hashed += 1
        entry = _entry(path, self.root, st)
        if same_name and same_size and entry["sha256"] == stored["sha256"]:
            if not self.moved:
                self.refreshed.append(name)
            return None, entry
        return FileChange(kind, "changed", name), entry


def compare_fingerprint(stored: Mapping[str, Any], ds: Dataset, *, moved: bool = False) -> FingerprintComparison:
    """Compare the dataset ``ds`` with the fingerprint ``stored``; nothing is written.

    A file whose name, size and modification time are the stored ones is not read. ``moved``: ``ds`` is a
    copy of the fingerprinted dataset at another place, where modification times say nothing; every file is
    hashed and compared by name, size and SHA-256.
    """
    root = Path(ds.root)
    cmp = _Comparer(root, moved)
    stored_cases: Mapping[str, Any] = stored["cases"]
    listed = set(ds.case_ids)
    changes: list[CaseChange] = []
    cases: dict[str, Any] = {}
    for cid in sorted(listed | set(stored_cases)):
        if cid not in listed:
            changes.append(CaseChange(cid, "removed"))
            continue
        if cid not in stored_cases:
            images, label = _case_files(ds, cid)
            present = [p for p in images if p.is_file()]
            cmp.hashed += len(present) + (label is not None)
            cases[cid] = {
                "images": [_entry(p, root) for p in present],
                "label": None if label is None else _entry(label, root),
            }
            changes.append(CaseChange(cid, "new"))
            continue
        old = stored_cases[cid]
        files: list[FileChange] = []
        new_images: list[dict[str, Any]] = []
        images = ds.image_files(cid)
        for i in range(max(len(images), len(old["images"]))):
            s = old["images"][i] if i < len(old["images"]) else None
            change, entry = cmp.file("image", s, images[i] if i < len(images) else None)
            if change is not None:
                files.append(change)
            if entry is not None:
                new_images.append(entry)
        label_change, label_entry = cmp.file("label", old["label"], ds.expected_label_file(cid))
        if label_change is not None:
            files.append(label_change)
        cases[cid] = {"images": new_images, "label": label_entry}
        if files:
            changes.append(CaseChange(cid, "changed", tuple(files)))
    fp = {"version": FINGERPRINT_VERSION, "root": str(root), "cases": cases}
    return FingerprintComparison(changes, fp, cmp.refreshed, cmp.hashed)
