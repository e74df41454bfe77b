"""The oracle seam: who labels a round's regions. The runner asks the oracle and commits what it wrote.

An oracle's :meth:`Oracle.annotate` writes the round's training labels (the partial labels nnU-Net trains on:
the labels inside the annotated regions, the ignore value elsewhere) and returns an :class:`Annotation`, or
returns :class:`Waiting` when the round's regions wait for people. The runner then commits the annotate
stage the same way for every oracle, in one transaction.

- ``simulated`` (:class:`~alseg.oracle.simulated.SimulatedOracle`): the dataset's ground truth;
- ``human`` (:class:`~alseg.oracle.human.HumanOracle`): people, through a work package and ``alseg import``.

From round 1 on (and unless the config says ``prefill: false``) an oracle gets the previous round's model
predictions through a :data:`ModelSegmentations` callable: the human oracle puts them into the work package as
the prefill people correct; both oracles measure the correction cost of every region against it
(:mod:`alseg.evaluation.correction`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from alseg.data.dataset import Dataset
from alseg.errors import ExperimentError
from alseg.evaluation.correction import RegionCost
from alseg.store.state import ExperimentState

#: ``(model_round, case_ids) -> (case_id, segmentation)`` per case, in the order given: the argmax label map of the
#: model trained in round ``model_round``, on the case's image grid. Lazy: nothing is predicted until iterated.
ModelSegmentations = Callable[[int, Sequence[str]], Iterator[tuple[str, np.ndarray]]]


def checked_segmentations(
    segmentations: ModelSegmentations, model_round: int, case_ids: Sequence[str], ds: Dataset
) -> Iterator[np.ndarray]:
    """The segmentations of ``case_ids`` by the model of ``model_round``, one per case in that order, each checked
    to be the case's and on its image grid (:class:`ExperimentError` otherwise)."""
    predicted = segmentations(model_round, list(case_ids))
    for case_id in case_ids:
        got = next(predicted, None)
        shape = tuple(ds.geometry(case_id).shape)
        if got is None or got[0] != case_id or tuple(got[1].shape) != shape:
            what = "nothing" if got is None else f"case {got[0]!r} of shape {tuple(got[1].shape)}"
            raise ExperimentError(
                f"the prediction of the model of round {model_round} for the prefill gave {what}; expected case "
                f"{case_id!r} of shape {shape}"
            )
        yield got[1]


@dataclass
class Annotation:
    """What an oracle wrote for a round, for the runner to commit."""

    label_files: dict[str, tuple[str, str]]  # case id -> (label file relative to the experiment, SHA-256)
    fg_voxels: dict[int, dict[str, int]] = field(default_factory=dict)  # regions labelled now: id -> {label: n}
    annotated_by: str = ""  # recorded with ``fg_voxels``
    detail: dict[str, Any] = field(default_factory=dict)  # the stage's detail in the state
    closed: list[int] = field(default_factory=list)  # regions closed without labels
    costs: dict[int, RegionCost] = field(default_factory=dict)  # regions measured now (``annotated_by`` labelled)


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


class OracleFactory(Protocol):
    """How the runner builds an oracle (an oracle class is one)."""

    def __call__(
        self,
        exp_dir: Path,
        ds: Dataset,
        state: ExperimentState,
        ignore_value: int,
        ground_truth: Callable[[str], np.ndarray],
        *,
        segmentations: ModelSegmentations | None = None,
    ) -> Oracle:
        """``segmentations``: the models' predictions for the prefill (None: no prefill, ``prefill: false``)."""
        ...
