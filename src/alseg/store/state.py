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
from alseg.errors import AlsegError

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
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, case_id TEXT NOT NULL,
    old_file INTEGER NOT NULL, new_file INTEGER NOT NULL, at_round INTEGER NOT NULL,
    corrected_at TEXT DEFAULT (datetime('now')));
CREATE TABLE IF NOT EXISTS imports (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, annotator TEXT NOT NULL, minutes REAL,
    n_files INTEGER NOT NULL, imported_at TEXT DEFAULT (datetime('now')));
CREATE TABLE IF NOT EXISTS region_costs (
    region_id INTEGER PRIMARY KEY, corrected_voxels INTEGER NOT NULL, strokes INTEGER NOT NULL,
    prefill TEXT NOT NULL CHECK (prefill IN ('model', 'none')), annotator TEXT NOT NULL, import_id INTEGER);
"""


class ExperimentStateError(AlsegError, RuntimeError):
    """The experiment's SQLite database cannot be read or written."""


class ExperimentLockedError(AlsegError, RuntimeError):
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
    with file_lock(Path(exp_dir) / ".lock", f"experiment {exp_dir}"):
        yield


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; its content: the holder's process id)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise ExperimentLockedError(
                f"{what} is in use by process {holder}; wait for it to finish or stop it first"
            ) from None
        except OSError as err:  # ENOLCK, ENOSYS, EOPNOTSUPP: a file system without working locks
            raise ExperimentLockedError(
                f"{path}: cannot take a lock on this file system ({err.strerror}); keep experiments on a local "
                "disk (SQLite and flock are not reliable on NFS or Lustre)"
            ) from err
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
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ExperimentStateError(
                f"{self.path}: the experiment's database cannot be read ({err}); expected alseg's SQLite state. "
                "Restore it (with its -wal file) from a backup; nothing else in the experiment folder was changed"
            ) from err

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

    # ------------------------------------------------------------ corrections of finished rounds (human oracle)
    def add_correction(
        self,
        conn: sqlite3.Connection,
        round_index: int,
        case_id: str,
        old_file: int,
        new_file: int,
        at_round: int,
    ) -> None:
        """Record that the labels of ``case_id`` in the finished round ``round_index`` were replaced (imported
        file ``old_file`` by ``new_file``) while round ``at_round`` waited for labels: that round's annotate stage
        rebuilds the case's training label."""
        conn.execute(
            "INSERT INTO corrections (round, case_id, old_file, new_file, at_round) VALUES (?, ?, ?, ?, ?)",
            (round_index, case_id, old_file, new_file, at_round),
        )

    def corrections(self, at_round: int | None = None) -> list[dict[str, Any]]:
        """Corrections of finished rounds, oldest first; ``at_round``: those made while that round waited."""
        sql = "SELECT id, round, case_id, old_file, new_file, at_round, corrected_at FROM corrections"
        args: list[Any] = []
        if at_round is not None:
            sql += " WHERE at_round = ?"
            args.append(at_round)
        keys = ("id", "round", "case_id", "old_file", "new_file", "at_round", "corrected_at")
        return [dict(zip(keys, row, strict=True)) for row in self.conn.execute(sql + " ORDER BY id", args).fetchall()]

    # ------------------------------------------------------------ annotation cost (corrected voxels, strokes)
    def add_import(
        self, conn: sqlite3.Connection, round_index: int, annotator: str, minutes: float | None, n_files: int
    ) -> int:
        """Record one ``alseg import`` that imported ``n_files`` files: who, and the minutes they spent on it
        (None when not given). Returns its id, for :meth:`set_region_cost`."""
        cur = conn.execute(
            "INSERT INTO imports (round, annotator, minutes, n_files) VALUES (?, ?, ?, ?)",
            (round_index, annotator, minutes, n_files),
        )
        return int(cur.lastrowid or 0)

    def imports(self) -> list[dict[str, Any]]:
        """Every recorded import, oldest first."""
        keys = ("id", "round", "annotator", "minutes", "n_files", "imported_at")
        sql = "SELECT id, round, annotator, minutes, n_files, imported_at FROM imports ORDER BY id"
        return [dict(zip(keys, row, strict=True)) for row in self.conn.execute(sql).fetchall()]

    def set_region_cost(
        self,
        conn: sqlite3.Connection,
        region_id: int,
        corrected_voxels: int,
        strokes: int,
        prefill: str,
        annotator: str,
        import_id: int | None = None,
    ) -> None:
        """Record (or replace: a corrected label) a region's correction measures against its prefill
        (``model`` or ``none``), who labelled it and, for people, the import that brought the label."""
        conn.execute(
            "INSERT OR REPLACE INTO region_costs (region_id, corrected_voxels, strokes, prefill, annotator, import_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (region_id, int(corrected_voxels), int(strokes), prefill, annotator, import_id),
        )

    def region_costs(self) -> dict[int, dict[str, Any]]:
        """``{region id: {corrected_voxels, strokes, prefill, annotator, import_id}}`` of the regions measured."""
        keys = ("corrected_voxels", "strokes", "prefill", "annotator", "import_id")
        rows = self.conn.execute(
            "SELECT region_id, corrected_voxels, strokes, prefill, annotator, import_id FROM region_costs"
        ).fetchall()
        return {int(row[0]): dict(zip(keys, row[1:], strict=True)) for row in rows}

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
