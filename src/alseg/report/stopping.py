"""The report's "When to stop" section: per active-learning run, a table of its stopping signals per round.

Read-only, from each experiment's database (the evaluate stages' details and metrics) and its
``rounds/NNN/evaluation.json`` files, through :func:`alseg.loop.stopping.stopping_status`.
"""

from __future__ import annotations

import html
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

from alseg.config import ExperimentConfig
from alseg.loop.stopping import stopping_status
from alseg.report.results import ExperimentRecord, Results
from alseg.store.layout import DB_FILE, STOP_SET_META

__all__ = ["experiment_stopping", "stopping_section"]


def experiment_stopping(exp_dir: Path, cfg: ExperimentConfig) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """``stopping_status`` of one experiment, its database opened read-only."""
    uri = (Path(exp_dir) / DB_FILE).resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:  # a WAL database in a folder we may not write to
        conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=30)
    try:
        stages = [
            {"round": r, "stage": s, "status": st, "detail": json.loads(d) if d else None}
            for r, s, st, d in conn.execute("SELECT round, stage, status, detail FROM stages ORDER BY round")
        ]
        metrics = {int(r): json.loads(d) for r, d in conn.execute("SELECT round, data FROM metrics ORDER BY round")}
        stored = conn.execute("SELECT value FROM meta WHERE key = ?", (STOP_SET_META,)).fetchone()
    finally:
        conn.close()
    return stopping_status(exp_dir, cfg, stages, metrics, json.loads(stored[0]) if stored else None)


def _num(v: Any, digits: int = 3, signed: bool = False) -> str:
    if not isinstance(v, int | float) or not math.isfinite(v):
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _x95_text(x95: dict[str, Any]) -> str:
    if x95.get("x95") is None:
        return f"95% budget of the fitted curve: none ({x95.get('reason')})"
    text = f"95% budget of the fitted curve: {x95['x95'] * 100:.1f}% of the pool's foreground"
    if x95.get("interval"):
        text += f" (bootstrap 95% interval {x95['interval'][0] * 100:.1f}–{x95['interval'][1] * 100:.1f}%)"
    if x95["x95"] > 1:
        text += "; more than the pool's whole foreground: not reachable"
    elif x95.get("beyond_observed"):
        text += "; beyond the budget spent (an extrapolation)"
    if x95.get("c_at_bound"):
        text += "; the fitted asymptote is the bound Dice 1 (no levelling off seen yet)"
    return text


def _table(exp: ExperimentRecord) -> str:
    try:
        rows, summary = experiment_stopping(exp.path, exp.config)
    except (sqlite3.DatabaseError, OSError, ValueError) as err:
        return f'<p class="note">{html.escape(f"{exp.name}: stopping signals cannot be read ({err})")}</p>'
    if not rows:
        return '<p class="muted">no evaluated rounds yet</p>'
    headers = ["round", "stability", "stop-set entropy", "Dice gain", "recommendation", "rule"]
    left = ' class="l"'
    head = "".join(f"<th{left if i >= 4 else ''}>{h}</th>" for i, h in enumerate(headers))
    body = "".join(
        f"<tr><td>{r}</td><td>{_num(row['stability'])}</td><td>{_num(row['stop_set_entropy'])}</td>"
        f"<td>{_num(row['dice_gain'], signed=True)}</td><td{left}>{html.escape(str(row['recommendation']))}</td>"
        f"<td{left}>{html.escape(str(row['rule']))}</td></tr>"
        for r, row in sorted(rows.items())
    )
    note = f'<p class="muted">{html.escape(_x95_text(summary["fg_eff_x95"]))}</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def stopping_section(results: Results) -> str:
    """One table per active-learning run: stability, stop-set entropy, held-out Dice gain, the recommendation."""
    runs = sorted(results.al_experiments, key=lambda e: (e.setting, e.strategy, e.seed))
    if not runs:
        return '<p class="muted">no active-learning runs</p>'
    intro = (
        '<p class="muted">Stability: Dice between consecutive rounds\' segmentations of a fixed stop set of pool '
        "cases, on voxels not annotated yet (mean over classes); stopping looks safe once it has stayed at or above "
        "the run's threshold for its patience. The held-out Dice gain is shown beside it and never used.</p>"
    )
    parts = [intro]
    for e in runs:
        title = f"{e.strategy}, seed {e.seed} ({e.setting})"
        parts.append(f"<h3>{html.escape(title)}</h3>{_table(e)}")
    return "".join(parts)
