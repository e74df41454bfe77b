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
