"""The oracle seam: who labels a round's regions. The runner asks the oracle and commits what it wrote.

An oracle's :meth:`Oracle.annotate` writes the round's training labels (the partial labels nnU-Net trains on:
the labels inside the annotated regions, the ignore value elsewhere) and returns an :class:`Annotation`, or
returns :class:`Waiting` when the round's regions wait for people. The runner then commits the annotate
stage the same way for every oracle, in one transaction.

- ``simulated`` (:class:`~alseg.oracle.simulated.SimulatedOracle`): the dataset's ground truth;
- ``human`` (:class:`~alseg.oracle.human.HumanOracle`): people, through a work package and ``alseg import``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from alseg.data.dataset import Dataset
from alseg.store.state import ExperimentState


@dataclass
class Annotation:
    """What an oracle wrote for a round, for the runner to commit."""

    label_files: dict[str, tuple[str, str]]  # case id -> (label file relative to the experiment, SHA-256)
    fg_voxels: dict[int, dict[str, int]] = field(default_factory=dict)  # regions labelled now: id -> {label: n}
    annotated_by: str = ""  # recorded with ``fg_voxels``
    detail: dict[str, Any] = field(default_factory=dict)  # the stage's detail in the state
    closed: list[int] = field(default_factory=list)  # regions closed without labels


@dataclass
class Waiting:
    """A round whose regions wait for human labels."""

    round_index: int
    package: Path
    open_regions: list[tuple[int, str]]  # (region id, case id)
    n_regions: int
    exported_now: bool = False

    def message(self, exp_dir: Path) -> str:
        n_open = len(self.open_regions)
        cases = sorted({c for _, c in self.open_regions})
        head = (
            f"round {self.round_index}: {n_open} of {self.n_regions} regions in {len(cases)} cases wait for "
            f"labels; work package: {self.package}"
        )
        return (
            f"{head}\nlabel them (see {self.package / 'README.txt'}), then run `alseg import {exp_dir} LABELS_DIR` "
            f"and `alseg query {exp_dir}`"
        )


class Oracle(Protocol):
    """Labels the regions of a round."""

    kind: ClassVar[str]
    #: whether the oracle reads the dataset's ground truth (then the start covers the classes from it)
    has_ground_truth: ClassVar[bool]

    def annotate(self, round_index: int, allow_open: bool = False) -> Annotation | Waiting:
        """Write the round's training labels, or say that the round waits for people."""
        ...


#: ``(exp_dir, ds, state, ignore_value, ground_truth)`` -> an oracle
OracleFactory = Callable[[Path, Dataset, ExperimentState, int, Callable[[str], np.ndarray]], Oracle]
