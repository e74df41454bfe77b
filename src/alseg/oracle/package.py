"""The work package of a round: ``rounds/NNN/to_annotate/``, what people label.

::

    manifest.json, manifest.csv   one entry per region: id, case, mask value, box in voxels and in mm, score
    masks/{case}_regions.nii.gz   the regions to label (value k = the case's k-th region, 0 elsewhere),
                                  in the geometry of the case's image
    prefill/{case}.nii.gz         from round 1 on (unless ``prefill: false``): the previous round's model prediction
                                  inside the case's regions, 0 elsewhere, to open as the starting segmentation
    images/                       links to the case images (copies where links cannot be made)
    README.txt                    what to do

Built in a temporary folder and renamed into place, so a package is either complete or absent.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alseg.data.dataset import Dataset
from alseg.data.images import Geometry, write_label_nifti
from alseg.data.prefill import PREFILL_MODEL, PREFILL_NONE, prefill_label
from alseg.data.regions import Box
from alseg.durable import fsync_dir, fsync_tree
from alseg.oracle.base import ModelSegmentations, checked_segmentations
from alseg.store.layout import fault_point, log, round_dir
from alseg.store.state import ExperimentState, StoredRegion

PACKAGE_DIR = "to_annotate"
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
PREFILL_DIR = "prefill"


def package_dir(exp_dir: Path, round_index: int) -> Path:
    """Where the work package of a round is exported."""
    return round_dir(exp_dir, round_index) / PACKAGE_DIR


def mask_file_name(case_id: str) -> str:
    return f"{case_id}_regions.nii.gz"


def prefill_path(exp_dir: Path, round_index: int, case_id: str) -> Path:
    """Where the work package of a round holds the prefill of a case (written only when it has one)."""
    return package_dir(exp_dir, round_index) / PREFILL_DIR / f"{case_id}.nii.gz"


def package_prefill(exp_dir: Path, round_index: int) -> str | None:
    """What the exported work package of a round declares as its prefill (``model`` or ``none``); None when it
    has no manifest or one written before alseg made prefills."""
    try:
        manifest = json.loads((package_dir(exp_dir, round_index) / MANIFEST_JSON).read_text())
    except (OSError, ValueError):
        return None
    kind = manifest.get("prefill") if isinstance(manifest, dict) else None
    return kind if kind in (PREFILL_MODEL, PREFILL_NONE) else None


def index_to_world(geo: Geometry, index: Sequence[float]) -> list[float]:
    """Physical (LPS, mm) position of a voxel index given in array order (``z, y, x``).

    The same as SimpleITK's ``TransformContinuousIndexToPhysicalPoint`` with the index reversed to ``x, y, z``.
    """
    n = geo.ndim
    idx_xyz = np.asarray(list(index)[::-1], dtype=float)
    spacing_xyz = np.asarray(geo.spacing[::-1], dtype=float)
    direction = np.asarray(geo.direction, dtype=float).reshape(n, n)
    return [float(v) for v in np.asarray(geo.origin, dtype=float) + direction @ (idx_xyz * spacing_xyz)]


def box_extent(geo: Geometry, box: Box) -> dict[str, list[float] | list[int]]:
    """A box in viewer voxel indices (``x, y, z``, inclusive) and in world millimetres (LPS and RAS)."""
    last = [a + s - 1 for a, s in zip(box.start, box.size, strict=True)]
    corners = np.array([index_to_world(geo, c) for c in itertools.product(*zip(box.start, last, strict=True))])
    centre = index_to_world(geo, [(a + b) / 2 for a, b in zip(box.start, last, strict=True)])
    ras = [-centre[0], -centre[1], *centre[2:]]
    return {
        "index_min_xyz": list(box.start[::-1]),
        "index_max_xyz": last[::-1],
        "world_min_lps_mm": [round(float(v), 4) for v in corners.min(axis=0)],
        "world_max_lps_mm": [round(float(v), 4) for v in corners.max(axis=0)],
        "centre_lps_mm": [round(v, 4) for v in centre],
        "centre_ras_mm": [round(v, 4) for v in ras],
    }


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _package_is_complete(out: Path, regions: Sequence[StoredRegion]) -> bool:
    try:
        manifest = json.loads((out / MANIFEST_JSON).read_text())
    except (OSError, ValueError):
        return False
    ids = sorted(int(e.get("region_id", -1)) for e in manifest.get("regions", []))
    if ids != sorted(g.id for g in regions):
        return False
    cases = {g.region.case_id for g in regions}
    if manifest.get("prefill") == PREFILL_MODEL and not all(
        (out / PREFILL_DIR / f"{c}.nii.gz").is_file() for c in cases
    ):
        return False
    return all((out / "masks" / mask_file_name(c)).is_file() for c in cases)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


_README = """alseg work package: round {round}, {n_regions} regions in {n_cases} cases

For each case, label the voxels inside the boxes of masks/{{case}}_regions.nii.gz (value k = region k of the
case in manifest.csv) on top of the image in images/. Label values: {labels}.
Voxels outside the boxes are ignored (0 there is fine).
{prefill}
Save one label file per case, named {{case_id}}.nii.gz, on the image's own grid (same size, spacing,
origin and orientation: start from the mask or the image in your viewer and save the segmentation), into
a folder of your own outside the experiment, then run:

    alseg import {exp} LABELS_DIR
    alseg query {exp}

Cases: {cases}
"""


_README_PREFILL = """
prefill/{{case}}.nii.gz holds the prediction of the model of round {model_round} inside the boxes (0 elsewhere):
open it as the starting segmentation over the image, correct it inside the boxes, and save the corrected
segmentation as {{case_id}}.nii.gz (below). alseg records how many voxels you changed and in how many connected
pieces (corrected voxels, correction strokes).
"""


def export_work_package(
    exp_dir: Path,
    state: ExperimentState,
    ds: Dataset,
    round_index: int,
    segmentations: ModelSegmentations | None = None,
) -> bool:
    """Write ``rounds/NNN/to_annotate/`` for the regions of a round unless it is already complete.

    ``segmentations``: from round 1 on, the model predictions written as ``prefill/{case}.nii.gz`` (the model of
    round ``round_index - 1`` inside the case's regions of the round, 0 elsewhere, declared label values only);
    None, or round 0: no prefill. Built in a temporary folder and renamed into place, so the package is either
    complete or absent. Returns True when it was written now.
    """
    r = round_index
    out = package_dir(exp_dir, r)
    regions = state.regions(round_index=r)
    if _package_is_complete(out, regions):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{PACKAGE_DIR}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{PACKAGE_DIR}.tmp-{os.getpid()}")
    (tmp / "masks").mkdir(parents=True)
    (tmp / "images").mkdir()
    by_case: dict[str, list[StoredRegion]] = defaultdict(list)
    for g in regions:
        by_case[g.region.case_id].append(g)
    entries: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    kind = PREFILL_MODEL if r > 0 and segmentations is not None else PREFILL_NONE
    try:
        predicted = None
        if kind == PREFILL_MODEL and segmentations is not None:
            (tmp / PREFILL_DIR).mkdir()
            predicted = checked_segmentations(segmentations, r - 1, sorted(by_case), ds)
        for i, case_id in enumerate(sorted(by_case)):
            geo = ds.geometry(case_id)
            if predicted is not None:
                boxes = [g.region.box for g in by_case[case_id]]
                prefill = prefill_label(next(predicted), boxes, ds.labels)
                write_label_nifti(tmp / PREFILL_DIR / f"{case_id}.nii.gz", prefill, geo)
            mask = np.zeros(geo.shape, dtype=np.uint8 if len(by_case[case_id]) < 256 else np.uint16)
            for k, g in enumerate(by_case[case_id], start=1):
                mask[g.region.box.slices()] = k
                entries.append(
                    {
                        "region_id": g.id,
                        "round": r,
                        "case_id": case_id,
                        "mask_value": k,
                        "start": list(g.region.box.start),
                        "size": list(g.region.box.size),
                        **box_extent(geo, g.region.box),
                        "n_voxels": g.region.box.n_voxels,
                        "strategy": g.region.info.get("strategy"),
                        "score": None if g.region.score != g.region.score else float(g.region.score),
                    }
                )
            write_label_nifti(tmp / "masks" / mask_file_name(case_id), mask, geo)
            images = []
            for src in ds.image_files(case_id):
                _link_or_copy(src, tmp / "images" / src.name)
                images.append(f"images/{src.name}")
            cases.append(
                {
                    "case_id": case_id,
                    "images": images,
                    "mask": f"masks/{mask_file_name(case_id)}",
                    "prefill": f"{PREFILL_DIR}/{case_id}.nii.gz" if predicted is not None else None,
                    "label_file": f"{case_id}.nii.gz",
                    "shape": list(geo.shape),
                    "spacing": list(geo.spacing),
                    "regions": [g.id for g in by_case[case_id]],
                }
            )
            if i == 0:
                fault_point("export.mask_written", r)
        labels = {str(k): v for k, v in ds.labels.items()}
        manifest = {
            "round": r,
            "experiment": str(Path(exp_dir).resolve()),
            "labels": labels,
            "prefill": kind,
            "prefill_model_round": r - 1 if kind == PREFILL_MODEL else None,
            "axes": "start/size: array order (z, y, x), half-open; index_*_xyz: viewer voxel indices, inclusive; "
            "world_*: millimetres, LPS (ITK, ITK-SNAP); centre_ras_mm: RAS (3D Slicer)",
            "cases": cases,
            "regions": entries,
        }
        _fsync_write(tmp / MANIFEST_CSV, _manifest_csv(entries))
        _fsync_write(
            tmp / "README.txt",
            _README.format(
                round=r,
                n_regions=len(entries),
                n_cases=len(cases),
                labels=", ".join(f"{k} = {v}" for k, v in labels.items()),
                prefill=_README_PREFILL.format(model_round=r - 1) if kind == PREFILL_MODEL else "",
                exp=Path(exp_dir).resolve(),
                cases=", ".join(sorted(by_case)),
            ),
        )
        _fsync_write(tmp / MANIFEST_JSON, json.dumps(manifest, indent=1))
        fault_point("export.before_rename", r)
        fsync_tree(tmp)
        if out.exists():
            trash = out.with_name(f".{PACKAGE_DIR}.old-{os.getpid()}")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "round %d: work package of %d regions in %d cases exported to %s (prefill: %s)",
        r,
        len(entries),
        len(cases),
        out,
        kind,
    )
    return True


def _manifest_csv(entries: Sequence[dict[str, Any]]) -> str:
    cols = (
        "region_id",
        "round",
        "case_id",
        "mask_value",
        "start",
        "size",
        "index_min_xyz",
        "index_max_xyz",
        "world_min_lps_mm",
        "world_max_lps_mm",
        "centre_lps_mm",
        "centre_ras_mm",
        "strategy",
        "score",
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for e in entries:
        w.writerow(
            [" ".join(str(v) for v in e[c]) if isinstance(e[c], list) else ("" if e[c] is None else e[c]) for c in cols]
        )
    return buf.getvalue()
