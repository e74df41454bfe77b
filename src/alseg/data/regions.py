"""Regions: axis-aligned boxes in image voxel coordinates, the unit of annotation.

Every annotation unit is a box: a 3D patch, a 2D slice (size 1 along the slice axis, the full image
elsewhere) or a whole case (the full image). Boxes are half-open: ``start <= index < start + size``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Unit = Literal["box", "slice", "case"]


@dataclass(frozen=True, order=True)
class Box:
    """An axis-aligned box: ``start`` (inclusive) and ``size`` per spatial axis, in voxels."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.start) != len(self.size):
            raise ValueError(f"box start {self.start} and size {self.size} differ in dimension")
        if any(s <= 0 for s in self.size):
            raise ValueError(f"box size must be positive on every axis, got {self.size}")
        object.__setattr__(self, "start", tuple(int(s) for s in self.start))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(a + b for a, b in zip(self.start, self.size, strict=True))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.size))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    def inside(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.start) and all(
            a >= 0 and b <= n for a, b, n in zip(self.start, self.stop, shape, strict=True)
        )

    def overlaps(self, other: Box) -> bool:
        return all(
            a0 < b1 and b0 < a1 for a0, a1, b0, b1 in zip(self.start, self.stop, other.start, other.stop, strict=True)
        )

    def to_json(self) -> dict[str, list[int]]:
        return {"start": list(self.start), "size": list(self.size)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Sequence[int]]) -> Box:
        return cls(tuple(obj["start"]), tuple(obj["size"]))


@dataclass(frozen=True)
class Region:
    """A box in one case, with the score and the explanation of the strategy that chose it."""

    case_id: str
    box: Box
    score: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        return (self.case_id, self.box.start, self.box.size)


def unit_box_size(
    unit: Unit, shape: Sequence[int], region_size: Sequence[int] | None, slice_axis: int = 0
) -> tuple[int, ...]:
    """The box size of one annotation unit in an image of ``shape``.

    A 3D box larger than the image along an axis is clamped to the image there, so that small cases still
    offer at least one candidate.
    """
    shape = tuple(int(s) for s in shape)
    if unit == "case":
        return shape
    if unit == "slice":
        if not 0 <= slice_axis < len(shape):
            raise ValueError(f"slice_axis {slice_axis} is outside an image of {len(shape)} axes")
        return tuple(1 if a == slice_axis else n for a, n in enumerate(shape))
    if unit == "box":
        if region_size is None:
            raise ValueError("unit 'box' needs a region_size")
        if len(region_size) != len(shape):
            raise ValueError(f"region_size {tuple(region_size)} has {len(region_size)} axes, image has {len(shape)}")
        return tuple(min(int(r), n) for r, n in zip(region_size, shape, strict=True))
    raise ValueError(f"unknown annotation unit {unit!r}; expected one of 'box', 'slice', 'case'")


#: a default 3D region holds at most this many voxels: nnActive's 20³ boxes (Hippocampus, BraTS); its
#: ACDC boxes of 4 × 40 × 40 hold 6,400
MAX_REGION_VOXELS = 20**3


def default_region_size(
    shapes: Iterable[Sequence[int]],
    spacings: Iterable[Sequence[float]] | None = None,
    fraction: float = 0.55,
    max_voxels: int = MAX_REGION_VOXELS,
) -> tuple[int, ...]:
    """The default box size for a dataset: about isotropic in millimetres.

    The physical edge is ``fraction`` of the median image size (the median over axes of the per-axis median
    physical extent), shrunk until the box holds at most ``max_voxels`` voxels (pixels in 2D), since what an
    annotator labels in one go is a matter of voxels. Each axis gets ``edge / spacing`` voxels (the median
    spacing of that axis), rounded (to an even number from 8 voxels up), at least 1 and at most the median
    image extent. On Hippocampus (median 36 × 50 × 35 voxels of 1 mm) this gives 20³, nnActive's box there;
    on a cardiac cine-MRI shape (10 × 256 × 216 voxels of 10 × 1 × 1 mm) 4 × 44 × 44, where nnActive used
    4 × 40 × 40. Without ``spacings`` every axis counts as 1 mm.
    """
    arr = np.asarray([tuple(s) for s in shapes], dtype=float)
    if arr.size == 0:
        raise ValueError("cannot derive a region size from an empty dataset")
    ndim = arr.shape[1]
    sp = np.ones(ndim) if spacings is None else np.median(np.asarray([tuple(s) for s in spacings], float), axis=0)
    if sp.shape != (ndim,) or np.any(sp <= 0):
        raise ValueError(f"spacings must be positive, one per axis of the {ndim}-D images; median {sp.tolist()}")
    extent = np.median(arr, axis=0)
    limit = np.maximum(1, np.floor(extent)).astype(int)

    def voxels(edge_mm: float) -> tuple[int, ...]:
        out = []
        for e, n in zip(edge_mm / sp, limit, strict=True):
            v = 2 * round(e / 2) if e >= 8 else round(e)
            out.append(int(min(n, max(1, v))))
        return tuple(out)

    edge = fraction * float(np.median(extent * sp))
    lo, hi = 0.0, edge  # the largest edge whose box holds at most max_voxels voxels (monotone in the edge)
    if np.prod(voxels(hi)) > max_voxels:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.prod(voxels(mid)) <= max_voxels else (lo, mid)
        edge = lo
    return voxels(edge)


def default_slice_axis(spacings: Iterable[Sequence[float]], anisotropy: float = 3.0) -> int:
    """The axis 2D slices are cut along by default: on anisotropic data (the largest median spacing at least
    ``anisotropy`` times the smallest, nnU-Net's threshold) the axis of lowest resolution, as annotators draw
    them; otherwise axis 0."""
    sp = np.median(np.asarray([tuple(s) for s in spacings], dtype=float), axis=0)
    return int(np.argmax(sp)) if sp.max() >= anisotropy * sp.min() else 0


def annotated_mask(shape: Sequence[int], boxes: Iterable[Box]) -> np.ndarray:
    """Boolean mask of the voxels covered by ``boxes``."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for box in boxes:
        mask[box.slices()] = True
    return mask
