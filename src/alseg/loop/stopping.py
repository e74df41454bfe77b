"""When to stop, the loop side: the stop set, its prediction after every round's training, and the signals
``alseg status`` and the report show (definitions: ``alseg.evaluation.stopping``).

The **stop set** is a seeded draw of ``stopping.stop_set_size`` pool cases (all of them when the pool is
smaller), the same for every strategy under one experiment seed, stored in the state's meta table when the
first evaluate stage that uses it starts (a resume uses the stored set). The evaluate stage predicts it with
the round's model in the same prediction run as the held-out cases (the model loads once), writes the
segmentations to ``rounds/NNN/stop_set.npz`` (uint8, compressed, one array per case id, byte-identical for the
same predictions) and records in the stage's detail:

* ``stability`` / ``stability_per_class``: Dice between this round's and the last earlier round's
  segmentations, per foreground class pooled over the stop set, and their mean; voxels annotated up to this
  round are left out of both (the rule is about unlabelled data);
* ``stop_set_entropy``: the mean normalised predictive entropy over the same voxels;
* ``compared_with`` (that earlier round), ``cases``, ``unannotated_voxels``, ``seconds`` (predicting the stop set
  and computing the signals) and ``compute_seconds`` (the signals and the file alone).

Everything is written before the stage commits and recomputed when a kill comes first. Experiments created
before the stop set existed resume with it from their next evaluate stage; earlier rounds have None.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alseg.backends.base import CasePrediction
from alseg.config import ExperimentConfig
from alseg.data.regions import Box, annotated_mask
from alseg.durable import replace
from alseg.errors import ExperimentError
from alseg.evaluation.stopping import (
    STOP,
    PooledAgreement,
    case_dice_matrix,
    dice_gains,
    draw_stop_set,
    fit_saturation,
    normalised_entropy_sum,
    recommend,
    saturation_interval,
)
from alseg.store.layout import STOP_SET_FILE, STOP_SET_META, fault_point, round_dir
from alseg.store.state import ExperimentState
from alseg.strategies.base import make_rng

__all__ = ["STOPPING_ROUND_KEYS", "StopSetRound", "stop_set_cases", "stopping_status"]

#: the keys ``stopping_status`` gives each round (``alseg status --json`` rows)
STOPPING_ROUND_KEYS = (
    "stability",
    "stability_per_class",
    "stop_set_entropy",
    "dice_gain",
    "gain_below_min",
    "recommendation",
    "rule",
)

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed member time: the same segmentations give the same file


def stop_set_cases(state: ExperimentState, cfg: ExperimentConfig, pool: Sequence[str]) -> list[str]:
    """The experiment's stop set: the stored one (less cases that left the pool), else the seeded draw, stored.

    Empty with ``stopping.stop_set_size: 0`` and for a single-round experiment (nothing to compare).
    """
    if cfg.stopping.stop_set_size == 0 or cfg.rounds < 2:
        return []
    stored = state.get_meta(STOP_SET_META)
    if stored is not None:
        members = set(pool)
        return [cid for cid in json.loads(stored) if cid in members]
    drawn = draw_stop_set(pool, cfg.stopping.stop_set_size, make_rng(cfg.seed, 0, "stop_set", "draw"))
    with state.transaction() as conn:  # before any prediction: a resume, or a later round, reads this set
        state.set_meta(conn, STOP_SET_META, json.dumps(drawn))
    return drawn


class _NpzWriter:
    """An ``.npz`` written one array at a time into a hidden temporary file, renamed into place by ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        self.closed = False

    def add(self, name: str, array: np.ndarray) -> None:
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_DEFLATED
        with self.zip.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def close(self) -> None:
        self.zip.close()
        replace(self.tmp, self.path)
        self.closed = True

    def discard(self) -> None:
        """Drop an unfinished file (a failed prediction run); the rerun writes it again."""
        self.zip.close()
        self.tmp.unlink(missing_ok=True)


class StopSetRound:
    """One round's stop-set prediction: ``take`` the prediction stream, then ``finish`` for the stage's detail."""

    def __init__(
        self,
        exp_dir: Path,
        state: ExperimentState,
        cfg: ExperimentConfig,
        pool: Sequence[str],
        round_index: int,
        labels: Sequence[int],
    ) -> None:
        self.exp_dir = Path(exp_dir)
        self.state = state
        self.round = round_index
        self.case_ids = stop_set_cases(state, cfg, pool)
        self.path = round_dir(self.exp_dir, round_index) / STOP_SET_FILE
        self.previous = self._previous_round() if self.case_ids else None
        boxes: dict[str, list[Box]] = defaultdict(list)
        for sr in state.regions(max_round=round_index, status="annotated"):
            boxes[sr.region.case_id].append(sr.region.box)
        self._boxes = boxes
        self._agreement = PooledAgreement(labels)
        self._entropy, self._voxels = 0.0, 0
        self.seconds = 0.0  # predicting the stop set and computing its signals
        self.compute_seconds = 0.0  # computing and storing the signals alone
        self._done: set[str] = set()

    def _previous_round(self) -> int | None:
        """The last earlier round whose committed evaluate stage wrote a stop-set prediction."""
        for q in range(self.round - 1, -1, -1):
            detail = self.state.stage_detail(q, "evaluate") or {}
            if detail.get("stopping") and (round_dir(self.exp_dir, q) / STOP_SET_FILE).is_file():
                return q
        return None

    def take(self, predictions: Iterable[CasePrediction]) -> Iterator[CasePrediction]:
        """Pass on the predictions of other cases; record (and time) those of the stop set."""
        wanted = set(self.case_ids)
        writer = _NpzWriter(self.path) if wanted else None
        before = None
        if self.previous is not None:
            before = np.load(round_dir(self.exp_dir, self.previous) / STOP_SET_FILE, allow_pickle=False)
        try:
            t = time.perf_counter()
            for pred in predictions:
                if pred.case_id in wanted and writer is not None:
                    self._add(pred, writer, before)
                    self.seconds += time.perf_counter() - t
                else:
                    yield pred
                t = time.perf_counter()
            if writer is not None:
                missing = sorted(wanted - self._done)
                if missing:
                    raise ExperimentError(f"round {self.round}: no prediction of stop-set case(s) {missing}")
                writer.close()
                fault_point("evaluate.stop_set_written", self.round)
        finally:
            if before is not None:
                before.close()
            if writer is not None and not writer.closed:
                writer.discard()

    def _add(self, pred: CasePrediction, writer: _NpzWriter, before: Any) -> None:
        t = time.perf_counter()
        mean = np.asarray(pred.probs).mean(axis=0, dtype=np.float32)  # (C, *spatial)
        seg = np.argmax(mean, axis=0).astype(np.uint8 if mean.shape[0] <= 256 else np.uint16)
        keep = ~annotated_mask(seg.shape, self._boxes.get(pred.case_id, []))
        total, n = normalised_entropy_sum(mean[None], keep)
        self._entropy += total
        self._voxels += n
        writer.add(pred.case_id, seg)
        self._done.add(pred.case_id)
        if before is not None and pred.case_id in before.files:
            earlier = before[pred.case_id]
            if earlier.shape != seg.shape:
                raise ExperimentError(
                    f"{round_dir(self.exp_dir, self.previous or 0) / STOP_SET_FILE}: case {pred.case_id} has shape "
                    f"{earlier.shape}, expected {seg.shape} as predicted in round {self.round}"
                )
            self._agreement.add(seg, earlier, keep)
        self.compute_seconds += time.perf_counter() - t

    def finish(self) -> dict[str, Any] | None:
        """The round's signals for the evaluate stage's detail (None without a stop set); after ``take`` ran."""
        if not self.case_ids:
            return None
        compared = self.previous is not None and self._agreement.n_cases > 0
        return {
            "cases": len(self.case_ids),
            "file": str(self.path.relative_to(self.exp_dir)),
            "compared_with": self.previous if compared else None,
            "stability": self._agreement.mean() if compared else None,
            "stability_per_class": {str(k): v for k, v in self._agreement.per_class().items()} if compared else None,
            "stop_set_entropy": self._entropy / self._voxels if self._voxels else None,
            "unannotated_voxels": self._voxels,
            "seconds": round(self.seconds, 3),
            "compute_seconds": round(self.compute_seconds, 3),
        }


# --------------------------------------------------------------------------------------------------
# what status and the report show
# --------------------------------------------------------------------------------------------------
def stopping_status(
    exp_dir: Path,
    cfg: ExperimentConfig,
    stages: Sequence[Mapping[str, Any]],
    metrics: Mapping[int, Mapping[str, Any]],
    stop_set: Sequence[str] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Per round ``{stability, stability_per_class, stop_set_entropy, dice_gain, gain_below_min, recommendation,
    rule}`` and the experiment's ``{stop_set_size, thresholds, first_stop_round, fg_eff_x95}``.

    Reads the stages' details and metrics given, and ``rounds/NNN/evaluation.json`` for the bootstrap. Rounds whose
    evaluate stage has not committed get None; the recommendation never reads held-out labels.
    """
    opts = cfg.stopping
    evaluated = sorted(
        {int(s["round"]) for s in stages if s["stage"] == "evaluate" and s.get("status") == "done"} | set(metrics)
    )
    signals: dict[int, dict[str, Any]] = {}
    for s in stages:
        if s["stage"] == "evaluate" and s.get("status") == "done" and (s.get("detail") or {}).get("stopping"):
            signals[int(s["round"])] = s["detail"]["stopping"]
    stability = [_number(signals.get(r, {}).get("stability")) for r in evaluated]
    recs = recommend(stability, opts.stability_threshold, opts.patience)
    gains = dice_gains([_number(metrics.get(r, {}).get("dice_mean")) for r in evaluated])
    rows: dict[int, dict[str, Any]] = {}
    for i, r in enumerate(evaluated):
        sig = signals.get(r, {})
        rule = recs[i].rule
        if stability[i] is None:
            rule = _why_no_stability(i, sig, opts.stop_set_size, cfg.rounds)
        rows[r] = {
            "stability": stability[i],
            "stability_per_class": sig.get("stability_per_class"),
            "stop_set_entropy": _number(sig.get("stop_set_entropy")),
            "dice_gain": gains[i],
            "gain_below_min": None if gains[i] is None else bool(gains[i] < opts.min_gain),
            "recommendation": recs[i].text,
            "rule": rule,
        }
    stops = [r for r, row in rows.items() if row["recommendation"] == STOP]
    experiment = {
        "stop_set_size": None if stop_set is None else len(stop_set),
        "stability_threshold": opts.stability_threshold,
        "patience": opts.patience,
        "min_gain": opts.min_gain,
        "first_stop_round": stops[0] if stops else None,
        "fg_eff_x95": _x95(exp_dir, cfg, metrics),
    }
    return rows, experiment


def _why_no_stability(position: int, signal: Mapping[str, Any], size: int, n_rounds: int) -> str:
    if size == 0 or n_rounds < 2:
        return "no stop set (stopping.stop_set_size: 0, or a single round): no stability"
    if position == 0 and signal:
        return "first round: no earlier prediction to compare with"
    if not signal:
        return "no stop-set prediction in this round (the experiment predates the stop set)"
    return "no earlier round with a stop-set prediction to compare with"


def _x95(exp_dir: Path, cfg: ExperimentConfig, metrics: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The FG-Eff 95% budget of the run's own curve, with its bootstrap interval over the held-out cases."""
    rounds = sorted(metrics)
    x = [_number((metrics[r].get("cost") or {}).get("fg_fraction")) for r in rounds]
    dice = [_number(metrics[r].get("dice_mean")) for r in rounds]
    fit = fit_saturation(x, dice)
    finite_x = [v for v in x if v is not None]
    out = fit.to_json(max(finite_x) if finite_x else None)
    out["interval"] = None
    if fit.ok and cfg.stopping.bootstrap_resamples > 0:
        per_round = [_case_dice(exp_dir, r) for r in rounds]
        if any(p is None for p in per_round):
            out["interval_reason"] = "a round's evaluation.json is missing or unreadable"
            return out
        interval = saturation_interval(
            x,
            case_dice_matrix([p or {} for p in per_round]),
            cfg.stopping.bootstrap_resamples,
            make_rng(cfg.seed, 0, "stopping", "bootstrap"),
            start=(fit.b or 1.0, fit.c or 1.0),
        )
        out["interval"] = None if interval.low is None else [interval.low, interval.high]
        out["interval_reason"] = interval.reason
        out["bootstrap"] = interval.to_json()
    return out


def _case_dice(exp_dir: Path, r: int) -> dict[str, float | None] | None:
    try:
        cases = json.loads((round_dir(exp_dir, r) / "evaluation.json").read_text())["cases"]
        return {str(c["case_id"]): _number(c.get("dice_fg_mean")) for c in cases}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None
