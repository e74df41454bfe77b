"""The experiment folder on disk: its file names, atomic writes, the log, and the crash-test hook.

One experiment is one directory::

    config.yaml          the complete, resolved configuration (``CONFIG_FILE``)
    alseg.sqlite         rounds, stages, regions, label files, metrics (``DB_FILE``, see ``state.py``)
    alseg.log            the log (``LOG_FILE``)
    progress.json        the stage running now, while a run holds the experiment (``PROGRESS_FILE``)
    nnunet/              the backend's frozen plans
    rounds/NNN/          query.json, labels/ (partial labels of the cases changed this round),
                         model/ (the trained model), evaluation.json, stop_set.npz (the model's
                         segmentations of the stop set, ``alseg.loop.stopping``); with the human oracle also
                         to_annotate/ (the work package) and imported/ (the annotators' files)

Everything that reads or writes an experiment (the loop, the oracles, the report, ``alseg status``) takes its
names from here, so none of them imports another to learn a file name.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alseg.durable import fsync_dir
from alseg.evaluation.metrics import json_safe

CONFIG_FILE = "config.yaml"
DB_FILE = "alseg.sqlite"
LOG_FILE = "alseg.log"
PROGRESS_FILE = "progress.json"  # the stage running now (see loop.progress.StageProgress); absent between runs
STAGES = ("query", "annotate", "train", "evaluate")
KILL_ENV = "ALSEG_KILL_AT"
KILL_ONCE_ENV = "ALSEG_KILL_ONCE"
# keys of the state database's meta table that more than one package reads
FULL_DATA_META = "full_data"  # marks a full-data reference run (alseg.loop.full_data); the report reads it
FINGERPRINT_META = "dataset_fingerprint"  # the dataset's files at creation (alseg.data.fingerprint), kept current
CHANGES_META = "dataset_changes"  # JSON list: every accepted change of the dataset, and every move
STOP_SET_META = "stop_set"  # JSON list: the stop set's case ids, stored at first use (alseg.loop.stopping)
STOP_SET_FILE = "stop_set.npz"  # rounds/NNN/: the round model's uint8 segmentation of each stop-set case

log = logging.getLogger("alseg")


def round_dir(exp_dir: Path, round_index: int) -> Path:
    """``rounds/NNN``: everything one round wrote."""
    return Path(exp_dir) / "rounds" / f"{round_index:03d}"


def model_dir(exp_dir: Path, round_index: int) -> Path:
    """``rounds/NNN/model``: the model trained in a round (a directory that exists is complete)."""
    return round_dir(exp_dir, round_index) / "model"


def fault_point(name: str, round_index: int) -> None:
    """Crash-safety testing hook: SIGKILL this process at ``name`` when ``ALSEG_KILL_AT`` names it.

    ``ALSEG_KILL_AT="query.before_commit:1"`` kills the process just before round 1's query commits. Tests
    use it to prove that a kill at any point leaves a resumable experiment; it does nothing otherwise. With
    ``ALSEG_KILL_ONCE=FILE`` it kills only while FILE does not exist, and creates it first (one kill among
    processes that share the environment, such as a Ray cluster's workers).
    """
    target = os.environ.get(KILL_ENV)
    if target and target == f"{name}:{round_index}":
        once = os.environ.get(KILL_ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(json_safe(obj), indent=1))


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
        if record.levelno >= self.terminal.level and not getattr(record, "file_only", False):
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


def peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024.0


def say(message: str) -> None:
    """One line on the terminal (stderr, above any progress bar) and in ``alseg.log``."""
    tqdm.write(message, file=sys.stderr)
    log.info(message)


def log_failure(err: BaseException) -> None:
    """The traceback of a failure in ``alseg.log`` only; the command line prints the message alone."""
    log.error("stopped: %s", err, exc_info=err, extra={"file_only": True})


#: file systems on which SQLite's write-ahead log and ``flock`` are not reliable (SQLite's and Lustre's docs)
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "fuse.glusterfs",
        "fuse.sshfs",
        "fuse.s3fs",
        "9p",
        "afs",
        "panfs",
        "ocfs2",
    }
)


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system holding ``path`` (from ``/proc/mounts``), or None where it is unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = Path(path).resolve()
    best, kind = -1, None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = Path(parts[1].replace("\\040", " "))
        if (target == mount_point or mount_point in target.parents) and len(str(mount_point)) > best:
            best, kind = len(str(mount_point)), parts[2]
    return kind


def warn_if_network_filesystem(exp_dir: Path, mounts: str | None = None) -> str | None:
    """Warn (log and terminal) when an experiment folder lies on a network file system; return its type."""
    kind = filesystem_type(Path(exp_dir).parent if not Path(exp_dir).exists() else Path(exp_dir), mounts)
    if kind in NETWORK_FILESYSTEMS:
        log.warning(
            "%s lies on a network file system (%s): SQLite's write-ahead log and file locks are not reliable "
            "there; keep experiment folders on a local disk",
            exp_dir,
            kind,
        )
        return kind
    return None
