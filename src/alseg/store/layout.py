"""The experiment folder on disk: its file names, atomic writes, the log, and the crash-test hook.

One experiment is one directory::

    config.yaml          the complete, resolved configuration (``CONFIG_FILE``)
    alseg.sqlite         rounds, stages, regions, label files, metrics (``DB_FILE``, see ``state.py``)
    alseg.log            the log (``LOG_FILE``)
    progress.json        the stage running now, while a run holds the experiment (``PROGRESS_FILE``)
    nnunet/              the backend's frozen plans
    rounds/NNN/          query.json, labels/ (partial labels of the cases changed this round),
                         model/ (the trained model), evaluation.json; with the human oracle also
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

from alseg.evaluation.metrics import json_safe

CONFIG_FILE = "config.yaml"
DB_FILE = "alseg.sqlite"
LOG_FILE = "alseg.log"
PROGRESS_FILE = "progress.json"  # the stage running now (see loop.progress.StageProgress); absent between runs
STAGES = ("query", "annotate", "train", "evaluate")
KILL_ENV = "ALSEG_KILL_AT"

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
    use it to prove that a kill at any point leaves a resumable experiment; it does nothing otherwise.
    """
    target = os.environ.get(KILL_ENV)
    if target and target == f"{name}:{round_index}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
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


def peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024.0


def say(message: str) -> None:
    """One line on the terminal (stderr, above any progress bar) and in ``alseg.log``."""
    tqdm.write(message, file=sys.stderr)
    log.info(message)
