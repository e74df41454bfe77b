"""Partial labels: the true label inside annotated regions, the ignore value elsewhere; atomic NIfTI writes."""

from __future__ import annotations

import numpy as np

from alseg.data.images import sha256_file, write_label_nifti

__all__ = ["partial_label", "sha256_file", "write_label_nifti"]


def partial_label(labels: np.ndarray, annotated: np.ndarray, ignore_value: int) -> np.ndarray:
    """``labels`` where ``annotated`` is True, ``ignore_value`` elsewhere (uint8 when it fits)."""
    if labels.shape != annotated.shape:
        raise ValueError(f"label shape {labels.shape} and annotated mask shape {annotated.shape} differ")
    dtype = np.uint8 if ignore_value < 256 and labels.max(initial=0) < 256 else np.int16
    out = np.full(labels.shape, ignore_value, dtype=dtype)
    out[annotated] = labels[annotated]
    return out
