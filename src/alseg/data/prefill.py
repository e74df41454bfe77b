"""Pre-annotation (prefill): the segmentation a person starts from and corrects, instead of an empty one.

From round 1 on, the prefill of a case is the previous round's model prediction inside the case's regions of
the round and 0 (background) elsewhere; in round 0, or with ``prefill: false``, there is none and a person
starts from background everywhere. What a person changes is measured by :mod:`alseg.evaluation.correction`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from alseg.data.regions import Box

#: what an annotator started from: the previous round's model prediction, or nothing (background everywhere)
PREFILL_MODEL = "model"
PREFILL_NONE = "none"
PREFILL_KINDS = (PREFILL_MODEL, PREFILL_NONE)


def prefill_label(
    segmentation: np.ndarray, boxes: Iterable[Box], labels: Mapping[int, str] | Iterable[int]
) -> np.ndarray:
    """``segmentation`` inside ``boxes``, 0 elsewhere, with only the declared ``labels`` (other values become 0).

    ``segmentation``: a label map in array order (the model's argmax). The result is uint8 when the largest
    declared label fits, else uint16.

    >>> seg = np.array([[1, 2, 5], [2, 2, 1]])
    >>> prefill_label(seg, [Box((0, 1), (2, 2))], {0: "background", 1: "a", 2: "b"}).tolist()
    [[0, 2, 0], [0, 2, 1]]
    """
    declared = np.array(sorted(int(k) for k in labels), dtype=np.int64)
    if declared.size == 0 or declared.min() < 0:
        raise ValueError(f"declared labels must be non-negative integers, got {declared.tolist()}")
    dtype = np.uint8 if declared.max() < 256 else np.uint16
    out = np.zeros(segmentation.shape, dtype=dtype)
    for box in boxes:
        if not box.inside(segmentation.shape):
            raise ValueError(f"box {box} lies outside the segmentation of shape {segmentation.shape}")
        sel = segmentation[box.slices()]
        out[box.slices()] = np.where(np.isin(sel, declared), sel, 0).astype(dtype)
    return out
