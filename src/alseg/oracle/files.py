"""Human annotation through files: export a round's work package, import the annotators' label files.

An experiment with ``oracle: human`` stops after each query. Its work package is written to
``rounds/NNN/to_annotate/``::

    manifest.json, manifest.csv   one entry per region: id, case, mask value, box in voxels and in mm, score
    masks/{case}_regions.nii.gz   the regions to label (value k = the case's k-th region, 0 elsewhere),
                                  in the geometry of the case's image
    images/                       links to the case images (copies where links cannot be made)
    README.txt                    what to do

Annotators return one label file per case, ``{case_id}.nii.gz`` (or ``.nii``) on the image's grid, in a
folder of their own. ``alseg import EXP LABELS_DIR`` checks every file before changing anything (see
:func:`import_labels`), then copies the files into ``rounds/NNN/imported/`` (content-addressed names, atomic
writes) and records them and the regions they annotate in one transaction. A region is *done* when a label
file of its case has been imported; regions of cases without a file stay *open*. The annotate stage of a
round completes (training labels written, stage committed) when the next ``alseg query`` finds no region
open, or is told to go on without them (``--allow-open``: the open regions are then closed unlabelled and
never queried again).

Everything here is written atomically (temporary name, fsync, rename) and committed in SQLite transactions,
so a kill at any point leaves a resumable experiment.
"""

from __future__ import annotations

import csv
import errno
import io
import itertools
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alseg.config import load_config
from alseg.data.dataset import Dataset, DatasetError, Geometry, count_nonfinite, load_dataset, split_holdout
from alseg.data.labels import sha256_file, write_label_nifti
from alseg.data.regions import Box, Region, annotated_mask
from alseg.loop.state import ExperimentState, StoredRegion, experiment_lock

if TYPE_CHECKING:
    from alseg.loop.runner import Experiment

log = logging.getLogger("alseg")

PACKAGE_DIR = "to_annotate"
IMPORTED_DIR = "imported"
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
LABEL_ENDINGS = (".nii.gz", ".nii")


class AnnotationImportError(ValueError):
    """Label files that cannot be imported; ``problems`` lists every problem found. Nothing was changed."""

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


def _fault_point(name: str, round_index: int) -> None:
    from alseg.loop.runner import fault_point

    fault_point(name, round_index)


def round_dir(exp_dir: Path, round_index: int) -> Path:
    return Path(exp_dir) / "rounds" / f"{round_index:03d}"


def package_dir(exp_dir: Path, round_index: int) -> Path:
    """Where the work package of a round is exported."""
    return round_dir(exp_dir, round_index) / PACKAGE_DIR


def mask_file_name(case_id: str) -> str:
    return f"{case_id}_regions.nii.gz"


# --------------------------------------------------------------------------- split and starting regions
def human_split(ds: Dataset, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(pool, test)`` for annotation mode: the held-out test cases are cases that have a label file.

    All cases labelled: :func:`split_holdout` (as the simulated oracle). None labelled: every case is in the
    pool and nothing is evaluated. Some labelled: ``max(1, round(fraction * n))`` test cases drawn from the
    labelled ones (at most all of them, and at most ``n - 1``).
    """
    ids = sorted(ds.case_ids)
    labelled = [c for c in ids if ds.has_label(c)]
    if len(labelled) == len(ids):
        return split_holdout(ids, fraction, seed)
    if not labelled:
        return ids, []
    n_test = min(len(labelled), len(ids) - 1, max(1, round(fraction * len(ids))))
    perm = np.random.default_rng(seed).permutation(len(labelled))
    test = sorted(labelled[i] for i in perm[:n_test])
    return [c for c in ids if c not in set(test)], test


def _ints(value: Any, what: str, source: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = value.replace(",", " ").replace(";", " ").split()
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{source}: {what} is {value!r}; expected a list of integers")
    out = []
    for v in value:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {what} is {value!r}; expected integers") from None
        if not f.is_integer() or isinstance(v, bool):
            raise ValueError(f"{source}: {what} is {value!r}; expected integers")
        out.append(int(f))
    return tuple(out)


def load_starting_regions(
    path: Path, ds: Dataset, pool: Sequence[str], box_sizes: dict[str, tuple[int, ...]]
) -> list[Region]:
    """Read and check user-given round-0 regions (JSON or CSV, boxes in voxels, array order ``z, y, x``).

    JSON: a list (or ``{"regions": [...]}``) of ``{"case_id": ..., "start": [z, y, x], "size": [...]}``.
    CSV: columns ``case_id``, ``start`` and optionally ``size`` (integers separated by spaces), e.g.
    ``hippocampus_001,10 12 8,20 20 20``. ``size`` defaults to the experiment's region size. Every region must
    lie in a pool case, inside the image, and overlap no other region.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"starting_regions file {path} does not exist; expected a JSON or CSV list of regions")
    text = path.read_text(encoding="utf-8", errors="replace")
    rows: list[dict[str, Any]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err}); expected a list of regions") from None
        if isinstance(data, dict):
            data = data.get("regions")
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ValueError(f"{path}: expected a list of {{'case_id', 'start', 'size'}} objects")
        rows = data
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"case_id", "start"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: CSV columns {reader.fieldnames}; expected case_id, start and optionally size")
        rows = [dict(r) for r in reader]
    else:
        raise ValueError(f"{path}: starting_regions must be a .json or .csv file")
    if not rows:
        raise ValueError(f"{path}: no regions; expected at least one")
    pool_set = set(pool)
    regions: list[Region] = []
    for i, row in enumerate(rows):
        where = f"{path} region {i + 1}"
        case_id = str(row.get("case_id", ""))
        if case_id not in pool_set:
            kind = "a held-out test case" if case_id in ds.case_ids else "not a case of the dataset"
            raise ValueError(f"{where}: case {case_id!r} is {kind}; expected a pool case")
        shape = ds.geometry(case_id).shape
        start = _ints(row.get("start"), "start", where)
        size = _ints(row["size"], "size", where) if row.get("size") not in (None, "") else box_sizes[case_id]
        if len(start) != len(shape) or len(size) != len(shape):
            raise ValueError(f"{where}: start {start} / size {size} must have {len(shape)} entries (z, y, x)")
        try:
            box = Box(start, size)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not box.inside(shape):
            raise ValueError(f"{where}: box start {start} size {size} lies outside {case_id} of shape {shape}")
        for other in regions:
            if other.case_id == case_id and other.box.overlaps(box):
                raise ValueError(f"{where}: box {box} overlaps {other.box} in {case_id}; expected disjoint regions")
        regions.append(Region(case_id, box, float("nan"), {"strategy": "starting_regions", "round": 0, "row": i + 1}))
    return regions


def regions_to_json(regions: Sequence[Region]) -> str:
    return json.dumps([{"case_id": g.case_id, **g.box.to_json(), "info": g.info} for g in regions])


def regions_from_json(text: str) -> list[Region]:
    return [Region(d["case_id"], Box.from_json(d), float("nan"), d["info"]) for d in json.loads(text)]


# --------------------------------------------------------------------------- geometry helpers
def index_to_world(geo: Geometry, index: Sequence[float]) -> list[float]:
    """Physical (LPS, mm) position of a voxel index given in array order (``z, y, x``).

    The same as SimpleITK's ``TransformContinuousIndexToPhysicalPoint`` with the index reversed to ``x, y, z``.
    """
    n = geo.ndim
    idx_xyz = np.asarray(list(index)[::-1], dtype=float)
    spacing_xyz = np.asarray(geo.spacing[::-1], dtype=float)
    direction = np.asarray(geo.direction, dtype=float).reshape(n, n)
    return [float(v) for v in np.asarray(geo.origin, dtype=float) + direction @ (idx_xyz * spacing_xyz)]


def box_extent(geo: Geometry, box: Box) -> dict[str, list[float] | list[int]]:
    """A box in viewer voxel indices (``x, y, z``, inclusive) and in world millimetres (LPS and RAS)."""
    last = [a + s - 1 for a, s in zip(box.start, box.size, strict=True)]
    corners = np.array([index_to_world(geo, c) for c in itertools.product(*zip(box.start, last, strict=True))])
    centre = index_to_world(geo, [(a + b) / 2 for a, b in zip(box.start, last, strict=True)])
    ras = [-centre[0], -centre[1], *centre[2:]]
    return {
        "index_min_xyz": list(box.start[::-1]),
        "index_max_xyz": last[::-1],
        "world_min_lps_mm": [round(float(v), 4) for v in corners.min(axis=0)],
        "world_max_lps_mm": [round(float(v), 4) for v in corners.max(axis=0)],
        "centre_lps_mm": [round(v, 4) for v in centre],
        "centre_ras_mm": [round(v, 4) for v in ras],
    }


# --------------------------------------------------------------------------- export
def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _package_is_complete(out: Path, regions: Sequence[StoredRegion]) -> bool:
    try:
        manifest = json.loads((out / MANIFEST_JSON).read_text())
    except (OSError, ValueError):
        return False
    ids = sorted(int(e.get("region_id", -1)) for e in manifest.get("regions", []))
    if ids != sorted(g.id for g in regions):
        return False
    return all((out / "masks" / mask_file_name(c)).is_file() for c in {g.region.case_id for g in regions})


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


_README = """alseg work package: round {round}, {n_regions} regions in {n_cases} cases

For each case, label the voxels inside the boxes of masks/{{case}}_regions.nii.gz (value k = region k of the
case in manifest.csv) on top of the image in images/. Label values: {labels}.
Voxels outside the boxes are ignored (0 there is fine).

Save one label file per case, named {{case_id}}.nii.gz, on the image's own grid (same size, spacing,
origin and orientation: start from the mask or the image in your viewer and save the segmentation), into
a folder of your own outside the experiment, then run:

    alseg import {exp} LABELS_DIR
    alseg query {exp}

Cases: {cases}
"""


def export_work_package(exp: Experiment, round_index: int) -> bool:
    """Write ``rounds/NNN/to_annotate/`` for the regions of a round unless it is already complete.

    Built in a temporary folder and renamed into place, so the package is either complete or absent.
    Returns True when it was written now.
    """
    r = round_index
    out = package_dir(exp.dir, r)
    regions = exp.state.regions(round_index=r)
    if _package_is_complete(out, regions):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{PACKAGE_DIR}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{PACKAGE_DIR}.tmp-{os.getpid()}")
    (tmp / "masks").mkdir(parents=True)
    (tmp / "images").mkdir()
    by_case: dict[str, list[StoredRegion]] = defaultdict(list)
    for g in regions:
        by_case[g.region.case_id].append(g)
    entries: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    try:
        for i, case_id in enumerate(sorted(by_case)):
            geo = exp.ds.geometry(case_id)
            mask = np.zeros(geo.shape, dtype=np.uint8 if len(by_case[case_id]) < 256 else np.uint16)
            for k, g in enumerate(by_case[case_id], start=1):
                mask[g.region.box.slices()] = k
                entries.append(
                    {
                        "region_id": g.id,
                        "round": r,
                        "case_id": case_id,
                        "mask_value": k,
                        "start": list(g.region.box.start),
                        "size": list(g.region.box.size),
                        **box_extent(geo, g.region.box),
                        "n_voxels": g.region.box.n_voxels,
                        "strategy": g.region.info.get("strategy"),
                        "score": None if g.region.score != g.region.score else float(g.region.score),
                    }
                )
            write_label_nifti(tmp / "masks" / mask_file_name(case_id), mask, geo)
            images = []
            for src in exp.ds.image_files(case_id):
                _link_or_copy(src, tmp / "images" / src.name)
                images.append(f"images/{src.name}")
            cases.append(
                {
                    "case_id": case_id,
                    "images": images,
                    "mask": f"masks/{mask_file_name(case_id)}",
                    "label_file": f"{case_id}.nii.gz",
                    "shape": list(geo.shape),
                    "spacing": list(geo.spacing),
                    "regions": [g.id for g in by_case[case_id]],
                }
            )
            if i == 0:
                _fault_point("export.mask_written", r)
        labels = {str(k): v for k, v in exp.ds.labels.items()}
        manifest = {
            "round": r,
            "experiment": str(exp.dir.resolve()),
            "labels": labels,
            "axes": "start/size: array order (z, y, x), half-open; index_*_xyz: viewer voxel indices, inclusive; "
            "world_*: millimetres, LPS (ITK, ITK-SNAP); centre_ras_mm: RAS (3D Slicer)",
            "cases": cases,
            "regions": entries,
        }
        _fsync_write(tmp / MANIFEST_CSV, _manifest_csv(entries))
        _fsync_write(
            tmp / "README.txt",
            _README.format(
                round=r,
                n_regions=len(entries),
                n_cases=len(cases),
                labels=", ".join(f"{k} = {v}" for k, v in labels.items()),
                exp=exp.dir,
                cases=", ".join(sorted(by_case)),
            ),
        )
        _fsync_write(tmp / MANIFEST_JSON, json.dumps(manifest, indent=1))
        _fault_point("export.before_rename", r)
        if out.exists():
            trash = out.with_name(f".{PACKAGE_DIR}.old-{os.getpid()}")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("round %d: work package of %d regions in %d cases exported to %s", r, len(entries), len(cases), out)
    return True


def _manifest_csv(entries: Sequence[dict[str, Any]]) -> str:
    cols = (
        "region_id",
        "round",
        "case_id",
        "mask_value",
        "start",
        "size",
        "index_min_xyz",
        "index_max_xyz",
        "world_min_lps_mm",
        "world_max_lps_mm",
        "centre_lps_mm",
        "centre_ras_mm",
        "strategy",
        "score",
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for e in entries:
        w.writerow(
            [" ".join(str(v) for v in e[c]) if isinstance(e[c], list) else ("" if e[c] is None else e[c]) for c in cols]
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- waiting rounds and the annotate stage
@dataclass
class Waiting:
    """A round whose regions wait for human labels."""

    round_index: int
    package: Path
    open_regions: list[tuple[int, str]]  # (region id, case id)
    n_regions: int
    exported_now: bool = False

    def message(self, exp_dir: Path) -> str:
        n_open = len(self.open_regions)
        cases = sorted({c for _, c in self.open_regions})
        head = (
            f"round {self.round_index}: {n_open} of {self.n_regions} regions in {len(cases)} cases wait for "
            f"labels; work package: {self.package}"
        )
        return (
            f"{head}\nlabel them (see {self.package / 'README.txt'}), then run `alseg import {exp_dir} LABELS_DIR` "
            f"and `alseg query {exp_dir}`"
        )


def waiting_round(state: ExperimentState) -> int | None:
    """The round whose regions are chosen but whose annotate stage is not done (None if there is none)."""
    rounds = sorted({g.round for g in state.regions()})
    for r in reversed(rounds):
        if state.stage_done(r, "query") and not state.stage_done(r, "annotate"):
            return r
    return None


def pending_annotation(exp_dir: Path) -> Waiting | None:
    """Read-only: the round waiting for labels, with its open regions."""
    state = ExperimentState(Path(exp_dir) / "alseg.sqlite")
    try:
        r = waiting_round(state)
        if r is None:
            return None
        regions = state.regions(round_index=r)
        open_ = [(g.id, g.region.case_id) for g in regions if g.status != "annotated"]
        return Waiting(r, package_dir(exp_dir, r), open_, len(regions))
    finally:
        state.close()


def finish_annotation(exp: Experiment, round_index: int, allow_open: bool = False) -> Waiting | None:
    """The annotate stage of a round with the human oracle.

    Exports the work package if it is missing. While regions are open (and ``allow_open`` is False) returns
    a :class:`Waiting`. Otherwise writes the round's training labels (imported labels inside the annotated
    regions, earlier rounds' labels kept, the ignore value elsewhere) and commits the stage.
    """
    from alseg.loop.runner import ExperimentError, _peak_rss_mb

    r = round_index
    try:
        exported = export_work_package(exp, r)
    except OSError as err:
        what = "the disk is full" if err.errno == errno.ENOSPC else "a write failed"
        raise ExperimentError(
            f"round {r}: exporting the work package to {package_dir(exp.dir, r)} failed: {what} ({err}); "
            "nothing is lost: run the command again once the problem is fixed"
        ) from err
    regions = exp.state.regions(round_index=r)
    open_ = [g for g in regions if g.status != "annotated"]
    if open_ and not allow_open:
        return Waiting(r, package_dir(exp.dir, r), [(g.id, g.region.case_id) for g in open_], len(regions), exported)
    done = [g for g in regions if g.status == "annotated"]
    previous = exp.state.latest_label_files(r - 1) if r > 0 else {}
    if not done and not previous:
        raise ExperimentError(
            f"round {r}: none of its {len(regions)} regions is labelled and nothing was labelled before; "
            f"import labels with `alseg import {exp.dir} LABELS_DIR` first"
        )
    t0 = time.perf_counter()
    label_dir = exp.round_dir(r) / "labels"
    files: dict[str, str] = {}
    by_case: dict[str, list[StoredRegion]] = defaultdict(list)
    for g in done:
        by_case[g.region.case_id].append(g)
    for case_id in sorted(by_case):
        geo = exp.ds.geometry(case_id)
        if case_id in previous:
            base = read_label_array(exp.dir / previous[case_id])
        else:
            dtype = np.uint8 if exp.ignore_value < 256 else np.int16
            base = np.full(geo.shape, exp.ignore_value, dtype=dtype)
        cache: dict[str, np.ndarray] = {}
        for g in by_case[case_id]:
            src = str(g.annotated_by)
            if src not in cache:
                cache[src] = read_label_array(exp.dir / src)
            sl = g.region.box.slices()
            base[sl] = cache[src][sl]
        files[case_id] = write_label_nifti(label_dir / f"{case_id}.nii.gz", base, geo)

    def record(conn: Any) -> None:
        for case_id, sha in files.items():
            rel = str((label_dir / f"{case_id}.nii.gz").relative_to(exp.dir))
            exp.state.add_label_file(conn, r, case_id, rel, sha)

    _fault_point("annotate.before_commit", r)
    detail = {"cases": len(files), "oracle": "human", "open_regions": [g.id for g in open_]}
    with exp.state.transaction() as conn:
        record(conn)
        exp.state.mark_stage(conn, r, "annotate", time.perf_counter() - t0, _peak_rss_mb(), detail)
    if open_:
        log.warning("round %d: %d regions closed without labels: %s", r, len(open_), [g.id for g in open_])
    return None


def read_label_array(path: Path) -> np.ndarray:
    """An already validated label file as an integer array (array order)."""
    from alseg.data.dataset import _label_array, _read_sitk

    path = Path(path)
    return _label_array(path, _read_sitk(path))


# --------------------------------------------------------------------------- import
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
    from alseg.data.dataset import _check_integrity, _label_array, _open_error, _reader

    _check_integrity(path)
    try:
        image = _reader(path).Execute()
    except RuntimeError as exc:
        raise _open_error(path, exc) from exc
    if count_nonfinite(path):
        raise DatasetError(f"{path}: label contains NaN/inf values; expected integer label values")
    geo = Geometry.from_sitk(image)
    if not geo.matches(expected):
        raise DatasetError(
            f"{path}: geometry differs from the image of case {case_id!r}: {geo.difference(expected)} "
            "(label vs image); expected the label on the image's own grid"
        )
    arr = _label_array(path, image)
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
    from alseg.loop.runner import CONFIG_FILE, DB_FILE, ExperimentError, setup_logging

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
    _fault_point("import.validated", r)
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
                _fault_point("import.copied", r)
        _fault_point("import.before_commit", r)
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


# --------------------------------------------------------------------------- status
def annotation_rows(state: ExperimentState) -> list[dict[str, Any]]:
    """Every region with its annotation state: done (and by which file), waiting, or closed unlabelled."""
    files = {f["path"]: f for f in state.imported_files()}
    rows = []
    for g in state.regions():
        if g.status == "annotated":
            state_name = "done"
        elif state.stage_done(g.round, "annotate"):
            state_name = "closed unlabelled"
        else:
            state_name = "waiting"
        f = files.get(g.annotated_by or "")
        rows.append(
            {
                "region_id": g.id,
                "round": g.round,
                "case_id": g.region.case_id,
                "start": list(g.region.box.start),
                "size": list(g.region.box.size),
                "state": state_name,
                "file": g.annotated_by,
                "source": None if f is None else f["source"],
                "sha256": None if f is None else f["sha256"],
            }
        )
    return rows
