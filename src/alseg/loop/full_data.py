"""The full-data reference: the whole pool fully labelled, trained with the experiment's schedule.

It is an ordinary experiment directory (``config.yaml``, ``alseg.sqlite``, ``rounds/000/``) whose single
round annotates every pool case entirely (``unit: case``, one region per case) and trains once from scratch;
the held-out evaluation is the same as in every active-learning run. The database's ``meta`` table carries
:data:`FULL_DATA_META`, which the report uses to recognise it as the upper bound (FG-Eff's ``c``, the dashed
line on every plot).

Schedule: the reference model is trained for as many epochs as the *last* model of an active-learning run
of the same config has been trained in total. Without warm start every round trains from scratch with the
same schedule, so this is simply that schedule (nnActive). With warm start (the ``cpu`` profile) the last
model has been through ``first_round_epochs + (rounds - 1) * epochs`` epochs, and the reference gets that
many; otherwise it would be trained less than the runs it bounds.

>>> # run_full_data(load_config("hippocampus.yaml"), Path("experiments/full_data"))
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from alseg.backends.nnunet.profiles import get_profile
from alseg.config import ConfigError, ExperimentConfig, Schedule
from alseg.data.dataset import load_dataset, split_holdout
from alseg.data.regions import Box, Region
from alseg.data.split import pool_subset
from alseg.loop.create import open_or_create, resolve_config
from alseg.loop.drivers import run_logged
from alseg.loop.runner import BackendFactory, Experiment, default_backend
from alseg.store.layout import DB_FILE, FULL_DATA_META, log
from alseg.store.state import ExperimentState, experiment_lock

__all__ = ["FULL_DATA_META", "FULL_DATA_STRATEGY", "full_data_config", "is_full_data", "run_full_data"]

FULL_DATA_STRATEGY = "full_data"  # recorded as the regions' strategy (never a registered key)
_STRATEGY = "random"  # the stored config needs a registered strategy; with one round it is never asked


def _total_epochs(cfg: ExperimentConfig) -> tuple[Schedule, int]:
    """The schedule of ``cfg`` (its profile's default when not given) and the epochs of its last model."""
    sched = cfg.schedule or get_profile(cfg.profile if cfg.profile != "auto" else "cpu").schedule
    first = sched.first_round_epochs or sched.epochs
    total = first + (cfg.rounds - 1) * sched.epochs if sched.warm_start else first
    return sched, total


def full_data_config(cfg: ExperimentConfig, n_pool: int) -> ExperimentConfig:
    """The reference's config: one round of ``n_pool`` whole cases, trained for the last model's epochs.

    ``cfg`` must be resolved (``resolve_config``) so that its profile, and hence its schedule, is known.
    Dataset, split, configuration, profile, device and uncertainty settings are kept.
    """
    if n_pool < 1:
        raise ConfigError(f"full-data reference: the pool of {cfg.dataset} is empty")
    sched, total = _total_epochs(cfg)
    schedule = sched.model_copy(update={"first_round_epochs": total})
    update: dict[str, Any] = {
        "strategy": _STRATEGY,
        "strategy_params": {},
        "rounds": 1,
        "unit": "case",
        "starting_budget": n_pool,
        "query_size": n_pool,
        "evaluate_every": 1,
        "schedule": schedule,
    }
    if "starting_regions" in ExperimentConfig.model_fields:  # the reference chooses its own regions
        update["starting_regions"] = None
    return cfg.model_copy(update=update)


class FullDataExperiment(Experiment):
    """An experiment whose round 0 selects every pool case, whole, instead of the starting budget."""

    def stage_query(self, r: int) -> None:
        if r != 0:
            raise RuntimeError(f"full-data reference has one round; round {r} asked for")
        t0 = time.perf_counter()
        regions = [
            Region(cid, Box((0,) * len(shape), tuple(shape)), float("nan"), {"kind": "full_data"})
            for cid in self.pool
            for shape in [self.ds.geometry(cid).shape]
        ]
        self._check_regions(r, regions, len(self.pool))
        self._record_query(r, t0, regions, FULL_DATA_STRATEGY, {})
        log.info("full-data reference: all %d pool cases selected", len(regions))


def is_full_data(exp_dir: Path) -> bool:
    """Whether ``exp_dir`` is a full-data reference (read-only check of its database)."""
    import sqlite3

    db = Path(exp_dir) / DB_FILE
    if not db.is_file():
        return False
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (FULL_DATA_META,)).fetchone()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return row is not None


def run_full_data(cfg: ExperimentConfig, exp_dir: Path, backend_factory: BackendFactory = default_backend) -> Path:
    """Create or resume the full-data reference of ``cfg`` in ``exp_dir`` and run it.

    ``cfg`` is the config of the active-learning runs it bounds (strategy and budget keys are ignored).
    """
    exp_dir = Path(exp_dir)
    ds = load_dataset(cfg.dataset)
    resolved = resolve_config(cfg, ds)
    if getattr(resolved, "oracle", "simulated") != "simulated":
        raise ConfigError(
            f"full-data reference: it needs the ground truth of every pool case of {cfg.dataset}, but the "
            f"oracle is {resolved.oracle!r}"
        )
    pool, _ = split_holdout(ds.case_ids, resolved.holdout_fraction, resolved.split_seed)
    pool = pool_subset(pool, resolved.pool_size, resolved.split_seed)
    full_cfg = open_or_create(full_data_config(resolved, len(pool)), exp_dir)
    marker: dict[str, Any] = {
        "source": {k: v for k, v in resolved.model_dump(mode="json").items() if k not in ("dataset",)},
        "epochs": full_cfg.schedule.first_round_epochs if full_cfg.schedule else None,
    }
    with experiment_lock(exp_dir):
        state = ExperimentState(exp_dir / DB_FILE)
        try:
            if state.get_meta(FULL_DATA_META) is None:
                with state.transaction() as conn:
                    state.set_meta(conn, FULL_DATA_META, json.dumps(marker))
        finally:
            state.close()
        run_logged(FullDataExperiment, exp_dir, full_cfg, backend_factory)
    return exp_dir
