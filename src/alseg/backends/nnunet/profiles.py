"""Training profiles for the nnU-Net backend: which configuration, network and schedule a round uses.

``gpu`` keeps nnU-Net's own plans and schedule (1000 epochs of 250 iterations, from scratch each round).
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
  the same batch, and a reference round costs what a round costs.
"""

from __future__ import annotations

import copy
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
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def configuration_suffix(self) -> str:
        return "" if self.name == "gpu" else "_alseg_cpu"


GPU_SCHEDULE = Schedule(epochs=1000, iterations_per_epoch=250, val_iterations_per_epoch=50, warm_start=False)
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
            notes=("features per stage halved", "short schedule with warm start", "batch 2 (3D) / 32 (2D)"),
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
    arch = copy.deepcopy(_resolved(plans, base)["architecture"])
    kw = arch["arch_kwargs"]
    if profile.name != "gpu":
        feats = [max(4, round(f * profile.feature_scale)) for f in kw["features_per_stage"]]
        if profile.max_features is not None:
            feats = [min(f, profile.max_features) for f in feats]
        kw["features_per_stage"] = feats
    if dropout_p is not None:
        kw["dropout_op"] = "torch.nn.Dropout"
        kw["dropout_op_kwargs"] = {"p": float(dropout_p), "inplace": False}
    config: dict[str, Any] = {"inherits_from": base, "architecture": arch}
    if profile.batch_size is not None:
        config["batch_size"] = profile.batch_size[len(_resolved(plans, base)["patch_size"])]
    plans["configurations"][name] = config
    return name


def _resolved(plans: dict[str, Any], name: str) -> dict[str, Any]:
    conf = plans["configurations"][name]
    if "inherits_from" in conf:
        merged = copy.deepcopy(_resolved(plans, conf["inherits_from"]))
        merged.update({k: v for k, v in conf.items() if k != "inherits_from"})
        return merged
    return conf
