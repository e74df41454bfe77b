"""Running a study: every cell one experiment, round 0 shared, resumable, versioned, ending with the report.

The study folder (``--out``)::

    study.json                 the study file's name and hash, and per run: the alseg version and commit of
                               every call that ran it (a run is never continued under another version unless
                               told to), when it finished and how long each call took
    runs/{setting}/round0/{signature}_seed{N}/   the base experiment: round 0 of a group of runs, trained once
    runs/{setting}/{strategy}/seed{N}/           one experiment per strategy and seed (forked from its base)
    runs/{setting}/full_data/                    the full-data reference of the setting
    report.html, tables/*.csv, figures/*.png     written at the end (and by ``--report-only``)

Runs of one setting and seed whose round 0 is the same (:func:`alseg.loop.fork.round0_signature`: everything but
the strategy and what only later rounds read) share one base experiment. A stopped study resumes: finished runs
are skipped, an unfinished one resumes at its first unfinished stage (the experiment's own resume), and a run
not yet created is forked from its base when the base has finished round 0.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alseg import __version__
from alseg.config import ConfigError, ExperimentConfig, load_config
from alseg.data.dataset import Dataset, load_dataset
from alseg.errors import AlsegError, ExperimentError
from alseg.loop.create import check_uncertainty, resolve_config
from alseg.loop.drivers import run_experiment
from alseg.loop.fork import fork_round0, round0_done, round0_signature
from alseg.loop.full_data import run_full_data
from alseg.loop.runner import BackendFactory, default_backend
from alseg.store.layout import CONFIG_FILE, DB_FILE, write_json_atomic
from alseg.store.state import ExperimentState
from alseg.strategies.registry import get_strategy
from alseg.study.spec import Cell, StudySpec, load_study

STUDY_FILE = "study.json"
COST_AXES = ("voxels", "fg_voxels", "corrected_voxels", "strokes")


class StudyError(AlsegError, RuntimeError):
    """A study cannot go on; the message says which run and why."""


@dataclass(frozen=True)
class StudyRun:
    """One cell of a study with its folders: the experiment and (active-learning runs) its round-0 base."""

    cell: Cell
    exp_dir: Path
    base_dir: Path | None

    @property
    def id(self) -> str:
        return self.cell.id


@dataclass
class StudyOutcome:
    """What a call of :func:`run_study` did."""

    total: int
    done_before: int
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def alseg_commit() -> str | None:
    """The git commit of the alseg source that runs (``+dirty`` when ``src`` has changes), or None when alseg
    was not installed from a git checkout."""
    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=normal", "--", "."],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def same_source(old: str | None, new: str | None) -> bool:
    """Whether two commits (:func:`alseg_commit`) hold the same alseg source (``src/alseg``): a commit that only
    changed documentation, tests or benchmarks runs the same code. A ``+dirty`` commit is never the same."""
    if not old or not new or old.endswith("+dirty") or new.endswith("+dirty"):
        return False  # uncommitted changes: which ones is unknown
    if old == new:
        return True
    src = Path(__file__).resolve().parents[1]
    try:
        diff = subprocess.run(
            ["git", "-C", str(src), "diff", "--quiet", old, new, "--", "."], capture_output=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return diff.returncode == 0


def plan_runs(cells: Sequence[Cell], out: Path) -> list[StudyRun]:
    """The folders of every cell: ``runs/{setting}/{strategy}/seed{N}``, and its base: an existing
    ``runs/{setting}/round0/*_seed{N}`` whose round 0 (:func:`round0_signature` of the resolved configs) is the
    cell's, else a new folder named by a hash of that signature. Bases are matched by content, not by name, so a
    study keeps its bases when a later alseg adds a config key (and with it a different hash)."""
    runs = []
    datasets: dict[Path, Dataset] = {}
    existing: dict[Path, dict[str, Any]] = {}
    for c in cells:
        root = Path(out) / "runs" / c.setting
        if c.is_reference:
            runs.append(StudyRun(c, root / c.name, None))
            continue
        data_root = Path(c.cfg.dataset).resolve()
        if data_root not in datasets:
            datasets[data_root] = load_dataset(data_root, require_labels=False)
        sig = round0_signature(resolve_config(c.cfg, datasets[data_root]))
        base = None
        for d in sorted((root / "round0").glob(f"*_seed{c.seed}")):
            if d not in existing and (d / CONFIG_FILE).is_file():
                existing[d] = round0_signature(load_config(d / CONFIG_FILE))
            if existing.get(d) == sig:
                base = d
                break
        if base is None:
            digest = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:10]
            base = root / "round0" / f"{digest}_seed{c.seed}"
        runs.append(StudyRun(c, root / c.name / f"seed{c.seed}", base))
    return runs


def check_cells(cells: Sequence[Cell]) -> None:
    """Each cell's strategy, parameters and uncertainty source, before any run starts (ConfigError names it)."""
    for c in cells:
        if c.is_reference:
            continue
        try:
            strategy = get_strategy(c.cfg.strategy, c.cfg.strategy_params)
        except ValueError as err:
            raise ConfigError(f"study cell {c.id}: {err}") from None
        try:
            check_uncertainty(c.cfg, strategy)
        except ConfigError as err:
            raise ConfigError(f"study cell {c.id}: {err}") from None


def _progress(exp_dir: Path, evaluate_every: int = 1, rounds: int = 1) -> tuple[int, dict[int, float]]:
    """``(rounds finished, seconds per round)`` of an experiment (0 and {} before it exists). A round is
    finished when its last stage committed: evaluate, or train in a round the config does not evaluate."""
    db = Path(exp_dir) / DB_FILE
    if not db.is_file() or not (Path(exp_dir) / CONFIG_FILE).is_file():
        return 0, {}
    state = ExperimentState(db)
    try:
        seconds: dict[int, float] = defaultdict(float)
        done: dict[int, set[str]] = defaultdict(set)
        for s in state.stages():
            if s["status"] == "done":
                seconds[s["round"]] += float(s["seconds"] or 0.0)
                done[s["round"]].add(s["stage"])
    finally:
        state.close()
    finished = 0
    while True:
        r = finished
        evaluated = r % evaluate_every == 0 or r == rounds - 1
        if not {"query", "annotate", "train", *(("evaluate",) if evaluated else ())} <= done.get(r, set()):
            break
        finished += 1
    return finished, dict(seconds)


def run_progress(run: StudyRun) -> tuple[int, int]:
    """``(rounds finished, rounds)`` of a study run (a reference has one round)."""
    cfg = run.cell.cfg
    rounds = 1 if run.cell.is_reference else cfg.rounds
    return _progress(run.exp_dir, cfg.evaluate_every, rounds)[0], rounds


def threads_backend(num_threads: int | None, factory: BackendFactory | None = None) -> BackendFactory:
    """``factory`` (default: the nnU-Net backend) with ``num_threads`` CPU threads (None: the config's)."""
    base = factory or default_backend
    if num_threads is None:
        return base

    def threaded(cfg: ExperimentConfig, ds: Any, exp_dir: Path) -> Any:
        return base(cfg.model_copy(update={"num_threads": num_threads}), ds, exp_dir)

    return threaded


def execute_run(
    run: StudyRun,
    num_threads: int | None = None,
    _base_ready: Any = None,
    *,
    backend_factory: BackendFactory | None = None,
) -> dict[str, Any]:
    """Run (or resume) one cell to its end: the reference, or the base's round 0 then the forked run. The task
    each executor runs; ``_base_ready``: a value the Ray executor makes the task wait for (its base task)."""
    factory = threads_backend(num_threads, backend_factory)
    t0 = time.perf_counter()
    if run.cell.is_reference:
        run_full_data(run.cell.cfg, run.exp_dir, factory)
    else:
        assert run.base_dir is not None
        if not (run.exp_dir / CONFIG_FILE).exists():
            run_base(run, num_threads, backend_factory=backend_factory)
            fork_round0(run.base_dir, run.exp_dir, run.cell.cfg)
        run_experiment(run.cell.cfg, run.exp_dir, factory, dataset=Path(run.cell.cfg.dataset).resolve())
    return {"id": run.id, "seconds": time.perf_counter() - t0}


def run_base(run: StudyRun, num_threads: int | None = None, *, backend_factory: BackendFactory | None = None) -> str:
    """Train (or resume) the round 0 of ``run``'s base experiment; returns the base folder.

    A base is created with the config of the group's first run (another run of the group resumes it with the
    stored one) and runs up to round 0 only. A base whose dataset moved (``--dataset``) is moved with it."""
    assert run.base_dir is not None
    data = Path(run.cell.cfg.dataset).resolve()
    exists = (run.base_dir / CONFIG_FILE).exists()
    if exists and round0_done(run.base_dir) and Path(load_config(run.base_dir / CONFIG_FILE).dataset) == data:
        return str(run.base_dir)
    factory = threads_backend(num_threads, backend_factory)
    run_experiment(None if exists else run.cell.cfg, run.base_dir, factory, dataset=data, until_round=0)
    return str(run.base_dir)


def base_id(run: StudyRun) -> str:
    """The key of a run's base experiment in ``study.json``."""
    assert run.base_dir is not None
    return f"{run.cell.setting}/round0/{run.base_dir.name}"


class StudyRecord:
    """``study.json``: per run, the alseg version and commit of every call that ran it."""

    def __init__(self, out: Path, spec: StudySpec, study_file: Path) -> None:
        self.path = Path(out) / STUDY_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"runs": {}}
        self.data["study"] = spec.name
        self.data["study_file"] = str(Path(study_file).resolve())
        self.data["study_sha256"] = hashlib.sha256(Path(study_file).read_bytes()).hexdigest()
        self.call_started = _now()  # this call of the study

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def last(self, run_id: str) -> dict[str, Any] | None:
        calls = self.data["runs"].get(run_id, {}).get("calls", [])
        return calls[-1] if calls else None

    def start(self, run_id: str, version: str, commit: str | None, rounds_done: int) -> None:
        entry = self.data["runs"].setdefault(run_id, {"calls": []})
        entry["calls"].append(
            {"version": version, "commit": commit, "started": self.call_started, "rounds_done_before": rounds_done}
        )

    def base_finished(self, key: str) -> None:
        entry = self.data["runs"].get(key)
        if entry is not None and "finished" not in entry:
            entry["finished"] = _now()

    def finish(self, run_id: str, seconds: float, error: str | None = None) -> None:
        entry = self.data["runs"].setdefault(run_id, {"calls": [{}]})
        entry["calls"][-1]["seconds"] = round(seconds, 1)
        if error is None:
            entry["finished"] = _now()
        else:
            entry["calls"][-1]["error"] = error


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fmt_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_left(runs: Sequence[StudyRun], slots: int = 1) -> tuple[float | None, int]:
    """Seconds the unfinished runs still need (from the rounds this study finished so far, per setting: round 0
    and later rounds apart), divided over ``slots`` parallel runs; and how many references it could not estimate.
    None before any round of a setting with unfinished work was measured."""
    r0: dict[str, list[float]] = defaultdict(list)
    later: dict[str, list[float]] = defaultdict(list)
    seen_bases: set[Path] = set()
    for run in runs:
        dirs = [run.exp_dir] + ([run.base_dir] if run.base_dir is not None and run.base_dir not in seen_bases else [])
        if run.base_dir is not None:
            seen_bases.add(run.base_dir)
        for d in dirs:
            _, secs = _progress(d)
            for r, s in secs.items():
                if run.cell.is_reference:
                    continue
                if r == 0 and d == run.base_dir:
                    r0[run.cell.setting].append(s)
                elif r > 0:
                    later[run.cell.setting].append(s)
    total = 0.0
    unknown_refs = 0
    bases_left: set[Path] = set()
    for run in runs:
        st = run.cell.setting
        done, rounds = run_progress(run)
        if run.cell.is_reference:
            if done < 1:
                unknown_refs += 1
            continue
        if done >= rounds:
            continue
        if done == 0 and run.base_dir is not None and _progress(run.base_dir)[0] < 1:
            bases_left.add(run.base_dir)
        left = rounds - max(done, 1)
        if left > 0:
            if not later[st]:
                return None, unknown_refs
            total += left * sum(later[st]) / len(later[st])
    for b in bases_left:
        st = next(r.cell.setting for r in runs if r.base_dir == b)
        if not r0[st]:
            return None, unknown_refs
        total += sum(r0[st]) / len(r0[st])
    return total / max(1, slots), unknown_refs


def run_study(
    study_file: Path,
    out: Path,
    *,
    executor: Any,
    allow_version_change: bool = False,
    dataset: Path | None = None,
    only: Sequence[str] | None = None,
    report: bool = True,
    say: Callable[[str], None] = print,
) -> StudyOutcome:
    """Run every unfinished cell of ``study_file`` into ``out`` with ``executor`` (an
    :class:`alseg.study.executors.Executor`), then write the report. Refuses, before running anything, to
    continue a run last run under another alseg version or source (a commit whose ``src/alseg`` differs) unless
    ``allow_version_change``. ``only``: run only these strategies (folder names; ``full_data``: the references).
    The report covers every run of the study folder."""
    spec, cells = load_study(study_file, dataset)
    check_cells(cells)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(cells, out)
    if only:
        names = {c.name for c in cells}
        unknown = sorted(set(only) - names)
        if unknown:
            raise ConfigError(f"--only {unknown}: not strategies of {study_file}; its strategies: {sorted(names)}")
        runs = [r for r in runs if r.cell.name in set(only)]
    record = StudyRecord(out, spec, study_file)
    version, commit = __version__, alseg_commit()
    todo: list[StudyRun] = []
    changed: list[str] = []
    for run in runs:
        done, rounds = run_progress(run)
        if done >= rounds:
            continue
        keys = [run.id]
        if run.base_dir is not None and not (run.exp_dir / CONFIG_FILE).exists():
            keys = [base_id(run)] if (run.base_dir / CONFIG_FILE).exists() and not round0_done(run.base_dir) else []
        for key in keys:
            last = record.last(key)
            started = (run.exp_dir if key == run.id else run.base_dir) / CONFIG_FILE
            if last is not None and started.exists():
                if last.get("version") != version or not same_source(last.get("commit"), commit):
                    changed.append(f"{key} (ran under {last.get('version')} {last.get('commit')})")
        todo.append(run)
    if changed and not allow_version_change:
        shown = "; ".join(changed[:10]) + (f"; and {len(changed) - 10} more" if len(changed) > 10 else "")
        raise StudyError(
            f"{len(changed)} unfinished runs of {out} ran under another alseg version or source than this one "
            f"({version} {commit}): {shown}. Finish them with that version, or pass --allow-version-change to "
            "continue them under this one (study.json records which call ran under which version)"
        )
    outcome = StudyOutcome(total=len(runs), done_before=len(runs) - len(todo))
    if todo:
        executor.start()
    say(f"study {spec.name}: {outcome.done_before} of {len(runs)} runs done; {len(todo)} to run ({executor.name})")
    for run in todo:
        record.start(run.id, version, commit, run_progress(run)[0])
        if run.base_dir is not None and not round0_done(run.base_dir):
            key = base_id(run)
            last = record.last(key)
            if last is None or last.get("started") != record.call_started:  # once per call for a shared base
                record.start(key, version, commit, 0)
    record.save()

    # on a cluster the runs' databases are written on other machines: SQLite (WAL) must not be read across
    # machines while they run, so the estimate then comes from the runs' durations alone
    local = getattr(executor, "shares_databases", True)
    durations: list[float] = []

    def on_done(run: StudyRun, seconds: float, error: str | None) -> None:
        record.finish(run.id, seconds, error)
        if run.base_dir is not None and error is None:  # a finished run had its round 0
            record.base_finished(base_id(run))
        record.save()
        if error is None:
            outcome.finished.append(run.id)
            durations.append(seconds)
        else:
            outcome.failed[run.id] = error
        n_done = outcome.done_before + len(outcome.finished)
        if local:
            left, refs = estimate_left(runs, executor.slots)
        else:
            waiting = len(todo) - len(outcome.finished) - len(outcome.failed)
            left, refs = sum(durations) / len(durations) * waiting / max(1, executor.slots), 0
        eta = "an unknown time" if left is None else f"about {_fmt_duration(left)}"
        if refs:
            eta += f" (plus {refs} full-data reference{'s' if refs > 1 else ''}, not estimated)"
        what = f"finished in {_fmt_duration(seconds)}" if error is None else f"FAILED after {_fmt_duration(seconds)}"
        say(
            f"[{n_done}/{len(runs)} runs done] {run.id} {what}; {eta} left"
            if n_done < len(runs)
            else f"[{n_done}/{len(runs)} runs done] {run.id} {what}"
        )
        if error is not None:
            say(f"  {run.id}: {error}")

    executor.run(todo, on_done)
    if report:
        try:
            outcome.report = write_study_report(spec, plan_runs(cells, out), out)
            say(f"report: {outcome.report}; tables in {out / 'tables'}")
        except ExperimentError as err:  # no run has results yet: the outcome below says why
            say(f"no report: {err}")
    if outcome.failed:
        raise StudyError(
            f"{len(outcome.failed)} of {len(todo)} runs failed: "
            + "; ".join(f"{k}: {v}" for k, v in list(outcome.failed.items())[:5])
            + f". The others are done; run the same command again to retry them (their logs: {out}/runs/.../alseg.log)"
        )
    return outcome


def report_runs(study_file: Path, out: Path, dataset: Path | None = None) -> Path:
    """``alseg bench --report-only``: the report of what the study has run so far."""
    spec, cells = load_study(study_file, dataset)
    return write_study_report(spec, plan_runs(cells, out), Path(out))


def write_study_report(spec: StudySpec, runs: Sequence[StudyRun], out: Path) -> Path:
    """The HTML report, the CSV tables and the figures over every run that exists, plus the summary table under
    each annotation cost measure (``tables/summary_cost-{axis}.csv``: AUBC against that cost)."""
    from alseg.report.compare import compare
    from alseg.report.html import build_report
    from alseg.report.results import load_results

    al = [r.exp_dir for r in runs if not r.cell.is_reference and (r.exp_dir / DB_FILE).is_file()]
    refs = [r.exp_dir for r in runs if r.cell.is_reference and run_progress(r)[0] >= 1]
    if not al:
        raise ExperimentError(f"{out}: no run of the study has started yet; nothing to report")
    html = out / "report.html"
    tables = out / "tables"
    results = load_results(al, refs)
    baseline = spec.baseline if spec.baseline in results.strategies else None  # a partial study may lack it
    build_report(al, html, refs, baseline, tables, title=f"Study {spec.name}", figures_dir=out / "figures")
    for axis in COST_AXES:
        cmp = compare(results, baseline=baseline, cost=axis)  # type: ignore[arg-type]
        cmp.summary.to_csv(tables / f"summary_cost-{axis}.csv", index=False)
    return html
