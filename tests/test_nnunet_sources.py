"""One loop per uncertainty source with the real nnU-Net backend on a few real Hippocampus cases, plus the
strategies that need the backend's features and gradients. Tiny schedule: the point is that every path through
nnU-Net (dropout networks, TTA, ensemble members, features, region gradients) runs and gives valid choices.

``test_every_strategy_on_real_data`` (marked slow) runs every registered key the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alseg.config import ExperimentConfig
from alseg.data.dataset import demo_dataset_path
from alseg.loop.drivers import run_experiment
from alseg.store.layout import DB_FILE
from alseg.store.state import ExperimentState
from alseg.strategies.registry import STRATEGIES, get_strategy
from alseg.uncertainty.measures import bald
from conftest import copy_demo_cases

pytestmark = pytest.mark.nnunet

TINY = {"epochs": 1, "iterations_per_epoch": 3, "warm_start": True}


@pytest.fixture(scope="module")
def small_hippocampus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 real cases: 9 in the pool, 3 held out."""
    assert demo_dataset_path().exists()
    return copy_demo_cases(tmp_path_factory.mktemp("hippo") / "data", n_cases=12)


def run_two_rounds(dataset: Path, out: Path, strategy: str, uncertainty: dict | None = None) -> Path:
    cfg = ExperimentConfig(
        dataset=dataset,
        strategy=strategy,
        seed=3,
        rounds=2,
        query_size=4,
        profile="cpu",
        device="cpu",
        num_threads=2,
        schedule=TINY,
        uncertainty=uncertainty or {"source": "softmax", "n_samples": 1},
    )
    return run_experiment(cfg, out)


def check(exp: Path, strategy: str) -> list:
    state = ExperimentState(exp / DB_FILE)
    try:
        regions = state.regions()
        metrics = state.metrics()
        assert state.integrity_check() == "ok"
    finally:
        state.close()
    assert len(regions) == 8 and {r.round for r in regions} == {0, 1}
    queried = [r for r in regions if r.round == 1]
    assert all(r.region.info.get("strategy") == strategy for r in queried)
    for r in queried:  # inside the image, no overlap with earlier regions of the same case
        for other in regions:
            if other is not r and other.region.case_id == r.region.case_id:
                assert not other.region.box.overlaps(r.region.box)
    assert set(metrics) == {0, 1} and all(m["dice_mean"] is not None for m in metrics.values())
    return queried


@pytest.mark.parametrize(
    ("source", "n_samples", "strategy"),
    [
        ("softmax", 1, "clasp_pe"),
        ("mc_dropout", 3, "bald"),
        ("tta", 3, "mean_std"),
        ("ensemble", 2, "power_bald"),
    ],
)
def test_uncertainty_source(
    small_hippocampus: Path, tmp_path: Path, source: str, n_samples: int, strategy: str
) -> None:
    exp = run_two_rounds(small_hippocampus, tmp_path / "exp", strategy, {"source": source, "n_samples": n_samples})
    queried = check(exp, strategy)
    assert all(np.isfinite(r.region.score) for r in queried)
    # the samples the strategy saw: one channel per declared label, and K samples that really differ
    probs = _pool_samples(exp, n_samples)
    assert probs.shape[:2] == (n_samples, 3)  # background, anterior, posterior: the ignore value is no class
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    if source != "softmax":
        assert np.max(bald(probs)) > 1e-4, f"{source}: the {n_samples} samples are (nearly) identical"
    model = exp / "rounds" / "001" / "model"
    report = json.loads((model / "alseg_model.json").read_text())
    assert report["uncertainty"] == source
    if source == "ensemble":
        assert sorted(p.name for p in model.glob("fold_*")) == ["fold_0", "fold_1"]
    if source == "mc_dropout":
        plans = json.loads((model / "plans.json").read_text())
        conf = plans["configurations"][report["configuration"]]
        assert conf["architecture"]["arch_kwargs"]["dropout_op"] == "torch.nn.Dropout"


def _pool_samples(exp: Path, n_samples: int) -> np.ndarray:
    """Probability samples of one pool case from the round-0 model, through the experiment's own backend."""
    from alseg.backends.nnunet import make_backend
    from alseg.config import load_config
    from alseg.data.dataset import load_dataset

    cfg = load_config(exp / "config.yaml")
    ds = load_dataset(cfg.dataset)
    state = ExperimentState(exp / DB_FILE)
    try:
        pool, _ = state.split()
    finally:
        state.close()
    backend = make_backend(cfg, ds, exp / "nnunet")
    [pred] = list(backend.predict(exp / "rounds" / "000" / "model", pool[:1], n_samples=n_samples, seed=7))
    return pred.probs


def test_fold_ensemble_members_train_outside_their_fold(small_hippocampus: Path, tmp_path: Path) -> None:
    """nnActive's ensemble: member k is nnU-Net's fold k of a cross-validation of the annotated cases."""
    uncertainty = {"source": "ensemble", "n_samples": 2, "ensemble": "folds"}
    exp = run_two_rounds(small_hippocampus, tmp_path / "exp", "bald", uncertainty)
    check(exp, "bald")
    state = ExperimentState(exp / DB_FILE)
    try:
        pool, _ = state.split()
        annotated = {r: {g.region.case_id for g in state.regions(max_round=r)} for r in (0, 1)}
    finally:
        state.close()
    for r in (0, 1):
        model = exp / "rounds" / f"{r:03d}" / "model"
        report = json.loads((model / "alseg_model.json").read_text())
        splits = json.loads((model / "splits_final.json").read_text())  # the file nnU-Net trained from
        folds = report["validation_folds"]
        assert report["ensemble"] == "folds" and len(folds) == 2 and all(folds)
        assert sorted(c for fold in folds for c in fold) == sorted(annotated[r])
        assert sorted(p.name for p in model.glob("fold_*")) == ["fold_0", "fold_1"]
        for k, member in enumerate(report["members"]):
            complement = annotated[r] - set(folds[k])
            assert member["fold"] == k
            assert set(member["train_cases"]) == complement and set(member["val_cases"]) == set(folds[k])
            assert set(splits[k]["train"]) == complement and set(splits[k]["val"]) == set(folds[k])
            log = (model / f"fold_{k}" / "alseg_train.log").read_text()
            assert f"This split has {len(complement)} training and {len(folds[k])} validation cases" in log
            if r == 1:  # warm start from the same member of the previous round
                previous = exp / "rounds" / "000" / "model" / f"fold_{k}" / "checkpoint_final.pth"
                assert Path(member["init_from"]).resolve() == previous.resolve()

    # the members disagree somewhere: BALD (mutual information) > 0 on the pool
    from alseg.backends.nnunet import make_backend
    from alseg.config import load_config
    from alseg.data.dataset import load_dataset

    cfg = load_config(exp / "config.yaml")
    backend = make_backend(cfg, load_dataset(cfg.dataset), exp / "nnunet")
    bald_max = 0.0
    for pred in backend.predict(exp / "rounds" / "001" / "model", sorted(pool)[:3], n_samples=2):
        p = np.clip(pred.probs.astype(np.float64), 1e-12, 1.0)
        assert p.shape[0] == 2
        mean = p.mean(axis=0)
        entropy_of_mean = -(mean * np.log(mean)).sum(axis=0)
        mean_entropy = -(p * np.log(p)).sum(axis=1).mean(axis=0)
        bald_max = max(bald_max, float((entropy_of_mean - mean_entropy).max()))
    assert bald_max > 1e-4


@pytest.mark.parametrize(
    ("strategy", "uncertainty"),
    [("badge", None), ("coreset", None), ("usim_c", {"source": "mc_dropout", "n_samples": 2})],
)
def test_feature_and_gradient_strategies(
    small_hippocampus: Path, tmp_path: Path, strategy: str, uncertainty: dict | None
) -> None:
    queried = check(run_two_rounds(small_hippocampus, tmp_path / "exp", strategy, uncertainty), strategy)
    if strategy == "usim_c":
        assert all("marginal_gain" in r.region.info for r in queried)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(STRATEGIES))
def test_every_strategy_on_real_data(small_hippocampus: Path, tmp_path: Path, key: str) -> None:
    needs = get_strategy(key).needs
    uncertainty = {"source": "mc_dropout", "n_samples": 3} if needs.min_samples > 1 else None
    check(run_two_rounds(small_hippocampus, tmp_path / "exp", key, uncertainty), key)
