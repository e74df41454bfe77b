"""``alseg remeasure``: compute the correction measures of an existing experiment's regions again and store them.

The measures (corrected voxels and correction strokes, :mod:`alseg.evaluation.correction`) go to the experiment's
``region_costs`` table, as a run records them:

- **simulated** (an oracle that reads the ground truth): round ``r``'s regions are measured against the prediction
  of round ``r - 1``'s stored model (``rounds/{r-1:03d}/model``), predicted with the experiment's backend exactly
  as the simulated oracle does (:func:`alseg.loop.prefill.model_segmentations`, seeded ``seed * 1000 + r``;
  :func:`alseg.oracle.simulated.measure_case`); round 0, and every round with ``prefill: false``, against
  background. Nothing is trained and no label file is written.
- **human**: each region's imported label file against the prefill of its round's work package
  (:func:`alseg.oracle.import_costs.measure_regions`; a package without one: background), keeping the annotator and
  import recorded with the region (``unknown`` and none when nothing was recorded).

One transaction per round. A round whose annotated regions all have measures is skipped unless ``force``, so an
interrupted remeasure resumes where it stopped. The experiment lock is held throughout: a running experiment is
refused. Made for experiments created before alseg measured corrections (their report cannot draw curves against
corrected voxels or strokes), and to check that a run's measures can be reproduced.

>>> # remeasure_experiment(Path("experiments/entropy_s0"))  # -> one RoundMeasures per round with annotated regions
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alseg.backends.base import SegmentationBackend
from alseg.config import ExperimentConfig
from alseg.data.dataset import Dataset, load_dataset
from alseg.data.images import read_label_array
from alseg.errors import ExperimentError
from alseg.evaluation.correction import RegionCost
from alseg.loop.create import open_or_create
from alseg.loop.drivers import logged
from alseg.loop.prefill import model_segmentations
from alseg.loop.runner import BackendFactory, default_backend
from alseg.oracle import ORACLES
from alseg.oracle.base import ModelSegmentations
from alseg.oracle.import_costs import UNKNOWN_ANNOTATOR, measure_regions
from alseg.oracle.simulated import measure_case, prefill_segmentations
from alseg.store.layout import DB_FILE, log, model_dir
from alseg.store.state import ExperimentState, StoredRegion, experiment_lock

__all__ = ["RoundMeasures", "remeasure_experiment"]


@dataclass(frozen=True)
class RoundMeasures:
    """What ``remeasure`` did with one round's annotated regions."""

    round_index: int
    n_regions: int
    #: the prefills measured against (``model``, ``none``; both for a human round whose package lost a file)
    prefill: tuple[str, ...]
    corrected_voxels: int
    strokes: int
    #: True when the round had every measure already and was left as it was (then the sums are the stored ones)
    skipped: bool
    #: the sums recorded before (corrected voxels, strokes); None when some region had no measure
    before: tuple[int, int] | None
    warnings: tuple[str, ...] = ()

    def line(self) -> str:
        """``round 1: 4 regions, 812 corrected voxels, 37 strokes (against the previous round's model; no measures
        before)``"""
        head = f"round {self.round_index}: {self.n_regions} regions, {self.corrected_voxels} corrected voxels, "
        head += f"{self.strokes} strokes"
        if self.skipped:
            return head + " (already measured; skipped, --force measures it again)"
        against = " and ".join("the previous round's model" if p == "model" else "background" for p in self.prefill)
        if self.before is None:
            was = "no measures before"
        elif self.before == (self.corrected_voxels, self.strokes):
            was = "recorded before: the same"
        else:
            was = f"recorded before: {self.before[0]} corrected voxels, {self.before[1]} strokes"
        return f"{head} (against {against}; {was})"


def remeasure_experiment(
    exp_dir: Path,
    force: bool = False,
    backend_factory: BackendFactory = default_backend,
    report: Callable[[RoundMeasures], None] | None = None,
) -> list[RoundMeasures]:
    """Measure again the annotated regions of every round of ``exp_dir`` that lacks measures (every round with
    ``force``) and store them, one transaction per round; returns one :class:`RoundMeasures` per round with
    annotated regions, oldest first. ``report`` is called with each round's as soon as it is stored.

    Raises :class:`~alseg.errors.ExperimentError` before changing anything when a stored model or imported label
    file that a round needs is missing, and :class:`~alseg.store.state.ExperimentLockedError` while another process
    holds the experiment.
    """
    exp_dir = Path(exp_dir).resolve()  # as the runner names it (the backend's and the models' folders)
    cfg = open_or_create(None, exp_dir)  # an experiment, and the dataset it was made with
    with experiment_lock(exp_dir), logged(exp_dir):
        state = ExperimentState(exp_dir / DB_FILE)
        try:
            return _remeasure(exp_dir, cfg, state, force, backend_factory, report)
        finally:
            state.close()


def _remeasure(
    exp_dir: Path,
    cfg: ExperimentConfig,
    state: ExperimentState,
    force: bool,
    backend_factory: BackendFactory,
    report: Callable[[RoundMeasures], None] | None,
) -> list[RoundMeasures]:
    by_round: dict[int, list[StoredRegion]] = defaultdict(list)
    for g in state.regions(status="annotated"):
        by_round[g.round].append(g)
    stored = state.region_costs()
    todo = [r for r in sorted(by_round) if force or any(g.id not in stored for g in by_round[r])]
    simulated = ORACLES[cfg.oracle].has_ground_truth
    _check_inputs(exp_dir, cfg, simulated, {r: by_round[r] for r in todo})
    measure: Callable[[int, list[StoredRegion]], tuple[dict[int, RegionCost], list[str]]] | None = None
    if todo:
        measure = _SimulatedMeasure(exp_dir, cfg, backend_factory) if simulated else _imported_measure(exp_dir)
    out = []
    for r in sorted(by_round):
        regions = by_round[r]
        before = _sums(stored, regions)
        if measure is None or r not in todo:
            assert before is not None  # every region of a round not to do has a measure
            kinds = tuple(sorted({str(stored[g.id]["prefill"]) for g in regions}))
            result = RoundMeasures(r, len(regions), kinds, *before, skipped=True, before=before)
        else:
            costs, warnings = measure(r, regions)
            with state.transaction() as conn:
                for g in regions:
                    c = costs[g.id]
                    old = stored.get(g.id) or {}
                    who = old.get("annotator") or (g.annotated_by if simulated else None) or UNKNOWN_ANNOTATOR
                    state.set_region_cost(
                        conn, g.id, c.corrected_voxels, c.strokes, c.prefill, who, old.get("import_id")
                    )
            kinds = tuple(sorted({c.prefill for c in costs.values()}))
            total = (sum(c.corrected_voxels for c in costs.values()), sum(c.strokes for c in costs.values()))
            result = RoundMeasures(
                r, len(regions), kinds, *total, skipped=False, before=before, warnings=tuple(warnings)
            )
            for w in warnings:  # in alseg.log and on the terminal
                log.warning("%s", w)
            log.info("remeasure: %s", result.line())
        out.append(result)
        if report is not None:
            report(result)
    return out


def _sums(stored: dict[int, dict[str, Any]], regions: Sequence[StoredRegion]) -> tuple[int, int] | None:
    if any(g.id not in stored for g in regions):
        return None
    return (
        sum(int(stored[g.id]["corrected_voxels"]) for g in regions),
        sum(int(stored[g.id]["strokes"]) for g in regions),
    )


def _check_inputs(exp_dir: Path, cfg: ExperimentConfig, simulated: bool, todo: dict[int, list[StoredRegion]]) -> None:
    """Every stored model (simulated) or imported label file (human) the rounds to measure need; one error naming
    every missing one, before anything is measured."""
    missing: list[str] = []
    if simulated:
        if cfg.prefill:
            for r in sorted(k for k in todo if k > 0):
                path = model_dir(exp_dir, r - 1)
                if not path.is_dir():
                    missing.append(
                        f"{path} (the model of round {r - 1}, whose prediction round {r} is measured against)"
                    )
    else:
        for r, regions in sorted(todo.items()):
            for src in sorted({str(g.annotated_by) for g in regions}):
                if not _imported_path(exp_dir, src).is_file():
                    missing.append(f"{_imported_path(exp_dir, src)} (the imported label file of round {r})")
    if missing:
        raise ExperimentError(
            f"{exp_dir}: cannot remeasure: missing {'; '.join(missing)}. Restore what is missing (from a backup) and "
            "run `alseg remeasure` again; nothing was changed"
        )


def _imported_path(exp_dir: Path, rel: str) -> Path:
    """An imported label file, named relative to the experiment folder in the state."""
    return Path(exp_dir) / rel


class _SimulatedMeasure:
    """Round ``r``'s regions against the prefill the simulated oracle would have given: the prediction of the
    model of round ``r - 1`` (``prefill: true``) or background; the ground truth as the label."""

    def __init__(self, exp_dir: Path, cfg: ExperimentConfig, backend_factory: BackendFactory) -> None:
        self.ds: Dataset = load_dataset(cfg.dataset, require_labels=True)
        self._backend: SegmentationBackend | None = None

        def backend() -> SegmentationBackend:  # started only when a round needs a prediction
            if self._backend is None:
                self._backend = backend_factory(cfg, self.ds, exp_dir)
            return self._backend

        self.segmentations: ModelSegmentations | None = (
            model_segmentations(backend, exp_dir, cfg.seed) if cfg.prefill else None
        )

    def __call__(self, r: int, regions: list[StoredRegion]) -> tuple[dict[int, RegionCost], list[str]]:
        cases = sorted({g.region.case_id for g in regions})
        predicted = prefill_segmentations(self.segmentations, r, cases, self.ds)
        costs: dict[int, RegionCost] = {}
        for case_id in tqdm(cases, desc=f"round {r}: remeasure", unit="case", leave=False):
            mine = [g for g in regions if g.region.case_id == case_id]
            segmentation = None if predicted is None else next(predicted)
            costs.update(measure_case(self.ds.read_label(case_id), segmentation, mine, self.ds.labels))
        return costs, []


def _imported_measure(exp_dir: Path) -> Callable[[int, list[StoredRegion]], tuple[dict[int, RegionCost], list[str]]]:
    """Round ``r``'s regions: the imported label file of each against the prefill of the round's work package."""

    def measure(r: int, regions: list[StoredRegion]) -> tuple[dict[int, RegionCost], list[str]]:
        costs: dict[int, RegionCost] = {}
        warnings: list[str] = []
        for (src, case_id), mine in _by_file(regions).items():
            path = _imported_path(exp_dir, src)
            found, warning = measure_regions(exp_dir, r, case_id, path, read_label_array(path), mine)
            costs.update(found)
            warnings += [warning] if warning else []
        return costs, warnings

    return measure


def _by_file(regions: Iterable[StoredRegion]) -> dict[tuple[str, str], list[StoredRegion]]:
    out: dict[tuple[str, str], list[StoredRegion]] = defaultdict(list)
    for g in regions:
        out[(str(g.annotated_by), g.region.case_id)].append(g)
    return dict(sorted(out.items()))
