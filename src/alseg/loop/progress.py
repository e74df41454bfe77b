"""Watching a run: the train stage's terminal bar and log lines, ``progress.json`` and the time estimates."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alseg.backends.base import TrainingProgress
from alseg.backends.nnunet.profiles import get_profile
from alseg.config import ExperimentConfig
from alseg.store.layout import PROGRESS_FILE, log, say

#: training iterations timed before ``alseg run`` estimates how long the experiment trains
ESTIMATE_AFTER_ITERATIONS = 20


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (backends written before it existed do not)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def format_minutes(seconds: float) -> str:
    """``7.5 min`` below ten minutes, ``42 min`` above, ``3 h 05 min`` from three hours."""
    minutes = seconds / 60.0
    if minutes < 10:
        return f"{minutes:.1f} min"
    if minutes < 180:
        return f"{minutes:.0f} min"
    h, m = divmod(round(minutes), 60)
    return f"{h} h {m:02d} min"


class StageProgress:
    """``progress.json`` at the experiment root while a stage runs: what ``alseg status`` shows as running.

    ``{pid, round, stage, detail, started_at, fraction, eta_seconds, updated_at}`` (times in UTC, ISO 8601),
    rewritten atomically at most every ``interval`` seconds (and at every ``force``); :meth:`close` removes it
    once the stage has committed or failed. A file left by a killed run is not shown as running: ``alseg
    status`` shows it only while the experiment lock is held by the process ``pid``.
    """

    def __init__(self, exp_dir: Path, r: int, stage: str, interval: float = 1.0) -> None:
        self.path = Path(exp_dir) / PROGRESS_FILE
        self.round, self.stage = r, stage
        self.started_at = time.time()
        self.t0 = time.perf_counter()
        self.interval = interval
        self.fraction = 0.0
        self.eta_seconds: float | None = None
        self.detail: str | None = None
        self._last = float("-inf")
        self.write()

    def update(
        self, fraction: float, eta_seconds: float | None = None, detail: str | None = None, force: bool = False
    ) -> None:
        """``fraction`` of the stage done; ``eta_seconds`` left (default: from the time so far)."""
        self.fraction = min(max(float(fraction), 0.0), 1.0)
        if eta_seconds is None and self.fraction > 0:
            elapsed = time.perf_counter() - self.t0
            eta_seconds = elapsed * (1.0 - self.fraction) / self.fraction
        self.eta_seconds = eta_seconds
        if detail is not None:
            self.detail = detail
        if force or time.perf_counter() - self._last >= self.interval:
            self.write()

    def write(self) -> None:
        self._last = time.perf_counter()
        data = {
            "pid": os.getpid(),
            "round": self.round,
            "stage": self.stage,
            "detail": self.detail,
            "started_at": _utc(self.started_at),
            "fraction": round(self.fraction, 4),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "updated_at": _utc(time.time()),
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def training_iterations(cfg: ExperimentConfig, from_round: int = 0) -> list[int]:
    """Training iterations of each round from ``from_round`` on under ``cfg``'s schedule, ensemble members
    counted: round 0 (and every round that is not warm-started) trains ``first_round_epochs`` (else
    ``epochs``), warm-started rounds ``epochs``, each of ``iterations_per_epoch``."""
    sched = cfg.schedule or get_profile(cfg.profile if cfg.profile != "auto" else "cpu").schedule
    u = cfg.uncertainty
    members = int(u.n_samples or 1) if u.source == "ensemble" else 1
    first = sched.first_round_epochs or sched.epochs
    out = []
    for r in range(from_round, cfg.rounds):
        epochs = sched.epochs if (r > 0 and sched.warm_start) else first
        out.append(epochs * sched.iterations_per_epoch * members)
    return out


class _TrainingDisplay:
    """The train stage's progress reports as a terminal bar, ``alseg.log`` lines per epoch and progress.json.

    The bar ("round r: train", iterations done / total over all ensemble members, tqdm's ETA; postfix epoch,
    loss, pseudo-Dice, member) is made at the first report and closed by :meth:`close`. Once per run, after
    :data:`ESTIMATE_AFTER_ITERATIONS` timed iterations of the first model, the experiment's training time is
    estimated (:meth:`RunProgress.announce_training_estimate`).
    """

    def __init__(self, run: RunProgress, r: int) -> None:
        self.run, self.r = run, r
        self.bar: Any = None
        self.spi: float | None = None

    def __call__(self, p: TrainingProgress) -> None:
        total = max(1, p.iterations * p.members)
        done = min(total, p.member * p.iterations + p.iteration)
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"round {self.r}: train", unit="it", leave=False, dynamic_ncols=True)
        epoch = p.epochs if p.iteration >= p.iterations else min(p.epoch + 1, p.epochs)
        postfix = {"epoch": f"{epoch}/{p.epochs}"}
        if p.members > 1:
            postfix["model"] = f"{p.member + 1}/{p.members}"
        if p.loss is not None:
            postfix["loss"] = f"{p.loss:.3f}"
        if p.pseudo_dice is not None:
            postfix["pseudo-Dice"] = f"{p.pseudo_dice:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        else:  # an epoch end after its last iteration's report: new loss and pseudo-Dice, same count
            self.bar.refresh()
        if p.epoch_end:
            member = f" (model {p.member + 1}/{p.members})" if p.members > 1 else ""
            loss = "-" if p.loss is None else f"{p.loss:.4f}"
            dice = "-" if p.pseudo_dice is None else f"{p.pseudo_dice:.3f}"
            per_epoch = "" if p.epoch_seconds is None else f", {p.epoch_seconds:.1f} s/epoch"
            line = (
                f"round {self.r}: train epoch {p.epoch}/{p.epochs}{member}: loss {loss}, pseudo-Dice {dice}{per_epoch}"
            )
            log.info(line)
        if p.seconds_per_iteration is not None:
            self.spi = p.seconds_per_iteration
        eta = None
        if self.spi is not None:
            eta = (total - done) * self.spi + (p.members - 1 - p.member) * (p.setup_seconds or 0.0)
        detail = f"epoch {epoch}/{p.epochs}" + (f", model {p.member + 1}/{p.members}" if p.members > 1 else "")
        self.run.update(done / total, eta, detail, force=p.epoch_end)
        if p.member == 0 and p.iteration >= min(ESTIMATE_AFTER_ITERATIONS, p.iterations) and p.iteration > 0:
            self.run.announce_training_estimate(self.r, p)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunProgress:
    """What one run of an experiment shows: the running stage's ``progress.json``, the bars, the estimates."""

    def __init__(self, exp_dir: Path, cfg: ExperimentConfig) -> None:
        self.dir = Path(exp_dir)
        self.cfg = cfg
        self.current: StageProgress | None = None  # the stage running now
        self.timing: dict[str, float] = {}  # measured this run: s/iteration, start-up per training, s/case
        self.estimated = False

    @contextlib.contextmanager
    def stage(self, r: int, stage: str) -> Iterator[StageProgress]:
        """``progress.json`` while a stage runs; removed once it has committed or failed."""
        self.current = StageProgress(self.dir, r, stage)
        try:
            yield self.current
        finally:
            self.current.close()
            self.current = None

    def training_display(self, r: int) -> _TrainingDisplay:
        return _TrainingDisplay(self, r)

    def update(
        self, fraction: float, eta_seconds: float | None = None, detail: str | None = None, force: bool = False
    ) -> None:
        """The running stage's share done (and seconds left) for ``progress.json``; nothing outside a stage."""
        if self.current is not None:
            self.current.update(fraction, eta_seconds, detail, force)

    def track(self, items: Any, total: int, desc: str, what: str) -> Iterator[Any]:
        """``items`` with a terminal bar (``desc``, cases done / ``total``, ETA) and progress.json updates."""
        bar = tqdm(items, total=total, desc=desc, unit="case", leave=False, dynamic_ncols=True)
        try:
            for i, item in enumerate(bar, 1):
                yield item
                self.update(i / max(total, 1), detail=f"{what}, {i}/{total} cases")
        finally:
            bar.close()

    def announce_training_estimate(self, r: int, p: TrainingProgress) -> None:
        """Once per run, from the first timed iterations: how long training the (rest of the) experiment takes."""
        if self.estimated or not p.iteration:
            return
        self.estimated = True
        spi = p.seconds / p.iteration
        setup = p.setup_seconds or 0.0
        self.timing.update(seconds_per_iteration=spi, setup_seconds=setup)
        iters = training_iterations(self.cfg, r)
        trainings = len(iters) * p.members
        total = spi * sum(iters) + setup * trainings
        last = self.cfg.rounds - 1
        scope = f"round {r}" if r == last else f"rounds {r}-{last}"
        if r == 0:
            scope = f"the whole experiment ({len(iters)} round{'s' if len(iters) > 1 else ''})"
        if len(iters) > 1 and len(set(iters[1:])) == 1:
            counted = f"{iters[0]} + {len(iters) - 1} × {iters[1]}"
        else:
            counted = " + ".join(map(str, iters))
        models = f" ({p.members} models a round)" if p.members > 1 else ""
        start = f", plus {setup:.0f} s to start each of {trainings} trainings" if setup >= 0.5 else ""
        say(
            f"round {r}: estimated training time of {scope}: {format_minutes(total)} "
            f"({counted} iterations{models} at {spi:.2f} s each{start}); predicting the pool and evaluating "
            "come on top"
        )

    def announce_remaining_estimate(self, r: int, predicts: bool, query_samples: int, n_pool: int, n_test: int) -> None:
        """After the first evaluation of a run that also timed training: the remaining rounds, prediction and
        evaluation included (scoring and selecting not)."""
        per_case = self.timing.get("evaluate_seconds_per_case")
        spi = self.timing.get("seconds_per_iteration")
        if per_case is None or spi is None or self.timing.get("remaining_announced") or r >= self.cfg.rounds - 1:
            return
        self.timing["remaining_announced"] = 1.0
        rounds = range(r + 1, self.cfg.rounds)
        u = self.cfg.uncertainty
        members = int(u.n_samples or 1) if u.source == "ensemble" else 1
        train = spi * sum(training_iterations(self.cfg, r + 1))
        train += self.timing.get("setup_seconds", 0.0) * len(rounds) * members
        parts = [f"training {format_minutes(train)}"]
        predict = 0.0
        samples = 1
        if predicts:  # evaluation predicts one sample (an ensemble: every member)
            if u.source in ("mc_dropout", "tta"):
                samples = query_samples
            predict = per_case * samples * n_pool * len(rounds)
            parts.append(f"predicting the pool {format_minutes(predict)}")
        evaluated = [q for q in rounds if not (q % self.cfg.evaluate_every) or q == self.cfg.rounds - 1]
        evaluate = per_case * n_test * len(evaluated)
        if evaluate:
            parts.append(f"evaluating {format_minutes(evaluate)}")
        rate = f" at {per_case:.1f} s per case" + (f" and sample ({samples} samples)" if samples > 1 else "")
        scope = f"round {r + 1}" if r + 1 == self.cfg.rounds - 1 else f"rounds {r + 1}-{self.cfg.rounds - 1}"
        say(
            f"round {r}: estimated time of {scope}: {format_minutes(train + predict + evaluate)} "
            f"({', '.join(parts)}{rate if len(parts) > 1 else ''}); scoring and selecting regions come on top"
        )
