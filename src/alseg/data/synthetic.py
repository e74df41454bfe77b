"""A synthetic anisotropic dataset: the shape of a cardiac cine-MRI short-axis stack, for tests and benchmarks.

Each case is about 10 thick slices (10 mm apart) of 256 × 216 voxels of 1 mm, the geometry on which alseg's
former defaults failed (a 9³-voxel region, nnU-Net's 10 × 256 × 224 patch on 2 cores). Three foreground
classes as in ACDC: the left-ventricular cavity (3), the myocardium around it (2) and the right ventricle
beside it (1), as elliptic cylinders that shrink towards the apex, at seeded positions and sizes, in an image
of class-dependent intensity with noise and a smooth bias field. It is written in the Medical Segmentation
Decathlon layout (``imagesTr/``, ``labelsTr/``, ``dataset.json``).

>>> # write_cardiac_like(Path("/tmp/cardiac"), n_cases=20, seed=0)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CARDIAC_SHAPE = (10, 256, 216)  # slices, rows, columns (array order)
CARDIAC_SPACING = (10.0, 1.0, 1.0)  # mm, array order
CARDIAC_LABELS = {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}


def cardiac_like_case(
    rng: np.random.Generator, shape: tuple[int, int, int] = CARDIAC_SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """One case: ``(image float32, label uint8)`` in array order."""
    n_z, n_y, n_x = shape
    cy = n_y / 2 + rng.uniform(-0.12, 0.12) * n_y
    cx = n_x / 2 + rng.uniform(-0.12, 0.12) * n_x
    r_lv = rng.uniform(16, 24)  # mm = voxels in-plane
    wall = rng.uniform(6, 10)
    yy, xx = np.mgrid[0:n_y, 0:n_x].astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    top, bottom = int(rng.integers(0, 2)), n_z - int(rng.integers(1, 3))
    for z in range(top, bottom):
        shrink = 1.0 - 0.6 * (z - top) / max(1, bottom - top)  # towards the apex
        r = r_lv * shrink
        d = np.hypot((yy - cy) / 1.1, xx - cx)
        label[z][d <= r + wall] = 2
        label[z][d <= r] = 3
        ry, rx = 1.6 * r, 0.9 * r  # the right ventricle: a crescent-like ellipse beside the septum
        rv = ((yy - cy) / ry) ** 2 + ((xx - (cx - r - wall - 0.7 * rx)) / rx) ** 2 <= 1.0
        label[z][rv & (label[z] == 0)] = 1
    means = np.asarray([60.0, 160.0, 90.0, 170.0], dtype=np.float32)
    bias = 1.0 + 0.15 * np.sin(yy / n_y * np.pi + rng.uniform(0, np.pi)) * np.cos(xx / n_x * np.pi)
    image = means[label] * bias[None] + rng.normal(0.0, 18.0, size=shape).astype(np.float32)
    return image.astype(np.float32), label


def write_cardiac_like(
    root: Path,
    n_cases: int = 20,
    seed: int = 0,
    shape: tuple[int, int, int] = CARDIAC_SHAPE,
    spacing: tuple[float, float, float] = CARDIAC_SPACING,
) -> Path:
    """Write ``n_cases`` cases in the MSD layout under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n_cases):
        case = f"cardiac_{i:03d}"
        image, label = cardiac_like_case(rng, shape)
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
            (root / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / folder / f"{case}.nii.gz"), useCompression=True)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {
        "name": "SyntheticCardiac",
        "description": "synthetic anisotropic short-axis stacks (alseg.data.synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": CARDIAC_LABELS,
        "numTraining": n_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
