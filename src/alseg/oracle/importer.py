"""``alseg import EXP LABELS_DIR``: check the annotators' label files, then record them in one transaction.

Every file is checked before anything changes. The files are then copied into ``rounds/NNN/imported/``
(content-addressed names, atomic writes) and recorded, with the regions they annotate, in one SQLite
transaction, so an error (a full disk included) or a kill leaves the experiment as it was.

``--round N --replace`` corrects the labels of cases of a finished round N (its annotate stage done) while a
later round waits for labels: the same checks, the earlier file kept (superseded), the correction recorded, and
the waiting round's annotate stage rebuilds the training labels of the corrected cases
(:meth:`alseg.oracle.human.HumanOracle.annotate`). Metrics recorded before stay as they were.

The same transaction records the annotator, the minutes and each region's correction measures against the
work package's prefill (:mod:`alseg.oracle.import_costs`); a correction replaces the region's measures.
"""

from __future__ import annotations

import errno
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alseg.config import load_config
from alseg.data.dataset import Dataset, load_dataset
from alseg.data.images import (
    DatasetError,
    sha256_file,
)
from alseg.data.regions import annotated_mask
from alseg.durable import copy_file
from alseg.errors import ExperimentError
from alseg.evaluation.correction import RegionCost
from alseg.oracle.corrections import check_correction, rounds_text
from alseg.oracle.human import waiting_round
from alseg.oracle.import_costs import annotator_name, check_minutes, measure_regions
from alseg.oracle.label_files import AnnotationImportError, check_label_file, label_ending, list_label_files
from alseg.store.layout import CONFIG_FILE, DB_FILE, fault_point, log, round_dir, setup_logging
from alseg.store.state import ExperimentState, StoredRegion, experiment_lock

IMPORTED_DIR = "imported"
__all__ = ["AnnotationImportError", "ImportReport", "import_labels"]


@dataclass
class ImportReport:
    """What an import did (or found already done)."""

    round_index: int | None
    imported: list[dict[str, Any]] = field(default_factory=list)  # case_id, file, regions, replaced
    unchanged: list[str] = field(default_factory=list)  # cases whose identical file was imported before
    open_regions: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: a correction (``--round N --replace``): the waiting round whose annotate stage rebuilds the training labels
    rebuilt_at: int | None = None
    annotator: str = ""  # recorded with the import, with the minutes spent (None: not given)
    minutes: float | None = None

    @property
    def changed(self) -> bool:
        return bool(self.imported)

    @property
    def correction(self) -> bool:
        return self.rebuilt_at is not None


@dataclass
class _Planned:
    case_id: str
    source: Path
    sha256: str
    regions: list[StoredRegion]
    fg_voxels: dict[int, dict[str, int]]  # region id -> {label: voxels}
    n_outside: int
    replaces: dict[str, Any] | None
    costs: dict[int, RegionCost] = field(default_factory=dict)  # region id -> corrected voxels, strokes


def import_labels(
    exp_dir: Path,
    labels_dir: Path,
    *,
    strict: bool = False,
    replace: bool = False,
    round_index: int | None = None,
    annotator: str | None = None,
    minutes: float | None = None,
) -> ImportReport:
    """Import annotators' label files into the round that waits for labels.

    Every file is checked before anything changes (see :func:`list_label_files` and :func:`check_label_file`);
    a file must belong to a case of the waiting round. Labelled voxels outside the requested regions are
    ignored with a warning (``strict``: refused). A region whose label is all background (0) is imported with a
    warning (``strict``: the file is refused). A file identical to the one imported before for its case
    changes nothing; a different one needs ``replace`` (the old copy is kept). Then the files are copied into
    ``rounds/NNN/imported/`` and recorded, with the regions they annotate, in one transaction. Any error
    (disk full included) leaves the experiment as it was.

    ``round_index`` (with ``replace``) corrects the labels of cases of that finished round instead: each file
    must belong to a case labelled in that round; the correction is recorded and the round waiting for labels
    rebuilds the training labels of the corrected cases. Refused when the round is not finished or no later
    round waits for labels (no training would use the correction).

    ``annotator`` (default: the login name) and ``minutes`` (the time spent on these files, >= 0, or None) are
    recorded with the import; each region's corrected voxels and strokes against its prefill too.
    """
    who, spent = annotator_name(annotator), check_minutes(minutes)
    exp_dir = Path(exp_dir)
    if not (exp_dir / CONFIG_FILE).is_file() or not (exp_dir / DB_FILE).is_file():
        raise ExperimentError(f"{exp_dir} is not an alseg experiment (no {CONFIG_FILE} / {DB_FILE})")
    cfg = load_config(exp_dir / CONFIG_FILE)
    if cfg.oracle != "human":
        raise ExperimentError(
            f"{exp_dir} annotates from ground truth (oracle: simulated); alseg import is for oracle: human"
        )
    with experiment_lock(exp_dir):
        handler = setup_logging(exp_dir)  # only a successful import writes to the log
        state = ExperimentState(exp_dir / DB_FILE)
        try:
            ds = load_dataset(cfg.dataset, require_labels=False)
            report = ImportReport(None, annotator=who, minutes=spent)
            return _import(exp_dir, state, ds, Path(labels_dir), strict, replace, round_index, cfg.rounds, report)
        finally:
            state.close()
            log.removeHandler(handler)
            handler.close()


def _import(
    exp_dir: Path,
    state: ExperimentState,
    ds: Dataset,
    labels_dir: Path,
    strict: bool,
    replace: bool,
    round_index: int | None = None,
    rounds_planned: int = 0,
    report: ImportReport | None = None,
) -> ImportReport:
    waiting = waiting_round(state)
    correcting = round_index is not None
    if correcting:
        assert round_index is not None
        check_correction(exp_dir, state, round_index, replace, waiting, rounds_planned)
    files, problems, notes = list_label_files(labels_dir, exp_dir)
    r = round_index if correcting else waiting
    report = report or ImportReport(None, annotator=annotator_name(None))
    report.round_index, report.rebuilt_at = r, waiting if correcting else None
    report.notes.extend(notes)
    regions = state.regions(round_index=r) if r is not None else []
    by_case: dict[str, list[StoredRegion]] = defaultdict(list)
    for g in regions:
        by_case[g.region.case_id].append(g)
    current = {f["case_id"]: f for f in state.imported_files(round_index=r, current_only=True)} if r is not None else {}
    earlier = {(f["case_id"], f["sha256"]): f["round"] for f in state.imported_files()}
    labelled_in: dict[str, list[int]] = defaultdict(list)  # case -> the rounds it was labelled in
    for f in state.imported_files(current_only=True):
        labelled_in[f["case_id"]].append(f["round"])
    again = f"--round {r} --replace" if correcting else "--replace"
    plan: list[_Planned] = []
    for case_id, path in files.items():
        try:
            sha = sha256_file(path)
        except OSError as err:
            problems.append(f"{path}: cannot be read ({err})")
            continue
        if case_id not in by_case:
            if (case_id, sha) in earlier:
                report.notes.append(f"{path}: imported before (round {earlier[(case_id, sha)]}); skipped")
            elif correcting:
                kind = "has no regions in" if case_id in ds.case_ids else "is not a case of the dataset, nor in"
                problems.append(
                    f"{path}: case {case_id!r} {kind} round {r}; round {r} has regions of {', '.join(sorted(by_case))}"
                )
            elif r is None:
                problems.append(
                    f"{path}: no round waits for labels (run `alseg query {exp_dir}` to export the next round)"
                )
            elif labelled_in.get(case_id):
                done = sorted(set(labelled_in[case_id]))
                if len(done) == 1:
                    how = f"in round {done[0]}: to correct those labels pass `--round {done[0]} --replace`"
                else:
                    how = f"in rounds {rounds_text(done)}: to correct one, pass `--round N --replace` with its N"
                problems.append(
                    f"{path}: case {case_id!r} is not in round {r}, the round waiting for labels; it was labelled {how}"
                )
            else:
                kind = "in the round's work package" if case_id in ds.case_ids else "a case of the dataset"
                problems.append(
                    f"{path}: case {case_id!r} is not {kind}; round {r} asks for labels of {', '.join(sorted(by_case))}"
                )
            continue
        old = current.get(case_id)
        if correcting and old is None:
            ids = [g.id for g in by_case[case_id]]
            problems.append(
                f"{path}: the regions {ids} of case {case_id!r} in round {r} were closed unlabelled (--allow-open); "
                "they cannot be labelled any more"
            )
            continue
        if old is not None and old["sha256"] == sha:
            report.unchanged.append(case_id)
            continue
        try:
            arr = check_label_file(path, ds.geometry(case_id), ds.labels, case_id)
        except DatasetError as err:
            problems.append(str(err))
            continue
        if old is not None and not replace:
            problems.append(
                f"{path}: case {case_id!r} was already imported from {old['source']} (sha256 {old['sha256'][:12]}); "
                "this file differs: pass --replace to import it (the old copy is kept)"
            )
            continue
        inside = annotated_mask(arr.shape, [g.region.box for g in by_case[case_id]])
        n_outside = int(np.count_nonzero(arr[~inside]))
        refused = False
        if n_outside:
            msg = f"{path}: case {case_id!r} has {n_outside} labelled voxels outside its requested regions"
            if strict:
                problems.append(msg + " (--strict refuses them)")
                refused = True
            else:
                report.warnings.append(msg + "; they are ignored")
        for g in by_case[case_id]:
            # every value is a declared label, so "no foreground label inside the box" is "all 0"
            if not np.any(arr[g.region.box.slices()]):
                msg = f"{path}: region {g.id} of case {case_id!r} (round {r}) is all background (0)"
                if strict:
                    problems.append(msg + " (--strict refuses it)")
                    refused = True
                else:
                    report.warnings.append(
                        msg + f"; imported as background: if it was forgotten, label it and import the file again "
                        f"with {again}"
                    )
        if refused:
            continue
        fg = {
            g.id: {str(lab): int(np.count_nonzero(arr[g.region.box.slices()] == lab)) for lab in ds.foreground_labels}
            for g in by_case[case_id]
        }
        assert r is not None  # the case has regions in round r
        costs, warning = measure_regions(exp_dir, r, case_id, path, arr, by_case[case_id])
        report.warnings += [warning] if warning else []
        plan.append(_Planned(case_id, path, sha, by_case[case_id], fg, n_outside, old, costs))
    if problems:
        head = f"nothing imported: {len(problems)} problem(s) in {labels_dir}:\n"
        raise AnnotationImportError(head + "\n".join(f"  - {p}" for p in problems), problems)
    if not correcting:
        covered = set(current) | {p.case_id for p in plan}
        report.open_regions = [(g.id, g.region.case_id) for g in regions if g.region.case_id not in covered]
    if not plan:
        return report
    assert r is not None
    _commit_import(exp_dir, state, r, plan, report)
    return report


def _commit_import(exp_dir: Path, state: ExperimentState, r: int, plan: list[_Planned], report: ImportReport) -> None:
    dest_dir = round_dir(exp_dir, r) / IMPORTED_DIR
    known = {f["path"] for f in state.imported_files()}
    if dest_dir.is_dir():  # leftovers of an import killed before its commit
        for p in dest_dir.iterdir():
            if str(p.relative_to(exp_dir)) not in known:
                p.unlink()
    fault_point("import.validated", r)
    created: list[Path] = []
    made_dir = not dest_dir.exists()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        dests: dict[str, str] = {}
        for i, p in enumerate(plan):
            ending = label_ending(p.source.name) or ".nii.gz"
            dest = dest_dir / f"{p.case_id}.{p.sha256[:16]}{ending}"
            if not (dest.is_file() and sha256_file(dest) == p.sha256):
                copy_label_file(p.source, dest)
                created.append(dest)
                if sha256_file(dest) != p.sha256:
                    raise AnnotationImportError(f"{p.source} changed while it was being imported; import it again")
            dests[p.case_id] = str(dest.relative_to(exp_dir))
            if i == 0:
                fault_point("import.copied", r)
        fault_point("import.before_commit", r)
        with state.transaction() as conn:
            import_id = state.add_import(conn, r, report.annotator, report.minutes, len(plan))
            for p in plan:
                new_id = state.add_imported_file(
                    conn, r, p.case_id, dests[p.case_id], p.sha256, str(p.source.resolve()), p.n_outside
                )
                if p.replaces is not None:
                    state.replace_imported_file(conn, p.replaces["id"], new_id)
                    if report.rebuilt_at is not None:
                        state.add_correction(conn, r, p.case_id, p.replaces["id"], new_id, report.rebuilt_at)
                for g in p.regions:
                    state.mark_annotated(conn, g.id, p.fg_voxels[g.id], dests[p.case_id])
                    c = p.costs[g.id]
                    state.set_region_cost(
                        conn, g.id, c.corrected_voxels, c.strokes, c.prefill, report.annotator, import_id
                    )
    except BaseException as err:
        for path in created:
            path.unlink(missing_ok=True)
        if made_dir and dest_dir.is_dir() and not any(dest_dir.iterdir()):
            dest_dir.rmdir()
        if isinstance(err, OSError):
            what = "the disk is full" if err.errno == errno.ENOSPC else str(err)
            raise AnnotationImportError(f"import failed: {what} ({err}); nothing was imported") from err
        raise
    for p in plan:
        report.imported.append(
            {
                "case_id": p.case_id,
                "file": str(p.source),
                "stored": dests[p.case_id],
                "regions": [g.id for g in p.regions],
                "replaced": None if p.replaces is None else p.replaces["path"],
            }
        )
        for w in report.warnings:
            if w.startswith(f"{p.source}:"):  # the command line prints them once: here the log file only
                log.warning("round %d: %s", r, w, extra={"file_only": True})
    if report.rebuilt_at is not None:
        log.info(
            "round %d: corrected the labels of %d cases: %s (replacing %s); round %d's annotate stage rebuilds their "
            "training labels; the metrics recorded so far stay",
            r,
            len(plan),
            [p.case_id for p in plan],
            [p.replaces["path"] for p in plan if p.replaces is not None],
            report.rebuilt_at,
        )
    else:
        log.info("round %d: imported %d label files: %s", r, len(plan), [p.case_id for p in plan])


#: the function that writes an imported file (a module attribute so that tests can simulate a full disk)
copy_label_file = copy_file
