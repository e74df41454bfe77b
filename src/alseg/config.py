"""Experiment configuration: a YAML file whose smallest form is ``dataset: PATH`` and ``strategy: NAME``.

Every other key has a default that suits the dataset; ``resolve`` fills the dataset-derived ones (region
size, stride, configuration) so that the stored config of an experiment is complete and explicit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alseg.errors import AlsegError


class ConfigError(AlsegError, ValueError):
    """An invalid configuration; the message names the file, the key and what was expected."""


class Schedule(BaseModel):
    """How each round trains: the one schedule type of alseg (config key ``schedule``, the profiles' defaults).

    An experiment stores its schedule resolved in ``config.yaml`` (the profile's when the config gives none),
    so a later change of a profile's defaults never changes a running experiment. Keys a given ``schedule``
    leaves out take these defaults (nnU-Net's SGD trainer and learning rate), not the profile's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(gt=0)
    iterations_per_epoch: int = Field(gt=0)
    val_iterations_per_epoch: int = Field(default=1, ge=1)
    warm_start: bool = True
    initial_lr: float | None = Field(default=None, gt=0)
    first_round_epochs: int | None = Field(default=None, gt=0, description="epochs of the from-scratch round")
    warm_start_lr: float | None = Field(default=None, gt=0, description="initial LR of warm-started rounds")
    optimizer: Literal["sgd", "adam"] = Field(
        default="sgd", description="nnU-Net's SGD trainer or its AdamW variant (nnUNetTrainerAdam)"
    )

    def to_spec(self, from_scratch: bool) -> dict[str, Any]:
        """The training worker's schedule for one round (from scratch, or warm-started)."""
        spec = {
            k: v
            for k, v in self.model_dump().items()
            if v is not None and k not in ("warm_start", "first_round_epochs", "warm_start_lr")
        }
        if from_scratch and self.first_round_epochs is not None:
            spec["epochs"] = self.first_round_epochs
        if not from_scratch and self.warm_start_lr is not None:
            spec["initial_lr"] = self.warm_start_lr
        return spec


#: K when the config leaves ``uncertainty.n_samples`` out: the source's paper (MC dropout 10 passes, seed 001;
#: TTA 8 augmentations, seed 002; a 5-member ensemble, nnActive's 5 cross-validation folds)
DEFAULT_SAMPLES: dict[str, int] = {"softmax": 1, "mc_dropout": 10, "tta": 8, "ensemble": 5}


class UncertaintyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["softmax", "mc_dropout", "tta", "ensemble"] = "softmax"
    n_samples: int | None = Field(
        default=None,
        ge=1,
        description="K: passes, augmentations or ensemble members; default the source's paper (DEFAULT_SAMPLES)",
    )
    ensemble: Literal["seeds", "folds"] = Field(
        default="seeds",
        description="ensemble members: every member on all annotated cases from its own seed ('seeds'), or one "
        "member per cross-validation fold of the annotated cases ('folds', nnActive)",
    )
    dropout_train_p: float = Field(default=0.01, gt=0, lt=1, description="dropout while training (seed 001)")
    dropout_query_p: float = Field(default=0.1, gt=0, lt=1, description="dropout at query time (seed 001)")
    tta_flip_axes: list[int] | None = Field(default=None, description="axes flipped by TTA; default all")
    tta_max_angle: float = Field(default=10.0, ge=0, description="TTA rotation range in degrees (seed 002)")
    tta_noise_std: float = Field(default=0.01, ge=0, description="TTA Gaussian noise, relative to image std")

    @model_validator(mode="after")
    def _samples(self) -> UncertaintyConfig:
        if self.n_samples is None:
            self.n_samples = DEFAULT_SAMPLES[self.source]
        if self.source == "ensemble" and self.ensemble == "folds" and self.n_samples < 2:
            raise ValueError(f"a cross-validation ensemble needs n_samples >= 2 folds, got {self.n_samples}")
        if self.source == "softmax" and self.n_samples != 1:
            raise ValueError(f"source 'softmax' gives one sample; n_samples must be 1, got {self.n_samples}")
        return self


class StoppingConfig(BaseModel):
    """When to stop (config key ``stopping``): the stop set and the thresholds of the label-free rule.

    ``alseg status`` recommends stopping at a round when the prediction stability (Dice between this round's and
    the previous round's segmentations of the stop set's unannotated voxels, mean over foreground classes) has
    been at least ``stability_threshold`` for ``patience`` consecutive rounds. ``min_gain`` only labels the
    held-out Dice gain shown beside it; held-out labels never enter the recommendation.
    """

    model_config = ConfigDict(extra="forbid")

    stop_set_size: int = Field(
        default=20,
        ge=0,
        description="pool cases predicted after every round to measure stability (a seeded draw, fixed for the "
        "experiment; a smaller pool: all of it; 0: no stop set, no stability)",
    )
    stability_threshold: float = Field(
        default=0.97, gt=0, le=1, description="mean-over-classes stability at or above which a round counts"
    )
    patience: int = Field(default=2, ge=1, description="consecutive rounds at or above the threshold to stop")
    min_gain: float = Field(
        default=0.01, ge=0, description="held-out Dice gain per round below which the gain is called small"
    )
    bootstrap_resamples: int = Field(
        default=200, ge=0, description="resamples of the held-out cases for the interval of the 95% budget"
    )


class ExperimentConfig(BaseModel):
    """All settings of one experiment (one strategy, one seed, one setting)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path
    strategy: str
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    rounds: int = Field(default=5, ge=1, description="training rounds, the starting one included")
    query_size: int = Field(default=20, ge=1, description="regions queried per round")
    starting_budget: int | None = Field(default=None, ge=1, description="regions in round 0; default query_size")
    unit: Literal["box", "slice", "case"] = "box"
    region_size: list[int] | None = None
    slice_axis: int | None = Field(
        default=None,
        ge=0,
        description="axis of 2D slices; default the lowest-resolution axis of anisotropic data, else 0",
    )
    stride: list[int] | None = None
    n_per_case: int = Field(default=20, ge=1)
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1)
    pool_size: int | None = Field(
        default=None,
        ge=1,
        description="use only this many pool cases, a fixed draw seeded by split_seed (the held-out cases stay)",
    )
    split_seed: int = 0
    backend: Literal["nnunet"] = "nnunet"
    configuration: Literal["2d", "3d_fullres"] | None = None
    profile: Literal["auto", "cpu", "gpu"] = "auto"
    schedule: Schedule | None = Field(
        default=None, description="how each round trains; default the profile's, stored resolved at creation"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(default=None, ge=1)
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)
    evaluate_every: int = Field(default=1, ge=1)
    oracle: Literal["simulated", "human"] = Field(
        default="simulated",
        description="who labels the regions: the dataset's ground truth (simulated) or people through "
        "alseg query / alseg import (human); a dataset without any label file is always human",
    )
    starting_regions: Path | None = Field(
        default=None, description="JSON or CSV of the round-0 regions; default: chosen by alseg"
    )
    prefill: bool = Field(
        default=True,
        description="from round 1 on, start each region from the previous round's model prediction: the work "
        "package holds it as prefill/{case}.nii.gz for people to correct, and the correction cost (corrected "
        "voxels, strokes) is measured against it; false: people start from an empty label, and the cost is "
        "measured against background",
    )
    stopping: StoppingConfig = Field(
        default_factory=StoppingConfig, description="the stop set and the thresholds of the stopping rule"
    )

    @field_validator("region_size", "stride")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(int(x) <= 0 for x in v)):
            raise ValueError(f"expected a list of positive integers, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.unit == "box" and self.region_size is not None and len(self.region_size) not in (2, 3):
            raise ValueError(f"region_size must have 2 or 3 entries, got {self.region_size}")
        return self

    @property
    def starting_size(self) -> int:
        return self.starting_budget or self.query_size


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(ExperimentConfig.model_fields))
            lines.append(f"unknown key {key!r}; valid keys: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}")
        else:
            lines.append(f"key {key!r}: {e['msg']} (got {value!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a config mapping; relative dataset paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    if base_dir is not None and not cfg.dataset.is_absolute():
        cfg = cfg.model_copy(update={"dataset": (base_dir / cfg.dataset).resolve()})
    if base_dir is not None and cfg.starting_regions is not None and not cfg.starting_regions.is_absolute():
        cfg = cfg.model_copy(update={"starting_regions": (base_dir / cfg.starting_regions).resolve()})
    return cfg


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The content of a YAML file; ConfigError naming ``what`` and the file when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None


def load_config(path: Path) -> ExperimentConfig:
    path = Path(path)
    return parse_config(read_yaml(path), str(path), base_dir=path.resolve().parent)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
