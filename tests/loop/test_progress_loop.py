"""A round the user can watch, with the fake backend: epoch lines in alseg.log, the estimate of the experiment's
training time, progress.json while a stage runs (and none after), ``alseg status`` showing the running stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from alseg.backends.base import TrainingProgress
from alseg.cli import app, running_line
from alseg.loop.drivers import run_experiment
from alseg.loop.progress import format_minutes, training_iterations
from alseg.loop.status import experiment_status, lock_holder
from alseg.store.layout import LOG_FILE, PROGRESS_FILE
from alseg.store.state import experiment_lock
from conftest import make_config
from fake_backend import FakeBackend

# 3 rounds: 4 epochs of 30 iterations from scratch, then 2 warm-started: 120 + 2 x 60 = 240 iterations
SCHEDULE = {"epochs": 2, "iterations_per_epoch": 30, "first_round_epochs": 4, "warm_start": True, "optimizer": "adam"}


class WatchingBackend(FakeBackend):
    """The fake backend; at every epoch end it also asks ``experiment_status`` what is running."""

    statuses: list[dict[str, Any]]

    def train(self, *args: Any, progress: Any = None, **kwargs: Any) -> Any:
        def watched(p: TrainingProgress) -> None:
            progress(p)
            if p.epoch_end:
                self.statuses.append(experiment_status(self.exp_dir).get("in_progress", {}))

        return super().train(*args, progress=watched if progress is not None else None, **kwargs)


def factory(spi: float = 0.5, setup: float = 0.0, statuses: list | None = None) -> Any:
    def make(cfg: Any, ds: Any, exp_dir: Path) -> FakeBackend:
        backend = WatchingBackend(cfg, ds, exp_dir)
        backend.seconds_per_iteration, backend.setup_seconds = spi, setup
        backend.statuses = statuses if statuses is not None else []
        return backend

    return make


def test_loop_logs_epochs_estimates_and_cleans_up(
    _synthetic_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses: list[dict[str, Any]] = []
    cfg = make_config(_synthetic_template, schedule=SCHEDULE)
    exp = run_experiment(cfg, tmp_path / "exp", factory(spi=0.5, statuses=statuses))
    text = (exp / LOG_FILE).read_text()
    # one line per epoch: 4 in round 0, 2 in each later round
    pattern = r"round (\d): train epoch (\d)/(\d): loss ([\d.]+), pseudo-Dice ([\d.]+), ([\d.]+) s/epoch"
    epochs = re.findall(pattern, text)
    assert [(r, e, n) for r, e, n, *_ in epochs] == [
        ("0", "1", "4"), ("0", "2", "4"), ("0", "3", "4"), ("0", "4", "4"),
        ("1", "1", "2"), ("1", "2", "2"), ("2", "1", "2"), ("2", "2", "2"),
    ]  # fmt: skip
    assert epochs[0][3:] == ("0.5000", "0.200", "15.0")  # fake: loss 1/(e+1), pseudo-Dice e/(epochs+1), 30 x 0.5 s
    # the estimate, once, on the terminal and in the log: 0.5 s x 240 iterations = 2.0 min
    line = "round 0: estimated training time of the whole experiment (3 rounds): 2.0 min (120 + 2 × 60 iterations"
    assert text.count("estimated training time") == 1 and line in text
    err = capsys.readouterr().err
    assert line in err
    assert "round 0: planning fake from" in err and "round 0: planning fake from" in text
    # after round 0's evaluation: the remaining rounds, prediction and evaluation included
    assert "round 0: estimated time of rounds 1-2: " in text
    # while training ran, status showed it as running; after the run no progress.json is left
    assert statuses and all(s.get("stage") == "train" for s in statuses)
    assert statuses[0]["round"] == 0 and statuses[0]["detail"].startswith("epoch 2/4")
    assert statuses[0]["fraction"] == pytest.approx(0.25)
    assert statuses[0]["eta_seconds"] == pytest.approx(90 * 0.5)  # 90 iterations left at 0.5 s
    assert statuses[0]["pid"] == os.getpid()
    assert not (exp / PROGRESS_FILE).exists()
    status = experiment_status(exp)
    assert "in_progress" not in status and status["complete"]


def test_estimate_counts_ensemble_members_and_start_up(_synthetic_template: Path, tmp_path: Path) -> None:
    cfg = make_config(
        _synthetic_template, schedule=SCHEDULE, uncertainty={"source": "ensemble", "n_samples": 2}, rounds=2
    )
    assert training_iterations(cfg) == [240, 120]  # two members a round
    exp = run_experiment(cfg, tmp_path / "exp", factory(spi=0.25, setup=10.0))
    text = (exp / LOG_FILE).read_text()
    # 0.25 s x 360 iterations + 10 s x 4 trainings = 130 s
    assert (
        "estimated training time of the whole experiment (2 rounds): 2.2 min (240 + 1 × 120 iterations "
        "(2 models a round) at 0.25 s each, plus 10 s to start each of 4 trainings); predicting the pool and "
        "evaluating come on top" in text
    )
    assert "round 0: train epoch 4/4 (model 2/2)" in text


def test_format_minutes() -> None:
    assert format_minutes(120) == "2.0 min"
    assert format_minutes(59 * 60) == "59 min"
    assert format_minutes(3 * 3600 + 5 * 60) == "3 h 05 min"


def _progress(exp: Path, pid: int, **kw: Any) -> None:
    data = {
        "pid": pid,
        "round": 1,
        "stage": "train",
        "detail": "epoch 4/12",
        "started_at": "2025-01-01T00:00:00Z",
        "fraction": 0.43,
        "eta_seconds": 170.0,
        "updated_at": "2025-01-01T00:02:00Z",
    }
    data.update(kw)
    (exp / PROGRESS_FILE).write_text(json.dumps(data))


@pytest.fixture
def finished_exp(_synthetic_template: Path, tmp_path: Path) -> Path:
    cfg = make_config(_synthetic_template, schedule=SCHEDULE, rounds=1)
    return run_experiment(cfg, tmp_path / "exp", factory())


def test_status_in_progress_only_while_the_lock_is_held(finished_exp: Path) -> None:
    exp = finished_exp
    _progress(exp, os.getpid())
    # a progress.json left by a killed run: the lock is free, nothing runs
    assert lock_holder(exp) is None
    assert "in_progress" not in experiment_status(exp)
    with experiment_lock(exp):
        assert lock_holder(exp) == os.getpid()
        status = experiment_status(exp)
        assert status["in_progress"]["stage"] == "train" and status["in_progress"]["fraction"] == 0.43
        # the lock held by a run that has not written its own progress.json yet: the old one is not shown
        _progress(exp, os.getpid() + 1)
        assert "in_progress" not in experiment_status(exp)
        (exp / PROGRESS_FILE).unlink()
        assert "in_progress" not in experiment_status(exp)  # running, but between stages
    assert "in_progress" not in experiment_status(exp)


def test_status_sees_a_run_in_another_process(finished_exp: Path) -> None:
    exp = finished_exp
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from alseg.store.state import experiment_lock
                with experiment_lock({str(exp)!r}):
                    print("locked", flush=True)
                    sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert lock_holder(exp) == holder.pid
        _progress(exp, holder.pid)
        assert experiment_status(exp)["in_progress"]["round"] == 1
        result = CliRunner().invoke(app, ["status", str(exp)])
        assert result.exit_code == 0, result.output
        assert "running: round 1, train (epoch 4/12), 43% done, about 3 min left" in result.output
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(exp) is None
    assert "in_progress" not in experiment_status(exp)  # killed: its progress.json is stale
    assert "running:" not in CliRunner().invoke(app, ["status", str(exp)]).output


def test_running_line() -> None:
    p = {"round": 2, "stage": "evaluate", "detail": None, "fraction": 0.5, "eta_seconds": 20.0}
    assert running_line(p) == "running: round 2, evaluate, 50% done, less than a minute left"
    p.update(fraction=0.0, eta_seconds=None, stage="train", detail="planning nnU-Net")
    assert running_line(p) == "running: round 2, train (planning nnU-Net), 0% done"
    p.update(fraction=0.1, eta_seconds=2 * 3600 + 30 * 60)
    assert running_line(p).endswith("10% done, about 2 h 30 min left")
