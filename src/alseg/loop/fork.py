"""One round 0 for many experiments: a new experiment that starts from another one's finished round 0.

Runs that differ only in their strategy (and in what only later rounds read: the rounds, the query size, K, the
stopping thresholds) have the same round 0: the starting budget is drawn from the seed alone and the model is
trained on it the same way. A study trains it once, in a *base* experiment (the config of the group's first run,
run up to round 0 only: ``run_experiment(..., until_round=0)``, so that round 0 also predicts the stop set as in
any experiment of several rounds), and forks every run of the group from it (:func:`fork_round0`): the base
folder is copied (its round 0, the nnU-Net plans, the database), the run's own config is written, and the copy
is renamed into place, so the run exists whole or not at all. The run then resumes at round 1 like any
experiment; its database records where round 0 came from (meta ``round0_from``). A finished base is never
written again, so forks copy it without a lock (several may run at once).

:func:`round0_signature` is what must agree: the resolved config without the keys that round 0 never reads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from alseg.config import ExperimentConfig, dump_config, load_config
from alseg.durable import fsync_dir, fsync_tree
from alseg.errors import ExperimentError
from alseg.loop.create import creation_lock_path, remove_leftovers, validate_new
from alseg.store.layout import CONFIG_FILE, DB_FILE, STAGES, log, setup_logging
from alseg.store.state import ExperimentState, file_lock

#: meta key: the base experiment a run's round 0 was copied from, and when
FORK_META = "round0_from"
#: what a base folder holds that a fork does not take (locks, the live progress file)
_NOT_COPIED = {".lock", "progress.json"}


def round0_signature(cfg: ExperimentConfig) -> dict[str, Any]:
    """The keys of a resolved config that round 0 depends on (a JSON-able dict; equal dicts share round 0).

    Left out: the strategy and its parameters, the number of rounds, K (``uncertainty.n_samples``: only queries
    sample, except for an ensemble, where it is the number of models trained), the stopping thresholds (the stop
    set's size stays: round 0 predicts it), the query size when the starting budget is given (else it is the
    starting budget), the thread count, and the dataset's path (a base and its forks must name the same folder:
    :func:`fork_round0` checks it; a study moves its bases with the dataset)."""
    data = cfg.model_dump(mode="json")
    for key in ("strategy", "strategy_params", "rounds", "num_threads", "dataset"):
        data.pop(key, None)
    if cfg.uncertainty.source != "ensemble":
        data["uncertainty"].pop("n_samples", None)
    data["stopping"] = {"stop_set_size": data["stopping"]["stop_set_size"]}
    data["starting_size"] = cfg.starting_size
    data.pop("starting_budget", None)
    data.pop("query_size", None)
    return data


def round0_done(exp_dir: Path) -> bool:
    """Whether ``exp_dir`` is an experiment whose round 0 has committed every stage."""
    if not (Path(exp_dir) / DB_FILE).exists():
        return False
    state = ExperimentState(Path(exp_dir) / DB_FILE)
    try:
        return all(state.stage_done(0, s) for s in STAGES)
    finally:
        state.close()


def fork_round0(base_dir: Path, exp_dir: Path, cfg: ExperimentConfig) -> ExperimentConfig:
    """Create the experiment ``exp_dir`` of ``cfg`` from the finished round 0 of ``base_dir``; returns its
    resolved config. Refuses (writing nothing) when ``exp_dir`` exists, when the base has not finished round 0
    or went further, or when ``cfg``'s round 0 would differ from the base's (the differing keys are named)."""
    base_dir, exp_dir = Path(base_dir), Path(exp_dir)
    if (exp_dir / CONFIG_FILE).exists() or (exp_dir.exists() and any(exp_dir.iterdir())):
        raise ExperimentError(f"{exp_dir} exists; a run is forked from {base_dir} only into a new folder")
    if not (base_dir / CONFIG_FILE).exists():
        raise ExperimentError(f"{base_dir} is not an alseg experiment (no {CONFIG_FILE}); it cannot give round 0")
    resolved = validate_new(cfg).cfg
    base = load_config(base_dir / CONFIG_FILE)
    mine, theirs = round0_signature(resolved), round0_signature(base)
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if Path(base.dataset).resolve() != Path(resolved.dataset).resolve():
        diff.insert(0, "dataset")
        mine["dataset"], theirs["dataset"] = str(resolved.dataset), str(base.dataset)
    if diff:
        shown = ", ".join(f"{k}: base {theirs.get(k)!r} vs run {mine.get(k)!r}" for k in diff)
        raise ExperimentError(f"{exp_dir} cannot take round 0 from {base_dir}: their round 0 differs ({shown})")
    state = ExperimentState(base_dir / DB_FILE)
    try:
        if not all(state.stage_done(0, s) for s in STAGES):
            raise ExperimentError(f"{base_dir} has not finished round 0; run it first")
        if any(state.stage_done(r, s) for r in range(1, base.rounds + 1) for s in STAGES):
            raise ExperimentError(f"{base_dir} went past round 0; a base experiment stops after round 0")
    finally:
        state.close()
    # a finished base is not written again: no lock on it (forks of one base may run at once)
    parent = exp_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(creation_lock_path(exp_dir), f"experiment {exp_dir} (being created)"):
        if (exp_dir / CONFIG_FILE).exists():
            raise ExperimentError(f"{exp_dir} was created while this fork waited")
        for old in remove_leftovers(exp_dir):
            log.warning("removed %s, left by a creation of %s that was stopped", old, exp_dir)
        tmp = parent / f".{exp_dir.name}.creating-{os.getpid()}"
        try:
            shutil.copytree(base_dir, tmp, ignore=lambda _d, names: [n for n in names if n in _NOT_COPIED])
            (tmp / CONFIG_FILE).write_text(dump_config(resolved))
            copied = ExperimentState(tmp / DB_FILE)
            with copied.transaction() as conn:
                copied.set_meta(conn, FORK_META, json.dumps({"base": str(base_dir.resolve()), "at": time.time()}))
            copied.close()
            if exp_dir.exists():
                exp_dir.rmdir()  # empty, checked above
            fsync_tree(tmp)
            os.rename(tmp, exp_dir)
            fsync_dir(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    handler = setup_logging(exp_dir)
    try:
        log.info("round 0 taken from %s (the base experiment of this run's group)", base_dir.resolve())
    finally:
        log.removeHandler(handler)
        handler.close()
    return resolved
