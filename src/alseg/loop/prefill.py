"""The model predictions an oracle asks for as the prefill (:data:`alseg.oracle.base.ModelSegmentations`).

The runner hands this callable to the oracle when the config keeps ``prefill: true``. It predicts lazily, case by
case, with the backend's plain prediction (one sample: what ``evaluate`` scores), and takes the argmax of the mean
probabilities, as the evaluation does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from alseg.backends.base import SegmentationBackend
from alseg.loop.progress import RunProgress
from alseg.oracle.base import ModelSegmentations
from alseg.store.layout import model_dir


def model_segmentations(
    backend: Callable[[], SegmentationBackend], exp_dir: Path, seed: int, progress: RunProgress | None = None
) -> ModelSegmentations:
    """``(model_round, case_ids) -> (case_id, argmax label map)`` per case from the model of ``model_round``.

    ``backend``: returns the backend (called only when a prediction is iterated, so an oracle that never asks
    starts none). ``seed``: the experiment seed; the prediction of the round after ``model_round`` is seeded
    ``seed * 1000 + model_round + 1``, as that round's query. ``progress``: shows a bar while it predicts.
    """

    def predict(model_round: int, case_ids: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        ids = list(case_ids)
        r = model_round + 1
        preds = backend().predict(model_dir(Path(exp_dir), model_round), ids, n_samples=1, seed=seed * 1000 + r)
        if progress is not None:
            preds = progress.track(preds, len(ids), f"round {r}: predict prefill", "predicting the prefill")
        for pred in preds:
            yield pred.case_id, np.argmax(pred.probs.mean(axis=0), axis=0)

    return predict
