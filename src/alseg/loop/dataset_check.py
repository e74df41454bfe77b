"""The dataset under a resumed experiment: compare its files with the stored fingerprint, say what changed.

:func:`check_dataset` decides, and writes nothing: :func:`alseg.loop.create.open_or_create` records what it
returns (the new fingerprint, the accepted change, the cases that leave the split) under the experiment lock.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alseg.config import ExperimentConfig
from alseg.data.dataset import Dataset
from alseg.data.fingerprint import (
    CaseChange,
    compare_fingerprint,
    fingerprint_from_json,
    fingerprint_to_json,
    n_files,
)
from alseg.data.region_files import regions_from_json
from alseg.oracle import ORACLES
from alseg.store.layout import CONFIG_FILE, FINGERPRINT_META, FULL_DATA_META
from alseg.store.state import ExperimentState

MAX_CASES_SHOWN = 20


@dataclass
class DatasetCheck:
    """What :func:`check_dataset` found and what resuming records (nothing is written by the check itself).

    ``changes``: the cases that differ from the stored fingerprint. ``error``: why resuming stops (the
    message of an ``ExperimentError``), or None. ``fingerprint``: the fingerprint to store (None: unchanged).
    ``record``: the entry to append to ``dataset_changes``. ``drop``: cases that leave the split.
    ``messages``: what to log, as ``(level, text)``, level "warning", "info" or "say" (terminal and log).
    """

    dataset: Path
    moved_from: Path | None
    changes: list[CaseChange]
    role: dict[str, str]
    command: str = ""  # the command that accepts the change
    error: str | None = None
    fingerprint: str | None = None
    record: dict[str, Any] | None = None
    drop: list[str] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)

    def change_lines(self) -> str:
        lines = []
        for c in self.changes[:MAX_CASES_SHOWN]:
            where = f" ({self.role[c.case_id]})" if c.case_id in self.role else ""
            lines.append(f"  - {c.case_id}{where}: {c.describe()}")
        more = len(self.changes) - min(len(self.changes), MAX_CASES_SHOWN)
        if more:
            lines.append(f"  ... and {more} more")
        return "\n".join(lines)

    def headline(self, exp_dir: Path) -> str:
        n = len(self.changes)
        cases = f"{n} case differs" if n == 1 else f"{n} cases differ"
        if self.moved_from is not None:
            return (
                f"{exp_dir}: the dataset at {self.dataset} does not hold the files the experiment was created with "
                f"(at {self.moved_from}); {cases}:"
            )
        return f"{exp_dir}: the dataset {self.dataset} changed since the experiment was created; {cases}:"

    def refusal(self, exp_dir: Path, blocked: list[str], accept: bool) -> str:
        text = self.headline(exp_dir) + "\n" + self.change_lines() + "\n"
        if blocked:
            even = "" if accept else " even with --accept-dataset-change"
            return text + f"the experiment cannot go on{even}: " + "; ".join(blocked)
        held_out = [c.case_id for c in self.changes if self.role.get(c.case_id) == "held-out"]
        if held_out:
            text += (
                f"held-out case{'s' if len(held_out) > 1 else ''} {', '.join(held_out[:MAX_CASES_SHOWN])} changed: "
                "accepting makes the Dice of later rounds not compare with earlier rounds\n"
            )
        return text + f"restore the files, or run {self.command} to record the change and go on"


def check_dataset(
    exp_dir: Path,
    cfg: ExperimentConfig,
    ds: Dataset,
    state: ExperimentState,
    moved_from: Path | None = None,
    accept: bool = False,
) -> DatasetCheck:
    """Compare ``ds`` with the experiment's stored fingerprint and say what resuming would record.

    Cheap where nothing changed: only files whose size or modification time changed are hashed (the same
    content with a new time is no change: the new time is stored quietly). ``moved_from``: ``ds`` is the
    dataset the experiment was created with at its old place; every file is hashed and compared by relative
    name, size and SHA-256. ``accept``: a change is accepted (``--accept-dataset-change``).

    Accepting a change (``--accept-dataset-change``): a changed file is used from now on; a new case is not used
    (the split is fixed at creation); a case whose image (or, for the held-out cases and with ground truth, whose
    label) is gone leaves the pool or the held-out set, unless regions were selected on a pool case: alseg
    trains on those, so nothing can be accepted then (said at once, accepted or not); nor when no pool or no
    held-out case would be left.
    """
    pool, test = state.split()
    role = {c: "pool" for c in pool} | {c: "held-out" for c in test}
    root = Path(ds.root)
    where = f" --dataset {root}" if moved_from is not None else ""
    if state.get_meta(FULL_DATA_META) is not None:  # resumed with the config of the runs it bounds
        command = f"`alseg run CONFIG --out {exp_dir} --full-data{where} --accept-dataset-change`"
    else:
        command = f"`alseg run {exp_dir / CONFIG_FILE} --out {exp_dir}{where} --accept-dataset-change`"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stored_json = state.get_meta(FINGERPRINT_META)
    if stored_json is None:  # created before alseg recorded its dataset's files
        current = compare_fingerprint({"cases": {}}, ds).fingerprint
        check = DatasetCheck(root, moved_from, [], role, command, fingerprint=fingerprint_to_json(current))
        if moved_from is not None and not accept:
            check.error = (
                f"{exp_dir} was created before alseg recorded its dataset's files, so alseg cannot check that "
                f"{root} holds the files of {moved_from}; restore the dataset at {moved_from}, or run {command} to "
                "use it as it is"
            )
            return check
        check.messages.append(
            (
                "warning",
                f"{exp_dir} was created before alseg recorded its dataset's files; recorded the {n_files(current)} "
                f"files of the {len(current['cases'])} cases of {root} now: changes from now on will be noticed, "
                "earlier ones cannot be",
            )
        )
        if moved_from is not None:
            check.record = {"time": now, "dataset": str(root), "moved_from": str(moved_from), "changes": []}
            check.messages.append(("say", _moved(exp_dir, moved_from, root, " (unchecked)")))
        return check
    stored_fp = fingerprint_from_json(stored_json)
    cmp = compare_fingerprint(stored_fp, ds, moved=moved_from is not None)
    check = DatasetCheck(root, moved_from, cmp.changes, role, command)
    if cmp.fingerprint != stored_fp:
        check.fingerprint = fingerprint_to_json(cmp.fingerprint)
    if moved_from is not None and not cmp.changes:
        check.messages.append(("say", _moved(exp_dir, moved_from, root, " (the same files)")))
        check.record = {"time": now, "dataset": str(root), "moved_from": str(moved_from), "changes": []}
        return check
    if cmp.refreshed and not cmp.changes:  # the same content: no change, the new times are stored quietly
        check.messages.append(
            ("info", f"dataset {root}: {len(cmp.refreshed)} file(s) have new modification times but the same content")
        )
    if not cmp.changes:
        return check
    if not accept:
        check.error = check.refusal(exp_dir, [], accept)  # replaced below where accepting cannot help

    has_gt = ORACLES[cfg.oracle].has_ground_truth
    regions: dict[str, set[int]] = defaultdict(set)
    for sr in state.regions():
        regions[sr.region.case_id].add(sr.round)
    starting = state.get_meta("starting_regions")
    if starting and not state.stage_done(0, "query"):
        for g in regions_from_json(starting):
            regions[g.case_id].add(0)
    blocked: list[str] = []
    for c in cmp.changes:
        r = role.get(c.case_id)
        gone = c.image_missing or (c.label_missing and (r == "held-out" or has_gt))
        if r is None or not gone:
            continue
        if r == "pool" and regions.get(c.case_id):
            rounds = ", ".join(map(str, sorted(regions[c.case_id])))
            what = "its files are" if c.status == "removed" else "a file of it is"
            blocked.append(
                f"pool case {c.case_id} has regions selected in round(s) {rounds}, which alseg trains on, but "
                f"{what} gone; restore the files of {c.case_id}"
            )
        else:
            check.drop.append(c.case_id)
    left_pool = [c for c in pool if c not in check.drop]
    left_test = [c for c in test if c not in check.drop]
    if not left_pool:
        blocked.append("no pool case would be left; restore the files")
    if test and not left_test:
        blocked.append("no held-out case would be left to evaluate on; restore the files")
    if blocked:
        check.error = check.refusal(exp_dir, blocked, accept)
    if check.error is not None:
        return check

    check.record = {
        "time": now,
        "dataset": str(root),
        "moved_from": None if moved_from is None else str(moved_from),
        "changes": [{**c.to_json(), "role": role.get(c.case_id)} for c in cmp.changes],
        "left_split": {c: role[c] for c in check.drop},
    }
    check.fingerprint = fingerprint_to_json(cmp.fingerprint)
    notes = []
    held_out = [c.case_id for c in cmp.changes if role.get(c.case_id) == "held-out"]
    if held_out:
        notes.append(
            f"the held-out set changed ({', '.join(held_out[:MAX_CASES_SHOWN])}): the Dice of the rounds evaluated "
            "from now on does not compare with earlier rounds"
        )
    left = [c for c in check.drop if role[c] == "pool"]
    if left:
        notes.append(f"left the pool (no regions were selected on them): {', '.join(left[:MAX_CASES_SHOWN])}")
    relabelled = [
        c.case_id
        for c in cmp.changes
        if role.get(c.case_id) == "pool" and c.case_id in regions and c.case_id not in check.drop
    ]
    if relabelled:
        notes.append(
            f"the regions already annotated on {', '.join(relabelled[:MAX_CASES_SHOWN])} keep what the old files gave"
        )
    new = [c.case_id for c in cmp.changes if c.status == "new" or c.case_id not in role]
    if new:
        notes.append(
            f"new cases are not used, the pool and the held-out set being fixed at creation: "
            f"{', '.join(new[:MAX_CASES_SHOWN])}"
        )
    check.messages.append(
        (
            "warning",
            check.headline(exp_dir)
            + "\n"
            + check.change_lines()
            + "\naccepted (--accept-dataset-change) and recorded in the experiment's state"
            + "".join(f"; {n}" for n in notes),
        )
    )
    if moved_from is not None:
        check.messages.append(("say", _moved(exp_dir, moved_from, root, "")))
    return check


def _moved(exp_dir: Path, old: Path, new: Path, how: str) -> str:
    return f"{exp_dir}: the dataset moved from {old} to {new}{how}; {CONFIG_FILE} names it now"
