"""The human oracle: people label the regions of a round from its work package; ``alseg import`` records them.

An experiment with ``oracle: human`` stops after each query. Its work package is written to
``rounds/NNN/to_annotate/`` (:mod:`alseg.oracle.package`); annotators return one label file per case, which
``alseg import`` checks and records (:mod:`alseg.oracle.importer`). A region is *done* when a label file of
its case has been imported; regions of cases without a file stay *open*. The annotate stage of a round
completes (training labels written, stage committed) when the next ``alseg query`` finds no region open, or
is told to go on without them (``--allow-open``: the open regions are then closed unlabelled and never
queried again).

A correction of a finished round (``alseg import --round N --replace``) is recorded while a later round waits;
that round's annotate stage rebuilds the training label of each corrected case from all its annotated regions'
current files, so the next training uses the corrected labels (rounds already trained are not rebuilt).
"""

from __future__ import annotations

import errno
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from alseg.data.dataset import Dataset
from alseg.data.images import read_label_array, write_label_nifti
from alseg.errors import ExperimentError
from alseg.oracle.base import Annotation, ModelSegmentations, Waiting
from alseg.oracle.package import export_work_package, package_dir
from alseg.store.layout import DB_FILE, round_dir
from alseg.store.state import ExperimentState, StoredRegion


class HumanOracle:
    """People annotate: each round exports a work package and waits until its labels are imported."""

    kind: ClassVar[str] = "human"
    has_ground_truth: ClassVar[bool] = False

    def __init__(
        self,
        exp_dir: Path,
        ds: Dataset,
        state: ExperimentState,
        ignore_value: int,
        ground_truth: Callable[[str], np.ndarray] | None = None,
        *,
        segmentations: ModelSegmentations | None = None,
    ) -> None:
        self.dir = Path(exp_dir)
        self.ds = ds
        self.state = state
        self.ignore_value = ignore_value
        self.segmentations = segmentations  # the prefill of the work package (None: prefill: false)

    def annotate(self, round_index: int, allow_open: bool = False) -> Annotation | Waiting:
        """Export the work package if it is missing. While regions are open (and ``allow_open`` is False) the
        round waits. Otherwise write the round's training labels: imported labels inside the annotated regions,
        earlier rounds' labels kept, the ignore value elsewhere. A case whose labels of a finished round were
        corrected while this round waited (``alseg import --round N --replace``) is rebuilt instead: every
        annotated region of the case, this round's included, from the file that labels it now."""
        r = round_index
        try:
            exported = export_work_package(self.dir, self.state, self.ds, r, self.segmentations)
        except OSError as err:
            what = "the disk is full" if err.errno == errno.ENOSPC else "a write failed"
            raise ExperimentError(
                f"round {r}: exporting the work package to {package_dir(self.dir, r)} failed: {what} ({err}); "
                "nothing is lost: run the command again once the problem is fixed"
            ) from err
        regions = self.state.regions(round_index=r)
        open_ = [g for g in regions if g.status != "annotated"]
        if open_ and not allow_open:
            open_ids = [(g.id, g.region.case_id) for g in open_]
            return Waiting(r, package_dir(self.dir, r), open_ids, len(regions), exported)
        done = [g for g in regions if g.status == "annotated"]
        previous = self.state.latest_label_files(r - 1) if r > 0 else {}
        corrected = sorted({c["case_id"] for c in self.state.corrections(at_round=r)})
        if not done and not previous:
            raise ExperimentError(
                f"round {r}: none of its {len(regions)} regions is labelled and nothing was labelled before; "
                f"import labels with `alseg import {self.dir} LABELS_DIR` first"
            )
        label_dir = round_dir(self.dir, r) / "labels"
        files: dict[str, tuple[str, str]] = {}
        by_case: dict[str, list[StoredRegion]] = defaultdict(list)
        for g in done:
            by_case[g.region.case_id].append(g)
        if corrected:  # rebuilt from every annotated region of the case (earlier rounds' ones point to new files)
            wanted = set(corrected)
            by_case.update({c: [] for c in corrected})
            for g in self.state.regions(max_round=r - 1, status="annotated"):
                if g.region.case_id in wanted:
                    by_case[g.region.case_id].append(g)
            for g in done:
                if g.region.case_id in wanted:
                    by_case[g.region.case_id].append(g)
        for case_id in sorted(by_case):
            geo = self.ds.geometry(case_id)
            if case_id in previous and case_id not in corrected:
                base = read_label_array(self.dir / previous[case_id])
            else:
                dtype = np.uint8 if self.ignore_value < 256 else np.int16
                base = np.full(geo.shape, self.ignore_value, dtype=dtype)
            cache: dict[str, np.ndarray] = {}
            for g in by_case[case_id]:
                src = str(g.annotated_by)
                if src not in cache:
                    cache[src] = read_label_array(self.dir / src)
                sl = g.region.box.slices()
                base[sl] = cache[src][sl]
            path = label_dir / f"{case_id}.nii.gz"
            files[case_id] = (str(path.relative_to(self.dir)), write_label_nifti(path, base, geo))
        closed = [g.id for g in open_]
        detail: dict[str, Any] = {"cases": len(files), "oracle": "human", "open_regions": closed}
        if corrected:
            detail["corrected_cases"] = corrected
        return Annotation(files, detail=detail, closed=closed)


def waiting_round(state: ExperimentState) -> int | None:
    """The round whose regions are chosen but whose annotate stage is not done (None if there is none)."""
    rounds = sorted({g.round for g in state.regions()})
    for r in reversed(rounds):
        if state.stage_done(r, "query") and not state.stage_done(r, "annotate"):
            return r
    return None


def pending_annotation(exp_dir: Path) -> Waiting | None:
    """Read-only: the round waiting for labels, with its open regions."""
    state = ExperimentState(Path(exp_dir) / DB_FILE)
    try:
        r = waiting_round(state)
        if r is None:
            return None
        regions = state.regions(round_index=r)
        open_ = [(g.id, g.region.case_id) for g in regions if g.status != "annotated"]
        return Waiting(r, package_dir(exp_dir, r), open_, len(regions))
    finally:
        state.close()


def all_background(g: StoredRegion) -> bool:
    """Whether an imported label marks the region all background: exact from the recorded foreground counts,
    since an imported label holds declared values only (background or a foreground label, each counted)."""
    return g.status == "annotated" and g.fg_voxels is not None and not any(int(n) for n in g.fg_voxels.values())


def annotation_rows(state: ExperimentState) -> list[dict[str, Any]]:
    """Every region with its annotation state: done (and by which file), ``done (all background)`` when its
    imported label has no foreground voxel (``all_background``), waiting, or closed unlabelled; once imported,
    its ``annotator``, ``corrected_voxels``, ``strokes`` and the ``prefill`` they were measured against."""
    files = {f["path"]: f for f in state.imported_files()}
    costs = state.region_costs()
    rows = []
    for g in state.regions():
        empty = all_background(g)
        if g.status == "annotated":
            state_name = "done (all background)" if empty else "done"
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
                "all_background": empty,
                "file": g.annotated_by,
                "source": None if f is None else f["source"],
                "sha256": None if f is None else f["sha256"],
                **{k: costs.get(g.id, {}).get(k) for k in ("annotator", "corrected_voxels", "strokes", "prefill")},
            }
        )
    return rows


def annotator_summary(state: ExperimentState) -> list[dict[str, Any]]:
    """Per annotator, from the regions they labelled now (a region corrected by someone else counts for them)
    and every import they made: :func:`summarise_annotators` of the experiment's state."""
    regions = [(g.id, g.n_voxels, g.fg_voxels) for g in state.regions(status="annotated")]
    return summarise_annotators(regions, state.region_costs(), state.imports())


def summarise_annotators(
    regions: Iterable[tuple[int, int, Mapping[str, int] | None]],
    costs: Mapping[int, Mapping[str, Any]],
    imports: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Per annotator (sorted by name): ``regions``, ``voxels``, ``fg_voxels``, ``corrected_voxels``, ``strokes``,
    ``imports``, ``minutes`` (the sum of the minutes given, None if no import gave any) and
    ``imports_without_minutes``.

    ``regions``: the annotated regions as ``(region id, voxels, foreground voxels per class or None)``; ``costs``:
    ``{region id: {annotator, corrected_voxels, strokes, ...}}`` (the ``region_costs`` table; a region without a
    row, imported before alseg measured corrections, counts for nobody); ``imports``: ``{annotator, minutes}`` per
    import (the ``imports`` table).

    >>> costs = {1: {"annotator": "ana", "corrected_voxels": 2, "strokes": 1}}
    >>> imports = [{"annotator": "ana", "minutes": 3.0}, {"annotator": "ana", "minutes": None}]
    >>> row = summarise_annotators([(1, 8, {"1": 2})], costs, imports)[0]
    >>> row["regions"], row["corrected_voxels"], row["imports"], row["minutes"], row["imports_without_minutes"]
    (1, 2, 2, 3.0, 1)
    """
    out: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        keys = ("regions", "voxels", "fg_voxels", "corrected_voxels", "strokes", "imports", "imports_without_minutes")
        return out.setdefault(name, {"annotator": name, **dict.fromkeys(keys, 0), "minutes": None})

    for region_id, n_voxels, fg_voxels in regions:
        c = costs.get(region_id)
        if c is None:  # imported before alseg measured corrections
            continue
        e = entry(str(c["annotator"]))
        e["regions"] += 1
        e["voxels"] += int(n_voxels)
        e["fg_voxels"] += sum(int(n) for n in (fg_voxels or {}).values())
        e["corrected_voxels"] += int(c["corrected_voxels"])
        e["strokes"] += int(c["strokes"])
    for imp in imports:
        e = entry(str(imp["annotator"]))
        e["imports"] += 1
        if imp["minutes"] is None:
            e["imports_without_minutes"] += 1
        else:
            e["minutes"] = (e["minutes"] or 0.0) + float(imp["minutes"])
    return [out[name] for name in sorted(out)]
