"""What an experiment has done so far, read from its database (works while it runs), and what it does now."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from alseg.config import load_config
from alseg.errors import ExperimentError
from alseg.loop.stopping import STOPPING_ROUND_KEYS, stopping_status
from alseg.store.layout import CONFIG_FILE, DB_FILE, PROGRESS_FILE, STOP_SET_META
from alseg.store.state import ExperimentState

LOCK_FILE = ".lock"  # as ``experiment_lock`` names it


def lock_holder(exp_dir: Path) -> int | None:
    """The process holding the experiment lock (``experiment_lock``): its pid (0 when unknown), or None if free.

    On Linux the lock is looked up in ``/proc/locks`` (a flock on the lock file's inode), which takes no lock
    itself; elsewhere it is probed with a shared lock, taken and released at once.
    """
    path = Path(exp_dir) / LOCK_FILE
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError:
        return None
    recorded = int(text) if text.isdigit() else 0
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return recorded if _probe_locked(path) else None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146500 0 EOF" (a process waiting for a lock: "1: -> FLOCK ...")
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK" or f[3] != "WRITE":
            continue
        where = f[5].rsplit(":", 1)
        if len(where) != 2 or not where[1].isdigit() or int(where[1]) != st.st_ino:
            continue
        pid = int(f[4]) if f[4].isdigit() else 0
        if where[0] == dev or (recorded and pid == recorded):
            return pid or recorded
    return None


def _probe_locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def stage_in_progress(exp_dir: Path) -> dict[str, Any] | None:
    """The stage a running experiment is in (its ``progress.json``), or None when it is not running.

    Shown only while the experiment lock is held by the process that wrote the file: a ``progress.json`` left
    by a killed run is not running, nor is one read before a new run has replaced it.
    """
    path = Path(exp_dir) / PROGRESS_FILE
    if not path.exists():
        return None
    holder = lock_holder(exp_dir)
    if holder is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    if holder and isinstance(pid, int) and pid != holder:
        return None
    return data


def experiment_status(exp_dir: Path) -> dict[str, Any]:
    """Per round: regions, annotation cost, Dice (foreground mean and per class), stages done.

    The correction cost per round (:mod:`alseg.evaluation.correction`): ``corrected_voxels`` and ``strokes``
    summed over the annotated regions so far that were measured (``n_regions_measured``: regions annotated before
    alseg measured corrections are left out), ``corrected_voxels_added`` and ``strokes_added`` of the round's own.

    With the human oracle also ``annotation``: the round waiting for labels, every region's state (done and
    by which file, ``all_background`` when its label has no foreground voxel, waiting, or closed unlabelled, and
    its correction measures), the ``corrections`` of finished rounds (``alseg import --round N --replace``) and
    per annotator their regions, voxels, corrected voxels, strokes and minutes (``annotators``). While the
    experiment runs also ``in_progress``: ``{round, stage, detail, started_at, fraction, eta_seconds, updated_at,
    pid}`` of the stage running now.

    When to stop (:mod:`alseg.loop.stopping`): per round ``stability``, ``stability_per_class``,
    ``stop_set_entropy``, ``dice_gain``, ``gain_below_min``, ``recommendation`` and ``rule`` (None before the
    round's evaluate stage commits), and ``stopping``: the thresholds, the first round where stopping looks safe
    and ``fg_eff_x95``, the budget at which the run's fitted curve is 95% of the way to its asymptote.
    """
    exp_dir = Path(exp_dir)
    if not (exp_dir / CONFIG_FILE).exists() or not (exp_dir / DB_FILE).exists():
        raise ExperimentError(f"{exp_dir} is not an alseg experiment (no {CONFIG_FILE} / {DB_FILE})")
    cfg = load_config(exp_dir / CONFIG_FILE)
    state = ExperimentState(exp_dir / DB_FILE)
    try:
        metrics = state.metrics()
        stages = state.stages()
        stop_set = state.get_meta(STOP_SET_META)
        regions = state.regions()
        costs = state.region_costs()
        annotation = None
        if cfg.oracle == "human":
            from alseg.oracle.human import annotation_rows, annotator_summary, waiting_round

            annotation = {
                "waiting_round": waiting_round(state),
                "regions": annotation_rows(state),
                "corrections": state.corrections(),
                "annotators": annotator_summary(state),
            }
    finally:
        state.close()
    in_progress = stage_in_progress(exp_dir)
    rounds_seen = sorted({s["round"] for s in stages} | set(metrics))
    rows = []
    for r in rounds_seen:
        upto = [g for g in regions if g.round <= r and g.status == "annotated"]
        fg = [sum(v for v in (g.fg_voxels or {}).values()) for g in upto]
        m = metrics.get(r, {})
        cost = m.get("cost", {})
        measured = [(g.round, costs[g.id]) for g in upto if g.id in costs]
        rows.append(
            {
                "round": r,
                "n_regions": len(upto),
                "n_regions_added": sum(1 for g in regions if g.round == r),
                "annotated_voxels": sum(g.n_voxels for g in upto),
                "annotated_fg_voxels": sum(fg),
                "fg_fraction": cost.get("fg_fraction"),
                # correction cost (cumulative, and added this round) of the regions measured so far
                "n_regions_measured": len(measured),
                "corrected_voxels": sum(c["corrected_voxels"] for _, c in measured),
                "strokes": sum(c["strokes"] for _, c in measured),
                "corrected_voxels_added": sum(c["corrected_voxels"] for k, c in measured if k == r),
                "strokes_added": sum(c["strokes"] for k, c in measured if k == r),
                "dice_mean": m.get("dice_mean"),
                "dice_per_class": m.get("dice_per_class", {}),
                "dice2d_mean": m.get("dice2d_mean"),
                "hd95_mean": m.get("hd95_mean"),
                "stages_done": [s["stage"] for s in stages if s["round"] == r and s["status"] == "done"],
                "seconds": {s["stage"]: s["seconds"] for s in stages if s["round"] == r},
            }
        )
    # when to stop (alseg.loop.stopping): None where a round has no signal yet
    stop_rows, stopping = stopping_status(exp_dir, cfg, stages, metrics, json.loads(stop_set) if stop_set else None)
    for row in rows:
        row.update(stop_rows.get(row["round"], dict.fromkeys(STOPPING_ROUND_KEYS)))
    return {
        "experiment": str(exp_dir),
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "uncertainty": {"source": cfg.uncertainty.source, "n_samples": cfg.uncertainty.n_samples},
        "oracle": cfg.oracle,
        "rounds_planned": cfg.rounds,
        "complete": bool(rows) and len(rows) == cfg.rounds and "evaluate" in rows[-1]["stages_done"],
        "rounds": rows,
        "stopping": stopping,
        **({"annotation": annotation} if annotation is not None else {}),
        **({"in_progress": in_progress} if in_progress is not None else {}),
    }
