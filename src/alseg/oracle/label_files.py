"""Label files handed back by annotators: which files a folder holds, and whether a file fits its case.

Used by :mod:`alseg.oracle.importer` before anything changes; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alseg.data.images import (
    DatasetError,
    Geometry,
    check_integrity,
    count_nonfinite,
    label_array,
    open_error,
    open_reader,
    read_geometry,
)
from alseg.errors import AlsegError

LABEL_ENDINGS = (".nii.gz", ".nii")


class AnnotationImportError(AlsegError, ValueError):
    """Label files that cannot be imported; ``problems`` lists every problem found. Nothing was changed."""

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


def label_ending(name: str) -> str | None:
    low = name.lower()
    return next((e for e in LABEL_ENDINGS if low.endswith(e) and len(name) > len(e)), None)


def list_label_files(labels_dir: Path, exp_dir: Path) -> tuple[dict[str, Path], list[str], list[str]]:
    """``{case_id: file}`` of a labels folder, the problems found and notes.

    Only files directly inside the folder are read: hidden files and subfolders are skipped, and a link that
    resolves outside the folder is refused (copy the file in instead). The folder must lie outside the
    experiment folder (alseg keeps its own copies there).
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.exists():
        raise AnnotationImportError(f"labels folder {labels_dir} does not exist")
    if not labels_dir.is_dir():
        raise AnnotationImportError(f"{labels_dir} is not a folder; expected a folder of {{case_id}}.nii.gz files")
    real = labels_dir.resolve()
    exp_real = Path(exp_dir).resolve()
    if real == exp_real or real.is_relative_to(exp_real):
        raise AnnotationImportError(
            f"labels folder {labels_dir} lies inside the experiment {exp_dir} ({real.relative_to(exp_real)}); "
            "expected a folder of your own outside it"
        )
    files: dict[str, Path] = {}
    problems: list[str] = []
    notes: list[str] = []
    for entry in sorted(labels_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            notes.append(f"{entry}: subfolder skipped (only files directly in {labels_dir} are imported)")
            continue
        ending = label_ending(entry.name)
        if ending is None:
            problems.append(f"{entry}: not a NIfTI file name; expected label files named {{case_id}}.nii.gz")
            continue
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(real):
                problems.append(f"{entry}: a link to {target}, outside {labels_dir}; copy the file into the folder")
                continue
        if not entry.is_file():
            problems.append(f"{entry}: not a regular file (a broken link?)")
            continue
        case_id = entry.name[: -len(ending)]
        if case_id in files:
            problems.append(f"{entry}: case {case_id!r} has two label files ({files[case_id].name}); expected one")
            continue
        files[case_id] = entry
    if not files and not problems:
        raise AnnotationImportError(f"labels folder {labels_dir} holds no label files; expected {{case_id}}.nii.gz")
    return files, problems, notes


def check_label_file(path: Path, expected: Geometry, labels: dict[int, str], case_id: str) -> np.ndarray:
    """Read a label file and check it against the case's image; :class:`DatasetError` on any problem.

    The header's geometry (shape, spacing, origin, direction within 1e-4) is checked before any voxel is
    read, so a wrong file (another case, a full-resolution volume) costs no memory. Then: complete gzip/NIfTI
    data, a readable scalar image, integer values (floats only when whole, never NaN) and declared values only.
    """
    try:
        geo = read_geometry(path)  # the header only
    except DatasetError:
        check_integrity(path)  # a corrupt or truncated stream: say that rather than "cannot be read"
        raise
    if not geo.matches(expected):
        raise DatasetError(
            f"{path}: geometry differs from the image of case {case_id!r}: {geo.difference(expected)} "
            "(label vs image); expected the label on the image's own grid"
        )
    check_integrity(path)
    try:
        image = open_reader(path).Execute()
    except RuntimeError as exc:
        raise open_error(path, exc) from exc
    if count_nonfinite(path):
        raise DatasetError(f"{path}: label contains NaN/inf values; expected integer label values")
    arr = label_array(path, image)
    present = np.unique(arr)
    undeclared = sorted(int(v) for v in present if int(v) not in labels)
    if undeclared:
        raise DatasetError(
            f"{path}: undeclared label values {undeclared[:10]}; expected values in "
            f"{{{', '.join(f'{k}: {v}' for k, v in labels.items())}}}"
        )
    return arr
