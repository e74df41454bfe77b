"""When to stop, in the loop (fake backend, synthetic dataset): the stop set is drawn once and kept across rounds
and kills, each round's stability and entropy agree with a recomputation from the stored segmentations, status
and the CLI carry them, and experiments from before the stop set still resume and report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from alseg.backends.base import TrainResult
from alseg.cli import app
from alseg.config import ExperimentConfig, load_config
from alseg.data.dataset import Dataset, load_dataset
from alseg.data.regions import annotated_mask
from alseg.evaluation.stopping import CONTINUE, STOP, draw_stop_set
from alseg.loop.drivers import advance_experiment, run_experiment
from alseg.loop.status import experiment_status
from alseg.oracle.importer import import_labels
from alseg.store.layout import DB_FILE, KILL_ENV, STOP_SET_FILE, STOP_SET_META
from alseg.store.state import ExperimentState
from alseg.strategies.base import make_rng
from conftest import TESTS_DIR, write_config
from fake_backend import FakeBackend, read_model

ROUNDS, STOP_SET, THRESHOLD = 4, 3, 0.93
LABELS = (1, 2)
ROUND_KEYS = ("stability", "stability_per_class", "stop_set_entropy", "dice_gain", "recommendation", "rule")


class ChangingBackend(FakeBackend):
    """The fake backend with a share of voxels (falling with the round) given a random class, so consecutive
    rounds' segmentations differ and stability rises; reproducible per (case, model seed)."""

    stop_training_at: int | None = None

    def probabilities(self, case_id: str, model_seed: int, n_samples: int = 1) -> np.ndarray:
        probs = super().probabilities(case_id, model_seed, n_samples)
        rng = np.random.default_rng([zlib.crc32(case_id.encode()), model_seed & 0xFFFFFFFF, 7])
        share = 0.02 / 4 ** (model_seed % 1000)
        flip = rng.random(probs.shape[2:]) < share
        target = rng.integers(0, probs.shape[1], size=probs.shape[2:])
        for c in range(probs.shape[1]):
            probs[:, c][:, flip & (target == c)] += 1.0
        return probs / probs.sum(axis=1, keepdims=True)

    def train(self, cases: Any, out_dir: Path, seed: int, *args: Any, **kwargs: Any) -> TrainResult:
        if self.stop_training_at is not None and seed % 1000 >= self.stop_training_at:
            raise RuntimeError("stopped before training")
        return super().train(cases, out_dir, seed, *args, **kwargs)


def make_changing_backend(cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> ChangingBackend:
    return ChangingBackend(cfg, ds, exp_dir)


@pytest.fixture(autouse=True)
def _no_kill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)


def _config(tmp: Path, dataset: Path, **overrides: Any) -> Path:
    stopping = {"stop_set_size": STOP_SET, "stability_threshold": THRESHOLD, **overrides}
    return write_config(tmp / "config.yaml", dataset, rounds=ROUNDS, stopping=stopping)


@pytest.fixture(scope="module")
def reference(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of 4 rounds."""
    os.environ.pop(KILL_ENV, None)
    root = tmp_path_factory.mktemp("stopping_reference")
    cfg = load_config(_config(root, _synthetic_template))
    return run_experiment(cfg, root / "exp", make_changing_backend)


def _meta_stop_set(exp: Path) -> list[str] | None:
    st = ExperimentState(exp / DB_FILE)
    try:
        value = st.get_meta(STOP_SET_META)
        return None if value is None else json.loads(value)
    finally:
        st.close()


def _recompute(exp: Path, r: int, stop_set: list[str]) -> tuple[dict[str, float], float]:
    """Round r's stability per class (against round r - 1) and stop-set entropy, from the stored files alone."""
    st = ExperimentState(exp / DB_FILE)
    try:
        boxes: dict[str, list] = {}
        for g in st.regions(max_round=r, status="annotated"):
            boxes.setdefault(g.region.case_id, []).append(g.region.box)
    finally:
        st.close()
    now = np.load(exp / "rounds" / f"{r:03d}" / STOP_SET_FILE)
    before = np.load(exp / "rounds" / f"{r - 1:03d}" / STOP_SET_FILE)
    inter = dict.fromkeys(LABELS, 0)
    sizes = dict.fromkeys(LABELS, 0)
    ent, n = 0.0, 0
    seed = read_model(exp / "rounds" / f"{r:03d}" / "model")["seed"]
    cfg = load_config(exp / "config.yaml")
    backend = ChangingBackend(cfg, load_dataset(cfg.dataset), exp)
    for cid in stop_set:
        keep = ~annotated_mask(now[cid].shape, boxes.get(cid, []))
        a, b = now[cid][keep], before[cid][keep]
        for lab in LABELS:
            inter[lab] += int(((a == lab) & (b == lab)).sum())
            sizes[lab] += int((a == lab).sum() + (b == lab).sum())
        p = backend.probabilities(cid, seed)[0]
        pe = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=0) / np.log(p.shape[0])
        ent += float(pe[keep].sum())
        n += int(keep.sum())
    per_class = {str(lab): 1.0 if sizes[lab] == 0 else 2 * inter[lab] / sizes[lab] for lab in LABELS}
    return per_class, ent / n


def test_stop_set_is_fixed_and_signals_match_the_stored_segmentations(reference: Path) -> None:
    exp = reference
    st = ExperimentState(exp / DB_FILE)
    pool, _ = st.split()
    st.close()
    stop_set = _meta_stop_set(exp)
    assert stop_set == draw_stop_set(pool, STOP_SET, make_rng(0, 0, "stop_set", "draw"))
    assert len(stop_set) == STOP_SET and set(stop_set) <= set(pool)
    for r in range(ROUNDS):
        with np.load(exp / "rounds" / f"{r:03d}" / STOP_SET_FILE) as npz:
            assert sorted(npz.files) == stop_set  # the same cases every round
            assert all(npz[c].dtype == np.uint8 and npz[c].ndim == 3 for c in stop_set)

    status = experiment_status(exp)
    rows = status["rounds"]
    assert [row["round"] for row in rows] == list(range(ROUNDS))
    assert rows[0]["stability"] is None and rows[0]["stability_per_class"] is None
    assert rows[0]["dice_gain"] is None and rows[0]["recommendation"] == CONTINUE
    for r, row in enumerate(rows):
        assert set(ROUND_KEYS) <= set(row)
        assert 0.0 <= row["stop_set_entropy"] <= 1.0
        assert row["recommendation"] in (STOP, CONTINUE) and isinstance(row["rule"], str) and row["rule"]
        if r == 0:
            continue
        assert 0.0 <= row["stability"] <= 1.0 and set(row["stability_per_class"]) == {"1", "2"}
        assert row["stability"] == pytest.approx(np.mean(list(row["stability_per_class"].values())))
        per_class, entropy = _recompute(exp, r, stop_set)
        assert row["stability_per_class"] == pytest.approx(per_class)
        assert row["stop_set_entropy"] == pytest.approx(entropy, rel=1e-4)
        assert -1.0 <= row["dice_gain"] <= 1.0
    # the backend's noise falls with the round, so stability rises (about 0.80, 0.94, 0.98): with the
    # config's threshold 0.93 and the default patience 2, stopping looks safe from round 3 on
    stab = [row["stability"] for row in rows[1:]]
    assert stab == sorted(stab) and stab[0] < THRESHOLD <= stab[1]
    assert [row["recommendation"] for row in rows] == [CONTINUE, CONTINUE, CONTINUE, STOP]
    assert rows[2]["rule"].endswith("for 1 of 2 rounds") and rows[3]["rule"].endswith("for 2 rounds (patience 2)")
    exp_level = status["stopping"]
    assert exp_level["stop_set_size"] == STOP_SET and exp_level["stability_threshold"] == THRESHOLD
    assert exp_level["patience"] == 2 and exp_level["min_gain"] == 0.01 and exp_level["first_stop_round"] == 3
    # the held-out Dice rises too: the 95% budget of the fitted curve, with its bootstrap interval
    x95 = exp_level["fg_eff_x95"]
    assert x95["reason"] is None and x95["n_points"] == ROUNDS and x95["c"] <= 1.0
    assert rows[0]["fg_fraction"] < x95["x95"] and x95["interval"][0] <= x95["x95"] <= x95["interval"][1]
    assert x95["bootstrap"]["n_resamples"] == 200
    json.dumps(status)


def _stability_rows(exp: Path) -> list[tuple[Any, ...]]:
    return [
        (row["round"], row["stability"], row["stop_set_entropy"], row["recommendation"], row["rule"])
        for row in experiment_status(exp)["rounds"]
    ]


_KILLED_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from test_stopping_loop import make_changing_backend
    from alseg.config import load_config
    from alseg.loop.drivers import advance_experiment, run_experiment
    run_experiment(load_config(Path(sys.argv[3])), Path(sys.argv[4]), backend_factory=make_changing_backend)
    print("finished without being killed")
    """
)


@pytest.mark.parametrize("kill_at", ["evaluate.stop_set_written:1", "evaluate.predicting:0", "train.before_commit:0"])
def test_stop_set_and_signals_survive_a_kill(
    reference: Path, _synthetic_template: Path, tmp_path: Path, kill_at: str
) -> None:
    cfg_path = _config(tmp_path, _synthetic_template)
    exp = tmp_path / "exp"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(TESTS_DIR), str(Path(__file__).parent), str(cfg_path), str(exp)],
        env={**os.environ, KILL_ENV: kill_at},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    r = int(kill_at.rsplit(":", 1)[1])
    st = ExperimentState(exp / DB_FILE)
    assert not st.stage_done(r, "evaluate")
    st.close()
    if kill_at.startswith("evaluate"):  # drawn and stored before the round's predictions
        assert _meta_stop_set(exp) == _meta_stop_set(reference)
    if kill_at.startswith("evaluate.stop_set"):  # the file is complete, the stage not committed
        assert (exp / "rounds" / f"{r:03d}" / STOP_SET_FILE).is_file()

    run_experiment(load_config(cfg_path), exp, make_changing_backend)
    assert _meta_stop_set(exp) == _meta_stop_set(reference)
    assert _stability_rows(exp) == _stability_rows(reference)
    for q in range(ROUNDS):  # the segmentation files are byte-identical to the uninterrupted run's
        name = Path("rounds") / f"{q:03d}" / STOP_SET_FILE
        assert (exp / name).read_bytes() == (reference / name).read_bytes()
    assert not list(exp.rglob(f".{STOP_SET_FILE}.tmp"))


def test_status_cli_prints_one_recommendation_line_per_round(reference: Path) -> None:
    result = CliRunner().invoke(app, ["status", str(reference)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("round ")]
    assert [ln.split(":")[0] for ln in lines] == [f"round {r}" for r in range(ROUNDS)]
    assert all(f": {STOP}: " in ln or f": {CONTINUE}: " in ln for ln in lines)
    assert "no earlier prediction" in lines[0]
    assert "stability 0." in lines[1] or "stability 1." in lines[1]
    assert "held-out Dice gain" in lines[1] and "shown, not used" in lines[1]
    assert any(ln.startswith("95% budget") and "bootstrap interval" in ln for ln in result.output.splitlines())

    as_json = CliRunner().invoke(app, ["status", str(reference), "--json"])
    data = json.loads(as_json.output)
    assert all(set(ROUND_KEYS) <= set(row) for row in data["rounds"]) and "stopping" in data


def test_experiment_from_before_the_stop_set_resumes_and_reports(
    reference: Path, _synthetic_template: Path, tmp_path: Path
) -> None:
    """Rounds 0-1 run, then every trace of the stop set is removed (as alseg wrote them before this feature);
    status reports None for them, and the resumed rounds draw the same stop set and compare from round 3."""
    cfg_path = _config(tmp_path, _synthetic_template)
    exp = tmp_path / "exp"
    ChangingBackend.stop_training_at = 2
    try:
        with pytest.raises(RuntimeError, match="stopped before training"):
            run_experiment(load_config(cfg_path), exp, make_changing_backend)
    finally:
        ChangingBackend.stop_training_at = None
    conn = sqlite3.connect(exp / DB_FILE)
    with conn:
        conn.execute("DELETE FROM meta WHERE key = ?", (STOP_SET_META,))
        conn.execute("UPDATE stages SET detail = NULL WHERE stage = 'evaluate'")
    conn.close()
    for r in (0, 1):
        (exp / "rounds" / f"{r:03d}" / STOP_SET_FILE).unlink()
    rows = experiment_status(exp)["rounds"]
    assert [row["stability"] for row in rows[:2]] == [None, None]
    assert [row["stop_set_entropy"] for row in rows[:2]] == [None, None]
    assert all("predates" in row["rule"] for row in rows[:2])

    run_experiment(load_config(cfg_path), exp, make_changing_backend)
    rows = experiment_status(exp)["rounds"]
    assert _meta_stop_set(exp) == _meta_stop_set(reference)
    assert rows[2]["stability"] is None and "no earlier round" in rows[2]["rule"]
    assert rows[2]["stop_set_entropy"] is not None
    ref_rows = experiment_status(reference)["rounds"]
    assert rows[3]["stability"] == ref_rows[3]["stability"]  # round 3 against round 2, as the reference


def test_no_stop_set_when_its_size_is_zero(_synthetic_template: Path, tmp_path: Path) -> None:
    cfg_path = _config(tmp_path, _synthetic_template, stop_set_size=0)
    exp = run_experiment(load_config(cfg_path), tmp_path / "exp", make_changing_backend)
    assert not list(exp.rglob(STOP_SET_FILE)) and _meta_stop_set(exp) is None
    rows = experiment_status(exp)["rounds"]
    assert all(row["stability"] is None and row["recommendation"] == CONTINUE for row in rows)
    assert all("no stop set" in row["rule"] for row in rows)
    assert [row["dice_gain"] is None for row in rows] == [True, False, False, False]


def test_a_copied_experiment_reports_the_same(reference: Path, tmp_path: Path) -> None:
    """Status reads only the experiment folder: a copy elsewhere gives the same signals."""
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    assert _stability_rows(copy) == _stability_rows(reference)
    assert experiment_status(copy)["stopping"] == experiment_status(reference)["stopping"]


def _label_work_package(exp: Path, r: int, out: Path) -> Path:
    """Play the annotator: label 1 in the first half of every requested region."""
    package = exp / "rounds" / f"{r:03d}" / "to_annotate"
    out.mkdir(parents=True)
    for case in json.loads((package / "manifest.json").read_text())["cases"]:
        mask_img = sitk.ReadImage(str(package / case["mask"]))
        lab = (sitk.GetArrayFromImage(mask_img) > 0).astype(np.uint8)
        lab[: lab.shape[0] // 2] = 0
        img = sitk.GetImageFromArray(lab)
        img.CopyInformation(mask_img)
        sitk.WriteImage(img, str(out / f"{case['case_id']}.nii.gz"))
    return out


def test_stability_without_any_held_out_label(_synthetic_template: Path, tmp_path: Path) -> None:
    """A dataset people annotate has no held-out cases: the label-free signals and the recommendation remain."""
    ds = tmp_path / "ds"
    shutil.copytree(_synthetic_template, ds)
    shutil.rmtree(ds / "labelsTr")
    meta = json.loads((ds / "dataset.json").read_text())
    meta["training"] = []
    (ds / "dataset.json").write_text(json.dumps(meta))
    exp = tmp_path / "exp"
    cfg = load_config(write_config(tmp_path / "cfg.yaml", ds, strategy="random", rounds=3))
    run_experiment(cfg, exp, make_changing_backend)
    for r in range(3):
        import_labels(exp, _label_work_package(exp, r, tmp_path / f"labels_{r}"))
        advance_experiment(exp, backend_factory=make_changing_backend)
    status = experiment_status(exp)
    rows = status["rounds"]
    assert [row["round"] for row in rows] == [0, 1, 2] and status["complete"]
    assert all(row["dice_mean"] is None and row["dice_gain"] is None for row in rows)
    assert len(_meta_stop_set(exp)) == 8  # the default 20 is more than the 8 pool cases: all of them
    assert rows[0]["stability"] is None
    assert all(0.0 <= row["stability"] <= 1.0 for row in rows[1:])
    assert all(row["recommendation"] in (STOP, CONTINUE) for row in rows)
    assert "at least 3" in status["stopping"]["fg_eff_x95"]["reason"]  # no held-out Dice: no 95% budget
    result = CliRunner().invoke(app, ["status", str(exp)], env={"COLUMNS": "200"})
    lines = [ln for ln in result.output.splitlines() if ln.startswith("round ")]
    assert len(lines) == 3 and not any("held-out" in ln for ln in lines)
    assert not any(ln.startswith("95% budget") for ln in result.output.splitlines())


def test_new_stopping_thresholds_are_taken_on_resume_but_not_a_new_stop_set(
    synthetic_dataset: Path, tmp_path: Path
) -> None:
    from alseg.config import load_config
    from alseg.errors import ExperimentError
    from alseg.loop.create import open_or_create
    from conftest import make_config

    exp = tmp_path / "exp"
    open_or_create(make_config(synthetic_dataset), exp)
    stricter = make_config(synthetic_dataset, stopping={"stability_threshold": 0.99, "patience": 3})
    assert open_or_create(stricter, exp).stopping.stability_threshold == 0.99
    assert load_config(exp / "config.yaml").stopping.patience == 3  # stored: status reads it
    with pytest.raises(ExperimentError, match=r"stopping\.stop_set_size: stored 20 vs given 5"):
        open_or_create(make_config(synthetic_dataset, stopping={"stop_set_size": 5}), exp)
