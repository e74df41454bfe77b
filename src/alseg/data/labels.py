"""Partial labels: the true label inside annotated regions, the ignore value elsewhere; atomic NIfTI writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from alseg.data.dataset import Geometry


def partial_label(labels: np.ndarray, annotated: np.ndarray, ignore_value: int) -> np.ndarray:
    """``labels`` where ``annotated`` is True, ``ignore_value`` elsewhere (uint8 when it fits)."""
    if labels.shape != annotated.shape:
        raise ValueError(f"label shape {labels.shape} and annotated mask shape {annotated.shape} differ")
    dtype = np.uint8 if ignore_value < 256 and labels.max(initial=0) < 256 else np.int16
    out = np.full(labels.shape, ignore_value, dtype=dtype)
    out[annotated] = labels[annotated]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_label_nifti(path: Path, array: np.ndarray, geometry: Geometry) -> str:
    """Write ``array`` as a NIfTI label in ``geometry``, atomically (temp file, fsync, rename).

    Returns the file's SHA-256.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"label array shape {array.shape} does not match the image shape {geometry.shape}")
    image = geometry.copy_to(sitk.GetImageFromArray(array))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)
