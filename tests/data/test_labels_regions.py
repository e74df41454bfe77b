"""Partial labels, atomic label writes, boxes and annotation units, default region size, box scoring and NMS."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from alseg.data.dataset import Geometry, demo_dataset_path, load_dataset
from alseg.data.labels import partial_label, write_label_nifti
from alseg.data.regions import Box, Region, annotated_mask, default_region_size, default_slice_axis, unit_box_size
from alseg.scoring.boxes import (
    Candidate,
    block_box,
    box_means,
    box_sums,
    free_positions,
    greedy_nms,
    grid_shape,
    top_k,
)

# --------------------------------------------------------------------------- partial labels


def test_partial_label_ground_truth_inside_ignore_elsewhere() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 3, size=(6, 7, 8)).astype(np.uint8)
    mask = annotated_mask(gt.shape, [Box((1, 1, 1), (2, 3, 4)), Box((4, 0, 0), (2, 2, 2))])
    out = partial_label(gt, mask, 3)
    assert out.dtype == np.uint8 and out.shape == gt.shape
    np.testing.assert_array_equal(out[mask], gt[mask])
    assert np.all(out[~mask] == 3)
    assert int(mask.sum()) == 2 * 3 * 4 + 2 * 2 * 2


def test_partial_label_nothing_or_everything_annotated() -> None:
    gt = np.ones((3, 4, 5), dtype=np.uint8)
    assert np.all(partial_label(gt, np.zeros(gt.shape, bool), 2) == 2)
    np.testing.assert_array_equal(partial_label(gt, np.ones(gt.shape, bool), 2), gt)


def test_partial_label_dtype_widens_when_needed() -> None:
    gt = np.zeros((2, 2), dtype=np.int16)
    gt[0, 0] = 300
    mask = np.zeros((2, 2), bool)
    mask[0, 0] = True
    out = partial_label(gt, mask, 301)
    assert out.dtype == np.int16 and out[0, 0] == 300 and out[1, 1] == 301
    assert partial_label(np.zeros((2, 2), np.uint8), mask, 256).dtype == np.int16
    assert partial_label(np.zeros((2, 2), np.uint8), mask, 255).dtype == np.uint8


def test_partial_label_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        partial_label(np.zeros((2, 3), np.uint8), np.zeros((3, 2), bool), 3)


# --------------------------------------------------------------------------- atomic NIfTI writes
GEOMETRY = Geometry(
    shape=(5, 6, 7),
    spacing=(2.5, 0.8, 1.2),
    origin=(-10.0, 4.5, 3.0),
    direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
)


def test_write_label_nifti_keeps_geometry_and_values(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 4, size=GEOMETRY.shape).astype(np.uint8)
    path = tmp_path / "sub" / "case.nii.gz"
    sha = write_label_nifti(path, arr, GEOMETRY)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    back = Geometry.from_sitk(img)
    assert back.shape == GEOMETRY.shape
    assert back.matches(GEOMETRY, tol=1e-5), back.difference(GEOMETRY)
    assert img.GetPixelID() == sitk.sitkUInt8
    assert [p.name for p in path.parent.iterdir()] == ["case.nii.gz"]  # no temp file left


def test_write_label_nifti_replaces_and_failure_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "case.nii.gz"
    write_label_nifti(path, np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY)
    sha2 = write_label_nifti(path, np.ones(GEOMETRY.shape, np.uint8), GEOMETRY)
    assert np.all(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 1)
    with pytest.raises(ValueError, match="does not match"):
        write_label_nifti(path, np.zeros((5, 6, 8), np.uint8), GEOMETRY)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha2
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_write_label_nifti_2d(tmp_path: Path) -> None:
    geo = Geometry((4, 5), (0.5, 0.25), (1.0, 2.0), (1.0, 0.0, 0.0, 1.0))
    arr = np.arange(20, dtype=np.uint8).reshape(4, 5) % 3
    path = tmp_path / "x.nii.gz"
    write_label_nifti(path, arr, geo)
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    assert Geometry.from_sitk(img).matches(geo)


# --------------------------------------------------------------------------- boxes and units
def test_box_basics() -> None:
    b = Box((1, 2, 3), (2, 3, 4))
    assert b.stop == (3, 5, 7) and b.n_voxels == 24
    assert b.slices() == (slice(1, 3), slice(2, 5), slice(3, 7))
    vol = np.zeros((5, 6, 7))
    vol[b.slices()] = 1
    assert vol.sum() == 24
    assert Box.from_json(b.to_json()) == b
    assert Box((np.int64(1),), (np.int64(2),)).start == (1,) and type(Box((np.int64(1),), (2,)).start[0]) is int
    with pytest.raises(ValueError, match="positive"):
        Box((0, 0), (0, 1))
    with pytest.raises(ValueError, match="dimension"):
        Box((0, 0), (1, 1, 1))


def test_box_inside() -> None:
    b = Box((1, 2, 3), (2, 3, 4))
    assert b.inside((3, 5, 7)) and b.inside((10, 10, 10))
    assert not b.inside((3, 5, 6)) and not b.inside((2, 5, 7))
    assert not Box((-1, 0), (2, 2)).inside((5, 5))
    assert not b.inside((3, 5))  # wrong dimension


def test_box_overlaps_half_open() -> None:
    a = Box((0, 0, 0), (4, 4, 4))
    assert a.overlaps(Box((3, 3, 3), (2, 2, 2)))
    assert not a.overlaps(Box((4, 0, 0), (2, 2, 2)))  # touching faces share no voxel
    assert not a.overlaps(Box((0, 4, 0), (4, 4, 4)))
    assert a.overlaps(Box((1, 1, 1), (1, 1, 1)))  # inside
    assert Box((1, 1, 1), (1, 1, 1)).overlaps(a)


def test_box_overlaps_agrees_with_masks() -> None:
    rng = np.random.default_rng(2)
    shape = (6, 6, 6)
    for _ in range(300):
        boxes = []
        for _ in range(2):
            size = tuple(int(s) for s in rng.integers(1, 4, size=3))
            start = tuple(int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size, strict=True))
            boxes.append(Box(start, size))
        a, b = boxes
        shared = annotated_mask(shape, [a]) & annotated_mask(shape, [b])
        assert a.overlaps(b) == bool(shared.any()) == b.overlaps(a)


def test_region_key() -> None:
    r = Region("c", Box((1, 2), (3, 4)), 0.5, {"x": 1})
    assert r.key == ("c", (1, 2), (3, 4))
    assert r == Region("c", Box((1, 2), (3, 4)), 0.5, {"other": 2})  # info is not compared


def test_unit_box_size() -> None:
    shape = (30, 40, 50)
    assert unit_box_size("box", shape, (20, 20, 20)) == (20, 20, 20)
    assert unit_box_size("box", (10, 40, 50), (20, 20, 20)) == (10, 20, 20)  # clamped to the image
    assert unit_box_size("slice", shape, None, 0) == (1, 40, 50)
    assert unit_box_size("slice", shape, None, 2) == (30, 40, 1)
    assert unit_box_size("case", shape, None) == shape
    assert unit_box_size("case", shape, (2, 2, 2)) == shape
    with pytest.raises(ValueError, match="region_size"):
        unit_box_size("box", shape, None)
    with pytest.raises(ValueError, match="axes"):
        unit_box_size("box", shape, (20, 20))
    with pytest.raises(ValueError, match="slice_axis"):
        unit_box_size("slice", shape, None, 3)
    with pytest.raises(ValueError, match="unknown annotation unit"):
        unit_box_size("cube", shape, (2, 2, 2))  # type: ignore[arg-type]


def test_default_region_size_on_the_real_hippocampus() -> None:
    ds = load_dataset(demo_dataset_path())
    shapes = [ds.geometry(c).shape for c in ds.case_ids]
    spacings = [ds.geometry(c).spacing for c in ds.case_ids]
    med = np.median(np.asarray(shapes), axis=0)
    assert np.allclose(med, (37, 50, 36), atol=2.5)
    assert default_region_size(shapes, spacings) == (20, 20, 20)  # nnActive's Hippocampus box
    assert default_slice_axis(spacings) == 0  # isotropic


def test_default_region_size_follows_the_physical_geometry() -> None:
    """A cardiac cine-MRI shape: about 10 slices of 256 x 216 voxels, 10 mm between slices, 1 mm in-plane.

    The box is about isotropic in millimetres: 0.55 of the median physical size (216 mm) is 119 mm, which would
    hold 12 x 119 x 119 voxels; shrunk to at most 20^3 = 8000 voxels the edge is 43 mm: 4 slices of 44 x 44
    voxels (nnActive used 4 x 40 x 40 on ACDC), never the 9 x 9 x 9 voxels (90 x 9 x 9 mm) of a voxel rule."""
    shapes = [(10, 256, 216), (9, 256, 216), (11, 232, 256)]
    spacings = [(10.0, 1.0, 1.0)] * 3
    size = default_region_size(shapes, spacings)
    assert size == (4, 44, 44)
    assert np.prod(size) <= 20**3
    edges_mm = np.asarray(size) * np.asarray(spacings[0])
    assert edges_mm.max() / edges_mm.min() < 1.15  # about isotropic in mm
    assert default_slice_axis(spacings) == 0  # slices across the thick axis, as annotators draw them
    # the thick axis stored last: the box and the slice axis follow it
    assert default_region_size([(256, 216, 10)], [(1.0, 1.0, 10.0)]) == (44, 44, 4)
    assert default_slice_axis([(0.7, 0.7, 5.0)]) == 2


def test_default_region_size_rules() -> None:
    assert default_region_size([(37, 50, 36), (36, 51, 35), (38, 50, 37)]) == (20, 20, 20)
    assert default_region_size([(10, 10, 10)]) == (6, 6, 6)  # 0.55 of the size, rounded
    assert default_region_size([(20, 100, 100)]) == (20, 20, 20)  # at most 8000 voxels, at most the image
    assert default_region_size([(500, 500, 500)]) == (20, 20, 20)  # the voxel budget
    assert default_region_size([(1, 300, 300)], [(5.0, 1.0, 1.0)]) == (1, 88, 88)  # at least one voxel, 88² ≤ 8000
    assert default_region_size([(100, 120)]) == (60, 60)
    with pytest.raises(ValueError, match="empty"):
        default_region_size([])
    with pytest.raises(ValueError, match="spacings must be positive"):
        default_region_size([(10, 10)], [(0.0, 1.0)])


# --------------------------------------------------------------------------- box scoring
def _brute_means(vol: np.ndarray, box: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    grid = grid_shape(vol.shape, box, stride)
    out = np.zeros(grid)
    for idx in itertools.product(*(range(g) for g in grid)):
        sl = tuple(slice(i * st, i * st + b) for i, st, b in zip(idx, stride, box, strict=True))
        out[idx] = vol[sl].mean()
    return out


@pytest.mark.parametrize(
    ("box", "stride"),
    [((3, 4, 5), (1, 1, 1)), ((3, 4, 5), (2, 2, 2)), ((2, 3, 1), (3, 1, 2)), ((9, 10, 11), (4, 4, 4)), ((1, 1, 1), 1)],
)
def test_box_means_equals_brute_force(box: tuple[int, ...], stride: tuple[int, ...] | int) -> None:
    vol = np.random.default_rng(3).random((9, 10, 11)).astype(np.float32)
    st = (stride,) * 3 if isinstance(stride, int) else stride
    got = box_means(vol, box, stride)
    want = _brute_means(vol.astype(np.float64), box, st)
    assert got.shape == want.shape == grid_shape(vol.shape, box, st)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(box_sums(vol, box, stride), want * np.prod(box), rtol=1e-10, atol=1e-9)


def test_box_means_2d_and_errors() -> None:
    vol = np.random.default_rng(4).random((7, 8))
    np.testing.assert_allclose(box_means(vol, (3, 2), (2, 3)), _brute_means(vol, (3, 2), (2, 3)))
    with pytest.raises(ValueError, match="does not fit"):
        box_means(vol, (8, 2))
    with pytest.raises(ValueError):
        box_means(vol, (3, 2, 1))


def test_free_positions() -> None:
    blocked = np.zeros((6, 6), bool)
    blocked[2, 3] = True
    free = free_positions(blocked, (2, 2), (1, 1))
    assert free.shape == (5, 5)
    for i, j in itertools.product(range(5), range(5)):
        assert free[i, j] == (not blocked[i : i + 2, j : j + 2].any())


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2), (3, 1, 2)])
def test_greedy_nms_never_overlaps_and_respects_blocked(stride: tuple[int, ...]) -> None:
    rng = np.random.default_rng(5)
    shape, box = (16, 14, 12), (4, 5, 3)
    blocked = np.zeros(shape, bool)
    blocked[5:9, 3:6, 2:10] = True
    scores = box_means(rng.random(shape), box, stride)
    free = free_positions(blocked, box, stride)
    chosen = greedy_nms("c", scores, box, stride, free, n_max=1000, info={"m": 1})
    assert chosen
    boxes = [Box(c.start, box) for c in chosen]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    for b in boxes:
        assert b.inside(shape)
        assert all(s % st == 0 for s, st in zip(b.start, stride, strict=True))
        assert not blocked[b.slices()].any()
    assert [c.score for c in chosen] == sorted((c.score for c in chosen), reverse=True)
    assert chosen[0].info == {"m": 1}
    # greedy maximality: no free box is left anywhere
    covered = annotated_mask(shape, boxes) | blocked
    assert not free_positions(covered, box, stride).any()
    assert not free.any()  # updated in place
    # a second call on the same free grid returns nothing more
    assert greedy_nms("c", scores, box, stride, free, n_max=5) == []


def test_greedy_nms_first_pick_is_the_best_and_ties_by_position() -> None:
    scores = np.zeros((5, 5))
    scores[3, 1] = 2.0
    scores[1, 1] = scores[1, 4] = 1.0  # tie: C order first
    free = np.ones_like(scores, bool)
    chosen = greedy_nms("c", scores, (2, 2), (1, 1), free, n_max=2)
    assert [c.start for c in chosen] == [(3, 1), (1, 1)]


def test_greedy_nms_skips_nan_and_limits() -> None:
    scores = np.full((4, 4), np.nan)
    scores[0, 0] = 1.0
    scores[3, 3] = 0.5
    free = np.ones_like(scores, bool)
    chosen = greedy_nms("c", scores, (1, 1), (1, 1), free, n_max=10)
    assert [c.start for c in chosen] == [(0, 0), (3, 3)]
    assert greedy_nms("c", scores, (1, 1), (1, 1), np.ones_like(free), n_max=0) == []
    with pytest.raises(ValueError, match="differ"):
        greedy_nms("c", scores, (1, 1), (1, 1), np.ones((3, 3), bool), n_max=1)


def test_block_box_blocks_exactly_the_overlapping_starts() -> None:
    shape, box, stride = (20, 17), (5, 4), (3, 2)
    grid = grid_shape(shape, box, stride)
    for start in [(0, 0), (6, 4), (15, 12), (7, 3)]:
        free = np.ones(grid, bool)
        block_box(free, start, box, stride)
        for idx in itertools.product(*(range(g) for g in grid)):
            other = Box(tuple(i * s for i, s in zip(idx, stride, strict=True)), box)
            assert free[idx] == (not other.overlaps(Box(start, box))), (start, idx)


def test_top_k_tie_breaking() -> None:
    cands = [
        Candidate("b", (0, 0, 0), 1.0),
        Candidate("a", (4, 0, 0), 1.0),
        Candidate("a", (0, 4, 0), 1.0),
        Candidate("c", (0, 0, 0), 2.0),
        Candidate("a", (0, 0, 0), 0.5),
    ]
    got = top_k(cands, 4)
    want = [("c", (0, 0, 0)), ("a", (0, 4, 0)), ("a", (4, 0, 0)), ("b", (0, 0, 0))]
    assert [(c.case_id, c.start) for c in got] == want
    assert top_k(list(reversed(cands)), 4) == got  # independent of input order
    assert len(top_k(cands, 100)) == 5 and top_k(cands, 0) == []
