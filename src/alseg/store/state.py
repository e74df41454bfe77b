"""Experiment state in one SQLite database, plus the experiment lock.

Every stage of a round commits in one transaction after its artifacts are written: a stage row marked
``done`` means its files are complete. Regions are unique per (case, box); a rerun of an interrupted stage
replaces the rows of that stage only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alseg.data.regions import Box, Region

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS split (case_id TEXT PRIMARY KEY, role TEXT NOT NULL CHECK (role IN ('pool', 'test')));
CREATE TABLE IF NOT EXISTS stages (
    round INTEGER NOT NULL, stage TEXT NOT NULL, status TEXT NOT NULL, seconds REAL, peak_rss_mb REAL,
    detail TEXT, finished_at TEXT DEFAULT (datetime('now')), PRIMARY KEY (round, stage));
CREATE TABLE IF NOT EXISTS regions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, case_id TEXT NOT NULL,
    box_start TEXT NOT NULL, box_size TEXT NOT NULL, score REAL, strategy TEXT NOT NULL, info TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('selected', 'annotated')),
    n_voxels INTEGER NOT NULL, fg_voxels TEXT, annotated_by TEXT,
    UNIQUE (case_id, box_start, box_size));
CREATE TABLE IF NOT EXISTS label_files (
    round INTEGER NOT NULL, case_id TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (round, case_id));
CREATE TABLE IF NOT EXISTS metrics (round INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS imported_files (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, case_id TEXT NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, source TEXT NOT NULL, n_outside INTEGER NOT NULL DEFAULT 0,
    replaced_by INTEGER, imported_at TEXT DEFAULT (datetime('now')));
"""


class ExperimentLockedError(RuntimeError):
    """Another process holds the experiment."""


@dataclass(frozen=True)
class StoredRegion:
    id: int
    round: int
    region: Region
    status: str
    n_voxels: int
    fg_voxels: dict[str, int] | None
    annotated_by: str | None = None


@contextlib.contextmanager
def experiment_lock(exp_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``exp_dir`` (released by the OS if the process dies)."""
    path = Path(exp_dir) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise ExperimentLockedError(
                f"experiment {exp_dir} is in use by process {holder}; wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ExperimentState:
    """The SQLite database of one experiment."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # ------------------------------------------------------------ meta and split
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def set_split(self, conn: sqlite3.Connection, pool: Sequence[str], test: Sequence[str]) -> None:
        conn.executemany("INSERT INTO split (case_id, role) VALUES (?, 'pool')", [(c,) for c in pool])
        conn.executemany("INSERT INTO split (case_id, role) VALUES (?, 'test')", [(c,) for c in test])

    def split(self) -> tuple[list[str], list[str]]:
        rows = self.conn.execute("SELECT case_id, role FROM split ORDER BY case_id").fetchall()
        return [c for c, r in rows if r == "pool"], [c for c, r in rows if r == "test"]

    # ------------------------------------------------------------ stages
    def stage_done(self, round_index: int, stage: str) -> bool:
        row = self.conn.execute(
            "SELECT status FROM stages WHERE round = ? AND stage = ?", (round_index, stage)
        ).fetchone()
        return row is not None and row[0] == "done"

    def stage_detail(self, round_index: int, stage: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT detail FROM stages WHERE round = ? AND stage = ? AND status = 'done'", (round_index, stage)
        ).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    def mark_stage(
        self,
        conn: sqlite3.Connection,
        round_index: int,
        stage: str,
        seconds: float,
        peak_rss_mb: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO stages (round, stage, status, seconds, peak_rss_mb, detail) "
            "VALUES (?, ?, 'done', ?, ?, ?)",
            (round_index, stage, seconds, peak_rss_mb, json.dumps(detail) if detail is not None else None),
        )

    def stages(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT round, stage, status, seconds, peak_rss_mb, detail FROM stages ORDER BY round, rowid"
        ).fetchall()
        return [
            {
                "round": r,
                "stage": s,
                "status": st,
                "seconds": sec,
                "peak_rss_mb": mem,
                "detail": json.loads(d) if d else None,
            }
            for r, s, st, sec, mem, d in rows
        ]

    # ------------------------------------------------------------ regions
    def add_regions(self, conn: sqlite3.Connection, round_index: int, regions: Sequence[Region], strategy: str) -> None:
        conn.executemany(
            "INSERT INTO regions (round, case_id, box_start, box_size, score, strategy, info, status, n_voxels) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'selected', ?)",
            [
                (
                    round_index,
                    r.case_id,
                    json.dumps(list(r.box.start)),
                    json.dumps(list(r.box.size)),
                    None if r.score != r.score else float(r.score),
                    strategy,
                    json.dumps(r.info, default=_json_default),
                    r.box.n_voxels,
                )
                for r in regions
            ],
        )

    def mark_annotated(
        self, conn: sqlite3.Connection, region_id: int, fg_voxels: dict[str, int] | None, annotated_by: str
    ) -> None:
        conn.execute(
            "UPDATE regions SET status = 'annotated', fg_voxels = ?, annotated_by = ? WHERE id = ?",
            (json.dumps(fg_voxels) if fg_voxels is not None else None, annotated_by, region_id),
        )

    def regions(
        self, round_index: int | None = None, max_round: int | None = None, status: str | None = None
    ) -> list[StoredRegion]:
        sql = (
            "SELECT id, round, case_id, box_start, box_size, score, info, status, n_voxels, fg_voxels, annotated_by "
            "FROM regions"
        )
        where, args = [], []
        if round_index is not None:
            where.append("round = ?")
            args.append(round_index)
        if max_round is not None:
            where.append("round <= ?")
            args.append(max_round)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        out = []
        for rid, rnd, cid, start, size, score, info, st, nvox, fg, by in self.conn.execute(sql, args).fetchall():
            region = Region(
                cid,
                Box(tuple(json.loads(start)), tuple(json.loads(size))),
                float("nan") if score is None else score,
                json.loads(info),
            )
            out.append(StoredRegion(rid, rnd, region, st, nvox, json.loads(fg) if fg else None, by))
        return out

    # ------------------------------------------------------------ label files
    def add_label_file(self, conn: sqlite3.Connection, round_index: int, case_id: str, path: str, sha256: str) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO label_files (round, case_id, path, sha256) VALUES (?, ?, ?, ?)",
            (round_index, case_id, path, sha256),
        )

    def latest_label_files(self, max_round: int) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT case_id, path FROM label_files WHERE round <= ? ORDER BY round", (max_round,)
        ).fetchall()
        return dict(rows)  # later rounds overwrite earlier ones

    # ------------------------------------------------------------ imported label files (human oracle)
    def add_imported_file(
        self,
        conn: sqlite3.Connection,
        round_index: int,
        case_id: str,
        path: str,
        sha256: str,
        source: str,
        n_outside: int = 0,
    ) -> int:
        cur = conn.execute(
            "INSERT INTO imported_files (round, case_id, path, sha256, source, n_outside) VALUES (?, ?, ?, ?, ?, ?)",
            (round_index, case_id, path, sha256, source, n_outside),
        )
        return int(cur.lastrowid or 0)

    def replace_imported_file(self, conn: sqlite3.Connection, old_id: int, new_id: int) -> None:
        conn.execute("UPDATE imported_files SET replaced_by = ? WHERE id = ?", (new_id, old_id))

    def imported_files(self, round_index: int | None = None, current_only: bool = False) -> list[dict[str, Any]]:
        """Imported label files, oldest first; ``current_only`` leaves out the replaced ones."""
        sql = "SELECT id, round, case_id, path, sha256, source, n_outside, replaced_by, imported_at FROM imported_files"
        where, args = [], []
        if round_index is not None:
            where.append("round = ?")
            args.append(round_index)
        if current_only:
            where.append("replaced_by IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        keys = ("id", "round", "case_id", "path", "sha256", "source", "n_outside", "replaced_by", "imported_at")
        return [dict(zip(keys, row, strict=True)) for row in self.conn.execute(sql + " ORDER BY id", args).fetchall()]

    # ------------------------------------------------------------ metrics
    def set_metrics(self, conn: sqlite3.Connection, round_index: int, data: dict[str, Any]) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO metrics (round, data) VALUES (?, ?)",
            (round_index, json.dumps(data, default=_json_default)),
        )

    def metrics(self) -> dict[int, dict[str, Any]]:
        rows = self.conn.execute("SELECT round, data FROM metrics ORDER BY round").fetchall()
        return {r: json.loads(d) for r, d in rows}

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
