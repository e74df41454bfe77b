from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from alseg.evaluation.metrics import (
    CostAccumulator,
    annotation_cost,
    dice_2d,
    dice_per_class,
    dice_per_slice,
    dump_json,
    evaluate_case,
    foreground_counts,
    hd95_per_class,
    json_safe,
    summarise_cases,
)


# ---------------------------------------------------------------------------------------------- helpers
def brute_force_hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], mode: str = "pooled") -> float:
    """Independent reference: 6-connected surfaces + scipy EDT with sampling, pooled 95th percentile."""

    def surface(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m, border_value=0)

    sp, sg = surface(pred.astype(bool)), surface(gt.astype(bool))
    dt_to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dt_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d_pg, d_gp = dt_to_g[sp], dt_to_p[sg]
    if mode == "pooled":
        return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def random_blob(rng: np.random.Generator, shape: tuple[int, ...], threshold: float = 0.6) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=3)
    return noise > threshold * noise.std()


# ---------------------------------------------------------------------------------------------- Dice
def test_dice_per_class_hand_made():
    gt = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 0, :4] = 1  # 4 voxels of class 1
    pred[0, 0, :2] = 1  # 2 TP
    pred[1, 1, :2] = 1  # 2 FP
    gt[2, 2, 2] = 2  # class 2: FN only
    res = dice_per_class(pred, gt, [1, 2, 3])
    assert res[1] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))  # 0.5
    assert res[2] == 0.0
    assert math.isnan(res[3])  # both empty
    assert dice_per_class(gt, gt, [1, 2])[1] == 1.0


def test_dice_2d_hand_example():
    gt = np.zeros((3, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 0, :4] = 1  # slice 0: gt 4 voxels
    pred[0, 0, :2] = 1  # slice 0: pred 2 voxels, both TP -> 2*2/(4+2) = 2/3
    # slice 1: both empty -> not counted
    pred[2, 3, :2] = 1  # slice 2: pred only -> 0
    per_slice = dice_per_slice(pred, gt, 1, axis=0)
    assert per_slice[0] == pytest.approx(2 / 3)
    assert math.isnan(per_slice[1])
    assert per_slice[2] == 0.0
    assert dice_2d(pred, gt, [1], axis=0)[1] == pytest.approx((2 / 3 + 0) / 2)
    # along axis 1: slice 0 (gt 4, pred 2, TP 2) -> 2/3; slice 3 (pred 2 only) -> 0
    assert dice_2d(pred, gt, [1], axis=1)[1] == pytest.approx(1 / 3)
    # along axis 2: slices 0,1 have gt 1 / pred 2 (TP 1) -> 2/3 each; slices 2,3 gt 1 / pred 0 -> 0
    assert dice_2d(pred, gt, [1], axis=2)[1] == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)
    assert math.isnan(dice_2d(pred, gt, [2])[2])
    # 3D Dice of the same example: TP 2, pred 4, gt 4
    assert dice_per_class(pred, gt, [1])[1] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- HD95
def _shifted_cubes(axis: int, shift: int = 3) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((20, 20, 30), dtype=np.uint8)
    gt[5:15, 5:15, 5:15] = 1
    pred = np.roll(gt, shift, axis=axis)
    return pred, gt


def test_hd95_shifted_cube_anisotropic():
    # 10^3 cube shifted by 3 voxels along axis 2 (2 mm): the largest surface distance is the whole
    # bottom/top face (100 of the 488 surface voxels, ~20% > 5%) at 3 voxels * 2 mm = 6 mm, every
    # other surface voxel is nearer; so the 95th percentile is exactly 6 mm.
    pred, gt = _shifted_cubes(axis=2)
    spacing = (1.0, 1.0, 2.0)
    hd = hd95_per_class(pred, gt, [1], spacing)[1]
    assert hd == pytest.approx(6.0)
    assert hd == pytest.approx(brute_force_hd95(pred, gt, spacing))
    assert hd95_per_class(pred, gt, [1], spacing, mode="max")[1] == pytest.approx(6.0)
    # spacing is honoured per axis: the same shift along a 1 mm axis gives 3 mm
    pred0, gt0 = _shifted_cubes(axis=0)
    assert hd95_per_class(pred0, gt0, [1], spacing)[1] == pytest.approx(3.0)
    assert hd95_per_class(pred, gt, [1], (2.0, 1.0, 1.0))[1] == pytest.approx(3.0)


def test_hd95_matches_brute_force_on_random_shapes():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 1.3)
    for _ in range(3):
        gt = random_blob(rng, (24, 28, 20)).astype(np.uint8)
        pred = random_blob(rng, (24, 28, 20)).astype(np.uint8)
        assert gt.any() and pred.any()
        got = hd95_per_class(pred, gt, [1], spacing)[1]
        assert got == pytest.approx(brute_force_hd95(pred, gt, spacing), rel=1e-5)
        got_max = hd95_per_class(pred, gt, [1], spacing, mode="max")[1]
        assert got_max == pytest.approx(brute_force_hd95(pred, gt, spacing, mode="max"), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_hd95_max_mode_matches_monai():
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(1)
    spacing = (1.5, 1.0, 0.7)
    gt = random_blob(rng, (20, 20, 20)).astype(np.uint8)
    pred = random_blob(rng, (20, 20, 20)).astype(np.uint8)

    def onehot(x: np.ndarray) -> np.ndarray:
        return np.stack([x == 0, x == 1])[None].astype(np.float32)

    ref = float(compute_hausdorff_distance(onehot(pred), onehot(gt), percentile=95, spacing=spacing)[0, 0])
    assert hd95_per_class(pred, gt, [1], spacing, mode="max")[1] == pytest.approx(ref, rel=1e-5)


def test_hd95_empty_conventions():
    z = np.zeros((6, 6, 6), dtype=np.uint8)
    one = z.copy()
    one[2:4, 2:4, 2:4] = 1
    assert hd95_per_class(z, z, [1], (1, 1, 1))[1] == 0.0  # both empty
    assert math.isnan(hd95_per_class(one, z, [1], (1, 1, 1))[1])  # gt empty
    assert math.isnan(hd95_per_class(z, one, [1], (1, 1, 1))[1])  # prediction empty
    assert hd95_per_class(one, one, [1], (1, 1, 1))[1] == 0.0
    with pytest.raises(ValueError):
        hd95_per_class(one, one, [1], (1, 1))


def test_hd95_2d():
    gt = np.zeros((20, 20), dtype=np.uint8)
    gt[5:10, 5:10] = 1
    pred = np.roll(gt, 2, axis=1)
    assert hd95_per_class(pred, gt, [1], (1.0, 0.5))[1] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- per case
def test_evaluate_and_summarise():
    gt = np.zeros((4, 4, 4), dtype=np.uint8)
    gt[0, 0, :4] = 1
    pred = np.zeros_like(gt)
    pred[0, 0, :2] = 1
    case_a = evaluate_case(pred, gt, [1, 2], (1, 1, 1))
    assert case_a["dice"] == {"1": pytest.approx(2 / 3), "2": case_a["dice"]["2"]}
    assert math.isnan(case_a["dice"]["2"])
    assert case_a["dice_fg_mean"] == pytest.approx(2 / 3)  # NaN class left out
    assert case_a["hd95"]["2"] == 0.0

    gt_b = gt.copy()
    gt_b[3, 3, 3] = 2
    case_b = evaluate_case(gt_b, gt_b, [1, 2], (1, 1, 1))  # perfect
    summary = summarise_cases([case_a, case_b])
    assert summary["n_cases"] == 2
    assert summary["dice_mean"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert summary["dice_per_class"]["1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert summary["dice_per_class"]["2"] == pytest.approx(1.0)
    assert summary["n_nan_dice"] == 1
    assert summary["n_nan_hd95"] == 0
    assert set(summary["hd95_per_class"]) == {"1", "2"}

    # one-empty HD95 is NaN, counted, and left out of means
    pred_c = np.zeros_like(gt)
    case_c = evaluate_case(pred_c, gt, [1], (1, 1, 1))
    s2 = summarise_cases([case_c, case_b])
    assert s2["n_nan_hd95"] == 1
    assert s2["hd95_per_class"]["1"] == pytest.approx(0.0)  # only case_b is finite
    # JSON round trip: NaN -> None, strict JSON
    js = json_safe({"a": case_a, "x": np.float32(np.nan), "n": np.int64(3)})
    assert js["a"]["dice"]["2"] is None and js["x"] is None and js["n"] == 3
    json.dumps(js, allow_nan=False)


def test_dump_json(tmp_path):
    dump_json({"v": float("nan"), 1: [np.float64(0.5)]}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"v": None, "1": [0.5]}


# ---------------------------------------------------------------------------------------------- cost
def test_cost_accumulator():
    gt1 = np.zeros((5, 4, 4), dtype=np.uint8)
    gt1[1, :2, :2] = 1  # 4 voxels of class 1
    gt1[3, 0, :] = 2  # 4 voxels of class 2
    gt2 = np.zeros((3, 4, 4), dtype=np.uint8)
    gt2[0, 0, 0] = 1  # 1 voxel of class 1
    pool = {1: 5, 2: 4}
    assert foreground_counts(gt1, [1, 2]) == {1: 4, 2: 4}

    m1 = np.zeros(gt1.shape, dtype=bool)
    m1[1, 0, :] = True  # 4 voxels, 2 of class 1, slice 1
    m1[3, 0, 0] = True  # 1 voxel of class 2, slice 3
    m2 = np.zeros(gt2.shape, dtype=bool)
    m2[2] = True  # 16 voxels, no foreground, slice 2

    acc = CostAccumulator([1, 2], pool_fg_voxels=pool, slice_axis=0)
    acc.add_case("a", m1, gt1)
    acc.add_case("b", m2, gt2)
    r = acc.result(n_regions=3)
    assert r["regions"] == 3
    assert r["annotated_voxels"] == 5 + 16
    assert r["annotated_fg_voxels_per_class"] == {"1": 2, "2": 1}
    assert r["annotated_fg_voxels"] == 3
    assert r["fg_fraction"] == pytest.approx(3 / 9)
    assert r["fg_fraction_per_class"] == {"1": pytest.approx(2 / 5), "2": pytest.approx(1 / 4)}
    assert r["slices_touched"] == 3  # (a, 1), (a, 3), (b, 2)
    assert r["cases_touched"] == 2

    # re-adding a case replaces its contribution
    m2b = np.zeros(gt2.shape, dtype=bool)
    m2b[0, 0, 0] = True
    acc.add_case("b", m2b, gt2)
    r2 = acc.result(n_regions=3)
    assert r2["annotated_voxels"] == 6
    assert r2["annotated_fg_voxels"] == 4
    assert r2["slices_touched"] == 3
    # slices along another axis
    acc_ax1 = CostAccumulator([1, 2], pool_fg_voxels=9, slice_axis=1)
    acc_ax1.add_case("a", m1, gt1)
    assert acc_ax1.result(1)["slices_touched"] == 1  # all annotated voxels have index 0 along axis 1
    assert acc_ax1.result(1)["fg_fraction"] == pytest.approx(3 / 9)

    # one-shot wrapper with pool totals from the gts
    r3 = annotation_cost({"a": m1, "b": m2}, [1, 2], 3, gts={"a": gt1, "b": gt2})
    assert r3["fg_fraction"] == pytest.approx(3 / 9)
    # without gts the foreground figures are unknown
    r4 = annotation_cost({"a": m1}, [1, 2], 1)
    assert r4["annotated_fg_voxels"] is None and math.isnan(r4["fg_fraction"])
    assert r4["annotated_voxels"] == 5
