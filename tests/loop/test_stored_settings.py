"""What an experiment stores at creation and keeps on resume (issue 10): the resolved schedule, the sample count
K of its uncertainty source, and which strategies see the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alseg.backends.nnunet import profiles
from alseg.config import DEFAULT_SAMPLES, ConfigError, Schedule, load_config
from alseg.loop.create import create_experiment, recover_schedule
from alseg.loop.drivers import run_experiment
from alseg.loop.runner import Experiment
from alseg.loop.status import experiment_status
from alseg.store.layout import CONFIG_FILE
from conftest import RecordingFactory, make_config


def test_the_profile_schedule_is_stored_resolved(synthetic_dataset: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    create_experiment(make_config(synthetic_dataset), exp)
    stored = yaml.safe_load((exp / CONFIG_FILE).read_text())["schedule"]
    assert stored == profiles.CPU_SCHEDULE.model_dump()
    assert stored["optimizer"] == "adam" and stored["first_round_epochs"] == 12


def test_resume_keeps_the_stored_schedule_after_the_profile_changes(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = tmp_path / "exp"
    factory = RecordingFactory()
    cfg = make_config(synthetic_dataset, rounds=2)
    run_experiment(cfg.model_copy(update={"rounds": 2}), exp, factory)
    before = load_config(exp / CONFIG_FILE).schedule
    # a later release changes the cpu profile's defaults
    monkeypatch.setattr(profiles, "CPU_SCHEDULE", Schedule(epochs=3, iterations_per_epoch=7, optimizer="sgd"))
    assert profiles.get_profile("cpu").schedule.optimizer == "sgd"
    run_experiment(make_config(synthetic_dataset, rounds=2), exp, factory)  # same config file, no schedule key
    after = load_config(exp / CONFIG_FILE).schedule
    assert after == before and after is not None and after.optimizer == "adam"
    backend = factory.backends[-1]
    assert backend.cfg.schedule == before  # the backend trains with the stored schedule


def _write_model(model: Path, epochs: int, lr: float, optimizer: str, init_from: str | None) -> None:
    (model / "fold_all").mkdir(parents=True)
    debug = {
        "num_epochs": str(epochs),
        "initial_lr": str(lr),
        "num_iterations_per_epoch": "50",
        "num_val_iterations_per_epoch": "1",
        "optimizer": f"{optimizer} (\nParameter Group 0\n    lr: {lr}\n)",
    }
    (model / "fold_all" / "debug.json").write_text(json.dumps(debug))
    (model / "alseg_model.json").write_text(json.dumps({"members": [{"init_from": init_from}]}))


def test_an_old_experiment_resumes_with_the_schedule_its_models_were_trained_with(
    synthetic_dataset: Path, tmp_path: Path
) -> None:
    """Created before the schedule was stored (``schedule: null``): the trained rounds' nnU-Net records say how
    they trained; that schedule is stored and kept, whatever today's profile says."""
    exp = tmp_path / "old"
    create_experiment(make_config(synthetic_dataset), exp)
    data = yaml.safe_load((exp / CONFIG_FILE).read_text())
    data["schedule"] = None
    (exp / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    _write_model(exp / "rounds" / "000" / "model", 12, 0.01, "SGD", None)
    _write_model(exp / "rounds" / "001" / "model", 8, 0.003, "SGD", "/x/rounds/000/model/fold_all/checkpoint.pth")
    default = profiles.CPU_SCHEDULE
    recovered, source = recover_schedule(exp, default)
    assert source == "read from the models of round 0 and round 1"
    assert recovered == Schedule(
        epochs=8,
        iterations_per_epoch=50,
        val_iterations_per_epoch=1,
        warm_start=True,
        initial_lr=0.01,
        first_round_epochs=12,
        warm_start_lr=0.003,
        optimizer="sgd",
    )
    from alseg.loop.create import open_or_create

    cfg = open_or_create(make_config(synthetic_dataset), exp)
    assert cfg.schedule == recovered
    assert load_config(exp / CONFIG_FILE).schedule == recovered  # written back


def test_an_old_experiment_with_nothing_trained_takes_the_profile_schedule(
    synthetic_dataset: Path, tmp_path: Path
) -> None:
    exp = tmp_path / "old"
    create_experiment(make_config(synthetic_dataset), exp)
    data = yaml.safe_load((exp / CONFIG_FILE).read_text())
    data["schedule"] = None
    (exp / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    recovered, source = recover_schedule(exp, profiles.CPU_SCHEDULE)
    assert recovered == profiles.CPU_SCHEDULE and "nothing trained" in source


@pytest.mark.parametrize("source", ["softmax", "mc_dropout", "tta", "ensemble"])
def test_default_k_follows_the_source_paper(source: str, synthetic_dataset: Path, tmp_path: Path) -> None:
    strategy = "entropy" if source == "softmax" else "bald"
    cfg = make_config(synthetic_dataset, strategy=strategy, uncertainty={"source": source})
    cfg = create_experiment(cfg, tmp_path / "exp")
    expected = {"softmax": 1, "mc_dropout": 10, "tta": 8, "ensemble": 5}[source]  # seeds 001 / 002, nnActive
    assert cfg.uncertainty.n_samples == expected == DEFAULT_SAMPLES[source]
    assert load_config(tmp_path / "exp" / CONFIG_FILE).uncertainty.n_samples == expected


def test_an_explicit_smaller_k_is_honoured_and_shown(synthetic_dataset: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    cfg = make_config(
        synthetic_dataset, strategy="bald", rounds=2, uncertainty={"source": "mc_dropout", "n_samples": 3}
    )
    run_experiment(cfg, exp, RecordingFactory())
    status = experiment_status(exp)
    assert status["uncertainty"] == {"source": "mc_dropout", "n_samples": 3}
    assert load_config(exp / CONFIG_FILE).uncertainty.n_samples == 3


def test_a_k_below_the_strategy_minimum_is_refused(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = make_config(synthetic_dataset, strategy="bald", uncertainty={"source": "tta", "n_samples": 1})
    with pytest.raises(ConfigError, match=r"needs at least 2 probability samples.*n_samples \(tta\) is 1"):
        create_experiment(cfg, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(("strategy", "sees"), [("entropy", False), ("random", False), ("random_fg33", True)])
def test_only_strategies_that_declare_it_receive_the_ground_truth(
    strategy: str, sees: bool, synthetic_dataset: Path, tmp_path: Path
) -> None:
    cfg = create_experiment(make_config(synthetic_dataset, strategy=strategy), tmp_path / "exp")
    exp = Experiment(tmp_path / "exp", cfg, RecordingFactory())
    try:
        assert (exp.pool_view(1).ground_truth is not None) is sees
        assert exp.pool_view(0).ground_truth is not None  # the starting budget covers the classes from it
    finally:
        exp.state.close()


def test_bad_strategy_parameters_fail_before_anything_is_written(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = make_config(synthetic_dataset, strategy="stochastic_batches", strategy_params={"base": "nope"})
    with pytest.raises(ValueError, match="unknown base strategy 'nope'"):
        create_experiment(cfg, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
