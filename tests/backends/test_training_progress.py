"""Watching nnU-Net train without nnU-Net: the worker's progress file, the parent's poller and the bar.

A stand-in trainer runs nnU-Net's ``run_training`` loop (``train_step`` per batch, ``on_epoch_end`` per epoch,
its logger's ``my_fantastic_logging``); the worker's ``_TrainingProgressFile`` watches it as it watches the real
trainer. The parent's side is tested on a file written step by step, then through ``_run_worker`` with a child
process that writes the file as the worker does.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from alseg.backends.base import TrainingProgress
from alseg.backends.nnunet import backend as backend_module
from alseg.backends.nnunet.backend import BackendError, NnUNetBackend, TrainingProgressReader
from alseg.backends.nnunet.worker import _TrainingProgressFile

FAKE_TRAINER = '''
import time


class FakeLogger:
    def __init__(self):
        self.my_fantastic_logging = {
            "train_losses": [], "mean_fg_dice": [], "epoch_start_timestamps": [], "epoch_end_timestamps": []
        }


class FakeMetaLogger:  # nnU-Net 2.8: the trainer's logger wraps a local logger
    def __init__(self):
        self.local_logger = FakeLogger()


class FakeTrainer:
    """nnU-Net's run_training loop: what it trains is the list of batches it saw."""

    def __init__(self, epochs, per_epoch):
        self.num_epochs, self.num_iterations_per_epoch = epochs, per_epoch
        self.logger = FakeMetaLogger()
        self.current_epoch = 0
        self.seen = []
        self._losses = []

    def train_step(self, batch):
        self.seen.append(batch)
        loss = 1.0 / (1 + len(self.seen))
        self._losses.append(loss)
        return {"loss": loss}

    def on_epoch_end(self):
        log = self.logger.local_logger.my_fantastic_logging
        log["train_losses"].append(sum(self._losses) / len(self._losses))
        log["mean_fg_dice"].append(0.1 * (self.current_epoch + 1))
        log["epoch_end_timestamps"].append(log["epoch_start_timestamps"][-1] + 2.5)
        self._losses = []
        self.current_epoch += 1

    def run_training(self, between=None):
        for epoch in range(self.current_epoch, self.num_epochs):
            self.logger.local_logger.my_fantastic_logging["epoch_start_timestamps"].append(100.0 * epoch)
            for i in range(self.num_iterations_per_epoch):
                self.train_step((epoch, i))
                if between:
                    between()
            self.on_epoch_end()
            if between:
                between()
'''

namespace: dict[str, Any] = {}
exec(FAKE_TRAINER, namespace)
FakeTrainer = namespace["FakeTrainer"]


def test_worker_file_and_reader_step_by_step(tmp_path: Path) -> None:
    path = tmp_path / "train_progress.json"
    reader = TrainingProgressReader(path, launched_at=None)
    assert reader.poll() == []  # no file yet
    writer = _TrainingProgressFile(path, epochs=3, iterations_per_epoch=4, member=1, members=2)
    writer.interval = 0.0  # write after every iteration
    writer.write("starting")
    first = reader.poll()
    assert [(p.iteration, p.iterations, p.epoch, p.epochs, p.member, p.members) for p in first] == [(0, 12, 0, 3, 1, 2)]
    assert reader.poll() == []  # unchanged file: nothing new

    trainer = FakeTrainer(3, 4)
    plain = FakeTrainer(3, 4)
    writer.watch(trainer)
    seen: list[TrainingProgress] = []
    trainer.run_training(between=lambda: seen.extend(reader.poll()))
    plain.run_training()
    writer.write("done")
    seen.extend(reader.poll())

    # what is trained is unchanged: the same batches in the same order, the same logged values
    assert trainer.seen == plain.seen
    assert trainer.logger.local_logger.my_fantastic_logging == plain.logger.local_logger.my_fantastic_logging
    # one report per iteration, each epoch end once, in order
    ends = [p for p in seen if p.epoch_end]
    assert [p.epoch for p in ends] == [1, 2, 3]
    assert [p.iteration for p in ends] == [4, 8, 12]
    assert [p.pseudo_dice for p in ends] == pytest.approx([0.1, 0.2, 0.3])
    assert [p.epoch_seconds for p in ends] == pytest.approx([2.5, 2.5, 2.5])
    losses = trainer.logger.local_logger.my_fantastic_logging["train_losses"]
    assert [p.loss for p in ends] == pytest.approx(losses)
    iterations = [p.iteration for p in seen]
    assert iterations == sorted(iterations) and iterations[-1] == 12
    assert sorted({p.iteration for p in seen if not p.epoch_end}) == list(range(1, 13))  # every iteration
    # within an epoch: the running mean loss of its iterations so far
    mid = next(p for p in seen if p.iteration == 6)
    assert mid.loss == pytest.approx((1 / 6 + 1 / 7) / 2) and mid.pseudo_dice == pytest.approx(0.1)
    assert all(p.member == 1 and p.members == 2 for p in seen)
    assert all(p.seconds >= 0 for p in seen)


def test_reader_catches_up_on_missed_epochs_and_ignores_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    reader = TrainingProgressReader(path, launched_at=1000.0)
    path.write_text("{not json")
    assert reader.poll() == []
    path.write_text("[1, 2]")
    assert reader.poll() == []
    state = {
        "phase": "training",
        "member": 0,
        "members": 1,
        "epoch": 2,
        "epochs": 5,
        "iteration": 23,
        "iterations": 50,
        "loss": 0.4,
        "pseudo_dice": 0.6,
        "seconds": 46.0,
        "started_at": 1012.5,
        "updated_at": 1060.0,
        "epochs_done": [
            {"epoch": 1, "loss": 0.9, "pseudo_dice": None, "seconds": 20.0, "elapsed": 20.0},
            {"epoch": 2, "loss": 0.5, "pseudo_dice": 0.6, "seconds": 21.0, "elapsed": 41.0},
        ],
    }
    path.write_text(json.dumps(state))
    got = reader.poll()  # the parent polled late: both epoch ends, then where training is now
    assert [(p.epoch_end, p.epoch, p.iteration) for p in got] == [(True, 1, 10), (True, 2, 20), (False, 2, 23)]
    assert got[0].pseudo_dice is None and got[1].pseudo_dice == pytest.approx(0.6)
    assert got[1].seconds_per_iteration == pytest.approx(41.0 / 20)
    assert got[2].seconds_per_iteration == pytest.approx(2.0)
    assert all(p.setup_seconds == pytest.approx(12.5) for p in got)
    state.update(iteration=30, epoch=3, updated_at=1070.0, seconds=60.0)
    state["epochs_done"].append({"epoch": 3, "loss": 0.3, "pseudo_dice": 0.7, "seconds": 19.0, "elapsed": 60.0})
    path.write_text(json.dumps(state))
    got = reader.poll()  # the current state is the epoch end: reported once
    assert [(p.epoch_end, p.epoch, p.iteration) for p in got] == [(True, 3, 30)]


# --------------------------------------------------------------------------- the parent's poller
CHILD = (
    FAKE_TRAINER
    + """
import json, sys, time
from pathlib import Path
from alseg.backends.nnunet.worker import _TrainingProgressFile

spec = json.loads(Path(sys.argv[-1]).read_text())
assert sys.argv[1:4] == ["-m", "alseg.backends.nnunet.worker", "train"], sys.argv
print("fake worker", sys.argv[-2], flush=True)
if spec.get("fail"):
    print("something broke", flush=True)
    sys.exit(3)
progress = _TrainingProgressFile(Path(spec["progress_file"]), 2, 3, spec["member"], spec["members"])
progress.interval = 0.0
progress.write("starting")
time.sleep(0.15)
trainer = FakeTrainer(2, 3)
progress.watch(trainer)
trainer.run_training(between=lambda: time.sleep(spec.get("pause", 0.1)))
progress.write("done")
"""
)


@pytest.fixture
def fake_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NnUNetBackend:
    """An NnUNetBackend whose worker command runs CHILD (``sys.executable`` is a launcher script)."""
    script = tmp_path / "fake_worker.py"
    script.write_text(CHILD)
    launcher = tmp_path / "python"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(launcher))
    monkeypatch.setattr(backend_module, "PROGRESS_POLL_SECONDS", 0.02)
    return NnUNetBackend(tmp_path / "ws", read_image=lambda cid: (None, None), num_threads=1)


def test_run_worker_polls_progress_into_the_callback(fake_worker: NnUNetBackend, tmp_path: Path) -> None:
    seen: list[TrainingProgress] = []
    work = tmp_path / "member_1"
    fake_worker._run_worker("train", {"member": 1, "members": 2}, work, training=True, progress=seen.append)
    assert seen, "no progress reported"
    assert seen[0].iteration == 0 and seen[0].iterations == 6 and seen[0].epochs == 2
    assert [p.epoch for p in seen if p.epoch_end] == [1, 2]  # each epoch end once, the last one too
    assert seen[-1].iteration == 6 and seen[-1].epoch == 2
    assert [p.iteration for p in seen] == sorted(p.iteration for p in seen)
    assert all((p.member, p.members) == (1, 2) for p in seen)
    started = [p.setup_seconds for p in seen if p.setup_seconds is not None]
    assert started and all(s >= 0.1 for s in started)  # the child slept before its first iteration
    # the spec the child got names the progress file next to its log; the log holds its output
    spec = json.loads((work / "train_spec.json").read_text())
    assert Path(spec["progress_file"]) == work.resolve() / "train_progress.json"
    assert "fake worker train" in (work / "train.log").read_text()


def test_run_worker_failure_message_unchanged(fake_worker: NnUNetBackend, tmp_path: Path) -> None:
    work = tmp_path / "w"
    message = r"nnU-Net train failed \(exit 3\); see .*train\.log:\n(.|\n)*something broke"
    with pytest.raises(BackendError, match=message):
        fake_worker._run_worker("train", {"fail": True, "member": 0, "members": 1}, work, True, progress=print)
    with pytest.raises(BackendError, match=r"exit 3"):  # without a callback as before
        fake_worker._run_worker("train", {"fail": True}, work, True)


def test_callback_error_stops_the_child(fake_worker: NnUNetBackend, tmp_path: Path) -> None:
    def broken(p: TrainingProgress) -> None:
        if p.iteration >= 1:
            raise RuntimeError("display broke")

    work = tmp_path / "w"
    with pytest.raises(RuntimeError, match="display broke"):
        fake_worker._run_worker("train", {"member": 0, "members": 1, "pause": 5.0}, work, True, progress=broken)
    # the child was killed and waited for, not left training
    spec_users = [
        pid for pid in os.listdir("/proc") if pid.isdigit() and str(work.resolve() / "train_spec.json") in _cmdline(pid)
    ]
    assert spec_users == []


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- the bar
class _Exp:
    """What ``_TrainingDisplay`` calls on its run."""

    def __init__(self) -> None:
        self.updates: list[tuple[float, float | None, str | None]] = []
        self.estimates: list[tuple[int, TrainingProgress]] = []

    def update(self, fraction: float, eta: float | None, detail: str | None, force: bool = False) -> None:
        self.updates.append((fraction, eta, detail))

    def announce_training_estimate(self, r: int, p: TrainingProgress) -> None:
        self.estimates.append((r, p))


def test_bar_follows_the_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from alseg.loop.progress import _TrainingDisplay

    path = tmp_path / "p.json"
    writer = _TrainingProgressFile(path, epochs=2, iterations_per_epoch=15, member=0, members=2)
    writer.interval = 0.0
    reader = TrainingProgressReader(path)
    exp = _Exp()
    display = _TrainingDisplay(exp, 1)  # type: ignore[arg-type]
    writer.write("starting")
    trainer = FakeTrainer(2, 15)
    writer.watch(trainer)
    caplog.set_level("INFO", logger="alseg")
    snapshots = []

    def poll() -> None:
        for p in reader.poll():
            display(p)
            snapshots.append((display.bar.n, display.bar.total, display.bar.postfix))

    trainer.run_training(between=poll)
    assert display.bar.total == 60 and display.bar.desc.startswith("round 1: train")
    assert display.bar.n == 30  # model 1 of 2 done
    assert "<" in str(display.bar)  # tqdm's elapsed<remaining (the ETA)
    assert [n for n, _, _ in snapshots] == sorted(n for n, _, _ in snapshots)
    assert snapshots[0][2].startswith("epoch=1/2, model=1/2")
    assert snapshots[-1][2].startswith("epoch=2/2, model=1/2, loss=") and snapshots[-1][2].endswith("pseudo-Dice=0.200")
    epoch_lines = [r.getMessage() for r in caplog.records if "train epoch" in r.getMessage()]
    assert len(epoch_lines) == 2
    assert epoch_lines[0].startswith("round 1: train epoch 1/2 (model 1/2): loss ")
    assert epoch_lines[0].endswith(", pseudo-Dice 0.100, 2.5 s/epoch")
    # progress.json: the share of both models, ETA once timed; the estimate once 20 iterations are timed
    fractions = [u[0] for u in exp.updates]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(0.5)
    assert exp.updates[-1][1] is not None and exp.updates[-1][2] == "epoch 2/2, model 1/2"
    assert exp.estimates and exp.estimates[0][1].iteration == 20
    display.close()
