"""``alseg import EXP LABELS_DIR``: check the annotators' label files, then record them in one transaction.

Every file is checked before anything changes. The files are then copied into ``rounds/NNN/imported/``
(content-addressed names, atomic writes) and recorded, with the regions they annotate, in one SQLite
transaction, so an error (a full disk included) or a kill leaves the experiment as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alseg.config import load_config
from alseg.data.dataset import Dataset, load_dataset
from alseg.data.images import (
    DatasetError,
    Geometry,
    check_integrity,
    count_nonfinite,
    label_array,
    open_error,
    open_reader,
    sha256_file,
)
from alseg.data.regions import annotated_mask
from alseg.errors import AlsegError, ExperimentError
from alseg.oracle.human import waiting_round
from alseg.store.layout import CONFIG_FILE, DB_FILE, fault_point, log, round_dir, setup_logging
from alseg.store.state import ExperimentState, StoredRegion, experiment_lock

IMPORTED_DIR = "imported"
LABEL_ENDINGS = (".nii.gz", ".nii")


class AnnotationImportError(AlsegError, ValueError):
    """Label files that cannot be imported; ``problems`` lists every problem found. Nothing was changed."""

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


@dataclass
class ImportReport:
    """What an import did (or found already done)."""

    round_index: int | None
    imported: list[dict[str, Any]] = field(default_factory=list)  # case_id, file, regions, replaced
    unchanged: list[str] = field(default_factory=list)  # cases whose identical file was imported before
    open_regions: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.imported)


@dataclass
class _Planned:
    case_id: str
    source: Path
    sha256: str
    regions: list[StoredRegion]
    fg_voxels: dict[int, dict[str, int]]  # region id -> {label: voxels}
    n_outside: int
    replaces: dict[str, Any] | None


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (temporary file, fsync, rename)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def _label_ending(name: str) -> str | None:
    low = name.lower()
    return next((e for e in LABEL_ENDINGS if low.endswith(e) and len(name) > len(e)), None)


def list_label_files(labels_dir: Path, exp_dir: Path) -> tuple[dict[str, Path], list[str], list[str]]:
    """``{case_id: file}`` of a labels folder, the problems found and notes.

    Only files directly inside the folder are read: hidden files and subfolders are skipped, and a link that
    resolves outside the folder is refused (copy the file in instead). The folder must lie outside the
    experiment folder (alseg keeps its own copies there).
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.exists():
        raise AnnotationImportError(f"labels folder {labels_dir} does not exist")
    if not labels_dir.is_dir():
        raise AnnotationImportError(f"{labels_dir} is not a folder; expected a folder of {{case_id}}.nii.gz files")
    real = labels_dir.resolve()
    exp_real = Path(exp_dir).resolve()
    if real == exp_real or real.is_relative_to(exp_real):
        raise AnnotationImportError(
            f"labels folder {labels_dir} lies inside the experiment {exp_dir} ({real.relative_to(exp_real)}); "
            "expected a folder of your own outside it"
        )
    files: dict[str, Path] = {}
    problems: list[str] = []
    notes: list[str] = []
    for entry in sorted(labels_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            notes.append(f"{entry}: subfolder skipped (only files directly in {labels_dir} are imported)")
            continue
        ending = _label_ending(entry.name)
        if ending is None:
            problems.append(f"{entry}: not a NIfTI file name; expected label files named {{case_id}}.nii.gz")
            continue
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(real):
                problems.append(f"{entry}: a link to {target}, outside {labels_dir}; copy the file into the folder")
                continue
        if not entry.is_file():
            problems.append(f"{entry}: not a regular file (a broken link?)")
            continue
        case_id = entry.name[: -len(ending)]
        if case_id in files:
            problems.append(f"{entry}: case {case_id!r} has two label files ({files[case_id].name}); expected one")
            continue
        files[case_id] = entry
    if not files and not problems:
        raise AnnotationImportError(f"labels folder {labels_dir} holds no label files; expected {{case_id}}.nii.gz")
    return files, problems, notes


def check_label_file(path: Path, expected: Geometry, labels: dict[int, str], case_id: str) -> np.ndarray:
    """Read a label file and check it against the case's image; :class:`DatasetError` on any problem.

    Checks: complete gzip/NIfTI data, a readable scalar image, integer values (floats only when whole, never
    NaN), the geometry of the image (shape, spacing, origin, direction within 1e-4) and declared values only.
    """
    check_integrity(path)
    try:
        image = open_reader(path).Execute()
    except RuntimeError as exc:
        raise open_error(path, exc) from exc
    if count_nonfinite(path):
        raise DatasetError(f"{path}: label contains NaN/inf values; expected integer label values")
    geo = Geometry.from_sitk(image)
    if not geo.matches(expected):
        raise DatasetError(
            f"{path}: geometry differs from the image of case {case_id!r}: {geo.difference(expected)} "
            "(label vs image); expected the label on the image's own grid"
        )
    arr = label_array(path, image)
    present = np.unique(arr)
    undeclared = sorted(int(v) for v in present if int(v) not in labels)
    if undeclared:
        raise DatasetError(
            f"{path}: undeclared label values {undeclared[:10]}; expected values in "
            f"{{{', '.join(f'{k}: {v}' for k, v in labels.items())}}}"
        )
    return arr


def import_labels(exp_dir: Path, labels_dir: Path, *, strict: bool = False, replace: bool = False) -> ImportReport:
    """Import annotators' label files into the round that waits for labels.

    Every file is checked before anything changes (see :func:`list_label_files` and :func:`check_label_file`);
    a file must belong to a case of the waiting round. Labelled voxels outside the requested regions are
    ignored with a warning (``strict``: refused). A file identical to the one imported before for its case
    changes nothing; a different one needs ``replace`` (the old copy is kept). Then the files are copied into
    ``rounds/NNN/imported/`` and recorded, with the regions they annotate, in one transaction. Any error
    (disk full included) leaves the experiment as it was.
    """
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
            return _import(exp_dir, state, ds, Path(labels_dir), strict, replace)
        finally:
            state.close()
            log.removeHandler(handler)
            handler.close()


def _import(
    exp_dir: Path, state: ExperimentState, ds: Dataset, labels_dir: Path, strict: bool, replace: bool
) -> ImportReport:
    files, problems, notes = list_label_files(labels_dir, exp_dir)
    r = waiting_round(state)
    report = ImportReport(r, notes=notes)
    regions = state.regions(round_index=r) if r is not None else []
    by_case: dict[str, list[StoredRegion]] = defaultdict(list)
    for g in regions:
        by_case[g.region.case_id].append(g)
    current = {f["case_id"]: f for f in state.imported_files(round_index=r, current_only=True)} if r is not None else {}
    earlier = {(f["case_id"], f["sha256"]): f["round"] for f in state.imported_files()}
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
            elif r is None:
                problems.append(
                    f"{path}: no round waits for labels (run `alseg query {exp_dir}` to export the next round)"
                )
            else:
                kind = "in the round's work package" if case_id in ds.case_ids else "a case of the dataset"
                problems.append(
                    f"{path}: case {case_id!r} is not {kind}; round {r} asks for labels of {', '.join(sorted(by_case))}"
                )
            continue
        old = current.get(case_id)
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
        if n_outside:
            msg = f"{path}: case {case_id!r} has {n_outside} labelled voxels outside its requested regions"
            if strict:
                problems.append(msg + " (--strict refuses them)")
                continue
            report.warnings.append(msg + "; they are ignored")
        for g in by_case[case_id]:
            if not np.any(arr[g.region.box.slices()]):
                report.notes.append(f"{path}: region {g.id} of {case_id!r} is all background (0)")
        fg = {
            g.id: {str(lab): int(np.count_nonzero(arr[g.region.box.slices()] == lab)) for lab in ds.foreground_labels}
            for g in by_case[case_id]
        }
        plan.append(_Planned(case_id, path, sha, by_case[case_id], fg, n_outside, old))
    if problems:
        head = f"nothing imported: {len(problems)} problem(s) in {labels_dir}:\n"
        raise AnnotationImportError(head + "\n".join(f"  - {p}" for p in problems), problems)
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
            ending = _label_ending(p.source.name) or ".nii.gz"
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
            for p in plan:
                new_id = state.add_imported_file(
                    conn, r, p.case_id, dests[p.case_id], p.sha256, str(p.source.resolve()), p.n_outside
                )
                if p.replaces is not None:
                    state.replace_imported_file(conn, p.replaces["id"], new_id)
                for g in p.regions:
                    state.mark_annotated(conn, g.id, p.fg_voxels[g.id], dests[p.case_id])
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
            if w.startswith(f"{p.source}:"):
                log.warning("round %d: %s", r, w)
    log.info("round %d: imported %d label files: %s", r, len(plan), [p.case_id for p in plan])


#: the function that writes an imported file (a module attribute so that tests can simulate a full disk)
copy_label_file = _copy_file
