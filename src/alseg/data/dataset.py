"""Datasets on disk: loading, header geometry, validation and the hold-out split.

Two on-disk layouts are supported and detected from ``dataset.json``:

* **nnU-Net v2** (``"channel_names"`` present): ``imagesTr/{case}_{channel:04d}{file_ending}``,
  ``labelsTr/{case}{file_ending}``, ``"labels"`` maps *name -> value*. An optional ``"dataset"``
  entry (``{case: {"images": [...], "label": ...}}``, paths relative to the dataset folder) overrides
  the folder scan, as in nnU-Net v2.
* **Medical Segmentation Decathlon** (``"training"`` list of ``{"image", "label"}``): one image file
  per case, ``"labels"`` maps *value string -> name*. If a listed image does not exist but
  nnU-Net-style channel files ``{case}_{channel:04d}{ending}`` do (the nnU-Net v1 convention), those
  are used. Multi-channel MSD 4D files are rejected: convert them to the nnU-Net v2 layout.

Nothing is written here. :func:`validate_dataset` checks everything up front and reports all
problems in one :class:`DatasetError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from alseg.data.images import (
    MAX_PROBLEMS_SHOWN,
    NIFTI_ENDINGS,
    DatasetError,
    Geometry,
    check_integrity,
    count_nonfinite,
    label_array,
    open_error,
    open_reader,
    read_geometry,
    read_sitk,
)

__all__ = [
    "Dataset",
    "DatasetError",
    "Geometry",
    "count_nonfinite",
    "demo_dataset_path",
    "load_dataset",
    "read_geometry",
    "split_holdout",
    "validate_dataset",
]

Layout = Literal["nnunetv2", "msd"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


_CASE_ID = re.compile(r"[A-Za-z0-9._-]+")


def is_valid_case_id(case_id: str) -> bool:
    """Letters, digits, '.', '_' and '-' only, and not only dots: safe as a file name in every folder alseg
    writes (``../../escape`` or ``a/b`` from an nnU-Net ``dataset.json`` are not)."""
    return bool(_CASE_ID.fullmatch(case_id)) and set(case_id) != {"."}


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


class Dataset:
    """A segmentation dataset on disk (read-only). Create with :func:`load_dataset`."""

    def __init__(
        self,
        root: Path,
        name: str,
        labels: Mapping[int, str],
        channel_names: Mapping[int, str],
        images: Mapping[str, Sequence[Path]],
        label_paths: Mapping[str, Path],
        file_ending: str,
        layout: Layout,
        require_labels: bool = True,
        num_training: int | None = None,
        layout_problems: Sequence[str] = (),
    ) -> None:
        self.root = Path(root)
        self.name = name
        self.labels: dict[int, str] = {int(k): str(v) for k, v in sorted(labels.items())}
        self.foreground_labels: tuple[int, ...] = tuple(v for v in self.labels if v != 0)
        self.channel_names: dict[int, str] = {int(k): str(v) for k, v in sorted(channel_names.items())}
        self.n_channels = len(self.channel_names)
        self.file_ending = file_ending
        self.layout: Layout = layout
        self.require_labels = require_labels
        self.num_training = num_training
        bad = sorted(c for c in images if not is_valid_case_id(c))
        if bad:
            raise DatasetError(
                f"{self.root}: case id(s) {', '.join(map(repr, bad[:10]))}{' ...' if len(bad) > 10 else ''} are not "
                "valid; a case id is used in file names and may hold only letters, digits, '.', '_' and '-' "
                "(not only dots)"
            )
        self.case_ids: list[str] = sorted(images)
        self._images = {c: [Path(p) for p in images[c]] for c in self.case_ids}
        self._label_paths = {c: Path(p) for c, p in label_paths.items()}
        self._layout_problems = list(layout_problems)
        self._geometry: dict[str, Geometry] = {}

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, root={str(self.root)!r}, layout={self.layout!r}, "
            f"cases={len(self.case_ids)}, channels={self.n_channels}, labels={self.labels})"
        )

    def __len__(self) -> int:
        return len(self.case_ids)

    def _check_case(self, case_id: str) -> None:
        if case_id not in self._images:
            raise KeyError(f"unknown case id {case_id!r} in dataset {self.name!r} ({self.root})")

    def image_files(self, case_id: str) -> list[Path]:
        """Image file paths of a case, one per channel (they may not exist; see validate)."""
        self._check_case(case_id)
        return list(self._images[case_id])

    def expected_label_file(self, case_id: str) -> Path:
        """Where the label file of a case is (or would be)."""
        self._check_case(case_id)
        return self._label_paths[case_id]

    def label_file(self, case_id: str) -> Path | None:
        """Label file of a case, or ``None`` if it does not exist."""
        path = self.expected_label_file(case_id)
        return path if path.is_file() else None

    def has_label(self, case_id: str) -> bool:
        return self.label_file(case_id) is not None

    def geometry(self, case_id: str) -> Geometry:
        """Geometry of the case (header of the first channel image; cached)."""
        self._check_case(case_id)
        if case_id not in self._geometry:
            self._geometry[case_id] = read_geometry(self._images[case_id][0])
        return self._geometry[case_id]

    def read_image(self, case_id: str) -> np.ndarray:
        """All channels of a case as float32, shape ``(C, *spatial)``."""
        arrays: list[np.ndarray] = []
        files = self.image_files(case_id)
        for path in files:
            img = read_sitk(path)
            if img.GetNumberOfComponentsPerPixel() != 1:
                raise DatasetError(
                    f"{path}: image has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                    "expected a scalar image (one file per channel)"
                )
            arr = sitk.GetArrayFromImage(img)
            if arrays and arr.shape != arrays[0].shape:
                raise DatasetError(f"{path}: channel shape {arr.shape}; expected {arrays[0].shape} as in {files[0]}")
            arrays.append(np.asarray(arr, dtype=np.float32))
        return np.stack(arrays, axis=0)

    def read_label(self, case_id: str) -> np.ndarray:
        """Label of a case as an integer array (uint8, or int16 if needed) of the spatial shape."""
        path = self.expected_label_file(case_id)
        if not path.is_file():
            raise DatasetError(f"{path}: label file of case {case_id!r} does not exist; expected a label")
        return label_array(path, read_sitk(path))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) and len(name) > len(ending) else None


def _parse_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    return None


def _check_labels(labels: dict[int, str], json_path: Path) -> None:
    for value, name in labels.items():
        if name.strip().lower() == "ignore":
            raise DatasetError(
                f"{json_path}: label {name!r} (value {value}) is declared; expected no 'ignore' label "
                "(alseg manages the ignore label itself; remove it from dataset.json)"
            )
    values = sorted(labels)
    if 0 not in labels:
        raise DatasetError(f"{json_path}: labels {values} lack 0; expected 0 = background")
    if values != list(range(len(values))):
        raise DatasetError(
            f"{json_path}: label values {values}; expected consecutive values 0..{len(values) - 1} "
            "(nnU-Net requirement)"
        )
    if len(values) < 2:
        raise DatasetError(f"{json_path}: labels {labels}; expected at least one foreground label")


def _rel(root: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else (root / path)


def _dataset(
    root: Path,
    meta: dict[str, Any],
    labels: Mapping[int, str],
    channel_names: Mapping[int, str],
    images: Mapping[str, Sequence[Path]],
    label_paths: Mapping[str, Path],
    file_ending: str,
    layout: Layout,
    require_labels: bool,
    problems: Sequence[str],
) -> Dataset:
    """The :class:`Dataset` of a parsed layout; ``numTraining`` kept only when it is an integer."""
    num = meta.get("numTraining")
    return Dataset(
        root=root,
        name=str(meta.get("name", root.name)),
        labels=labels,
        channel_names=channel_names,
        images=images,
        label_paths=label_paths,
        file_ending=file_ending,
        layout=layout,
        require_labels=require_labels,
        num_training=num if isinstance(num, int) and not isinstance(num, bool) else None,
        layout_problems=problems,
    )


def _load_nnunet(root: Path, meta: dict[str, Any], json_path: Path, require_labels: bool) -> Dataset:
    channel_names: dict[int, str] = {}
    raw_channels = meta["channel_names"]
    if not isinstance(raw_channels, dict) or not raw_channels:
        raise DatasetError(f"{json_path}: 'channel_names' is {raw_channels!r}; expected {{'0': 'T1', ...}}")
    for key, name in raw_channels.items():
        idx = _parse_int(key)
        if idx is None:
            raise DatasetError(f"{json_path}: channel key {key!r}; expected a channel index '0', '1', ...")
        channel_names[idx] = str(name)
    if sorted(channel_names) != list(range(len(channel_names))):
        raise DatasetError(
            f"{json_path}: channel indices {sorted(channel_names)}; expected 0..{len(channel_names) - 1}"
        )

    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError(f"{json_path}: 'labels' is {raw_labels!r}; expected {{'background': 0, ...}}")
    if "regions_class_order" in meta:
        raise DatasetError(
            f"{json_path}: 'regions_class_order' is set; expected plain labels (region-based "
            "training is not supported by alseg)"
        )
    labels: dict[int, str] = {}
    for name, value in raw_labels.items():
        if isinstance(value, list | tuple):
            raise DatasetError(
                f"{json_path}: label {name!r} is the region {value!r}; expected a single integer value "
                "(region-based labels are not supported by alseg)"
            )
        if str(name).strip().lower() == "ignore":
            raise DatasetError(
                f"{json_path}: label 'ignore' = {value!r} is declared; expected no 'ignore' label "
                "(alseg manages the ignore label itself; remove it from dataset.json)"
            )
        ivalue = _parse_int(value)
        if ivalue is None:
            raise DatasetError(f"{json_path}: label {name!r} has value {value!r}; expected an integer")
        if ivalue in labels:
            raise DatasetError(
                f"{json_path}: label value {ivalue} used by both {labels[ivalue]!r} and {name!r}; "
                "expected unique values"
            )
        labels[ivalue] = str(name)
    _check_labels(labels, json_path)

    file_ending = meta.get("file_ending")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise DatasetError(f"{json_path}: 'file_ending' is {file_ending!r}; expected e.g. '.nii.gz'")

    n_ch = len(channel_names)
    images: dict[str, list[Path]] = {}
    label_paths: dict[str, Path] = {}
    problems: list[str] = []
    if isinstance(meta.get("dataset"), dict):
        for case_id, entry in meta["dataset"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
                raise DatasetError(
                    f"{json_path}: 'dataset' entry {case_id!r} is {entry!r}; expected {{'images': [...], 'label': ...}}"
                )
            if len(entry["images"]) != n_ch:
                raise DatasetError(
                    f"{json_path}: case {case_id!r} lists {len(entry['images'])} images; "
                    f"expected {n_ch} (one per channel)"
                )
            images[str(case_id)] = [_rel(root, p) for p in entry["images"]]
            label = entry.get("label")
            label_paths[str(case_id)] = (
                _rel(root, label) if isinstance(label, str) else root / "labelsTr" / f"{case_id}{file_ending}"
            )
    else:
        images_dir = root / "imagesTr"
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: folder does not exist; expected the training images")
        found: dict[str, set[int]] = {}
        for path in sorted(images_dir.iterdir()):
            stem = _strip_ending(path.name, file_ending)
            if stem is None or path.name.startswith(".") or not path.is_file():
                continue  # hidden files, e.g. macOS "._case_0000.nii.gz", are skipped
            m = _CHANNEL_RE.match(stem)
            if m is None:
                problems.append(
                    f"{path}: file name does not end in a channel suffix; "
                    f"expected {{case}}_{{channel:04d}}{file_ending}"
                )
                continue
            channel = int(m["channel"])
            if channel >= n_ch:
                problems.append(
                    f"{path}: channel {channel} is not declared; expected channels 0..{n_ch - 1} ({channel_names})"
                )
                continue
            found.setdefault(m["case"], set()).add(channel)
        for case_id in found:
            images[case_id] = [images_dir / f"{case_id}_{c:04d}{file_ending}" for c in range(n_ch)]
            label_paths[case_id] = root / "labelsTr" / f"{case_id}{file_ending}"

    return _dataset(
        root, meta, labels, channel_names, images, label_paths, file_ending, "nnunetv2", require_labels, problems
    )


def _file_ending(name: str) -> str:
    for ending in NIFTI_ENDINGS:
        if name.lower().endswith(ending):
            return name[-len(ending) :]
    suffix = Path(name).suffix
    if not suffix:
        raise DatasetError(f"{name}: file name has no extension; expected e.g. '.nii.gz'")
    return suffix


def _load_msd(root: Path, meta: dict[str, Any], json_path: Path, require_labels: bool) -> Dataset:
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError(f"{json_path}: 'labels' is {raw_labels!r}; expected {{'0': 'background', ...}}")
    labels: dict[int, str] = {}
    for key, name in raw_labels.items():
        value = _parse_int(key)
        if value is None:
            raise DatasetError(
                f"{json_path}: label key {key!r} ({name!r}); expected an integer value string like '1' "
                "(MSD layout maps value -> name)"
            )
        labels[value] = str(name)
    _check_labels(labels, json_path)

    modality = meta.get("modality", {"0": "image"})
    if not isinstance(modality, dict) or not modality:
        raise DatasetError(f"{json_path}: 'modality' is {modality!r}; expected {{'0': 'MRI', ...}}")
    channel_names = {}
    for key, name in modality.items():
        idx = _parse_int(key)
        if idx is None:
            raise DatasetError(f"{json_path}: modality key {key!r}; expected '0', '1', ...")
        channel_names[idx] = str(name)
    n_ch = len(channel_names)

    training = meta.get("training")
    if not isinstance(training, list):
        raise DatasetError(f"{json_path}: 'training' is {training!r}; expected a list of image/label pairs")
    images: dict[str, list[Path]] = {}
    label_paths: dict[str, Path] = {}
    problems: list[str] = []
    endings: set[str] = set()
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DatasetError(f"{json_path}: training entry {i} is {entry!r}; expected {{'image': ..., 'label': ...}}")
        image = _rel(root, entry["image"])
        ending = _file_ending(image.name)
        endings.add(ending)
        case_id = image.name[: -len(ending)]
        if case_id in images:
            problems.append(f"{json_path}: case {case_id!r} is listed twice in 'training'; expected once")
            continue
        split = [image.with_name(f"{case_id}_{c:04d}{ending}") for c in range(n_ch)]
        if not image.exists() and split[0].exists():  # nnU-Net v1 style: one file per channel
            images[case_id] = split
        elif n_ch > 1:
            raise DatasetError(
                f"{image}: MSD image with {n_ch} modalities {list(channel_names.values())} (a 4D file); "
                "expected one file per channel: multi-channel MSD 4D files are not supported, convert "
                "the dataset to the nnU-Net v2 layout (imagesTr/{case}_{channel:04d}.nii.gz)"
            )
        else:
            images[case_id] = [image]
        label = entry.get("label")
        label_paths[case_id] = _rel(root, label) if isinstance(label, str) else root / "labelsTr" / f"{case_id}{ending}"
    if len(endings) > 1:
        raise DatasetError(f"{json_path}: mixed file endings {sorted(endings)}; expected a single one")

    if not images and not require_labels and (root / "imagesTr").is_dir():
        # Annotation mode without a training list: take the cases from the images.
        for path in sorted((root / "imagesTr").iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(NIFTI_ENDINGS):
                ending = _file_ending(path.name)
                endings.add(ending)
                case_id = path.name[: -len(ending)]
                images[case_id] = [path]
                label_paths[case_id] = root / "labelsTr" / path.name
        if len(endings) > 1:
            raise DatasetError(f"{root / 'imagesTr'}: mixed file endings {sorted(endings)}; expected one")

    ending = next(iter(endings)) if endings else ".nii.gz"
    return _dataset(root, meta, labels, channel_names, images, label_paths, ending, "msd", require_labels, problems)


def load_dataset(path: str | Path, require_labels: bool = True) -> Dataset:
    """Load a dataset folder (nnU-Net v2 or MSD layout, detected from ``dataset.json``).

    Only ``dataset.json`` and the folder listing are read; call :func:`validate_dataset` to check
    the files. With ``require_labels=False`` (annotation mode) cases need no label file.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist; expected a folder with dataset.json")
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: file does not exist; expected the dataset description")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_path}: invalid JSON ({exc}); expected a JSON object") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{json_path}: top-level value is {type(meta).__name__}; expected a JSON object")
    if "channel_names" in meta:
        return _load_nnunet(root, meta, json_path, require_labels)
    if "training" in meta or "modality" in meta:
        return _load_msd(root, meta, json_path, require_labels)
    raise DatasetError(
        f"{json_path}: keys {sorted(meta)}; expected 'channel_names' (nnU-Net v2 layout) or "
        "'training' (Medical Segmentation Decathlon layout)"
    )


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _validate_case(
    ds: Dataset, case_id: str, check_label_values: bool, check_image_data: bool, tol: float
) -> list[str]:
    problems: list[str] = []
    geoms: list[tuple[Path, Geometry]] = []
    for channel, path in enumerate(ds.image_files(case_id)):
        if not path.is_file():
            problems.append(f"{path}: image file of case {case_id!r} (channel {channel}) does not exist")
            continue
        reader = open_reader(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            problems.append(str(open_error(path, exc)))
            continue
        geom = Geometry.from_sitk(reader)
        if geom.ndim == 4 and ds.layout == "msd":
            problems.append(
                f"{path}: 4D image of shape {geom.shape}; expected 2D/3D: multi-channel MSD 4D files are "
                "not supported, convert the dataset to the nnU-Net v2 layout (one file per channel)"
            )
            continue
        if geom.ndim not in (2, 3):
            problems.append(f"{path}: image has {geom.ndim} dimensions {geom.shape}; expected 2 or 3")
            continue
        if reader.GetNumberOfComponents() != 1:
            problems.append(
                f"{path}: image has {reader.GetNumberOfComponents()} components per voxel; "
                "expected a scalar image (one file per channel)"
            )
            continue
        if geoms and not geom.matches(geoms[0][1], tol):
            problems.append(
                f"{path}: channel {channel} of case {case_id!r} does not match channel 0 "
                f"{geoms[0][0].name}: {geom.difference(geoms[0][1], tol)}"
            )
            continue
        if check_image_data:
            try:
                check_integrity(path)
                reader.Execute()
                n_bad = count_nonfinite(path)
                if n_bad:
                    problems.append(f"{path}: image has {n_bad} NaN/inf voxels; expected finite values")
                    continue
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            except RuntimeError as exc:
                problems.append(str(open_error(path, exc)))
                continue
        geoms.append((path, geom))
        if channel == 0:
            ds._geometry[case_id] = geom

    label_path = ds.expected_label_file(case_id)
    if not label_path.is_file():
        if ds.require_labels:
            problems.append(f"{label_path}: label file of case {case_id!r} does not exist; expected a label")
        return problems
    reader = open_reader(label_path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        problems.append(str(open_error(label_path, exc)))
        return problems
    lgeom = Geometry.from_sitk(reader)
    if geoms and not lgeom.matches(geoms[0][1], tol):
        problems.append(
            f"{label_path}: label of case {case_id!r} does not match image {geoms[0][0].name}: "
            f"{lgeom.difference(geoms[0][1], tol)} (label vs image)"
        )
        return problems
    if not check_label_values:
        return problems
    try:
        check_integrity(label_path)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise open_error(label_path, exc) from exc
        if count_nonfinite(label_path):
            raise DatasetError(f"{label_path}: label contains NaN/inf values; expected integer label values")
        arr = label_array(label_path, image)
    except DatasetError as exc:
        problems.append(str(exc))
        return problems
    present = np.flatnonzero(np.bincount(arr.ravel())) if arr.dtype == np.uint8 else np.unique(arr)
    undeclared = sorted(set(int(v) for v in present) - set(ds.labels))
    if undeclared:
        problems.append(
            f"{label_path}: case {case_id!r} has undeclared label values {undeclared}; "
            f"expected values in the declared labels {sorted(ds.labels)}"
        )
    return problems


def validate_dataset(
    ds: Dataset,
    check_label_values: bool = True,
    *,
    check_image_data: bool = True,
    tol: float = 1e-4,
) -> None:
    """Check the whole dataset before anything is written; raise one :class:`DatasetError`.

    Checks: at least one case; every channel image (and label, if required) exists and opens as an
    image (corrupt/truncated gzip and non-NIfTI files named ``.nii.gz`` included); channels and label
    share shape, spacing, origin and direction (within ``tol``); label values are integers and
    declared (``check_label_values``). ``check_image_data`` also reads every image in full to catch
    truncated data and NaN/inf voxels. The error's ``problems`` lists every problem found.
    """
    problems: list[str] = list(ds._layout_problems)
    if not ds.case_ids:
        where = ds.root / "imagesTr" if ds.layout == "nnunetv2" else ds.root / "dataset.json"
        problems.append(f"{where}: dataset {ds.name!r} has no cases; expected at least one case")
    elif ds.require_labels and ds.num_training is not None and ds.num_training != len(ds.case_ids):
        problems.append(
            f"{ds.root / 'dataset.json'}: numTraining is {ds.num_training}; expected "
            f"{len(ds.case_ids)} (the number of cases found)"
        )
    for case_id in ds.case_ids:
        problems.extend(_validate_case(ds, case_id, check_label_values, check_image_data, tol))
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        msg = f"dataset {ds.name!r} at {ds.root} has {len(problems)} problem(s):\n" + "\n".join(
            f"  - {p}" for p in shown
        )
        if more:
            msg += f"\n  ... and {more} more"
        raise DatasetError(msg, problems)


# --------------------------------------------------------------------------------------------------
# Splits and demo data
# --------------------------------------------------------------------------------------------------


def split_holdout(case_ids: Iterable[str], fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split cases into ``(pool, test)``, both sorted.

    The input is sorted first, so the split depends only on the set of ids and the seed. The test
    set has ``max(1, round(fraction * n))`` cases (Python rounding, half to even), at most ``n - 1``.
    """
    ids = sorted(str(c) for c in case_ids)
    n = len(ids)
    if len(set(ids)) != n:
        dupes = sorted({c for c in ids if ids.count(c) > 1})
        raise DatasetError(f"case ids {dupes[:10]} appear more than once; expected unique case ids")
    if n < 2:
        raise DatasetError(f"split_holdout: {n} case(s) {ids}; expected at least 2 to hold out a test set")
    if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise DatasetError(f"split_holdout: fraction {fraction!r}; expected a number in (0, 1)")
    n_test = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    test = sorted(ids[i] for i in perm[:n_test])
    test_set = set(test)
    pool = [c for c in ids if c not in test_set]
    return pool, test


def demo_dataset_path() -> Path:
    """Path of the bundled demo dataset (40 MSD Hippocampus cases, CC BY-SA 4.0, MSD layout)."""
    res = resources.files("alseg.data").joinpath("demo", "hippocampus")
    path = Path(str(res))
    if not (path / "dataset.json").is_file():
        raise DatasetError(
            f"{path}: bundled demo dataset not found; expected package data alseg/data/demo/hippocampus "
            "(is alseg installed from a zip or without package data?)"
        )
    return path
