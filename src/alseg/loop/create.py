"""Creating an experiment, and resuming one: resolve the config's defaults, validate, write the folder.

``create_experiment`` validates everything and writes the experiment folder atomically (nothing is written on
bad input); ``open_or_create`` resumes an experiment whose stored config agrees with the given one, or creates
it. The schedule, K and the dataset-derived defaults are stored resolved, so a later release never changes a
running experiment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alseg import __version__
from alseg.backends.nnunet.profiles import get_profile
from alseg.config import DEFAULT_SAMPLES, ConfigError, ExperimentConfig, Schedule, dump_config, load_config
from alseg.data.dataset import Dataset, load_dataset, validate_dataset
from alseg.data.fingerprint import (
    fingerprint_dataset,
    fingerprint_to_json,
)
from alseg.data.region_files import load_starting_regions, regions_to_json
from alseg.data.regions import Region, default_region_size, default_slice_axis, unit_box_size
from alseg.data.split import pool_subset, split_pool_and_test
from alseg.durable import fsync_dir, fsync_tree
from alseg.errors import ExperimentError
from alseg.loop.dataset_check import check_dataset
from alseg.store.layout import (
    CHANGES_META,
    CONFIG_FILE,
    DB_FILE,
    FINGERPRINT_META,
    log,
    say,
    setup_logging,
    write_text_atomic,
)
from alseg.store.state import ExperimentState, experiment_lock, file_lock
from alseg.strategies.base import Strategy
from alseg.strategies.registry import get_strategy


def resolve_config(cfg: ExperimentConfig, ds: Dataset) -> ExperimentConfig:
    """Fill the dataset-derived defaults so the stored config is explicit."""
    shapes = [ds.geometry(c).shape for c in ds.case_ids]
    spacings = [ds.geometry(c).spacing for c in ds.case_ids]
    ndim = len(shapes[0])
    update: dict[str, Any] = {}
    if cfg.region_size is None:
        update["region_size"] = list(default_region_size(shapes, spacings))
    elif len(cfg.region_size) != ndim:
        raise ConfigError(
            f"invalid config: key 'region_size' has {len(cfg.region_size)} entries but the images of "
            f"{ds.root} have {ndim} axes"
        )
    if cfg.stride is None:
        # nnActive: stride 1 on small images (Hippocampus), 8 on large ones
        median_voxels = float(np.median([np.prod(s) for s in shapes]))
        update["stride"] = [1 if median_voxels <= 2_000_000 else 8] * ndim
    elif len(cfg.stride) != ndim:
        raise ConfigError(f"invalid config: key 'stride' has {len(cfg.stride)} entries, images have {ndim} axes")
    if cfg.slice_axis is None:
        update["slice_axis"] = default_slice_axis(spacings)
    elif cfg.slice_axis >= ndim:
        raise ConfigError(f"invalid config: key 'slice_axis' is {cfg.slice_axis}, images have {ndim} axes")
    if cfg.configuration is None:
        update["configuration"] = "3d_fullres" if ndim == 3 else "2d"
    profile = cfg.profile
    if profile == "auto":
        import torch

        profile = update["profile"] = "gpu" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu"
    if cfg.schedule is None:  # stored resolved: a later change of the profile's defaults never reaches this run
        update["schedule"] = get_profile(profile).schedule
    update["dataset"] = Path(cfg.dataset).resolve()
    if cfg.oracle == "simulated" and not any(ds.has_label(c) for c in ds.case_ids):
        update["oracle"] = "human"  # no ground truth at all: people annotate
    if cfg.starting_regions is not None:
        update["starting_regions"] = Path(cfg.starting_regions).resolve()
    return cfg.model_copy(update=update)


def check_uncertainty(cfg: ExperimentConfig, strategy: Strategy) -> None:
    """A strategy that needs several probability samples needs a source, and a K, that gives them."""
    need = strategy.needs.min_samples
    u = cfg.uncertainty
    if need > 1 and u.source == "softmax":
        raise ConfigError(
            f"invalid config: strategy {cfg.strategy!r} needs at least {need} probability samples, but "
            "uncertainty.source is 'softmax' (one sample); use mc_dropout, tta or ensemble"
        )
    if u.n_samples is not None and u.n_samples < need:
        raise ConfigError(
            f"invalid config: strategy {cfg.strategy!r} needs at least {need} probability samples; "
            f"uncertainty.n_samples ({u.source}) is {u.n_samples}; leave it out for the source's default "
            f"({DEFAULT_SAMPLES[u.source]})"
        )


def capacity(ds: Dataset, pool: list[str], cfg: ExperimentConfig) -> int:
    """How many non-overlapping regions the pool holds at most (a tiling of each case)."""
    total = 0
    for cid in pool:
        shape = ds.geometry(cid).shape
        size = unit_box_size(cfg.unit, shape, cfg.region_size, cfg.slice_axis)
        total += int(np.prod([n // s for n, s in zip(shape, size, strict=True)]))
    return total


# --------------------------------------------------------------------------- creation
@dataclass(frozen=True)
class Validated:
    """A new experiment's config, resolved and checked against its dataset (nothing written yet)."""

    cfg: ExperimentConfig
    ds: Dataset
    pool: list[str]
    test: list[str]
    start_regions: list[Region] | None
    human: bool


def validate_new(cfg: ExperimentConfig) -> Validated:
    """Resolve ``cfg``'s defaults and check everything a new experiment needs: the dataset, the strategy and its
    uncertainty source, the starting regions and the pool's capacity for every round. Raises ConfigError."""
    ds = load_dataset(cfg.dataset, require_labels=False)
    human = cfg.oracle == "human" or not any(ds.has_label(c) for c in ds.case_ids)
    if not human:
        ds = load_dataset(cfg.dataset)
    validate_dataset(ds)
    try:
        strategy = get_strategy(cfg.strategy, cfg.strategy_params)  # unknown name or parameter: error now
    except ValueError as err:
        raise ConfigError(f"invalid config: {err}") from None
    check_uncertainty(cfg, strategy)
    if human and strategy.needs.ground_truth:
        raise ConfigError(
            f"invalid config: strategy {cfg.strategy!r} reads the ground truth (a simulation baseline), but "
            "the oracle is human; choose a strategy that needs no ground truth, e.g. random or entropy"
        )
    cfg = resolve_config(cfg, ds)
    pool, test = split_pool_and_test(ds, cfg.holdout_fraction, cfg.split_seed)
    try:
        pool = pool_subset(pool, cfg.pool_size, cfg.split_seed)
    except ValueError as err:
        raise ConfigError(f"invalid config: key 'pool_size': {err} (dataset {ds.root})") from None
    start_regions = None
    if cfg.starting_regions is not None:
        sizes = {c: unit_box_size(cfg.unit, ds.geometry(c).shape, cfg.region_size, cfg.slice_axis) for c in pool}
        try:
            start_regions = load_starting_regions(cfg.starting_regions, ds, pool, sizes)
        except ValueError as err:
            raise ConfigError(f"invalid config: key 'starting_regions': {err}") from None
        if cfg.starting_budget is not None and cfg.starting_budget != len(start_regions):
            raise ConfigError(
                f"invalid config: starting_budget is {cfg.starting_budget} but starting_regions "
                f"{cfg.starting_regions} lists {len(start_regions)} regions; leave starting_budget out"
            )
    n_start = cfg.starting_size if start_regions is None else len(start_regions)
    u = cfg.uncertainty
    if u.source == "ensemble" and u.ensemble == "folds" and n_start < (u.n_samples or 0):
        raise ConfigError(
            f"invalid config: a {u.n_samples}-fold cross-validation ensemble needs at least {u.n_samples} annotated "
            f"cases to train round 0, but the starting budget has {n_start} regions; raise starting_budget, lower "
            "uncertainty.n_samples, or use ensemble: seeds"
        )
    needed = n_start + (cfg.rounds - 1) * cfg.query_size
    cap = capacity(ds, pool, cfg)
    if needed > cap:
        raise ConfigError(
            f"invalid config: {cfg.rounds} rounds need {needed} regions (starting_budget "
            f"{n_start} + {cfg.rounds - 1} x query_size {cfg.query_size}) but the pool of "
            f"{len(pool)} cases holds at most {cap} non-overlapping {cfg.unit} regions of size "
            f"{cfg.region_size}"
        )
    return Validated(cfg, ds, pool, test, start_regions, human)


def create_experiment(cfg: ExperimentConfig, exp_dir: Path) -> ExperimentConfig:
    """Validate everything, then create ``exp_dir`` atomically. Nothing is written on bad input."""
    exp_dir = Path(exp_dir)
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise ExperimentError(f"{exp_dir} exists and is not an alseg experiment (no {CONFIG_FILE})")
    v = validate_new(cfg)
    cfg, ds, pool, test, start_regions, human = v.cfg, v.ds, v.pool, v.test, v.start_regions, v.human
    pool_fg: dict[str, int] = defaultdict(int)
    for cid in pool if not human else ():  # the human oracle's pool has no ground truth to count
        gt = ds.read_label(cid)
        for lab in ds.foreground_labels:
            pool_fg[str(lab)] += int(np.count_nonzero(gt == lab))
    fingerprint = fingerprint_to_json(fingerprint_dataset(ds))  # every file hashed, before anything is written

    parent = exp_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    for old in remove_leftovers(exp_dir):
        log.warning("removed %s, left by a creation of %s that was stopped", old, exp_dir)
    tmp = parent / f".{exp_dir.name}.creating-{os.getpid()}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(dump_config(cfg))
        state = ExperimentState(tmp / DB_FILE)
        with state.transaction() as conn:
            state.set_split(conn, pool, test)
            state.set_meta(conn, "pool_fg_voxels", json.dumps(dict(pool_fg)))
            state.set_meta(conn, "alseg_version", __version__)
            state.set_meta(conn, FINGERPRINT_META, fingerprint)
            if start_regions is not None:
                state.set_meta(conn, "starting_regions", regions_to_json(start_regions))
        state.close()
        if exp_dir.exists():
            exp_dir.rmdir()  # empty, checked above
        fsync_tree(tmp)
        os.rename(tmp, exp_dir)
        fsync_dir(exp_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg


def open_or_create(
    cfg: ExperimentConfig | None,
    exp_dir: Path,
    *,
    dataset: str | Path | None = None,
    accept_dataset_change: bool = False,
) -> ExperimentConfig:
    """Resume ``exp_dir`` if it is an experiment, else create it.

    On resume, every key that ``cfg`` sets must equal the stored one; keys it leaves out take the stored
    values (the experiment's resolved defaults, whatever alseg's defaults are today). The dataset must hold the
    files the experiment was created with (its stored fingerprint; see :func:`check_dataset`):
    ``accept_dataset_change`` records a change and goes on. ``dataset`` overrides ``cfg``'s dataset: on resume,
    a moved dataset, accepted when it holds the same files; ``config.yaml`` then names the new folder.
    """
    exp_dir = Path(exp_dir)
    stored_path = exp_dir / CONFIG_FILE
    new_root = None if dataset is None else Path(dataset).expanduser().resolve()
    if stored_path.exists():
        stored = load_config(stored_path)
        if stored.schedule is None:
            stored = _store_recovered_schedule(exp_dir, stored)
        with experiment_lock(exp_dir):  # no run may change the state between the check and what it records
            return _resume(cfg, exp_dir, stored, new_root, accept_dataset_change)
    if cfg is None:
        raise ExperimentError(f"{exp_dir} is not an alseg experiment (no {CONFIG_FILE})")
    if new_root is not None:
        cfg = cfg.model_copy(update={"dataset": new_root})
    parent = exp_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    # Taken before anything is written: a second first run of the same folder stops with a clear message.
    with file_lock(creation_lock_path(exp_dir), f"experiment {exp_dir} (being created)"):
        if stored_path.exists():  # created by a run that held the lock just before
            return open_or_create(cfg, exp_dir, dataset=dataset, accept_dataset_change=accept_dataset_change)
        return create_experiment(cfg, exp_dir)


def creation_lock_path(exp_dir: Path) -> Path:
    """``.{name}.lock`` beside the experiment folder: held while the folder is created."""
    exp_dir = Path(exp_dir).resolve()
    return exp_dir.parent / f".{exp_dir.name}.lock"


def remove_leftovers(exp_dir: Path) -> list[Path]:
    """Remove the temporary folders (``.{name}.creating-PID``) of creations that were killed; call under the
    creation lock (no creation of the folder runs then)."""
    exp_dir = Path(exp_dir).resolve()
    gone = []
    for tmp in exp_dir.parent.glob(f".{exp_dir.name}.creating-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            gone.append(tmp)
    return gone


def _resume(
    cfg: ExperimentConfig | None, exp_dir: Path, stored: ExperimentConfig, new_root: Path | None, accept: bool
) -> ExperimentConfig:
    """Check the given config and the dataset against the stored ones, record what is accepted, return the config."""
    stored_root = Path(stored.dataset)
    root = stored_root if new_root is None else new_root
    if cfg is not None and new_root is None:
        given = Path(cfg.dataset).expanduser().resolve()
        if given != stored_root:
            raise ExperimentError(
                f"{exp_dir} was created with a different config (dataset: stored {str(stored_root)!r} vs given "
                f"{str(given)!r}); use another --out directory, or, if the dataset moved, pass --dataset NEW_PATH"
            )
    if new_root is None and not root.is_dir():
        raise ExperimentError(
            f"the dataset of {exp_dir}, {root}, does not exist; restore it, or, if it moved, pass --dataset NEW_PATH "
            "to `alseg run`"
        )
    ds = load_dataset(root, require_labels=False)
    state = ExperimentState(exp_dir / DB_FILE)
    try:
        moved_from = stored_root if root != stored_root else None
        plan = check_dataset(exp_dir, stored, ds, state, moved_from=moved_from, accept=accept)
        if plan.error is not None:
            raise ExperimentError(plan.error)
        if cfg is not None:
            stored = _check_config(exp_dir, cfg.model_copy(update={"dataset": root}), stored, _readable(ds))
        if plan.fingerprint is not None or plan.record is not None or plan.drop:
            with state.transaction() as conn:
                if plan.fingerprint is not None:
                    state.set_meta(conn, FINGERPRINT_META, plan.fingerprint)
                if plan.record is not None:
                    history = json.loads(state.get_meta(CHANGES_META) or "[]")
                    state.set_meta(conn, CHANGES_META, json.dumps([*history, plan.record]))
                for case_id in plan.drop:  # gone or unreadable, not trained on: it leaves the pool or the test set
                    conn.execute("DELETE FROM split WHERE case_id = ?", (case_id,))
    finally:
        state.close()
    if root != stored_root:
        stored = stored.model_copy(update={"dataset": root})
        write_text_atomic(exp_dir / CONFIG_FILE, dump_config(stored))
    if plan.messages:
        handler = setup_logging(exp_dir)
        try:
            for level, message in plan.messages:
                if level == "say":
                    say(message)
                else:
                    log.log(logging.WARNING if level == "warning" else logging.INFO, message)
        finally:
            log.removeHandler(handler)
            handler.close()
    return stored


def _check_config(exp_dir: Path, cfg: ExperimentConfig, stored: ExperimentConfig, ds: Dataset) -> ExperimentConfig:
    """Every key that ``cfg`` sets equals the stored one (``cfg``'s dataset is the experiment's); returns the
    stored config. The stopping rule's thresholds only read what the rounds recorded, so new ones are taken (and
    stored in ``config.yaml``); the stop set's size is fixed at creation like every other key."""
    wanted = resolve_config(cfg, ds)
    given = cfg.model_fields_set
    diff = {
        k: (getattr(stored, k), getattr(wanted, k))
        for k in ExperimentConfig.model_fields
        if k in given and k not in ("dataset", "stopping") and getattr(stored, k) != getattr(wanted, k)
    }
    if "stopping" in given and wanted.stopping.stop_set_size != stored.stopping.stop_set_size:
        diff["stopping.stop_set_size"] = (stored.stopping.stop_set_size, wanted.stopping.stop_set_size)
    if diff:
        lines = ", ".join(f"{k}: stored {a!r} vs given {b!r}" for k, (a, b) in diff.items())
        raise ExperimentError(f"{exp_dir} was created with a different config ({lines}); use another --out directory")
    if "stopping" in given and wanted.stopping != stored.stopping:
        log.info("%s: stopping thresholds changed from %s to %s", exp_dir, stored.stopping, wanted.stopping)
        stored = stored.model_copy(update={"stopping": wanted.stopping})
        write_text_atomic(exp_dir / CONFIG_FILE, dump_config(stored))
    return stored


def _readable(ds: Dataset) -> Dataset:
    """``ds`` without the cases an image file of which is missing (their geometry cannot be read)."""
    keep = [c for c in ds.case_ids if all(p.is_file() for p in ds.image_files(c))]
    if len(keep) == len(ds.case_ids) or not keep:
        return ds
    return Dataset(
        root=ds.root,
        name=ds.name,
        labels=ds.labels,
        channel_names=ds.channel_names,
        images={c: ds.image_files(c) for c in keep},
        label_paths={c: ds.expected_label_file(c) for c in keep},
        file_ending=ds.file_ending,
        layout=ds.layout,
        require_labels=ds.require_labels,
        num_training=ds.num_training,
    )


def _store_recovered_schedule(exp_dir: Path, stored: ExperimentConfig) -> ExperimentConfig:
    """An experiment created before alseg stored the resolved schedule: recover it and store it.

    The rounds already trained say how they trained: nnU-Net's ``debug.json`` of each model records its
    epochs, iterations, initial learning rate and optimiser, and alseg's model summary whether it was
    warm-started. Round 0 gives the from-scratch values, round 1 the warm-started ones; what no trained round
    shows (nothing trained yet, or only round 0) comes from the profile, which is then the schedule the
    experiment goes on with. The result is written to ``config.yaml`` (atomically) and logged.
    """
    profile = get_profile(stored.profile if stored.profile != "auto" else "cpu")
    recovered, source = recover_schedule(exp_dir, profile.schedule)
    cfg = stored.model_copy(update={"schedule": recovered})
    write_text_atomic(exp_dir / CONFIG_FILE, dump_config(cfg))
    logging.getLogger("alseg").warning(
        "%s was created before alseg stored the resolved schedule; stored %s (%s)",
        exp_dir,
        recovered.model_dump(),
        source,
    )
    return cfg


def recover_schedule(exp_dir: Path, default: Schedule) -> tuple[Schedule, str]:
    """The schedule an experiment's trained models were trained with, ``default`` where they do not say."""
    found: dict[str, Any] = {}
    said: list[str] = []
    for r in (0, 1):
        model = Path(exp_dir) / "rounds" / f"{r:03d}" / "model"
        debug = sorted(model.glob("fold_*/debug.json"))
        summary_file = model / "alseg_model.json"
        if not debug or not summary_file.exists():
            break
        trained = json.loads(debug[0].read_text())
        epochs, lr = int(trained["num_epochs"]), float(trained["initial_lr"])
        found["iterations_per_epoch"] = int(trained["num_iterations_per_epoch"])
        found["val_iterations_per_epoch"] = int(trained["num_val_iterations_per_epoch"])
        found["optimizer"] = "adam" if "adam" in str(trained.get("optimizer", "")).lower() else "sgd"
        if r == 0:
            found.update(first_round_epochs=epochs, initial_lr=lr)
        else:
            members = json.loads(summary_file.read_text()).get("members", [])
            warm = any(m.get("init_from") for m in members)
            found.update(epochs=epochs, warm_start=warm)
            found["warm_start_lr" if warm else "initial_lr"] = lr
        said.append(f"round {r}")
    if not said:
        return default, "nothing trained yet: the profile's schedule"
    schedule = default.model_copy(update=found)
    return Schedule.model_validate(schedule.model_dump()), "read from the models of " + " and ".join(said)
