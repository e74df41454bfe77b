"""Studies with the fake backend on the synthetic dataset: the grid, one round 0 per group, resume, the version
check, failures, the report and the study file's errors."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from alseg.config import ConfigError, load_config
from alseg.errors import ExperimentError
from alseg.loop.fork import FORK_META, fork_round0
from alseg.report.stopping import experiment_stopping
from alseg.study.executors import InProcessExecutor
from alseg.study.runner import STUDY_FILE, StudyError, alseg_commit, plan_runs, run_study, same_source
from alseg.study.spec import load_study
from conftest import RecordingFactory, make_config

SETTING = {"region_size": [8, 8, 8], "query_size": 4, "rounds": 3, "profile": "cpu", "device": "cpu"}


def write_study(path: Path, dataset: Path, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "name": "tiny",
        "dataset": str(dataset),
        "seeds": [0, 1],
        "settings": {"box8": dict(SETTING)},
        "strategies": ["random", "entropy", {"strategy": "power_pe", "name": "power_pe_b2", "params": {"beta": 2}}],
        "baseline": "random",
    }
    data.update(overrides)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def regions(exp: Path, max_round: int | None = None) -> list[tuple]:
    with sqlite3.connect(exp / "alseg.sqlite") as conn:
        rows = conn.execute("SELECT round, case_id, box_start, box_size FROM regions ORDER BY id").fetchall()
    return [r for r in rows if max_round is None or r[0] <= max_round]


def experiments(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def study(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("study")
    spec = write_study(root / "study.yaml", _synthetic_template)
    factory = RecordingFactory()
    lines: list[str] = []
    outcome = run_study(spec, root / "out", executor=InProcessExecutor(backend_factory=factory), say=lines.append)
    return {"root": root, "spec": spec, "out": root / "out", "factory": factory, "outcome": outcome, "lines": lines}


def test_every_cell_runs_and_round_0_is_trained_once_per_seed(study: dict[str, Any]) -> None:
    out, outcome = study["out"], study["outcome"]
    assert outcome.total == 3 * 2 + 1 and not outcome.failed and len(outcome.finished) == 7
    for name in ("random", "entropy", "power_pe_b2"):
        for seed in (0, 1):
            exp = out / "runs" / "box8" / name / f"seed{seed}"
            status = {r[0] for r in sqlite3.connect(exp / "alseg.sqlite").execute("SELECT stage FROM stages")}
            assert status == {"query", "annotate", "train", "evaluate"}
            assert max(r[0] for r in regions(exp)) == 2
    bases = experiments(out / "runs" / "box8" / "round0")
    assert sorted(b.name.rsplit("_", 1)[1] for b in bases) == ["seed0", "seed1"]
    # every run of a seed holds its base's round 0, regions and model, and says where it came from
    for base in bases:
        seed = base.name.rsplit("_", 1)[1]
        for name in ("random", "entropy", "power_pe_b2"):
            exp = out / "runs" / "box8" / name / seed
            assert regions(exp, 0) == regions(base)
            assert (exp / "rounds" / "000" / "model").is_dir()
            meta = dict(sqlite3.connect(exp / "alseg.sqlite").execute("SELECT key, value FROM meta").fetchall())
            assert json.loads(meta[FORK_META])["base"] == str(base.resolve())
    # the fake backend's round-0 trainings: one per base, none in the forked runs (their round 1 warm-starts)
    round0 = [c for b in study["factory"].backends for c in b.calls if c[0] == "train" and "round0" in str(b.exp_dir)]
    assert len(round0) == 2
    forked_trains = [
        (b.exp_dir.name, len([c for c in b.calls if c[0] == "train"]))
        for b in study["factory"].backends
        if b.exp_dir.name.startswith("seed")
    ]
    assert all(n == 2 for _, n in forked_trains) and len(forked_trains) == 6  # rounds 1 and 2 only
    # the base predicted the stop set in round 0, so every run has its stability from round 1 on
    for name in ("random", "entropy", "power_pe_b2"):
        exp = out / "runs" / "box8" / name / "seed0"
        per_round, _ = experiment_stopping(exp, load_config(exp / "config.yaml"))
        assert per_round[1]["stability"] is not None and per_round[2]["stability"] is not None


def test_study_record_and_report(study: dict[str, Any]) -> None:
    out = study["out"]
    record = json.loads((out / STUDY_FILE).read_text())
    assert record["study"] == "tiny" and len(record["runs"]) == 7 + 2  # and the two bases (round 0 per seed)
    assert sorted(k.rsplit("_", 1)[1] for k in record["runs"] if "/round0/" in k) == ["seed0", "seed1"]
    for key, entry in record["runs"].items():
        assert entry["finished"] and entry["calls"][0]["version"]
        assert "seconds" in entry["calls"][0] or "/round0/" in key  # a base's time is in its runs' first
    assert (out / "report.html").is_file()
    for axis in ("voxels", "fg_voxels", "corrected_voxels", "strokes"):
        text = (out / "tables" / f"summary_cost-{axis}.csv").read_text()
        assert "power_pe(beta=2)" in text and "entropy" in text
    assert any("[7/7 runs done]" in line for line in study["lines"])
    assert any("left" in line for line in study["lines"][1:-2])


def test_a_second_call_runs_nothing(study: dict[str, Any]) -> None:
    factory = RecordingFactory()
    outcome = run_study(study["spec"], study["out"], executor=InProcessExecutor(backend_factory=factory), say=print)
    assert outcome.done_before == outcome.total == 7 and not outcome.finished
    assert not [c for c in factory.calls if c[0] == "train"]


class FailingFactory(RecordingFactory):
    """Training fails in round ``fail_round`` of the runs whose folder path contains ``where``."""

    def __init__(self, where: str, fail_round: int) -> None:
        super().__init__()
        self.where, self.fail_round = where, fail_round

    def __call__(self, cfg: Any, ds: Any, exp_dir: Path) -> Any:
        backend = super().__call__(cfg, ds, exp_dir)
        if self.where in str(exp_dir):
            train = backend.train

            def failing(cases: Any, out_dir: Path, *a: Any, **kw: Any) -> Any:
                if Path(out_dir).parent.name == f"{self.fail_round:03d}":
                    raise RuntimeError("simulated training failure")
                return train(cases, out_dir, *a, **kw)

            backend.train = failing
        return backend


def test_failure_resume_and_version_check(_synthetic_template: Path, tmp_path: Path) -> None:
    spec = write_study(tmp_path / "s.yaml", _synthetic_template, seeds=[0], full_data=False)
    out = tmp_path / "out"
    with pytest.raises(StudyError, match=r"1 of 3 runs failed: box8/entropy/seed0: .*simulated training failure"):
        run_study(spec, out, executor=InProcessExecutor(backend_factory=FailingFactory("entropy", 2)), say=print)
    record = json.loads((out / STUDY_FILE).read_text())
    assert "finished" not in record["runs"]["box8/entropy/seed0"]
    assert "simulated" in record["runs"]["box8/entropy/seed0"]["calls"][0]["error"]
    done_before = regions(out / "runs" / "box8" / "entropy" / "seed0")
    # the unfinished run was started under another commit: refused, nothing run
    record["runs"]["box8/entropy/seed0"]["calls"][-1]["commit"] = "0" * 40
    (out / STUDY_FILE).write_text(json.dumps(record))
    factory = RecordingFactory()
    with pytest.raises(StudyError, match=r"box8/entropy/seed0 \(ran under .* 0000000000"):
        run_study(spec, out, executor=InProcessExecutor(backend_factory=factory), say=print)
    assert not factory.backends
    # told to: it resumes (rounds 0 and 1 kept, round 2 trained) and records the new call
    outcome = run_study(
        spec, out, executor=InProcessExecutor(backend_factory=factory), allow_version_change=True, say=print
    )
    assert outcome.finished == ["box8/entropy/seed0"]
    assert regions(out / "runs" / "box8" / "entropy" / "seed0")[: len(done_before)] == done_before
    calls = json.loads((out / STUDY_FILE).read_text())["runs"]["box8/entropy/seed0"]["calls"]
    assert len(calls) == 2 and calls[1]["rounds_done_before"] == 2
    assert [c[0] for c in factory.calls].count("train") == 1


def test_fork_refuses_another_round_0(study: dict[str, Any], tmp_path: Path, _synthetic_template: Path) -> None:
    base = experiments(study["out"] / "runs" / "box8" / "round0")[0]
    other = make_config(_synthetic_template, strategy="entropy", seed=0, region_size=[8, 8, 4])
    with pytest.raises(ExperimentError, match=r"their round 0 differs \(region_size: base \[8, 8, 8\] vs run"):
        fork_round0(base, tmp_path / "x", other)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExperimentError, match="exists"):
        fork_round0(base, study["out"] / "runs" / "box8" / "random" / "seed0", make_config(_synthetic_template))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategies": ["random", "random"]}, r"strategies \['random'\] appear twice"),
        ({"settings": {"box8": {**SETTING, "strategy": "random"}}}, r"setting 'box8' sets \['strategy'\]"),
        ({"settings": {"a b": SETTING}}, r"setting 'a b' cannot name a folder"),
        ({"settings": {"box8": {**SETTING, "regoin_size": [8]}}}, r"(?s)setting 'box8', strategy 'random'.*regoin"),
        ({"seeds": []}, r"key 'seeds'"),
        ({"seeds": [0, 0]}, r"key 'seeds' repeats a seed"),
        ({"baseline": "randon"}, r"baseline 'randon' is none of its strategies"),
        ({"defaults": {"seed": 3}}, r"'defaults' sets \['seed'\]"),
        ({"strategies": ["nope"], "baseline": None}, r"study cell box8/nope/seed0: .*nope"),
        ({"strategies": ["bald"], "baseline": None}, r"study cell box8/bald/seed0: .*uncertainty.source is 'softmax'"),
    ],
)
def test_bad_study_files_are_refused(
    _synthetic_template: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    spec = write_study(tmp_path / "bad.yaml", _synthetic_template, **change)
    with pytest.raises(ConfigError, match=message):
        run_study(spec, tmp_path / "out", executor=InProcessExecutor(backend_factory=RecordingFactory()), say=print)
    assert not (tmp_path / "out" / "runs").exists()


def test_entries_with_their_own_uncertainty_get_their_own_base(_synthetic_template: Path, tmp_path: Path) -> None:
    spec = write_study(
        tmp_path / "s.yaml",
        _synthetic_template,
        strategies=["random", {"strategy": "bald", "uncertainty": {"source": "mc_dropout", "n_samples": 3}}],
    )
    _, cells = load_study(spec)
    runs = plan_runs(cells, tmp_path / "out")
    bases = {r.id: r.base_dir for r in runs if r.base_dir is not None}
    assert bases["box8/random/seed0"] != bases["box8/bald/seed0"]
    assert bases["box8/random/seed0"] != bases["box8/random/seed1"]
    assert [r.id for r in runs][-1] == "box8/full_data"


def test_same_source() -> None:
    head = alseg_commit()
    assert head is not None  # the tests run from a git checkout
    clean = head.removesuffix("+dirty")
    assert same_source(clean, clean)
    assert not same_source(clean + "+dirty", clean + "+dirty")  # uncommitted changes are never the same
    assert not same_source(clean + "+dirty", clean)
    assert not same_source("0" * 40, "1" * 40)  # not commits of this repository
    assert not same_source(None, clean)


def test_cli_bench_stops_on_ctrl_c_and_resumes(
    _synthetic_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import alseg.study.executors as executors
    from alseg.cli import app

    class Interrupted(executors.InProcessExecutor):
        """The fake backend; Ctrl-C after the first run when ``stop`` is set."""

        stop = True

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(backend_factory=RecordingFactory())

        def run(self, runs: Any, on_done: Any) -> None:
            def done(run: Any, seconds: float, error: str | None) -> None:
                on_done(run, seconds, error)
                if Interrupted.stop:
                    raise KeyboardInterrupt

            super().run(runs, done)

    monkeypatch.setattr(executors, "InProcessExecutor", Interrupted)
    spec = write_study(tmp_path / "s.yaml", _synthetic_template, seeds=[0], full_data=False)
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["bench", str(spec), "--out", str(out)])
    assert first.exit_code == 130, first.output
    assert "0 of 3 runs done" in first.output and "stopped; run the same command again to resume" in first.output
    Interrupted.stop = False
    second = CliRunner().invoke(app, ["bench", str(spec), "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "1 of 3 runs done; 2 to run" in second.output and "[3/3 runs done]" in second.output
    assert (out / "report.html").is_file()


def test_only_runs_the_named_strategies(_synthetic_template: Path, tmp_path: Path) -> None:
    spec = write_study(tmp_path / "s.yaml", _synthetic_template, seeds=[0])
    out = tmp_path / "out"
    factory = RecordingFactory()
    outcome = run_study(spec, out, executor=InProcessExecutor(backend_factory=factory), only=["entropy"], say=print)
    assert outcome.finished == ["box8/entropy/seed0"] and outcome.total == 1
    assert not (out / "runs" / "box8" / "random").exists()
    with pytest.raises(ConfigError, match=r"--only \['nope'\]: not strategies of .*'entropy'"):
        run_study(spec, out, executor=InProcessExecutor(backend_factory=factory), only=["nope"], say=print)
    rest = run_study(spec, out, executor=InProcessExecutor(backend_factory=factory), say=print)
    assert rest.done_before == 1 and len(rest.finished) == 3  # random, power_pe_b2 and the reference


def test_bases_are_found_by_content_not_by_name(_synthetic_template: Path, tmp_path: Path) -> None:
    spec = write_study(tmp_path / "s.yaml", _synthetic_template, seeds=[0], full_data=False)
    out = tmp_path / "out"
    run_study(spec, out, executor=InProcessExecutor(backend_factory=RecordingFactory()), only=["random"], say=print)
    (base,) = experiments(out / "runs" / "box8" / "round0")
    renamed = base.with_name("made-by-an-older-alseg_seed0")
    base.rename(renamed)
    factory = RecordingFactory()
    run_study(spec, out, executor=InProcessExecutor(backend_factory=factory), only=["entropy"], say=print)
    assert experiments(out / "runs" / "box8" / "round0") == [renamed]  # no second round 0 trained
    assert regions(out / "runs" / "box8" / "entropy" / "seed0", 0) == regions(renamed)
    assert not [b for b in factory.backends if "round0" in str(b.exp_dir)]


def test_remote_executors_estimate_from_durations(_synthetic_template: Path, tmp_path: Path) -> None:
    """On a cluster the study reads no run database while runs are on: the estimate uses the runs' durations."""

    class Remote(InProcessExecutor):
        shares_databases = False

    spec = write_study(tmp_path / "s.yaml", _synthetic_template, seeds=[0], full_data=False)
    lines: list[str] = []
    run_study(spec, tmp_path / "out", executor=Remote(backend_factory=RecordingFactory()), say=lines.append)
    first = next(line for line in lines if line.startswith("[1/3 runs done]"))
    assert "about" in first and "left" in first and "unknown" not in first
    record = json.loads((tmp_path / "out" / STUDY_FILE).read_text())
    assert all(e.get("finished") for e in record["runs"].values())
