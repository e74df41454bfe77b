"""What a person changes in a region when correcting a prefill: corrected voxels and correction strokes.

- **corrected voxels**: the voxels of the region whose returned label differs from the prefill. Without a
  prefill (round 0, or ``prefill: false``) the prefill is background everywhere, so every foreground voxel of
  the region is a corrected voxel.
- **correction strokes**: the connected components of the corrected voxels inside the region, with full
  connectivity (26 neighbours in 3D, 8 in 2D; a region one voxel thick counts 8 in-plane neighbours). A proxy
  for the clicks or brush strokes a person needs: real edits depend on the tool (a large brush covers several
  components at once, a thin structure may take several strokes), and neither measure counts the time spent
  checking voxels that were right already.

Both are measured inside the region only: what lies outside it is never imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from alseg.data.prefill import PREFILL_KINDS
from alseg.data.regions import Box


@dataclass(frozen=True)
class RegionCost:
    """The correction measures of one region and the prefill they were measured against (``model``/``none``)."""

    corrected_voxels: int
    strokes: int
    prefill: str

    def __post_init__(self) -> None:
        if self.prefill not in PREFILL_KINDS:
            raise ValueError(f"prefill must be one of {PREFILL_KINDS}, got {self.prefill!r}")


def correction_strokes(changed: np.ndarray) -> int:
    """The connected components of a boolean mask, every neighbour counted (26 in 3D, 8 in 2D).

    >>> correction_strokes(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool))
    2
    """
    if not changed.any():
        return 0
    _, n = ndimage.label(changed, structure=np.ones((3,) * changed.ndim, dtype=bool))
    return int(n)


def correction_cost(label: np.ndarray, prefill: np.ndarray | None, box: Box, prefill_kind: str) -> RegionCost:
    """Corrected voxels and strokes of ``box``: where ``label`` differs from ``prefill`` inside the box.

    ``label``: the label a person returned (or the ground truth in simulation), whole-image array;
    ``prefill``: what they started from, on the same grid, or None for background everywhere (then
    ``prefill_kind`` must be ``none``).

    >>> lab = np.zeros((4, 4), dtype=np.uint8); lab[0, 0] = lab[3, 3] = 1
    >>> correction_cost(lab, None, Box((0, 0), (4, 4)), "none")
    RegionCost(corrected_voxels=2, strokes=2, prefill='none')
    """
    if prefill is not None and prefill.shape != label.shape:
        raise ValueError(f"prefill shape {prefill.shape} differs from the label shape {label.shape}")
    if prefill is None and prefill_kind != "none":
        raise ValueError(f"no prefill array given for a prefill of kind {prefill_kind!r}")
    inside = label[box.slices()]
    changed = inside != 0 if prefill is None else inside != prefill[box.slices()]
    return RegionCost(int(np.count_nonzero(changed)), correction_strokes(changed), prefill_kind)
