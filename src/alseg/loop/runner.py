"""The active-learning loop: predict, score, select, annotate, train, evaluate, round after round.

Round ``r`` runs the stages ``query`` (round 0: the starting budget; later: the strategy, using the model of
round ``r - 1``), ``annotate`` (the oracle fills the regions), ``train`` and ``evaluate``. Each stage
commits in one transaction after its files are complete, so an interrupted run resumes at the first
stage that is not done, with no region lost or duplicated. The experiment folder is described in
``alseg.store.layout``; creating and resuming one in ``alseg.loop.create``.

The annotate stage asks the experiment's oracle (``alseg.oracle``): the simulated one writes the ground truth
of the regions; the human one exports the round's work package and the run stops until ``alseg import`` has
recorded labels for every region of the round.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from alseg.backends.base import SegmentationBackend, TrainingCase
from alseg.config import ExperimentConfig
from alseg.data.cache import ArrayCache
from alseg.data.dataset import Dataset, load_dataset
from alseg.data.region_files import regions_from_json
from alseg.data.regions import Region, annotated_mask, unit_box_size
from alseg.errors import ExperimentError
from alseg.evaluation.metrics import evaluate_case, json_safe, summarise_cases
from alseg.loop.prefill import model_segmentations
from alseg.loop.progress import RunProgress, accepts
from alseg.loop.round_data import (
    annotated_case_classes,
    annotation_cost,
    check_regions,
    write_planning_labels,
)
from alseg.loop.stopping import StopSetRound
from alseg.oracle import ORACLES, Oracle, Waiting
from alseg.store.layout import (
    DB_FILE,
    STAGES,
    fault_point,
    log,
    model_dir,
    peak_rss_mb,
    round_dir,
    say,
    write_json_atomic,
)
from alseg.store.state import ExperimentState
from alseg.strategies.base import NotEnoughCandidatesError, PoolView, QueryContext, Strategy
from alseg.strategies.random import RandomStrategy
from alseg.strategies.registry import get_strategy
from alseg.strategies.starting import starting_budget

BackendFactory = Callable[[ExperimentConfig, Dataset, Path], SegmentationBackend]


def default_backend(cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> SegmentationBackend:
    from alseg.backends.nnunet import make_backend

    return make_backend(cfg, ds, exp_dir / "nnunet")


class Experiment:
    """A running experiment: the dataset, its state and the backend."""

    def __init__(self, exp_dir: Path, cfg: ExperimentConfig, backend_factory: BackendFactory = default_backend) -> None:
        self.dir = Path(exp_dir).resolve()
        self.cfg = cfg
        oracle_class = ORACLES[cfg.oracle]
        self.ds = load_dataset(cfg.dataset, require_labels=oracle_class.has_ground_truth)
        self.state = ExperimentState(self.dir / DB_FILE)
        self.pool, self.test = self.state.split()
        self.strategy: Strategy = get_strategy(cfg.strategy, cfg.strategy_params)
        self.ignore_value = max(self.ds.labels) + 1
        self._backend_factory = backend_factory
        self._backend: SegmentationBackend | None = None
        self._gt_cache = ArrayCache()  # bounded by bytes: a large dataset's labels never fill the memory
        self.progress = RunProgress(self.dir, cfg)  # bars, progress.json and the time estimates of this run
        # the previous round's predictions for the prefill (work package) and the correction cost
        segs = model_segmentations(lambda: self.backend, self.dir, cfg.seed, self.progress) if cfg.prefill else None
        self.oracle: Oracle = oracle_class(
            self.dir, self.ds, self.state, self.ignore_value, self.ground_truth, segmentations=segs
        )

    @property
    def backend(self) -> SegmentationBackend:
        if self._backend is None:
            self._backend = self._backend_factory(self.cfg, self.ds, self.dir)
        return self._backend

    def round_dir(self, r: int) -> Path:
        return round_dir(self.dir, r)

    def model_dir(self, r: int) -> Path:
        return model_dir(self.dir, r)

    # ------------------------------------------------------------ helpers
    def box_sizes(self) -> dict[str, tuple[int, ...]]:
        return {
            cid: unit_box_size(self.cfg.unit, self.ds.geometry(cid).shape, self.cfg.region_size, self.cfg.slice_axis)
            for cid in self.pool
        }

    def ground_truth(self, case_id: str) -> np.ndarray:
        return self._gt_cache.get(case_id, lambda: self.ds.read_label(case_id))

    def annotated_boxes(self, max_round: int) -> dict[str, list]:
        boxes: dict[str, list] = defaultdict(list)
        for sr in self.state.regions(max_round=max_round):
            boxes[sr.region.case_id].append(sr.region.box)
        return boxes

    def pool_view(
        self, r: int, predictions: Callable[[], Iterator[Any]] | None = None, gradients: Any = None
    ) -> PoolView:
        boxes = self.annotated_boxes(r - 1)
        shapes = {cid: self.ds.geometry(cid).shape for cid in self.pool}
        class_voxels: dict[int, int] = defaultdict(int)
        for sr in self.state.regions(max_round=r - 1, status="annotated"):
            for lab, n in (sr.fg_voxels or {}).items():
                class_voxels[int(lab)] += int(n)
        # only to the strategies that declare they read it (and to the starting budget, round 0)
        reads_ground_truth = self.oracle.has_ground_truth and (r == 0 or self.strategy.needs.ground_truth)
        return PoolView(
            case_ids=list(self.pool),
            shapes=shapes,
            box_sizes=self.box_sizes(),
            stride=tuple(self.cfg.stride or ()),
            foreground_labels=tuple(self.ds.foreground_labels),
            annotated=lambda cid: annotated_mask(shapes[cid], boxes.get(cid, [])),
            annotated_class_voxels=dict(class_voxels),
            ground_truth=self.ground_truth if reads_ground_truth else None,
            predictions=predictions,
            region_gradients=gradients,
            n_gradient_params=int(getattr(gradients, "n_params", 0)),
        )

    def _commit_stage(
        self,
        r: int,
        stage: str,
        t0: float,
        detail: dict[str, Any] | None = None,
        extra: Callable[[Any], None] | None = None,
    ) -> None:
        with self.state.transaction() as conn:
            if extra is not None:
                extra(conn)
            self.state.mark_stage(conn, r, stage, time.perf_counter() - t0, peak_rss_mb(), detail)

    # ------------------------------------------------------------ stages
    def query_samples(self) -> int:
        """K for the query's predictions: the stored K (experiments created before K was resolved at creation
        stored 1 for every source), at least the strategy's minimum; 1 for strategies that read features only
        (Core-Set) or the network's own prediction (BADGE)."""
        needs = self.strategy.needs
        return max(self.cfg.uncertainty.n_samples or 1, needs.min_samples) if needs.samples else 1

    def query_context(self, r: int) -> QueryContext:
        """What the query of round ``r`` gives the strategy: the pool (with lazy predictions of the previous
        round's model, and its gradient embedder, when the strategy needs them), the query size and the seed."""
        key = "starting_budget" if r == 0 else self.strategy.key
        predictions = None
        if r > 0 and self.strategy.needs.probabilities:
            model = self.model_dir(r - 1)
            n_samples = self.query_samples()

            def predictions() -> Iterator[Any]:
                it = self.backend.predict(
                    model,
                    self.pool,
                    n_samples=n_samples,
                    with_features=self.strategy.needs.features,
                    seed=self.cfg.seed * 1000 + r,
                )
                yield from self.progress.track(it, len(self.pool), f"round {r}: predict pool", "predicting the pool")

        gradients = None
        if r > 0 and self.strategy.needs.gradients:
            gradients = self.backend.gradient_embedder(
                self.model_dir(r - 1), layers=self.strategy.needs.gradient_layers
            )
        return QueryContext(
            pool=self.pool_view(r, predictions, gradients),
            query_size=self.cfg.query_size if r > 0 else self.cfg.starting_size,
            round_index=r,
            n_rounds=self.cfg.rounds,
            seed=self.cfg.seed,
            strategy_key=key,
            n_per_case=self.cfg.n_per_case,
        )

    def stage_query(self, r: int) -> None:
        t0 = time.perf_counter()
        ctx = self.query_context(r)
        key = ctx.strategy_key
        given = self.state.get_meta("starting_regions") if r == 0 else None
        try:
            if given is not None:  # regions from the config's starting_regions file
                regions = regions_from_json(given)
            elif r == 0 and not self.oracle.has_ground_truth:  # nothing to cover the classes: uniform boxes
                regions = RandomStrategy().query(ctx)
            else:
                regions = starting_budget(ctx, ctx.query_size) if r == 0 else self.strategy.query(ctx)
        except NotEnoughCandidatesError as err:
            raise ExperimentError(f"round {r}: {err}") from None
        self._check_regions(r, regions, len(regions) if given is not None else ctx.query_size)
        fault_point("query.selected", r)
        self._record_query(r, t0, regions, key, self.strategy.params() if r > 0 else {})
        log.info("round %d: %s chose %d regions in %.1f s", r, key, len(regions), time.perf_counter() - t0)

    def _record_query(self, r: int, t0: float, regions: list[Region], key: str, params: dict[str, Any]) -> None:
        """Write rounds/NNN/query.json, then commit the regions and the query stage in one transaction."""
        write_json_atomic(
            self.round_dir(r) / "query.json",
            {
                "round": r,
                "strategy": key,
                "params": params,
                "regions": [
                    {"case_id": g.case_id, **g.box.to_json(), "score": g.score, "info": g.info} for g in regions
                ],
            },
        )
        fault_point("query.before_commit", r)
        self._commit_stage(
            r,
            "query",
            t0,
            {"n_regions": len(regions), "strategy": key},
            lambda conn: self.state.add_regions(conn, r, regions, key),
        )

    def _check_regions(self, r: int, regions: list[Region], expected: int) -> None:
        check_regions(r, regions, expected, set(self.pool), self.ds, self.annotated_boxes(r - 1))

    def stage_annotate(self, r: int, allow_open: bool = False) -> Waiting | None:
        """The oracle writes the round's training labels (or the round waits for people); commit them."""
        t0 = time.perf_counter()
        result = self.oracle.annotate(r, allow_open)
        if isinstance(result, Waiting):
            return result
        fault_point("annotate.before_commit", r)

        def record(conn: Any) -> None:
            for cid, (rel, sha) in result.label_files.items():
                self.state.add_label_file(conn, r, cid, rel, sha)
            for region_id, fg in result.fg_voxels.items():
                self.state.mark_annotated(conn, region_id, fg, result.annotated_by)
            for rid, c in result.costs.items():
                self.state.set_region_cost(conn, rid, c.corrected_voxels, c.strokes, c.prefill, result.annotated_by)

        self._commit_stage(r, "annotate", t0, result.detail, record)
        if result.closed:
            log.warning("round %d: %d regions closed without labels: %s", r, len(result.closed), result.closed)
        return None

    def training_cases(self, r: int) -> dict[str, TrainingCase]:
        files = self.state.latest_label_files(r)
        return {cid: TrainingCase(tuple(self.ds.image_files(cid)), self.dir / rel) for cid, rel in files.items()}

    def stage_train(self, r: int) -> None:
        t0 = time.perf_counter()
        cases = self.training_cases(r)
        if r == 0:  # the backend plans once (a backend that has planned returns at once)
            name = {"nnunet": "nnU-Net"}.get(self.backend.name, self.backend.name)
            self.progress.update(0.0, detail=f"planning {name}", force=True)
            say(f"round {r}: planning {name} from {len(cases)} cases…")
            self._prepare_backend(cases)
        init = self.model_dir(r - 1) if r > 0 else None
        extra: dict[str, Any] = {}
        u = self.cfg.uncertainty
        if u.source == "ensemble" and u.ensemble == "folds":  # only then: backends without the argument still work
            extra["case_classes"] = annotated_case_classes(self.state, cases, r)
        display = self.progress.training_display(r)
        if accepts(self.backend.train, "progress"):
            extra["progress"] = display
        self.progress.update(0.0, detail="starting", force=True)
        try:
            result = self.backend.train(
                cases, self.model_dir(r), seed=self.cfg.seed * 1000 + r, init_from=init, **extra
            )
        finally:
            display.close()
        fault_point("train.before_commit", r)
        self._commit_stage(
            r,
            "train",
            t0,
            {
                "n_cases": len(cases),
                "train_seconds": result.seconds,
                "model_dir": str(result.model_dir.relative_to(self.dir)),
            },
        )
        log.info("round %d: trained on %d cases in %.1f s", r, len(cases), time.perf_counter() - t0)

    def _prepare_backend(self, cases: dict[str, TrainingCase]) -> None:
        """Plan once from the starting data; planning labels carry background instead of the ignore value."""
        planning = write_planning_labels(self.dir / "nnunet" / "planning_labels", cases, self.ds, self.ignore_value)
        self.backend.prepare(planning, self.ds.labels, self.ignore_value)

    def stage_evaluate(self, r: int) -> None:
        t0 = time.perf_counter()
        stop = StopSetRound(self.dir, self.state, self.cfg, self.pool, r, self.ds.foreground_labels)
        cases = [*self.test, *stop.case_ids]
        preds = self.backend.predict(self.model_dir(r), cases) if cases else iter(())
        per_case = []
        for pred in stop.take(self.progress.track(preds, len(cases), f"round {r}: evaluate", "evaluating")):
            seg = np.argmax(pred.probs.mean(axis=0), axis=0)
            gt = self.ground_truth(pred.case_id)
            geo = self.ds.geometry(pred.case_id)
            m = evaluate_case(seg, gt, self.ds.foreground_labels, geo.spacing, self.cfg.slice_axis)
            m["case_id"] = pred.case_id
            per_case.append(m)
            fault_point("evaluate.predicting", r)
        detail = {"stopping": stop.finish()}
        if not self.test:  # a dataset without any label (people annotate it): nothing to evaluate on
            self._commit_stage(r, "evaluate", t0, {"skipped": "no held-out cases with labels", **detail})
            return
        self.progress.timing["evaluate_seconds_per_case"] = (time.perf_counter() - t0) / len(cases)
        summary = summarise_cases(per_case)
        summary["cost"] = self.cost(r)
        summary["round"] = r
        write_json_atomic(self.round_dir(r) / "evaluation.json", json_safe({"summary": summary, "cases": per_case}))
        self._commit_stage(r, "evaluate", t0, detail, lambda conn: self.state.set_metrics(conn, r, json_safe(summary)))
        log.info(
            "round %d: held-out Dice %.3f (%s)",
            r,
            summary["dice_mean"],
            {k: round(v, 3) for k, v in summary["dice_per_class"].items() if v == v},
        )

    def cost(self, r: int) -> dict[str, Any]:
        """The annotation cost up to round ``r``, counted in the training labels the oracle wrote."""
        return annotation_cost(self.dir, self.state, self.ds, self.cfg.slice_axis, r)

    # ------------------------------------------------------------ driver
    def run(self, allow_open: bool = False, until_round: int | None = None) -> Waiting | None:
        """Run every stage not done yet (``until_round``: of the rounds up to that one only). With the human
        oracle, stop at the first round whose regions wait for labels and return it (``allow_open``: go on with
        the labelled regions of that round, closing its open ones; a round queried in this call always waits)."""
        last = self.cfg.rounds if until_round is None else min(self.cfg.rounds, until_round + 1)
        for r in range(last):
            for stage in STAGES:
                if self.state.stage_done(r, stage):
                    continue
                if stage == "evaluate" and (r % self.cfg.evaluate_every) and r != self.cfg.rounds - 1:
                    continue
                log.info("round %d: %s", r, stage)
                with self.progress.stage(r, stage):  # progress.json, removed once committed (or failed)
                    if stage == "annotate":
                        waiting = self.stage_annotate(r, allow_open)
                        if waiting is not None:
                            log.info("round %d: %d regions wait for labels", r, len(waiting.open_regions))
                            return waiting
                        allow_open = False  # it closes the round that was waiting, never a new one
                        continue
                    getattr(self, f"stage_{stage}")(r)
                if stage == "evaluate":
                    self.progress.announce_remaining_estimate(
                        r, self.strategy.needs.probabilities, self.query_samples(), len(self.pool), len(self.test)
                    )
        return None
