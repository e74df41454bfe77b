"""ExperimentState (SQLite) transactions, region uniqueness, stage marks, and the experiment lock."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alseg.data.regions import Box, Region
from alseg.store.state import ExperimentLockedError, ExperimentState, experiment_lock


def _region(case: str, start: tuple[int, ...], size: tuple[int, ...] = (4, 4, 4)) -> Region:
    return Region(case, Box(start, size), 0.5, {"why": "test"})


@pytest.fixture
def state(tmp_path: Path) -> ExperimentState:
    st = ExperimentState(tmp_path / "alseg.sqlite")
    yield st
    st.close()


def test_transaction_rolls_back_on_exception(state: ExperimentState) -> None:
    with state.transaction() as conn:
        state.set_split(conn, ["a", "b"], ["c"])
    with pytest.raises(RuntimeError, match="boom"), state.transaction() as conn:
        state.add_regions(conn, 0, [_region("a", (0, 0, 0))], "random")
        state.mark_stage(conn, 0, "query", 1.0)
        state.set_meta(conn, "k", "v")
        raise RuntimeError("boom")
    assert state.regions() == []
    assert not state.stage_done(0, "query")
    assert state.get_meta("k") is None
    assert state.split() == (["a", "b"], ["c"])
    # the connection is usable afterwards
    with state.transaction() as conn:
        state.add_regions(conn, 0, [_region("a", (0, 0, 0))], "random")
    assert len(state.regions()) == 1
    assert state.integrity_check() == "ok"


def test_rollback_on_constraint_violation_keeps_earlier_rows(state: ExperimentState) -> None:
    with state.transaction() as conn:
        state.add_regions(conn, 0, [_region("a", (0, 0, 0))], "random")
    with pytest.raises(sqlite3.IntegrityError), state.transaction() as conn:
        state.add_regions(conn, 1, [_region("b", (1, 1, 1))], "random")
        state.add_regions(conn, 1, [_region("a", (0, 0, 0))], "random")  # duplicate (case, box)
    regions = state.regions()
    assert [(g.round, g.region.key) for g in regions] == [(0, ("a", (0, 0, 0), (4, 4, 4)))]


def test_regions_unique_per_case_and_box(state: ExperimentState) -> None:
    with state.transaction() as conn:
        state.add_regions(
            conn,
            0,
            [
                _region("a", (0, 0, 0)),
                _region("a", (0, 0, 0), (4, 4, 2)),  # same start, other size: a different box
                _region("b", (0, 0, 0)),  # same box, other case
            ],
            "random",
        )
    with pytest.raises(sqlite3.IntegrityError), state.transaction() as conn:
        state.add_regions(conn, 1, [_region("a", (0, 0, 0))], "entropy")
    assert len(state.regions()) == 3


def test_region_roundtrip_and_filters(state: ExperimentState) -> None:
    with state.transaction() as conn:
        state.add_regions(conn, 0, [_region("a", (0, 0, 0)), _region("b", (2, 0, 0))], "starting_budget")
        state.add_regions(conn, 1, [Region("a", Box((4, 4, 4), (4, 4, 4)))], "random")  # NaN score
    r0 = state.regions(round_index=0)
    assert [g.region.key for g in r0] == [("a", (0, 0, 0), (4, 4, 4)), ("b", (2, 0, 0), (4, 4, 4))]
    assert r0[0].region.info == {"why": "test"}
    assert r0[0].n_voxels == 64 and r0[0].status == "selected" and r0[0].fg_voxels is None
    r1 = state.regions(round_index=1)
    assert r1[0].region.score != r1[0].region.score  # NaN survives as NULL
    assert len(state.regions(max_round=0)) == 2
    assert len(state.regions(max_round=1)) == 3
    with state.transaction() as conn:
        state.mark_annotated(conn, r0[0].id, {"1": 5, "2": 0}, "simulated")
    done = state.regions(status="annotated")
    assert [g.id for g in done] == [r0[0].id]
    assert done[0].fg_voxels == {"1": 5, "2": 0}


def test_stage_marks(state: ExperimentState) -> None:
    assert not state.stage_done(0, "query")
    assert state.stage_detail(0, "query") is None
    with state.transaction() as conn:
        state.mark_stage(conn, 0, "query", 1.5, 10.0, {"n_regions": 4})
        state.mark_stage(conn, 0, "annotate", 0.5)
    assert state.stage_done(0, "query") and state.stage_done(0, "annotate")
    assert not state.stage_done(0, "train") and not state.stage_done(1, "query")
    assert state.stage_detail(0, "query") == {"n_regions": 4}
    assert state.stage_detail(0, "annotate") is None
    with state.transaction() as conn:  # re-marking replaces, never duplicates
        state.mark_stage(conn, 0, "query", 2.0, None, {"n_regions": 5})
    stages = state.stages()
    assert [(s["round"], s["stage"]) for s in stages].count((0, "query")) == 1
    assert state.stage_detail(0, "query") == {"n_regions": 5}


def test_label_files_latest_wins(state: ExperimentState) -> None:
    with state.transaction() as conn:
        state.add_label_file(conn, 0, "a", "rounds/000/labels/a.nii.gz", "x")
        state.add_label_file(conn, 0, "b", "rounds/000/labels/b.nii.gz", "y")
        state.add_label_file(conn, 1, "a", "rounds/001/labels/a.nii.gz", "z")
    assert state.latest_label_files(0) == {"a": "rounds/000/labels/a.nii.gz", "b": "rounds/000/labels/b.nii.gz"}
    assert state.latest_label_files(1)["a"] == "rounds/001/labels/a.nii.gz"


def test_state_persists_across_connections(tmp_path: Path) -> None:
    st = ExperimentState(tmp_path / "db.sqlite")
    with st.transaction() as conn:
        st.set_split(conn, ["a"], ["b"])
        st.set_metrics(conn, 0, {"dice_mean": 0.5})
    st.close()
    st2 = ExperimentState(tmp_path / "db.sqlite")
    assert st2.split() == (["a"], ["b"])
    assert st2.metrics() == {0: {"dice_mean": 0.5}}
    st2.close()


# --------------------------------------------------------------------------- the lock
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from alseg.store.state import experiment_lock
    with experiment_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
    """
)

_TRY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from alseg.store.state import ExperimentLockedError, experiment_lock
    try:
        with experiment_lock(Path(sys.argv[1])):
            print("acquired")
    except ExperimentLockedError as err:
        print("LOCKED:", err)
    """
)


def _start_holder(exp_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(exp_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"lock holder did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc


def test_second_process_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    holder = _start_holder(exp_dir)
    try:
        with pytest.raises(ExperimentLockedError) as info, experiment_lock(exp_dir):
            pytest.fail("the lock was acquired twice")
        msg = str(info.value)
        assert str(exp_dir) in msg
        assert str(holder.pid) in msg  # names the holding process
        # and from a third process too
        out = subprocess.run(
            [sys.executable, "-c", _TRY, str(exp_dir)], capture_output=True, text=True, timeout=60
        ).stdout
        assert out.startswith("LOCKED:") and str(exp_dir) in out
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_lock_released_when_holder_is_sigkilled(tmp_path: Path) -> None:
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    holder = _start_holder(exp_dir)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while True:
        try:
            with experiment_lock(exp_dir):
                break
        except ExperimentLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_lock_can_be_taken_again_after_release(tmp_path: Path) -> None:
    with experiment_lock(tmp_path):
        pass
    with experiment_lock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
