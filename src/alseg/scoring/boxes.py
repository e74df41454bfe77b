"""From voxel maps to box scores, and non-overlapping selection of boxes.

Candidate boxes lie fully inside the image on a grid ``start = index * stride``. Their means are one
separable box filter computed with cumulative sums, so a case's voxel map can be reduced to candidate scores
and dropped (scoring streams case by case).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def grid_shape(shape: Sequence[int], box_size: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """Number of candidate positions per axis for boxes of ``box_size`` fully inside ``shape``."""
    out = []
    for n, s, st in zip(shape, box_size, stride, strict=True):
        if s > n:
            raise ValueError(f"box size {tuple(box_size)} does not fit in an image of shape {tuple(shape)}")
        out.append((n - s) // st + 1)
    return tuple(out)


#: Volumes up to this many voxels are summed in float64; larger ones in float32 (relative error about 1e-6 of
#: a box sum, far below any score difference that matters, at twice the speed and half the memory).
FLOAT64_MAX_VOXELS = 1 << 22


def _index(ndim: int, axis: int, idx: int | slice) -> tuple[int | slice, ...]:
    out: list[int | slice] = [slice(None)] * ndim
    out[axis] = idx
    return tuple(out)


def _box_sum_axis(a: np.ndarray, s: int, st: int, axis: int) -> np.ndarray:
    """Sums over windows of ``s`` along ``axis`` at starts ``0, st, 2 st, ...``.

    The last (contiguous) axis uses a cumulative sum and one strided difference; other axes a running window
    over whole slabs (one add and one subtract of a contiguous slab per step), which avoids numpy's slow
    strided accumulate and a full-size temporary.
    """
    nd, n = a.ndim, a.shape[axis]
    n_pos = (n - s) // st + 1
    shape = list(a.shape)
    shape[axis] = n_pos
    out = np.empty(shape, dtype=a.dtype)
    if axis == nd - 1:
        c = np.cumsum(a, axis=axis, dtype=a.dtype)
        out[..., 0] = c[..., s - 1]
        if n_pos > 1:
            np.subtract(
                c[..., s - 1 + st :: st][..., : n_pos - 1], c[..., st - 1 :: st][..., : n_pos - 1], out=out[..., 1:]
            )
        return out
    acc = np.add.reduce(a[_index(nd, axis, slice(0, s))], axis=axis, dtype=a.dtype)
    out[_index(nd, axis, 0)] = acc
    for i in range(1, (n_pos - 1) * st + 1):
        acc += a[_index(nd, axis, i + s - 1)]
        acc -= a[_index(nd, axis, i - 1)]
        if i % st == 0:
            out[_index(nd, axis, i // st)] = acc
    return out


def box_sums(volume: np.ndarray, box_size: Sequence[int], stride: Sequence[int] | int = 1) -> np.ndarray:
    """Sum of ``volume`` over every box of ``box_size`` on the strided grid.

    A separable box filter: per axis one in-place cumulative sum and one strided difference; earlier axes
    shrink the array first. float64 for volumes up to ``FLOAT64_MAX_VOXELS``, float32 above.
    """
    nd = volume.ndim
    if isinstance(stride, int):
        stride = (stride,) * nd
    if len(box_size) != nd or len(stride) != nd:
        raise ValueError(f"box_size {tuple(box_size)} / stride {tuple(stride)} do not match a {nd}-D volume")
    for s, st, n in zip(box_size, stride, volume.shape, strict=True):
        if s > n:
            raise ValueError(f"box size {tuple(box_size)} does not fit in an image of shape {volume.shape}")
        if s < 1 or st < 1:
            raise ValueError(f"box size {tuple(box_size)} and stride {tuple(stride)} must be positive")
    dtype = np.float64 if volume.size <= FLOAT64_MAX_VOXELS else np.float32
    out = np.asarray(volume, dtype=dtype)
    # the axis whose windows shrink the array most goes first
    order = sorted(range(nd), key=lambda ax: ((volume.shape[ax] - box_size[ax]) // stride[ax] + 1) / volume.shape[ax])
    for axis in order:
        out = _box_sum_axis(out, int(box_size[axis]), int(stride[axis]), axis)
    return out


def box_means(volume: np.ndarray, box_size: Sequence[int], stride: Sequence[int] | int = 1) -> np.ndarray:
    """Mean of ``volume`` over every box of ``box_size`` on the strided grid."""
    return box_sums(volume, box_size, stride) / float(np.prod(box_size))


def free_positions(blocked: np.ndarray, box_size: Sequence[int], stride: Sequence[int] | int = 1) -> np.ndarray:
    """Boolean grid: True where the box shares no voxel with ``blocked`` (e.g. already annotated voxels)."""
    return box_sums(blocked.astype(np.float32), box_size, stride) < 0.5


@dataclass(frozen=True)
class Candidate:
    """A scored candidate box in one case; ``info`` explains the score."""

    case_id: str
    start: tuple[int, ...]
    score: float
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def sort_key(self) -> tuple[float, str, tuple[int, ...]]:
        # highest score first; ties broken by case id, then position
        return (-self.score, self.case_id, self.start)


def block_box(free: np.ndarray, start: Sequence[int], box_size: Sequence[int], stride: Sequence[int]) -> None:
    """Mark as taken, in a grid of free positions, every box that would overlap the box at ``start``."""
    sl = []
    for p, s, st, n in zip(start, box_size, stride, free.shape, strict=True):
        lo = max(0, -(-(p - s + 1) // st))  # ceil((p - s + 1) / st)
        hi = min(n, (p + s - 1) // st + 1)
        sl.append(slice(lo, hi))
    free[tuple(sl)] = False


def random_packing(
    free: np.ndarray, box_size: Sequence[int], stride: Sequence[int], rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """Box starts of a random maximal packing: non-overlapping boxes on the free grid until none fits.

    Random sequential packing: visit the free grid positions in one random order and take each position that
    is still free, blocking every box it overlaps. At each step this takes a position drawn uniformly among
    those still free, so every free position can be chosen, and the boxes end up covering the free space
    (no further box fits). ``free`` is updated in place. Returns starts in the order taken.
    """
    order = rng.permutation(np.flatnonzero(free))
    starts: list[tuple[int, ...]] = []
    flat = free.reshape(-1)  # a view: block_box's updates show here
    for idx in order.tolist():
        if not flat[idx]:
            continue
        pos = np.unravel_index(idx, free.shape)
        start = tuple(int(p) * int(st) for p, st in zip(pos, stride, strict=True))
        starts.append(start)
        block_box(free, start, box_size, stride)
    return starts


def greedy_nms(
    case_id: str,
    scores: np.ndarray,
    box_size: Sequence[int],
    stride: Sequence[int],
    free: np.ndarray,
    n_max: int,
    info: dict[str, Any] | None = None,
) -> list[Candidate]:
    """Take up to ``n_max`` boxes by descending score, none overlapping each other or a non-free position.

    ``free`` is updated in place, so several calls (e.g. one per class map) never return overlapping boxes.
    Ties are broken by position (C order). NaN scores are never taken.
    """
    if scores.shape != free.shape:
        raise ValueError(f"score grid {scores.shape} and free grid {free.shape} differ")
    flat = np.where(free & np.isfinite(scores), scores, -np.inf).ravel()
    n_valid = int(np.isfinite(flat).sum())
    chosen: list[Candidate] = []
    if n_max <= 0 or n_valid == 0:
        return chosen
    chunk = min(n_valid, max(64, 8 * n_max))
    taken = 0
    while len(chosen) < n_max and taken < n_valid:
        k = min(n_valid, taken + chunk)
        if k < flat.size:
            part = np.argpartition(-flat, k - 1)[:k]
        else:
            part = np.arange(flat.size)
        # stable order: by score descending, then by flat index (position in C order)
        order = part[np.lexsort((part, -flat[part]))]
        for idx in order[taken:k]:
            if not np.isfinite(flat[idx]):
                continue
            pos = np.unravel_index(idx, scores.shape)
            if not free[pos]:
                continue
            start = tuple(int(p) * int(st) for p, st in zip(pos, stride, strict=True))
            chosen.append(Candidate(case_id, start, float(flat[idx]), dict(info or {})))
            block_box(free, start, box_size, stride)
            if len(chosen) >= n_max:
                break
        taken = k
        chunk *= 2
    return chosen


def top_k(candidates: Iterable[Candidate], k: int) -> list[Candidate]:
    """The ``k`` best candidates over all cases (score descending, ties by case id then position)."""
    return sorted(candidates, key=Candidate.sort_key)[:k]
