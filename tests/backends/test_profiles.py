"""nnU-Net profiles: derived configurations and schedules (no nnU-Net import needed)."""

from __future__ import annotations

import copy

import pytest

from alseg.backends.nnunet.profiles import CPU_SCHEDULE, derive_configuration, get_profile
from alseg.config import Schedule

PLANS = {
    "configurations": {
        "3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "batch_size": 7,
            "patch_size": [40, 56, 40],
            "architecture": {
                "network_class_name": "PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 4,
                    "features_per_stage": [32, 64, 128, 256],
                    "dropout_op": None,
                    "dropout_op_kwargs": None,
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
        }
    }
}


def test_gpu_profile_keeps_nnunet_plans() -> None:
    plans = copy.deepcopy(PLANS)
    assert derive_configuration(plans, "3d_fullres", get_profile("gpu")) == "3d_fullres"
    assert plans == PLANS


def test_cpu_profile_halves_features_and_inherits_preprocessing() -> None:
    plans = copy.deepcopy(PLANS)
    name = derive_configuration(plans, "3d_fullres", get_profile("cpu"))
    conf = plans["configurations"][name]
    assert conf["inherits_from"] == "3d_fullres"
    assert conf["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128]
    assert "data_identifier" not in conf  # same preprocessed data as the base configuration
    assert plans["configurations"]["3d_fullres"] == PLANS["configurations"]["3d_fullres"]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_mc_dropout_adds_dropout_to_every_conv_block(profile: str) -> None:
    plans = copy.deepcopy(PLANS)
    name = derive_configuration(plans, "3d_fullres", get_profile(profile), dropout_p=0.01)
    kw = plans["configurations"][name]["architecture"]["arch_kwargs"]
    assert name.endswith("_dropout")
    assert kw["dropout_op"] == "torch.nn.Dropout" and kw["dropout_op_kwargs"]["p"] == 0.01
    expected = [16, 32, 64, 128] if profile == "cpu" else [32, 64, 128, 256]
    assert kw["features_per_stage"] == expected


def test_cpu_profile_fixes_the_batch_size_whatever_nnunet_planned() -> None:
    """nnU-Net's batch depends on the planned dataset's size; the cpu profile's does not (runs and reference)."""
    plans = copy.deepcopy(PLANS)
    plans["configurations"]["2d"] = {**copy.deepcopy(PLANS["configurations"]["3d_fullres"]), "patch_size": [56, 40]}
    plans["configurations"]["2d"]["batch_size"] = 274
    assert plans["configurations"][derive_configuration(plans, "3d_fullres", get_profile("cpu"))]["batch_size"] == 2
    assert plans["configurations"][derive_configuration(plans, "2d", get_profile("cpu"))]["batch_size"] == 32
    assert derive_configuration(plans, "3d_fullres", get_profile("gpu")) == "3d_fullres"
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 7  # gpu: nnU-Net's own plans


def test_unknown_configuration_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="3d_fullres"):
        derive_configuration(copy.deepcopy(PLANS), "3d_lowres", get_profile("cpu"))


def test_first_round_epochs_apply_only_from_scratch() -> None:
    assert CPU_SCHEDULE.to_spec(from_scratch=True)["epochs"] == CPU_SCHEDULE.first_round_epochs
    assert CPU_SCHEDULE.to_spec(from_scratch=False)["epochs"] == CPU_SCHEDULE.epochs
    plain = Schedule(epochs=3, iterations_per_epoch=5)
    assert plain.to_spec(from_scratch=True)["epochs"] == 3
    assert "warm_start" not in plain.to_spec(from_scratch=True)


def test_warm_start_lr_applies_only_to_warm_started_rounds() -> None:
    s = Schedule(epochs=8, iterations_per_epoch=50, warm_start=True, initial_lr=0.01, warm_start_lr=0.003)
    assert s.to_spec(from_scratch=True)["initial_lr"] == 0.01
    assert s.to_spec(from_scratch=False)["initial_lr"] == 0.003
    assert "warm_start_lr" not in s.to_spec(from_scratch=False)


def test_optimizer_reaches_the_training_spec_in_every_round() -> None:
    assert CPU_SCHEDULE.optimizer == "adam"
    for from_scratch in (True, False):
        assert CPU_SCHEDULE.to_spec(from_scratch)["optimizer"] == "adam"
    assert Schedule(epochs=3, iterations_per_epoch=5).to_spec(True)["optimizer"] == "sgd"


def _nnunet_like_plans(spacing: list[float], median: list[int], patch: list[int]) -> dict:
    """A 3d_fullres configuration whose topology comes from nnU-Net's own ``get_pool_and_conv_props``."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pool, conv, patch_size, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n = len(pool)
    kw = {
        "n_stages": n,
        "features_per_stage": [min(320, 32 * 2**i) for i in range(n)],
        "kernel_sizes": [list(k) for k in conv],
        "strides": [list(s) for s in pool],
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "dropout_op": None,
        "dropout_op_kwargs": None,
    }
    conf = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "batch_size": 2,
        "patch_size": [int(p) for p in patch_size],
        "spacing": spacing,
        "median_image_size_in_voxels": median,
        "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": kw, "_kw_requires_import": []},
    }
    return {"configurations": {"3d_fullres": conf}}


def test_cpu_profile_caps_the_patch_of_an_anisotropic_dataset() -> None:
    """The cardiac shape: nnU-Net plans a 10 x 256 x 224 patch (6.4 times Hippocampus's voxels); the cpu profile
    shrinks it to at most Hippocampus's 40 x 56 x 40 voxels, with a topology that fits the patch."""
    import math

    from alseg.backends.nnunet.profiles import CPU_MAX_PATCH_VOXELS_3D

    plans = _nnunet_like_plans([10.0, 1.0, 1.0], [10, 256, 216], [10, 256, 224])
    assert math.prod(plans["configurations"]["3d_fullres"]["patch_size"]) > 6 * CPU_MAX_PATCH_VOXELS_3D
    name = derive_configuration(plans, "3d_fullres", get_profile("cpu"))
    conf = plans["configurations"][name]
    patch = conf["patch_size"]
    kw = conf["architecture"]["arch_kwargs"]
    assert math.prod(patch) <= CPU_MAX_PATCH_VOXELS_3D == 40 * 56 * 40
    assert math.prod(patch) >= 0.5 * CPU_MAX_PATCH_VOXELS_3D  # not shrunk further than needed
    total_stride = [math.prod(s[a] for s in kw["strides"]) for a in range(3)]
    assert all(p % t == 0 for p, t in zip(patch, total_stride, strict=True))
    assert len(kw["strides"]) == len(kw["kernel_sizes"]) == kw["n_stages"] == len(kw["features_per_stage"])
    assert len(kw["n_conv_per_stage_decoder"]) == kw["n_stages"] - 1
    assert kw["features_per_stage"][0] == 16  # still the cpu profile's half width
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [10, 256, 224]  # nnU-Net's own untouched
    # the gpu profile keeps nnU-Net's plans whatever the patch
    assert derive_configuration(plans, "3d_fullres", get_profile("gpu")) == "3d_fullres"


def test_cpu_profile_keeps_hippocampus_patch() -> None:
    plans = _nnunet_like_plans([1.0, 1.0, 1.0], [36, 50, 35], [40, 56, 40])
    name = derive_configuration(plans, "3d_fullres", get_profile("cpu"))
    assert "patch_size" not in plans["configurations"][name]  # inherited unchanged: 40 x 56 x 40
    assert (
        plans["configurations"][name]["architecture"]["arch_kwargs"]["strides"]
        == (plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"])
    )


def test_gpu_profile_follows_nnactive() -> None:
    schedule = get_profile("gpu").schedule
    assert (schedule.epochs, schedule.iterations_per_epoch, schedule.warm_start) == (200, 250, False)
