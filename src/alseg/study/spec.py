"""A study file: settings × strategies × seeds, each cell one experiment (``alseg bench STUDY.yaml --out DIR``).

.. code-block:: yaml

    name: hippocampus-3d
    dataset: /data/Task04_Hippocampus      # relative paths: to the study file's folder
    seeds: [0, 1, 2]
    full_data: true                         # one full-data reference per setting
    baseline: random_fg33                   # the report's significance baseline (optional)
    defaults: {profile: cpu, device: cpu}   # config keys of every setting
    settings:
      box20:                                # a setting: any experiment config key but strategy and seed
        unit: box
        region_size: [20, 20, 20]
        query_size: 20
        starting_budget: 20
        rounds: 5
    strategies:
      - random
      - strategy: stochastic_batches       # an entry with parameters,
        name: sb_entropy                   # a folder name (default: the strategy and its parameters),
        params: {base: entropy}
        uncertainty: {source: mc_dropout}  # and its own uncertainty keys (over the setting's)

Every cell is validated as an experiment config when the study is read, so a typo stops the study before any
run starts, with the study file, the setting and the strategy named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alseg.config import ConfigError, ExperimentConfig, parse_config, read_yaml
from alseg.report.results import strategy_label

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: keys a setting may not set: the study sets them per cell
_CELL_KEYS = ("strategy", "strategy_params", "seed")


class StrategyEntry(BaseModel):
    """One strategy of a study: its key, parameters, own uncertainty keys and folder name."""

    model_config = ConfigDict(extra="forbid")

    strategy: str
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    uncertainty: dict[str, Any] | None = None

    @property
    def folder(self) -> str:
        if self.name is not None:
            return self.name
        if not self.params:
            return self.strategy
        return self.strategy + "".join(f"_{k}-{v}" for k, v in sorted(self.params.items()))


class StudySpec(BaseModel):
    """A study file's content (see the module's documentation)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dataset: Path | None = None
    seeds: list[int] = Field(min_length=1)
    settings: dict[str, dict[str, Any]] = Field(min_length=1)
    defaults: dict[str, Any] = Field(default_factory=dict)
    strategies: list[str | StrategyEntry] = Field(min_length=1)
    full_data: bool = True
    baseline: str | None = None

    @field_validator("strategies")
    @classmethod
    def _entries(cls, v: list[str | StrategyEntry]) -> list[str | StrategyEntry]:
        return [StrategyEntry(strategy=e) if isinstance(e, str) else e for e in v]

    def entries(self) -> list[StrategyEntry]:
        return [e if isinstance(e, StrategyEntry) else StrategyEntry(strategy=e) for e in self.strategies]


@dataclass(frozen=True)
class Cell:
    """One experiment of a study: a setting, a strategy entry, a seed and the config they make."""

    setting: str
    name: str  # the strategy entry's folder name; "full_data" for the reference
    seed: int
    cfg: ExperimentConfig

    @property
    def id(self) -> str:
        return f"{self.setting}/{self.name}" + ("" if self.name == FULL_DATA else f"/seed{self.seed}")

    @property
    def is_reference(self) -> bool:
        return self.name == FULL_DATA


FULL_DATA = "full_data"


def load_study(path: Path, dataset: Path | None = None) -> tuple[StudySpec, list[Cell]]:
    """Read and check a study file; its cells, setting by setting, seed by seed, strategy by strategy (the order
    the in-process executor runs them: every strategy of seed 0 first), the references last.

    ``dataset``: replaces the dataset of every setting (a study written for another machine's folder)."""
    path = Path(path)
    data = read_yaml(path, "study file")
    if not isinstance(data, dict):
        raise ConfigError(f"study file {path}: expected a mapping of keys, got {type(data).__name__}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        lines = [f"key {'.'.join(str(p) for p in e['loc'])!r}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid study file {path}:\n  " + "\n  ".join(lines)) from None
    base = path.resolve().parent
    entries = spec.entries()
    for what, name in [("setting", s) for s in spec.settings] + [("strategy name", e.folder) for e in entries]:
        if not _NAME.match(name) or name == FULL_DATA or name.startswith("round0"):
            raise ConfigError(
                f"study file {path}: {what} {name!r} cannot name a folder (letters, digits, '_', '.', '-'; not "
                f"{FULL_DATA!r} or round0...); give the entry a 'name'"
            )
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"study file {path}: key 'seeds' repeats a seed ({spec.seeds}); each seed is one run")
    folders = [e.folder for e in entries]
    if len(set(folders)) != len(folders):
        dup = sorted({f for f in folders if folders.count(f) > 1})
        raise ConfigError(f"study file {path}: strategies {dup} appear twice; give one of them another 'name'")
    cells: list[Cell] = []
    refs: list[Cell] = []
    for sname, setting in spec.settings.items():
        for where, keys_given in ((f"setting {sname!r}", setting), ("'defaults'", spec.defaults)):
            bad = [k for k in _CELL_KEYS if k in keys_given]
            if bad:
                raise ConfigError(f"study file {path}: {where} sets {bad}; the study sets them per run")
        keys = {**spec.defaults, **setting}
        root = dataset if dataset is not None else keys.get("dataset", spec.dataset)
        if root is None:
            raise ConfigError(f"study file {path}: setting {sname!r} has no dataset (key 'dataset')")
        keys["dataset"] = str(root)
        for seed in spec.seeds:
            for e in entries:
                cell = {**keys, "strategy": e.strategy, "strategy_params": e.params, "seed": seed}
                if e.uncertainty is not None:
                    cell["uncertainty"] = {**(keys.get("uncertainty") or {}), **e.uncertainty}
                source = f"{path}: setting {sname!r}, strategy {e.folder!r}"
                cells.append(Cell(sname, e.folder, seed, parse_config(cell, source, base_dir=base)))
        if spec.full_data:  # the setting's keys (its uncertainty source: dropout in training); the strategy unused
            cell = {**keys, "strategy": "random", "seed": spec.seeds[0]}
            source = f"{path}: setting {sname!r}, the full-data reference"
            refs.append(Cell(sname, FULL_DATA, spec.seeds[0], parse_config(cell, source, base_dir=base)))
    labels = sorted({strategy_label(c.cfg) for c in cells})
    if spec.baseline is not None and spec.baseline not in labels:
        raise ConfigError(f"study file {path}: baseline {spec.baseline!r} is none of its strategies {labels}")
    return spec, cells + refs
