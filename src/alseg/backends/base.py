"""The segmentation backend protocol: everything the loop needs from a segmentation framework.

The loop talks only to this protocol; ``alseg.backends.nnunet`` is the one implementation that imports
nnunetv2. This module is low in the house: it holds only the protocol and the plain types a backend hands
over (:class:`CasePrediction`, :class:`TrainingCase`, ...), which the strategies read too. A backend trains
on partially labelled cases (the ignore value marks unannotated voxels) and streams probability samples
``(K, C, *spatial)`` for the cases it is asked to predict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass
class CasePrediction:
    """A model's output for one case: probability samples ``(K, C, *spatial)`` and optional extras."""

    case_id: str
    probs: np.ndarray
    features: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingCase:
    """One training case: its image files (one per channel) and its partial label file."""

    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class TrainResult:
    """Where the trained model is, and what training measured."""

    model_dir: Path
    seconds: float
    details: dict


@dataclass(frozen=True)
class TrainingProgress:
    """Where a training stands, reported to the loop while it runs (plain values, any backend).

    ``iteration`` of ``iterations``: training iterations (batches) done by this member and its total; ``epoch``
    of ``epochs``: epochs completed. ``loss``: the mean training loss of the current epoch so far (of the
    epoch just completed when ``epoch_end``); ``pseudo_dice``: the mean foreground pseudo-Dice of the last
    completed epoch (None before the first). ``seconds``: seconds since this member's first iteration began,
    so ``seconds / iteration`` is the time per iteration; ``setup_seconds``: what came before it (starting,
    preprocessing), when known. ``member`` (0-based) of ``members``: which model of an ensemble trains.
    ``epoch_end``: this report closes epoch ``epoch``; ``epoch_seconds`` is then that epoch's duration.
    """

    iteration: int
    iterations: int
    epoch: int
    epochs: int
    loss: float | None = None
    pseudo_dice: float | None = None
    seconds: float = 0.0
    member: int = 0
    members: int = 1
    epoch_end: bool = False
    epoch_seconds: float | None = None
    setup_seconds: float | None = None

    @property
    def seconds_per_iteration(self) -> float | None:
        return self.seconds / self.iteration if self.iteration > 0 else None


#: ``train(..., progress=...)``: called with each report while a model trains
ProgressCallback = Callable[[TrainingProgress], None]


class SegmentationBackend(Protocol):
    """A segmentation framework seen by the active-learning loop."""

    name: str

    def prepare(self, planning_cases: Mapping[str, TrainingCase], labels: Mapping[int, str], ignore_value: int) -> None:
        """Plan once from the starting data (idempotent: a second call with plans present does nothing)."""
        ...

    def train(
        self,
        cases: Mapping[str, TrainingCase],
        out_dir: Path,
        seed: int,
        init_from: Path | None = None,
        case_classes: Mapping[str, set[int]] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        """Train one model on ``cases`` and leave it, complete, in ``out_dir`` (written atomically).

        ``seed``: the training seed (the loop passes ``experiment seed * 1000 + round``); the same seed gives the
        same training draws, so a resumed round repeats them. ``init_from``: the previous round's model to warm
        start from. ``case_classes``: per case of ``cases``, the foreground classes in its annotated voxels; a
        backend that splits the cases into cross-validation folds (an nnActive ensemble) uses it to put every
        class into at least two folds, any other backend may ignore it. The loop passes it only for
        ``uncertainty.ensemble: folds``. ``progress``: called with a :class:`TrainingProgress` now and then while
        training runs (at least at every epoch end) and never after ``train`` returns; the loop passes it only
        to a backend whose ``train`` has this argument."""
        ...

    def predict(
        self,
        model_dir: Path,
        case_ids: Sequence[str],
        n_samples: int = 1,
        with_features: bool = False,
        seed: int = 0,
    ) -> Iterator[CasePrediction]:
        """Stream predictions case by case: probability samples ``(K, C, *spatial)`` in image geometry."""
        ...

    def gradient_embedder(self, model_dir: Path, layers: str = "bottleneck") -> Callable[..., np.ndarray]:
        """``(case_id, boxes, index) -> (len(boxes), D)`` per-region gradient embeddings (flat parameter
        indices ``index`` of the embedded weights, or all of them); the callable has ``n_params``.

        ``layers``: ``"bottleneck"`` (the last convolution of the encoder's bottleneck stage, USIMC) or
        ``"decoder"`` (the convolution weights of every decoder stage, USIMF)."""
        ...
