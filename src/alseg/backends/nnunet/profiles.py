"""Training profiles for the nnU-Net backend: which configuration, network and schedule a round uses.

``gpu`` keeps nnU-Net's own plans and trains as nnActive does (200 epochs of 250 iterations, from scratch each
round; nnU-Net's own 1000 epochs per round are more than an active-learning study affords).
``cpu`` makes a round converge in minutes on 2 cores; each change from nnU-Net's defaults is stated here and
calibrated by ``benchmarks/cpu_profile.py``:

- features per stage halved (16, 32, 64, 128 instead of 32 ... 256 for Hippocampus): about 4x fewer
  multiply-adds, 0.3-0.45 s per iteration instead of 1.5 s on 2 cores;
- a short schedule (see ``CPU_SCHEDULE``) with warm start from the previous round's model, as seed 001 does;
  the first round, trained from scratch, gets more epochs (a network from scratch first predicts only
  background and picks up each class at a random moment);
- a fixed number of training iterations per round instead of nnU-Net's 250 000;
- AdamW (nnU-Net's own variant trainer ``nnUNetTrainerAdam``; initial learning rate 3e-3 from scratch, 1e-3
  when warm-started) instead of SGD with Nesterov momentum 0.99 at 1e-2. With batch 2 and 600 iterations from
  scratch, SGD left one seed in three predicting a single hippocampus class (held-out Dice 0.24 against 0.71
  and 0.76 after 20 boxes); AdamW learnt both classes for all three seeds (0.80, 0.75 and 0.71);
- a fixed batch size (2 for 3D, 32 for 2D): nnU-Net caps the batch at 5% of the planned dataset's voxels, so
  its batch depends on how many cases the planning saw (2 for a 20-box starting budget of Hippocampus, 7 for
  the full pool); fixed, the active-learning runs and their full-data reference train the same network with
  the same batch, and a reference round costs what a round costs;
- a 3D training patch of at most Hippocampus's 40 × 56 × 40 voxels (``CPU_MAX_PATCH_VOXELS_3D``), shrunk the
  way nnU-Net's planner shrinks it for a smaller GPU, so that an iteration costs about the same on any
  dataset: on a cardiac cine-MRI shape nnU-Net plans 10 × 256 × 224 (6.4 times the voxels; 6.4 s per
  iteration on 2 cores), the profile trains 5 × 128 × 128. 2D patches are kept (their cost grows with the
  image's area).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from alseg.config import Schedule

ProfileName = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class Profile:
    name: ProfileName
    schedule: Schedule
    feature_scale: float = 1.0  # multiplies features per stage
    max_features: int | None = None
    batch_size: dict[int, int] | None = None  # image dimensionality (2 or 3) -> batch size
    max_patch_voxels: dict[int, int] | None = None  # image dimensionality -> voxels per training patch at most
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def configuration_suffix(self) -> str:
        return "" if self.name == "gpu" else "_alseg_cpu"


#: nnActive's setting (its ``nnActiveTrainer_200epochs``): 200 epochs of 250 iterations, trained from scratch
#: every round, on nnU-Net's own plans. nnU-Net's default of 1000 epochs per round is more than any
#: active-learning study affords (5 rounds = 5 full nnU-Net trainings).
GPU_SCHEDULE = Schedule(epochs=200, iterations_per_epoch=250, val_iterations_per_epoch=50, warm_start=False)
#: the cpu profile's budget of voxels per 3D training patch: Hippocampus's planned 3d_fullres patch (40 × 56 × 40),
#: so that an iteration costs about what it costs there whatever the dataset
CPU_MAX_PATCH_VOXELS_3D = 40 * 56 * 40
CPU_SCHEDULE = Schedule(
    epochs=8,
    iterations_per_epoch=50,
    val_iterations_per_epoch=1,
    warm_start=True,
    first_round_epochs=12,
    optimizer="adam",
    initial_lr=3e-3,
    warm_start_lr=1e-3,
)


def get_profile(name: str, schedule: Schedule | None = None) -> Profile:
    if name == "gpu":
        return Profile("gpu", schedule or GPU_SCHEDULE)
    if name == "cpu":
        return Profile(
            "cpu",
            schedule or CPU_SCHEDULE,
            feature_scale=0.5,
            batch_size={2: 32, 3: 2},
            max_patch_voxels={3: CPU_MAX_PATCH_VOXELS_3D},
            notes=(
                "features per stage halved",
                "short schedule with warm start",
                "batch 2 (3D) / 32 (2D)",
                f"3D patch of at most {CPU_MAX_PATCH_VOXELS_3D} voxels",
            ),
        )
    raise ValueError(f"unknown profile {name!r}; expected one of 'gpu', 'cpu'")


def derive_configuration(plans: dict[str, Any], base: str, profile: Profile, dropout_p: float | None = None) -> str:
    """Add the profile's configuration to ``plans`` (in place) and return its name.

    The derived configuration inherits nnU-Net's preprocessing (same data identifier) and changes only the
    network width and batch size (``cpu``) and, for MC dropout, adds dropout after every convolution
    (``torch.nn.Dropout`` with ``dropout_p``; seed 001 trains with p = 0.01).
    """
    if base not in plans["configurations"]:
        raise ValueError(
            f"configuration {base!r} is not in the nnU-Net plans; available: {sorted(plans['configurations'])}"
        )
    if profile.name == "gpu" and dropout_p is None:
        return base
    name = base + profile.configuration_suffix + ("_dropout" if dropout_p is not None else "")
    resolved = _resolved(plans, base)
    arch = copy.deepcopy(resolved["architecture"])
    kw = arch["arch_kwargs"]
    config: dict[str, Any] = {"inherits_from": base, "architecture": arch}
    budget = (profile.max_patch_voxels or {}).get(len(resolved["patch_size"]))
    if budget is not None and math.prod(resolved["patch_size"]) > budget:
        config["patch_size"] = _patch_within_budget(resolved, kw, budget)
    if profile.name != "gpu":
        feats = [max(4, round(f * profile.feature_scale)) for f in kw["features_per_stage"]]
        if profile.max_features is not None:
            feats = [min(f, profile.max_features) for f in feats]
        kw["features_per_stage"] = feats
    if dropout_p is not None:
        kw["dropout_op"] = "torch.nn.Dropout"
        kw["dropout_op_kwargs"] = {"p": float(dropout_p), "inplace": False}
    if profile.batch_size is not None:
        config["batch_size"] = profile.batch_size[len(resolved["patch_size"])]
    plans["configurations"][name] = config
    return name


def _patch_within_budget(resolved: dict[str, Any], kw: dict[str, Any], budget: int) -> list[int]:
    """Shrink a configuration's patch to at most ``budget`` voxels the way nnU-Net's planner shrinks it for a
    smaller GPU (``ExperimentPlanner.get_plans_for_configuration``): reduce the axis that is largest relative to
    the median image shape, one step of its divisibility at a time, and let nnU-Net's ``get_pool_and_conv_props``
    derive the network topology (stages, strides, kernels) for each patch. ``kw`` (the architecture's
    ``arch_kwargs``) is updated in place; returns the patch size.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = resolved["spacing"]
    median = resolved["median_image_size_in_voxels"]
    min_edge = 4  # nnU-Net's UNet_featuremap_min_edge_length
    _, pool, conv, patch, divisible = get_pool_and_conv_props(spacing, resolved["patch_size"], min_edge, 999999)
    while math.prod(patch) > budget:
        axis = int(max(range(len(patch)), key=lambda a: patch[a] / median[a]))
        trial = list(patch)
        trial[axis] -= divisible[axis]
        _, _, _, _, divisible = get_pool_and_conv_props(spacing, trial, min_edge, 999999)
        patch = list(patch)
        patch[axis] -= divisible[axis]
        if patch[axis] < 1:
            raise ValueError(f"cannot fit a patch in {budget} voxels for spacing {spacing}")
        _, pool, conv, patch, divisible = get_pool_and_conv_props(spacing, patch, min_edge, 999999)
    n_stages = len(pool)
    old = list(kw["features_per_stage"])
    base_features, max_features = old[0], max(old)
    kw.update(
        n_stages=n_stages,
        kernel_sizes=[list(k) for k in conv],
        strides=[list(s) for s in pool],
        features_per_stage=[min(max_features, base_features * 2**i) for i in range(n_stages)],
        n_conv_per_stage=[kw["n_conv_per_stage"][0]] * n_stages,
        n_conv_per_stage_decoder=[kw["n_conv_per_stage_decoder"][0]] * (n_stages - 1),
    )
    return [int(p) for p in patch]


def _resolved(plans: dict[str, Any], name: str) -> dict[str, Any]:
    conf = plans["configurations"][name]
    if "inherits_from" in conf:
        merged = copy.deepcopy(_resolved(plans, conf["inherits_from"]))
        merged.update({k: v for k, v in conf.items() if k != "inherits_from"})
        return merged
    return conf
