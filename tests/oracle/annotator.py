"""A scripted annotator for the annotation round-trip tests: reads a round's work package and writes label files
with the ground truth inside the requested regions (and, on request, stray labels outside them).

A plain module so that subprocesses can import it too (``sys.path.insert(0, tests/oracle)``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from alseg.config import load_config
from alseg.data.dataset import load_dataset


def work_package(exp_dir: Path, round_index: int) -> Path:
    return Path(exp_dir) / "rounds" / f"{round_index:03d}" / "to_annotate"


def annotate(
    exp_dir: Path,
    round_index: int,
    labels_dir: Path,
    *,
    n_outside: int = 0,
    cases: Iterable[str] | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``labels_dir/{case}.nii.gz`` for the cases of a round's work package: ground truth inside the
    requested regions, 0 elsewhere, plus ``n_outside`` voxels of label 1 outside the regions of each case."""
    package = work_package(exp_dir, round_index)
    manifest = json.loads((package / "manifest.json").read_text())
    ds = load_dataset(load_config(Path(exp_dir) / "config.yaml").dataset)
    wanted = set(cases) if cases is not None else None
    labels_dir = Path(labels_dir)
    labels_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict[str, Path] = {}
    for case in manifest["cases"]:
        case_id = case["case_id"]
        if wanted is not None and case_id not in wanted:
            continue
        mask_img = sitk.ReadImage(str(package / case["mask"]))
        mask = sitk.GetArrayFromImage(mask_img) > 0
        gt = ds.read_label(case_id)
        lab = np.where(mask, gt, 0).astype(np.uint8)
        if n_outside:
            outside = np.flatnonzero(~mask.ravel())
            lab.ravel()[rng.choice(outside, size=n_outside, replace=False)] = 1
        img = sitk.GetImageFromArray(lab)
        img.CopyInformation(mask_img)
        path = labels_dir / f"{case_id}.nii.gz"
        sitk.WriteImage(img, str(path), useCompression=True)
        out[case_id] = path
    return out
