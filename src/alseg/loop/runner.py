"""The active-learning loop: split, starting budget, train, predict, score, select, annotate, evaluate.

One experiment is one directory::

    config.yaml          the complete, resolved configuration
    alseg.sqlite         rounds, stages, regions, label files, metrics (see ``state.py``)
    alseg.log            the log
    nnunet/              the backend's frozen plans
    rounds/NNN/          query.json, labels/ (partial labels of the cases changed this round),
                         model/ (the trained model), evaluation.json; with the human oracle also
                         to_annotate/ (the work package) and imported/ (the annotators' files)

Round ``r`` runs the stages ``query`` (round 0: the starting budget; later: the strategy, using the model of
round ``r - 1``), ``annotate`` (the oracle fills the regions), ``train`` and ``evaluate``. Each stage
commits in one transaction after its files are complete, so an interrupted run resumes at the first
stage that is not done, with no region lost or duplicated.

With ``oracle: human`` (see ``alseg.oracle.files``) the annotate stage exports the round's work package and
the run stops until ``alseg import`` has recorded labels for every region of the round.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from alseg import __version__
from alseg.backends.base import SegmentationBackend, TrainingCase, TrainingProgress
from alseg.backends.nnunet.profiles import get_profile
from alseg.config import DEFAULT_SAMPLES, ConfigError, ExperimentConfig, Schedule, dump_config, load_config
from alseg.data.dataset import Dataset, load_dataset, split_holdout, validate_dataset
from alseg.data.labels import partial_label, write_label_nifti
from alseg.data.regions import Region, annotated_mask, default_region_size, default_slice_axis, unit_box_size
from alseg.evaluation.metrics import CostAccumulator, evaluate_case, json_safe, summarise_cases
from alseg.loop.state import ExperimentState, experiment_lock
from alseg.strategies.base import NotEnoughCandidatesError, PoolView, QueryContext, Strategy
from alseg.strategies.registry import get_strategy
from alseg.strategies.starting import starting_budget

if TYPE_CHECKING:
    from alseg.oracle.files import Waiting

CONFIG_FILE = "config.yaml"
DB_FILE = "alseg.sqlite"
LOG_FILE = "alseg.log"
PROGRESS_FILE = "progress.json"  # the stage running now (see StageProgress); absent between runs
STAGES = ("query", "annotate", "train", "evaluate")

log = logging.getLogger("alseg")

KILL_ENV = "ALSEG_KILL_AT"


def fault_point(name: str, round_index: int) -> None:
    """Crash-safety testing hook: SIGKILL this process at ``name`` when ``ALSEG_KILL_AT`` names it.

    ``ALSEG_KILL_AT="query.before_commit:1"`` kills the process just before round 1's query commits. Tests
    use it to prove that a kill at any point leaves a resumable experiment; it does nothing otherwise.
    """
    target = os.environ.get(KILL_ENV)
    if target and target == f"{name}:{round_index}":
        os.kill(os.getpid(), signal.SIGKILL)


class ExperimentError(RuntimeError):
    """The experiment cannot be created or continued; the message says why."""


# --------------------------------------------------------------------------- config resolution
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
def create_experiment(cfg: ExperimentConfig, exp_dir: Path) -> ExperimentConfig:
    """Validate everything, then create ``exp_dir`` atomically. Nothing is written on bad input."""
    exp_dir = Path(exp_dir)
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise ExperimentError(f"{exp_dir} exists and is not an alseg experiment (no {CONFIG_FILE})")
    ds = load_dataset(cfg.dataset, require_labels=False)
    human = cfg.oracle == "human" or not any(ds.has_label(c) for c in ds.case_ids)
    if not human:
        ds = load_dataset(cfg.dataset)
    validate_dataset(ds)
    strategy = get_strategy(cfg.strategy, cfg.strategy_params)  # unknown name or parameter: error now
    check_uncertainty(cfg, strategy)
    if human and strategy.needs.ground_truth:
        raise ConfigError(
            f"invalid config: strategy {cfg.strategy!r} reads the ground truth (a simulation baseline), but "
            "the oracle is human; choose a strategy that needs no ground truth, e.g. random or entropy"
        )
    cfg = resolve_config(cfg, ds)
    if human:
        from alseg.oracle.files import human_split

        pool, test = human_split(ds, cfg.holdout_fraction, cfg.split_seed)
    else:
        pool, test = split_holdout(ds.case_ids, cfg.holdout_fraction, cfg.split_seed)
    start_regions = None
    if cfg.starting_regions is not None:
        from alseg.oracle.files import load_starting_regions

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
    pool_fg: dict[str, int] = defaultdict(int)
    for cid in pool if not human else ():  # the human oracle's pool has no ground truth to count
        gt = ds.read_label(cid)
        for lab in ds.foreground_labels:
            pool_fg[str(lab)] += int(np.count_nonzero(gt == lab))

    parent = exp_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{exp_dir.name}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(dump_config(cfg))
        state = ExperimentState(tmp / DB_FILE)
        with state.transaction() as conn:
            state.set_split(conn, pool, test)
            state.set_meta(conn, "pool_fg_voxels", json.dumps(dict(pool_fg)))
            state.set_meta(conn, "alseg_version", __version__)
            if start_regions is not None:
                from alseg.oracle.files import regions_to_json

                state.set_meta(conn, "starting_regions", regions_to_json(start_regions))
        state.close()
        if exp_dir.exists():
            exp_dir.rmdir()  # empty, checked above
        os.rename(tmp, exp_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg


def open_or_create(cfg: ExperimentConfig | None, exp_dir: Path) -> ExperimentConfig:
    """Resume ``exp_dir`` if it is an experiment, else create it.

    On resume, every key that ``cfg`` sets must equal the stored one; keys it leaves out take the stored
    values (the experiment's resolved defaults, whatever alseg's defaults are today).
    """
    exp_dir = Path(exp_dir)
    stored_path = exp_dir / CONFIG_FILE
    if stored_path.exists():
        stored = load_config(stored_path)
        if stored.schedule is None:
            stored = _store_recovered_schedule(exp_dir, stored)
        if cfg is not None:
            ds = load_dataset(cfg.dataset, require_labels=False)
            wanted = resolve_config(cfg, ds)
            diff = {
                k: (getattr(stored, k), getattr(wanted, k))
                for k in ExperimentConfig.model_fields
                if k in cfg.model_fields_set and getattr(stored, k) != getattr(wanted, k)
            }
            if diff:
                lines = ", ".join(f"{k}: stored {a!r} vs given {b!r}" for k, (a, b) in diff.items())
                raise ExperimentError(
                    f"{exp_dir} was created with a different config ({lines}); use another --out directory"
                )
        return stored
    if cfg is None:
        raise ExperimentError(f"{exp_dir} is not an alseg experiment (no {CONFIG_FILE})")
    return create_experiment(cfg, exp_dir)


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
    _write_text_atomic(exp_dir / CONFIG_FILE, dump_config(cfg))
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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the loop
@dataclass
class StageTimer:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def _peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024.0


BackendFactory = Callable[[ExperimentConfig, Dataset, Path], SegmentationBackend]

#: training iterations timed before ``alseg run`` estimates how long the experiment trains
ESTIMATE_AFTER_ITERATIONS = 20


def say(message: str) -> None:
    """One line on the terminal (stderr, above any progress bar) and in ``alseg.log``."""
    tqdm.write(message, file=sys.stderr)
    log.info(message)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (backends written before it existed do not)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def format_minutes(seconds: float) -> str:
    """``7.5 min`` below ten minutes, ``42 min`` above, ``3 h 05 min`` from three hours."""
    minutes = seconds / 60.0
    if minutes < 10:
        return f"{minutes:.1f} min"
    if minutes < 180:
        return f"{minutes:.0f} min"
    h, m = divmod(round(minutes), 60)
    return f"{h} h {m:02d} min"


class StageProgress:
    """``progress.json`` at the experiment root while a stage runs: what ``alseg status`` shows as running.

    ``{pid, round, stage, detail, started_at, fraction, eta_seconds, updated_at}`` (times in UTC, ISO 8601),
    rewritten atomically at most every ``interval`` seconds (and at every ``force``); :meth:`close` removes it
    once the stage has committed or failed. A file left by a killed run is not shown as running: ``alseg
    status`` shows it only while the experiment lock is held by the process ``pid``.
    """

    def __init__(self, exp_dir: Path, r: int, stage: str, interval: float = 1.0) -> None:
        self.path = Path(exp_dir) / PROGRESS_FILE
        self.round, self.stage = r, stage
        self.started_at = time.time()
        self.t0 = time.perf_counter()
        self.interval = interval
        self.fraction = 0.0
        self.eta_seconds: float | None = None
        self.detail: str | None = None
        self._last = float("-inf")
        self.write()

    def update(
        self, fraction: float, eta_seconds: float | None = None, detail: str | None = None, force: bool = False
    ) -> None:
        """``fraction`` of the stage done; ``eta_seconds`` left (default: from the time so far)."""
        self.fraction = min(max(float(fraction), 0.0), 1.0)
        if eta_seconds is None and self.fraction > 0:
            elapsed = time.perf_counter() - self.t0
            eta_seconds = elapsed * (1.0 - self.fraction) / self.fraction
        self.eta_seconds = eta_seconds
        if detail is not None:
            self.detail = detail
        if force or time.perf_counter() - self._last >= self.interval:
            self.write()

    def write(self) -> None:
        self._last = time.perf_counter()
        data = {
            "pid": os.getpid(),
            "round": self.round,
            "stage": self.stage,
            "detail": self.detail,
            "started_at": _utc(self.started_at),
            "fraction": round(self.fraction, 4),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "updated_at": _utc(time.time()),
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def training_iterations(cfg: ExperimentConfig, from_round: int = 0) -> list[int]:
    """Training iterations of each round from ``from_round`` on under ``cfg``'s schedule, ensemble members
    counted: round 0 (and every round that is not warm-started) trains ``first_round_epochs`` (else
    ``epochs``), warm-started rounds ``epochs``, each of ``iterations_per_epoch``."""
    sched = cfg.schedule or get_profile(cfg.profile if cfg.profile != "auto" else "cpu").schedule
    u = cfg.uncertainty
    members = int(u.n_samples or 1) if u.source == "ensemble" else 1
    first = sched.first_round_epochs or sched.epochs
    out = []
    for r in range(from_round, cfg.rounds):
        epochs = sched.epochs if (r > 0 and sched.warm_start) else first
        out.append(epochs * sched.iterations_per_epoch * members)
    return out


class _TrainingDisplay:
    """The train stage's progress reports as a terminal bar, ``alseg.log`` lines per epoch and progress.json.

    The bar ("round r: train", iterations done / total over all ensemble members, tqdm's ETA; postfix epoch,
    loss, pseudo-Dice, member) is made at the first report and closed by :meth:`close`. Once per run, after
    :data:`ESTIMATE_AFTER_ITERATIONS` timed iterations of the first model, the experiment's training time is
    estimated (:meth:`Experiment.announce_training_estimate`).
    """

    def __init__(self, exp: Experiment, r: int) -> None:
        self.exp, self.r = exp, r
        self.bar: Any = None
        self.spi: float | None = None

    def __call__(self, p: TrainingProgress) -> None:
        total = max(1, p.iterations * p.members)
        done = min(total, p.member * p.iterations + p.iteration)
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"round {self.r}: train", unit="it", leave=False, dynamic_ncols=True)
        epoch = p.epochs if p.iteration >= p.iterations else min(p.epoch + 1, p.epochs)
        postfix = {"epoch": f"{epoch}/{p.epochs}"}
        if p.members > 1:
            postfix["model"] = f"{p.member + 1}/{p.members}"
        if p.loss is not None:
            postfix["loss"] = f"{p.loss:.3f}"
        if p.pseudo_dice is not None:
            postfix["pseudo-Dice"] = f"{p.pseudo_dice:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        else:  # an epoch end after its last iteration's report: new loss and pseudo-Dice, same count
            self.bar.refresh()
        if p.epoch_end:
            member = f" (model {p.member + 1}/{p.members})" if p.members > 1 else ""
            loss = "-" if p.loss is None else f"{p.loss:.4f}"
            dice = "-" if p.pseudo_dice is None else f"{p.pseudo_dice:.3f}"
            per_epoch = "" if p.epoch_seconds is None else f", {p.epoch_seconds:.1f} s/epoch"
            line = (
                f"round {self.r}: train epoch {p.epoch}/{p.epochs}{member}: loss {loss}, pseudo-Dice {dice}{per_epoch}"
            )
            log.info(line)
        if p.seconds_per_iteration is not None:
            self.spi = p.seconds_per_iteration
        eta = None
        if self.spi is not None:
            eta = (total - done) * self.spi + (p.members - 1 - p.member) * (p.setup_seconds or 0.0)
        detail = f"epoch {epoch}/{p.epochs}" + (f", model {p.member + 1}/{p.members}" if p.members > 1 else "")
        self.exp.progress_update(done / total, eta, detail, force=p.epoch_end)
        if p.member == 0 and p.iteration >= min(ESTIMATE_AFTER_ITERATIONS, p.iterations) and p.iteration > 0:
            self.exp.announce_training_estimate(self.r, p)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_backend(cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> SegmentationBackend:
    from alseg.backends.nnunet import make_backend

    return make_backend(cfg, ds, exp_dir / "nnunet")


class Experiment:
    """A running experiment: the dataset, its state and the backend."""

    def __init__(self, exp_dir: Path, cfg: ExperimentConfig, backend_factory: BackendFactory = default_backend) -> None:
        self.dir = Path(exp_dir).resolve()
        self.cfg = cfg
        self.human = cfg.oracle == "human"
        self.ds = load_dataset(cfg.dataset, require_labels=not self.human)
        self.state = ExperimentState(self.dir / DB_FILE)
        self.pool, self.test = self.state.split()
        self.strategy: Strategy = get_strategy(cfg.strategy, cfg.strategy_params)
        self.ignore_value = max(self.ds.labels) + 1
        self._backend_factory = backend_factory
        self._backend: SegmentationBackend | None = None
        self._gt_cache: dict[str, np.ndarray] = {}
        self._progress: StageProgress | None = None  # the stage running now (progress.json)
        self._timing: dict[str, float] = {}  # measured this run: s/iteration, start-up per training, s/case
        self._estimated = False

    @property
    def backend(self) -> SegmentationBackend:
        if self._backend is None:
            self._backend = self._backend_factory(self.cfg, self.ds, self.dir)
        return self._backend

    def round_dir(self, r: int) -> Path:
        return self.dir / "rounds" / f"{r:03d}"

    def model_dir(self, r: int) -> Path:
        return self.round_dir(r) / "model"

    # ------------------------------------------------------------ helpers
    def box_sizes(self) -> dict[str, tuple[int, ...]]:
        return {
            cid: unit_box_size(self.cfg.unit, self.ds.geometry(cid).shape, self.cfg.region_size, self.cfg.slice_axis)
            for cid in self.pool
        }

    def ground_truth(self, case_id: str) -> np.ndarray:
        if case_id not in self._gt_cache:
            if len(self._gt_cache) > 512:
                self._gt_cache.clear()
            self._gt_cache[case_id] = self.ds.read_label(case_id)
        return self._gt_cache[case_id]

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
        return PoolView(
            case_ids=list(self.pool),
            shapes=shapes,
            box_sizes=self.box_sizes(),
            stride=tuple(self.cfg.stride or ()),
            foreground_labels=tuple(self.ds.foreground_labels),
            annotated=lambda cid: annotated_mask(shapes[cid], boxes.get(cid, [])),
            annotated_class_voxels=dict(class_voxels),
            # only to the strategies that declare they read it (and to the starting budget, round 0)
            ground_truth=self.ground_truth if not self.human and (r == 0 or self.strategy.needs.ground_truth) else None,
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
            self.state.mark_stage(conn, r, stage, time.perf_counter() - t0, _peak_rss_mb(), detail)

    # ------------------------------------------------------------ progress
    def progress_update(
        self, fraction: float, eta_seconds: float | None = None, detail: str | None = None, force: bool = False
    ) -> None:
        """The running stage's share done (and seconds left) for ``progress.json``; nothing outside ``run``."""
        if self._progress is not None:
            self._progress.update(fraction, eta_seconds, detail, force)

    def _track(self, items: Any, total: int, desc: str, what: str) -> Iterator[Any]:
        """``items`` with a terminal bar (``desc``, cases done / ``total``, ETA) and progress.json updates."""
        bar = tqdm(items, total=total, desc=desc, unit="case", leave=False, dynamic_ncols=True)
        try:
            for i, item in enumerate(bar, 1):
                yield item
                self.progress_update(i / max(total, 1), detail=f"{what}, {i}/{total} cases")
        finally:
            bar.close()

    def announce_training_estimate(self, r: int, p: TrainingProgress) -> None:
        """Once per run, from the first timed iterations: how long training the (rest of the) experiment takes."""
        if self._estimated or not p.iteration:
            return
        self._estimated = True
        spi = p.seconds / p.iteration
        setup = p.setup_seconds or 0.0
        self._timing.update(seconds_per_iteration=spi, setup_seconds=setup)
        iters = training_iterations(self.cfg, r)
        trainings = len(iters) * p.members
        total = spi * sum(iters) + setup * trainings
        last = self.cfg.rounds - 1
        scope = f"round {r}" if r == last else f"rounds {r}-{last}"
        if r == 0:
            scope = f"the whole experiment ({len(iters)} round{'s' if len(iters) > 1 else ''})"
        if len(iters) > 1 and len(set(iters[1:])) == 1:
            counted = f"{iters[0]} + {len(iters) - 1} × {iters[1]}"
        else:
            counted = " + ".join(map(str, iters))
        models = f" ({p.members} models a round)" if p.members > 1 else ""
        start = f", plus {setup:.0f} s to start each of {trainings} trainings" if setup >= 0.5 else ""
        say(
            f"round {r}: estimated training time of {scope}: {format_minutes(total)} "
            f"({counted} iterations{models} at {spi:.2f} s each{start}); predicting the pool and evaluating "
            "come on top"
        )

    def announce_remaining_estimate(self, r: int) -> None:
        """After the first evaluation of a run that also timed training: the remaining rounds, prediction and
        evaluation included (scoring and selecting not)."""
        per_case = self._timing.get("evaluate_seconds_per_case")
        spi = self._timing.get("seconds_per_iteration")
        if per_case is None or spi is None or self._timing.get("remaining_announced") or r >= self.cfg.rounds - 1:
            return
        self._timing["remaining_announced"] = 1.0
        rounds = range(r + 1, self.cfg.rounds)
        u = self.cfg.uncertainty
        members = int(u.n_samples or 1) if u.source == "ensemble" else 1
        train = spi * sum(training_iterations(self.cfg, r + 1))
        train += self._timing.get("setup_seconds", 0.0) * len(rounds) * members
        parts = [f"training {format_minutes(train)}"]
        predict = 0.0
        samples = 1
        if self.strategy.needs.probabilities:  # evaluation predicts one sample (an ensemble: every member)
            if u.source in ("mc_dropout", "tta"):
                samples = max(u.n_samples or 1, self.strategy.needs.min_samples)
            predict = per_case * samples * len(self.pool) * len(rounds)
            parts.append(f"predicting the pool {format_minutes(predict)}")
        evaluated = [q for q in rounds if not (q % self.cfg.evaluate_every) or q == self.cfg.rounds - 1]
        evaluate = per_case * len(self.test) * len(evaluated)
        if evaluate:
            parts.append(f"evaluating {format_minutes(evaluate)}")
        rate = f" at {per_case:.1f} s per case" + (f" and sample ({samples} samples)" if samples > 1 else "")
        scope = f"round {r + 1}" if r + 1 == self.cfg.rounds - 1 else f"rounds {r + 1}-{self.cfg.rounds - 1}"
        say(
            f"round {r}: estimated time of {scope}: {format_minutes(train + predict + evaluate)} "
            f"({', '.join(parts)}{rate if len(parts) > 1 else ''}); scoring and selecting regions come on top"
        )

    # ------------------------------------------------------------ stages
    def stage_query(self, r: int) -> None:
        t0 = time.perf_counter()
        key = "starting_budget" if r == 0 else self.strategy.key
        predictions = None
        if r > 0 and self.strategy.needs.probabilities:
            model = self.model_dir(r - 1)
            # the stored K; experiments created before K was resolved at creation stored 1 for every source
            n_samples = max(self.cfg.uncertainty.n_samples or 1, self.strategy.needs.min_samples)

            def predictions() -> Iterator[Any]:
                it = self.backend.predict(
                    model,
                    self.pool,
                    n_samples=n_samples,
                    with_features=self.strategy.needs.features,
                    seed=self.cfg.seed * 1000 + r,
                )
                yield from self._track(it, len(self.pool), f"round {r}: predict pool", "predicting the pool")

        gradients = None
        if r > 0 and self.strategy.needs.gradients:
            gradients = self.backend.gradient_embedder(
                self.model_dir(r - 1), layers=self.strategy.needs.gradient_layers
            )
        ctx = QueryContext(
            pool=self.pool_view(r, predictions, gradients),
            query_size=self.cfg.query_size if r > 0 else self.cfg.starting_size,
            round_index=r,
            n_rounds=self.cfg.rounds,
            seed=self.cfg.seed,
            strategy_key=key,
            n_per_case=self.cfg.n_per_case,
        )
        given = self.state.get_meta("starting_regions") if r == 0 else None
        try:
            if given is not None:  # regions from the config's starting_regions file
                from alseg.oracle.files import regions_from_json

                regions = regions_from_json(given)
            elif r == 0 and self.human:  # no ground truth to cover the classes: uniform random boxes
                from alseg.strategies.random import RandomStrategy

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
        _write_json_atomic(
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
        if len(regions) != expected:
            raise ExperimentError(f"round {r}: strategy returned {len(regions)} regions, expected {expected}")
        boxes = self.annotated_boxes(r - 1)
        pool = set(self.pool)
        for g in regions:
            if g.case_id not in pool:
                raise ExperimentError(f"round {r}: region in case {g.case_id!r}, which is not in the pool")
            if not g.box.inside(self.ds.geometry(g.case_id).shape):
                raise ExperimentError(f"round {r}: region {g.box} lies outside case {g.case_id}")
            clash = [b for b in boxes.get(g.case_id, []) if b.overlaps(g.box)]
            if clash:
                raise ExperimentError(f"round {r}: region {g.box} of {g.case_id} overlaps annotated {clash[0]}")
            boxes[g.case_id].append(g.box)

    def stage_annotate(self, r: int) -> None:
        """Simulated oracle: the ground truth inside the round's regions, the ignore value elsewhere."""
        t0 = time.perf_counter()
        chosen = self.state.regions(round_index=r)
        boxes = self.annotated_boxes(r)
        label_dir = self.round_dir(r) / "labels"
        changed = sorted({sr.region.case_id for sr in chosen})
        files: dict[str, str] = {}
        fg_counts: dict[int, dict[str, int]] = {}
        for cid in self._track(changed, len(changed), f"round {r}: annotate", "annotating"):
            gt = self.ground_truth(cid)
            mask = annotated_mask(gt.shape, boxes[cid])
            path = label_dir / f"{cid}.nii.gz"
            files[cid] = write_label_nifti(path, partial_label(gt, mask, self.ignore_value), self.ds.geometry(cid))
            for sr in chosen:
                if sr.region.case_id == cid:
                    sel = gt[sr.region.box.slices()]
                    fg_counts[sr.id] = {
                        str(lab): int(np.count_nonzero(sel == lab)) for lab in self.ds.foreground_labels
                    }

        def record(conn: Any) -> None:
            for cid, sha in files.items():
                self.state.add_label_file(conn, r, cid, str((label_dir / f"{cid}.nii.gz").relative_to(self.dir)), sha)
            for sr in chosen:
                self.state.mark_annotated(conn, sr.id, fg_counts[sr.id], "simulated")

        fault_point("annotate.before_commit", r)
        self._commit_stage(r, "annotate", t0, {"cases": len(changed)}, record)

    def training_cases(self, r: int) -> dict[str, TrainingCase]:
        files = self.state.latest_label_files(r)
        return {cid: TrainingCase(tuple(self.ds.image_files(cid)), self.dir / rel) for cid, rel in files.items()}

    def stage_train(self, r: int) -> None:
        t0 = time.perf_counter()
        cases = self.training_cases(r)
        if r == 0:  # the backend plans once (a backend that has planned returns at once)
            name = {"nnunet": "nnU-Net"}.get(self.backend.name, self.backend.name)
            self.progress_update(0.0, detail=f"planning {name}", force=True)
            say(f"round {r}: planning {name} from {len(cases)} cases…")
            self._prepare_backend(cases)
        init = self.model_dir(r - 1) if r > 0 else None
        extra: dict[str, Any] = {}
        u = self.cfg.uncertainty
        if u.source == "ensemble" and u.ensemble == "folds":  # only then: backends without the argument still work
            # the classes in each case's annotated voxels, background included as nnActive counts it, for its
            # folds (each class in at least two)
            case_classes: dict[str, set[int]] = {cid: set() for cid in cases}
            for sr in self.state.regions(max_round=r, status="annotated"):
                if sr.region.case_id in case_classes:
                    counts = {int(lab): int(n) for lab, n in (sr.fg_voxels or {}).items()}
                    found = {lab for lab, n in counts.items() if n > 0}
                    if sr.region.box.n_voxels > sum(counts.values()):
                        found.add(0)
                    case_classes[sr.region.case_id] |= found
            extra["case_classes"] = case_classes
        display = _TrainingDisplay(self, r)
        if _accepts(self.backend.train, "progress"):
            extra["progress"] = display
        self.progress_update(0.0, detail="starting", force=True)
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
        plan_dir = self.dir / "nnunet" / "planning_labels"
        planning: dict[str, TrainingCase] = {}
        for cid, case in cases.items():
            if self.human:  # the annotators' labels: the ignore value becomes background
                from alseg.oracle.files import read_label_array

                lab = read_label_array(case.label)
                path = plan_dir / f"{cid}.nii.gz"
                planning_label = np.where(lab == self.ignore_value, 0, lab).astype(np.uint8)
                write_label_nifti(path, planning_label, self.ds.geometry(cid))
                planning[cid] = TrainingCase(case.images, path)
                continue
            gt = self.ground_truth(cid)
            mask = annotated_mask(gt.shape, self.annotated_boxes(0)[cid])
            path = plan_dir / f"{cid}.nii.gz"
            write_label_nifti(path, np.where(mask, gt, 0).astype(np.uint8), self.ds.geometry(cid))
            planning[cid] = TrainingCase(case.images, path)
        self.backend.prepare(planning, self.ds.labels, self.ignore_value)

    def stage_evaluate(self, r: int) -> None:
        t0 = time.perf_counter()
        if not self.test:  # human oracle on a dataset without labels: nothing to evaluate on
            self._commit_stage(r, "evaluate", t0, {"skipped": "no held-out cases with labels"})
            return
        per_case = []
        preds = self.backend.predict(self.model_dir(r), self.test)
        for pred in self._track(preds, len(self.test), f"round {r}: evaluate", "evaluating"):
            seg = np.argmax(pred.probs.mean(axis=0), axis=0)
            gt = self.ground_truth(pred.case_id)
            geo = self.ds.geometry(pred.case_id)
            m = evaluate_case(seg, gt, self.ds.foreground_labels, geo.spacing, self.cfg.slice_axis)
            m["case_id"] = pred.case_id
            per_case.append(m)
            fault_point("evaluate.predicting", r)
        self._timing["evaluate_seconds_per_case"] = (time.perf_counter() - t0) / len(self.test)
        summary = summarise_cases(per_case)
        summary["cost"] = self.cost(r)
        summary["round"] = r
        _write_json_atomic(self.round_dir(r) / "evaluation.json", json_safe({"summary": summary, "cases": per_case}))
        self._commit_stage(r, "evaluate", t0, None, lambda conn: self.state.set_metrics(conn, r, json_safe(summary)))
        log.info(
            "round %d: held-out Dice %.3f (%s)",
            r,
            summary["dice_mean"],
            {k: round(v, 3) for k, v in summary["dice_per_class"].items() if v == v},
        )

    def cost(self, r: int) -> dict[str, Any]:
        pool_fg = {int(k): v for k, v in json.loads(self.state.get_meta("pool_fg_voxels") or "{}").items()}
        acc = CostAccumulator(self.ds.foreground_labels, pool_fg or None, self.cfg.slice_axis)
        if self.human:  # only labelled regions count; foreground from the annotators' labels
            from alseg.oracle.files import read_label_array

            labelled: dict[str, list] = defaultdict(list)
            for sr in self.state.regions(max_round=r, status="annotated"):
                labelled[sr.region.case_id].append(sr.region.box)
            files = self.state.latest_label_files(r)
            for cid, bs in labelled.items():
                lab = read_label_array(self.dir / files[cid])
                acc.add_case(cid, annotated_mask(lab.shape, bs), lab)
            return acc.result(sum(len(b) for b in labelled.values()))
        boxes = self.annotated_boxes(r)
        for cid, bs in boxes.items():
            gt = self.ground_truth(cid)
            acc.add_case(cid, annotated_mask(gt.shape, bs), gt)
        return acc.result(sum(len(b) for b in boxes.values()))

    # ------------------------------------------------------------ driver
    def run(self, allow_open: bool = False) -> Waiting | None:
        """Run every stage not done yet. With the human oracle, stop at the first round whose regions wait for
        labels and return it (``allow_open``: go on with the labelled regions of that round, closing its open
        ones; a round queried in this call always waits)."""
        for r in range(self.cfg.rounds):
            for stage in STAGES:
                if self.state.stage_done(r, stage):
                    continue
                if stage == "evaluate" and (r % self.cfg.evaluate_every) and r != self.cfg.rounds - 1:
                    continue
                log.info("round %d: %s", r, stage)
                progress = self._progress = StageProgress(self.dir, r, stage)  # removed once committed (or failed)
                try:
                    if stage == "annotate" and self.human:
                        from alseg.oracle.files import finish_annotation

                        waiting = finish_annotation(self, r, allow_open)
                        if waiting is not None:
                            log.info("round %d: %d regions wait for labels", r, len(waiting.open_regions))
                            return waiting
                        allow_open = False  # it closes the round that was waiting, never a new one
                        continue
                    getattr(self, f"stage_{stage}")(r)
                finally:
                    progress.close()
                    self._progress = None
                if stage == "evaluate":
                    self.announce_remaining_estimate(r)
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _TerminalHandler(logging.Handler):
    """Log records on stderr through ``tqdm.write``, so that a warning never garbles a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


class _Handlers(logging.Handler):
    """The experiment's log file (everything) and the terminal (warnings), attached and closed together."""

    def __init__(self, exp_dir: Path) -> None:
        super().__init__()
        self.file = logging.FileHandler(Path(exp_dir) / LOG_FILE)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.terminal = _TerminalHandler()
        self.terminal.setLevel(logging.WARNING)
        self.terminal.setFormatter(logging.Formatter("warning: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.file.handle(record)
        if record.levelno >= self.terminal.level:
            self.terminal.handle(record)

    def close(self) -> None:
        self.file.close()
        super().close()


def setup_logging(exp_dir: Path) -> logging.Handler:
    """Attach the experiment's log file (and warnings on the terminal) to the ``alseg`` logger."""
    handler = _Handlers(exp_dir)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def advance_experiment(
    exp_dir: Path, allow_open: bool = False, backend_factory: BackendFactory = default_backend
) -> Waiting | None:
    """``alseg query``: continue a human-oracle experiment up to the next round's exported work package.

    Trains on what is annotated, evaluates, queries the next round and exports its work package. Refuses
    (changing nothing) while regions of the waiting round are open, unless ``allow_open``. Returns the round
    now waiting for labels, or None when the experiment is complete.
    """
    exp_dir = Path(exp_dir)
    cfg = open_or_create(None, exp_dir)
    if cfg.oracle != "human":
        raise ExperimentError(f"{exp_dir} annotates from ground truth (oracle: simulated); use `alseg run` to continue")
    with experiment_lock(exp_dir):
        handler = setup_logging(exp_dir)
        try:
            exp = Experiment(exp_dir, cfg, backend_factory)
            try:
                waiting = exp.run(allow_open=allow_open)
            finally:
                exp.state.close()
        finally:
            log.removeHandler(handler)
            handler.close()
    if waiting is not None and not waiting.exported_now:
        shown = ", ".join(f"{rid} ({cid})" for rid, cid in waiting.open_regions[:20])
        more = len(waiting.open_regions) - min(20, len(waiting.open_regions))
        raise ExperimentError(
            f"round {waiting.round_index}: {len(waiting.open_regions)} of {waiting.n_regions} regions are still "
            f"open: {shown}{f' and {more} more' if more else ''}; import their labels with "
            f"`alseg import {exp_dir} LABELS_DIR`, or pass --allow-open to train on the labelled ones "
            "(the open regions are then closed unlabelled)"
        )
    return waiting


def run_experiment(
    cfg: ExperimentConfig | None, exp_dir: Path, backend_factory: BackendFactory = default_backend
) -> Path:
    """Create or resume the experiment in ``exp_dir`` and run it to its last round."""
    exp_dir = Path(exp_dir)
    cfg = open_or_create(cfg, exp_dir)
    with experiment_lock(exp_dir):
        run_logged(Experiment, exp_dir, cfg, backend_factory)
    return exp_dir


def run_logged(kind: type[Experiment], exp_dir: Path, cfg: ExperimentConfig, backend_factory: BackendFactory) -> None:
    """Run an experiment of class ``kind`` to its end with the log file attached (the caller holds the lock)."""
    handler = setup_logging(exp_dir)
    try:
        exp = kind(exp_dir, cfg, backend_factory)
        exp.run()
        exp.state.close()
    finally:
        log.removeHandler(handler)
        handler.close()
