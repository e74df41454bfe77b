"""Saved experiment results as tidy tables; reads ``config.yaml`` and ``alseg.sqlite`` only (read-only).

Works on an experiment that is still running: only rounds whose ``evaluate`` stage has committed have
metrics, so the tables hold the rounds done so far.

One row of :attr:`Results.rounds` per (experiment, evaluated round)::

    experiment strategy seed setting dataset_key full_data complete round
    regions voxels fg_voxels fg_fraction corrected_voxels strokes slices_touched cases_touched
    dice dice2d hd95 n_nan_dice n_nan_hd95 n_test_cases
    dice_<label> dice2d_<label> hd95_<label> fg_voxels_<label> fg_fraction_<label>

``dice`` is the held-out foreground-mean 3D Dice, ``voxels``/``fg_voxels`` are cumulative annotated voxels
(foreground summed over classes), ``fg_fraction`` the annotated share of the pool's foreground voxels.
``corrected_voxels``/``strokes`` are the cumulative correction measures (:mod:`alseg.evaluation.correction`) of
the regions annotated up to the round, from the ``region_costs`` table; NaN in every round of an experiment with
an annotated region that has no measure (made before alseg measured corrections: ``alseg remeasure`` adds them),
so that an axis is never half measured.

:attr:`Results.annotators` has, per experiment labelled by people (``oracle: human``), one row per annotator, as
``alseg status`` shows it (:func:`alseg.oracle.human.summarise_annotators`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alseg.config import ExperimentConfig, load_config
from alseg.errors import AlsegError
from alseg.oracle.human import summarise_annotators
from alseg.store.layout import CONFIG_FILE, DB_FILE, FULL_DATA_META

__all__ = [
    "ANNOTATOR_COLUMNS",
    "COST_AXES",
    "ExperimentRecord",
    "ReportError",
    "Results",
    "dataset_key",
    "find_experiments",
    "load_annotators",
    "load_experiment",
    "load_results",
    "setting_name",
    "strategy_label",
]

ROUND_COLUMNS = [
    "experiment",
    "strategy",
    "seed",
    "setting",
    "dataset_key",
    "full_data",
    "complete",
    "round",
    "regions",
    "voxels",
    "fg_voxels",
    "fg_fraction",
    "corrected_voxels",
    "strokes",
    "slices_touched",
    "cases_touched",
    "dice",
    "dice2d",
    "hd95",
    "n_nan_dice",
    "n_nan_hd95",
    "n_test_cases",
]
REGION_COLUMNS = [
    "experiment",
    "strategy",
    "seed",
    "setting",
    "round",
    "region_id",
    "case_id",
    "start",
    "size",
    "score",
    "status",
    "n_voxels",
    "fg_voxels",
    "query_strategy",
]
ANNOTATOR_COLUMNS = [
    "experiment",
    "strategy",
    "seed",
    "setting",
    "annotator",
    "regions",
    "voxels",
    "fg_voxels",
    "corrected_voxels",
    "strokes",
    "imports",
    "minutes",
    "imports_without_minutes",
]
#: the cumulative annotation costs a learning curve can be drawn against: column of ``rounds`` -> axis label
COST_AXES = {
    "voxels": "annotated voxels",
    "fg_voxels": "annotated foreground voxels",
    "corrected_voxels": "corrected voxels",
    "strokes": "correction strokes",
}
#: the axes measured per region (``region_costs``), unavailable in experiments made before they were measured
MEASURED_AXES = ("corrected_voxels", "strokes")


class ReportError(AlsegError, ValueError):
    """A directory cannot be read as an experiment; the message names it and says why."""


def strategy_label(cfg: ExperimentConfig) -> str:
    """The strategy key, with its explicitly given parameters: ``power_pe(beta=2)``."""
    if not cfg.strategy_params:
        return cfg.strategy
    params = ", ".join(f"{k}={v}" for k, v in sorted(cfg.strategy_params.items()))
    return f"{cfg.strategy}({params})"


def dataset_key(cfg: ExperimentConfig) -> str:
    """What a full-data reference must share with a run to bound it: dataset, configuration, split, pool size."""
    key = f"{Path(cfg.dataset).name}, {cfg.configuration or 'auto'}"
    if cfg.holdout_fraction != 0.25 or cfg.split_seed != 0:
        key += f", split {cfg.holdout_fraction:g}/{cfg.split_seed}"
    if cfg.pool_size is not None:
        key += f", pool {cfg.pool_size}"
    return key


def setting_name(cfg: ExperimentConfig) -> str:
    """Runs of one setting differ only in strategy and seed: dataset, configuration, unit, budget."""
    if cfg.unit == "box":
        unit = "box " + "×".join(str(s) for s in cfg.region_size or ())
    elif cfg.unit == "slice":
        unit = f"slice (axis {cfg.slice_axis})"
    else:
        unit = "case"
    budget = f"{cfg.query_size}/round"
    if cfg.starting_size != cfg.query_size:
        budget += f", start {cfg.starting_size}"
    return f"{dataset_key(cfg)}, {unit}, {budget}"


@dataclass(frozen=True)
class ExperimentRecord:
    """One experiment directory: who it is and how far it got."""

    path: Path
    config: ExperimentConfig
    strategy: str
    seed: int
    setting: str
    dataset_key: str
    full_data: bool
    rounds_planned: int
    rounds_evaluated: tuple[int, ...]
    foreground_labels: tuple[str, ...]
    pool_fg_voxels: dict[str, int] = field(default_factory=dict)
    #: labels of finished rounds corrected later (``alseg import --round N --replace``), one sentence each
    corrections: tuple[str, ...] = ()
    #: annotated regions of the evaluated rounds without correction measures (then ``corrected_voxels`` and
    #: ``strokes`` are NaN in every round of the experiment)
    unmeasured_regions: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return bool(self.rounds_evaluated) and self.rounds_evaluated[-1] == self.rounds_planned - 1


@dataclass
class Results:
    """All experiments of a report: the experiments, per-round metrics and the queried regions."""

    experiments: list[ExperimentRecord]
    rounds: pd.DataFrame
    regions: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    #: per experiment labelled by people, one row per annotator (:data:`ANNOTATOR_COLUMNS`)
    annotators: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ANNOTATOR_COLUMNS))

    @property
    def al_experiments(self) -> list[ExperimentRecord]:
        return [e for e in self.experiments if not e.full_data]

    @property
    def references(self) -> list[ExperimentRecord]:
        return [e for e in self.experiments if e.full_data]

    @property
    def al_rounds(self) -> pd.DataFrame:
        """Per-round rows of the active-learning runs (full-data references left out)."""
        return self.rounds[~self.rounds["full_data"].astype(bool)].reset_index(drop=True)

    @property
    def strategies(self) -> list[str]:
        return sorted({e.strategy for e in self.al_experiments})

    @property
    def settings(self) -> list[str]:
        return sorted({e.setting for e in self.al_experiments})

    def reference_dice(self) -> dict[str, float]:
        """Full-data Dice per dataset key: the mean over its references' last evaluated round."""
        out: dict[str, list[float]] = {}
        ref = self.rounds[self.rounds["full_data"].astype(bool)]
        for _exp, rows in ref.groupby("experiment", sort=False):
            last = rows.sort_values("round").iloc[-1]
            if np.isfinite(last["dice"]):
                out.setdefault(str(last["dataset_key"]), []).append(float(last["dice"]))
        return {k: float(np.mean(v)) for k, v in out.items()}

    def reference_for_setting(self, setting: str) -> float | None:
        keys = {e.dataset_key for e in self.al_experiments if e.setting == setting}
        ref = self.reference_dice()
        vals = [ref[k] for k in keys if k in ref]
        return vals[0] if vals else None


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _connect_read_only(db: Path) -> sqlite3.Connection:
    """A read-only connection (a running experiment keeps writing; we never do)."""
    uri = db.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        # a WAL database in a directory we may not write to: open it as immutable
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=30)


def _float(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _query(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError as err:  # a table not created yet
        if "no such table" in str(err):
            return []
        raise


def find_experiments(paths: Iterable[Path]) -> list[Path]:
    """Experiment directories among ``paths``; a directory holding experiments stands for all of them."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / CONFIG_FILE).is_file():
            found.append(p)
            continue
        if not p.is_dir():
            raise ReportError(f"{p} does not exist or is not a directory; expected an experiment directory")
        children = sorted(c for c in p.iterdir() if (c / CONFIG_FILE).is_file() and (c / DB_FILE).is_file())
        if not children:
            raise ReportError(f"{p} is not an alseg experiment (no {CONFIG_FILE}) and holds no experiment directories")
        found.extend(children)
    out: list[Path] = []
    seen: set[Path] = set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def load_experiment(exp_dir: Path, full_data: bool | None = None) -> tuple[ExperimentRecord, list[dict], list[dict]]:
    """``(record, round rows, region rows)`` of one experiment directory.

    ``full_data=None`` reads the reference marker from the database; ``True`` forces it.
    """
    exp_dir = Path(exp_dir)
    if not (exp_dir / CONFIG_FILE).is_file() or not (exp_dir / DB_FILE).is_file():
        raise ReportError(f"{exp_dir} is not an alseg experiment (no {CONFIG_FILE} / {DB_FILE})")
    cfg = load_config(exp_dir / CONFIG_FILE)
    conn = _connect_read_only(exp_dir / DB_FILE)
    try:
        meta = dict(_query(conn, "SELECT key, value FROM meta"))
        metrics = {int(r): json.loads(d) for r, d in _query(conn, "SELECT round, data FROM metrics ORDER BY round")}
        region_rows = _query(
            conn,
            "SELECT id, round, case_id, box_start, box_size, score, strategy, status, n_voxels, fg_voxels "
            "FROM regions ORDER BY round, id",
        )
        correction_rows = _query(
            conn, "SELECT round, case_id, at_round, corrected_at FROM corrections ORDER BY round, case_id, id"
        )
        measured = {
            int(rid): (int(cv), int(st))
            for rid, cv, st in _query(conn, "SELECT region_id, corrected_voxels, strokes FROM region_costs")
        }
    except sqlite3.DatabaseError as err:
        raise ReportError(f"{exp_dir / DB_FILE}: cannot read the experiment database ({err})") from None
    finally:
        conn.close()
    is_ref = FULL_DATA_META in meta if full_data is None else bool(full_data or FULL_DATA_META in meta)
    # the annotated regions (id, round) whose correction measures add up to a round's cumulative cost
    annotated = [(int(rid), int(rnd)) for rid, rnd, *_, status, _n, _fg in region_rows if status == "annotated"]
    last = max(metrics, default=-1)
    unmeasured = sum(1 for rid, rnd in annotated if rnd <= last and rid not in measured)
    pool_fg = {str(k): int(v) for k, v in json.loads(meta.get("pool_fg_voxels") or "{}").items()}
    labels = sorted(
        set(pool_fg) | {str(k) for m in metrics.values() for k in (m.get("dice_per_class") or {})}, key=_label_order
    )
    record = ExperimentRecord(
        path=exp_dir,
        config=cfg,
        strategy="full data" if is_ref else strategy_label(cfg),
        seed=int(cfg.seed),
        setting=setting_name(cfg),
        dataset_key=dataset_key(cfg),
        full_data=is_ref,
        rounds_planned=int(cfg.rounds),
        rounds_evaluated=tuple(sorted(metrics)),
        foreground_labels=tuple(labels),
        pool_fg_voxels=pool_fg,
        corrections=_correction_notes(correction_rows),
        unmeasured_regions=unmeasured,
    )
    ident = {
        "experiment": str(exp_dir),
        "strategy": record.strategy,
        "seed": record.seed,
        "setting": record.setting,
    }
    rows = []
    for r, m in sorted(metrics.items()):
        cost = m.get("cost") or {}
        row: dict[str, Any] = {
            **ident,
            "dataset_key": record.dataset_key,
            "full_data": is_ref,
            "complete": record.complete,
            "round": r,
            "regions": _float(cost.get("regions")),
            "voxels": _float(cost.get("annotated_voxels")),
            "fg_voxels": _float(cost.get("annotated_fg_voxels")),
            "fg_fraction": _float(cost.get("fg_fraction")),
            "corrected_voxels": _measured_sum(annotated, measured, r, 0, unmeasured),
            "strokes": _measured_sum(annotated, measured, r, 1, unmeasured),
            "slices_touched": _float(cost.get("slices_touched")),
            "cases_touched": _float(cost.get("cases_touched")),
            "dice": _float(m.get("dice_mean")),
            "dice2d": _float(m.get("dice2d_mean")),
            "hd95": _float(m.get("hd95_mean")),
            "n_nan_dice": _float(m.get("n_nan_dice")),
            "n_nan_hd95": _float(m.get("n_nan_hd95")),
            "n_test_cases": _float(m.get("n_cases")),
        }
        for lab in labels:
            row[f"dice_{lab}"] = _float((m.get("dice_per_class") or {}).get(lab))
            row[f"dice2d_{lab}"] = _float((m.get("dice2d_per_class") or {}).get(lab))
            row[f"hd95_{lab}"] = _float((m.get("hd95_per_class") or {}).get(lab))
            row[f"fg_voxels_{lab}"] = _float((cost.get("annotated_fg_voxels_per_class") or {}).get(lab))
            row[f"fg_fraction_{lab}"] = _float((cost.get("fg_fraction_per_class") or {}).get(lab))
        rows.append(row)
    regions = [
        {
            **ident,
            "round": int(rnd),
            "region_id": int(rid),
            "case_id": cid,
            "start": tuple(json.loads(start)),
            "size": tuple(json.loads(size)),
            "score": _float(score),
            "status": status,
            "n_voxels": int(nvox),
            "fg_voxels": json.loads(fg) if fg else None,
            "query_strategy": strat,
        }
        for rid, rnd, cid, start, size, score, strat, status, nvox, fg in region_rows
    ]
    return record, rows, regions


def _measured_sum(
    annotated: Sequence[tuple[int, int]], measured: dict[int, tuple[int, int]], r: int, k: int, unmeasured: int
) -> float:
    """The sum of measure ``k`` (0: corrected voxels, 1: strokes) over the regions annotated up to round ``r``;
    NaN when any annotated region of the experiment's evaluated rounds has no measure."""
    if unmeasured:
        return float("nan")
    return float(sum(measured[rid][k] for rid, rnd in annotated if rnd <= r))


def load_annotators(record: ExperimentRecord) -> list[dict[str, Any]]:
    """Per annotator of an experiment labelled by people (``oracle: human``): regions, voxels, corrected voxels,
    strokes, imports and minutes (:func:`alseg.oracle.human.summarise_annotators`), read-only; [] for any other
    experiment."""
    if record.config.oracle != "human":
        return []
    db = record.path / DB_FILE
    conn = _connect_read_only(db)
    try:
        regions = [
            (int(rid), int(nvox), json.loads(fg) if fg else None)
            for rid, nvox, fg in _query(conn, "SELECT id, n_voxels, fg_voxels FROM regions WHERE status = 'annotated'")
        ]
        costs = {
            int(rid): {"corrected_voxels": cv, "strokes": st, "annotator": who}
            for rid, cv, st, who in _query(
                conn, "SELECT region_id, corrected_voxels, strokes, annotator FROM region_costs"
            )
        }
        imports = [
            {"annotator": who, "minutes": m} for who, m in _query(conn, "SELECT annotator, minutes FROM imports")
        ]
    except sqlite3.DatabaseError as err:
        raise ReportError(f"{db}: cannot read the experiment database ({err})") from None
    finally:
        conn.close()
    ident = {
        "experiment": str(record.path),
        "strategy": record.strategy,
        "seed": record.seed,
        "setting": record.setting,
    }
    return [{**ident, **row} for row in summarise_annotators(regions, costs, imports)]


def _correction_notes(rows: Sequence[tuple[Any, ...]]) -> tuple[str, ...]:
    """One sentence per corrected (round, case): the metrics of the rounds before the correction's round came
    from models trained on the earlier labels."""
    latest: dict[tuple[int, str], tuple[int, str]] = {}
    for rnd, cid, at, when in rows:  # a case corrected twice: the last one
        latest[(int(rnd), str(cid))] = (int(at), str(when))
    out = []
    for (rnd, cid), (at, when) in sorted(latest.items()):
        before = f"round {rnd}" if at - 1 == rnd else f"rounds {rnd}–{at - 1}"
        out.append(
            f"labels of case {cid} in round {rnd} were corrected at round {at} ({when} UTC): the metrics of "
            f"{before} come from models trained on the earlier labels"
        )
    return tuple(out)


def _label_order(lab: str) -> tuple[int, str]:
    try:
        return (int(lab), "")
    except ValueError:
        return (1 << 30, lab)


def load_results(exp_dirs: Sequence[Path], full_data_dirs: Sequence[Path] = ()) -> Results:
    """Load every experiment of ``exp_dirs`` (directories of experiments expand) and the references.

    Experiments recognised as full-data references (database marker) are references wherever they are
    listed. Two runs of the same strategy, seed and setting keep the first (listed in ``problems``).
    """
    dirs = [(p, None) for p in find_experiments(exp_dirs)] + [(p, True) for p in find_experiments(full_data_dirs)]
    if not dirs:
        raise ReportError("no experiment directories given")
    records: list[ExperimentRecord] = []
    rows: list[dict] = []
    regions: list[dict] = []
    annotators: list[dict] = []
    problems: list[str] = []
    seen: dict[tuple[str, int, str], Path] = {}
    seen_paths: set[Path] = set()
    for path, ref in dirs:
        if path.resolve() in seen_paths:
            continue
        seen_paths.add(path.resolve())
        rec, r_rows, g_rows = load_experiment(path, full_data=ref)
        key = (rec.strategy, rec.seed, rec.setting)
        if not rec.full_data and key in seen:
            problems.append(
                f"{path} repeats strategy {rec.strategy!r}, seed {rec.seed} of setting {rec.setting!r} "
                f"({seen[key]}); left out"
            )
            continue
        if not rec.full_data:
            seen[key] = path
        records.append(rec)
        rows.extend(r_rows)
        regions.extend(g_rows)
        annotators.extend(load_annotators(rec))
    labels = sorted({lab for e in records for lab in e.foreground_labels}, key=_label_order)
    extra = [f"{m}_{lab}" for lab in labels for m in ("dice", "dice2d", "hd95", "fg_voxels", "fg_fraction")]
    rounds = pd.DataFrame(rows, columns=ROUND_COLUMNS + extra)
    for col in rounds.columns:
        if col not in ("experiment", "strategy", "setting", "dataset_key", "full_data", "complete", "seed", "round"):
            rounds[col] = pd.to_numeric(rounds[col], errors="coerce").astype(np.float64)
    rounds["seed"] = rounds["seed"].astype(np.int64)
    rounds["round"] = rounds["round"].astype(np.int64)
    rounds["full_data"] = rounds["full_data"].astype(bool)
    rounds["complete"] = rounds["complete"].astype(bool)
    people = pd.DataFrame(annotators, columns=ANNOTATOR_COLUMNS)
    return Results(records, rounds, pd.DataFrame(regions, columns=REGION_COLUMNS), problems, people)
