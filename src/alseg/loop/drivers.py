"""The commands' drivers: ``alseg run`` (create or resume, run to the last round) and ``alseg query`` (continue
an experiment that people annotate, up to the next round's work package)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from alseg.config import ExperimentConfig
from alseg.errors import ExperimentError
from alseg.loop.create import open_or_create
from alseg.loop.runner import BackendFactory, Experiment, default_backend
from alseg.oracle import ORACLES, Waiting
from alseg.store.layout import log, log_failure, setup_logging, warn_if_network_filesystem
from alseg.store.state import experiment_lock


def advance_experiment(
    exp_dir: Path, allow_open: bool = False, backend_factory: BackendFactory = default_backend
) -> Waiting | None:
    """``alseg query``: continue a human-oracle experiment up to the next round's exported work package.

    Trains on what is annotated, evaluates, queries the next round and exports its work package. Refuses
    (changing nothing) while regions of the waiting round are open, unless ``allow_open``. Returns the round
    now waiting for labels, or None when the experiment is complete.
    """
    exp_dir = Path(exp_dir)
    cfg = open_or_create(None, exp_dir)
    if ORACLES[cfg.oracle].has_ground_truth:
        raise ExperimentError(
            f"{exp_dir} annotates from ground truth (oracle: {cfg.oracle}); use `alseg run` to continue"
        )
    with experiment_lock(exp_dir), logged(exp_dir):
        exp = Experiment(exp_dir, cfg, backend_factory)
        try:
            waiting = exp.run(allow_open=allow_open)
        finally:
            exp.state.close()
    if waiting is not None and not waiting.exported_now:
        shown = ", ".join(f"{rid} ({cid})" for rid, cid in waiting.open_regions[:20])
        more = len(waiting.open_regions) - min(20, len(waiting.open_regions))
        raise ExperimentError(
            f"round {waiting.round_index}: {len(waiting.open_regions)} of {waiting.n_regions} regions are still "
            f"open: {shown}{f' and {more} more' if more else ''}; import their labels with "
            f"`alseg import {exp_dir} LABELS_DIR`, or pass --allow-open to train on the labelled ones "
            "(the open regions are then closed unlabelled)"
        )
    return waiting


def run_experiment(
    cfg: ExperimentConfig | None,
    exp_dir: Path,
    backend_factory: BackendFactory = default_backend,
    *,
    dataset: Path | None = None,
    accept_dataset_change: bool = False,
    until_round: int | None = None,
) -> Path:
    """Create or resume the experiment in ``exp_dir`` and run it to its last round (``until_round``: to that one).

    ``dataset`` overrides the config's dataset (a moved dataset: see ``open_or_create``); ``accept_dataset_change``
    records a change of the dataset's files and goes on.
    """
    exp_dir = Path(exp_dir)
    cfg = open_or_create(cfg, exp_dir, dataset=dataset, accept_dataset_change=accept_dataset_change)
    with experiment_lock(exp_dir):
        run_logged(Experiment, exp_dir, cfg, backend_factory, until_round)
    return exp_dir


def run_logged(
    kind: type[Experiment],
    exp_dir: Path,
    cfg: ExperimentConfig,
    backend_factory: BackendFactory,
    until_round: int | None = None,
) -> None:
    """Run an experiment of class ``kind`` to its end (or ``until_round``) with the log file attached (the caller
    holds the lock)."""
    with logged(exp_dir):
        exp = kind(exp_dir, cfg, backend_factory)
        try:
            exp.run(until_round=until_round)
        finally:
            exp.state.close()


@contextlib.contextmanager
def logged(exp_dir: Path) -> Iterator[None]:
    """``alseg.log`` attached while the block runs; a failure's traceback goes to it (the terminal gets the
    message from the command line); a warning when the folder lies on a network file system."""
    handler = setup_logging(exp_dir)
    warn_if_network_filesystem(exp_dir)
    try:
        yield
    except Exception as err:
        log_failure(err)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
