"""The batched MC dropout passes (``backends/nnunet/sampling.py``) against nnU-Net's own predictor, on real
Hippocampus cases with tiny models of both configurations (3d_fullres boxes and 2d slices)."""

from __future__ import annotations

import numpy as np
import pytest

from alseg.config import ExperimentConfig, load_config
from alseg.loop.drivers import run_experiment
from alseg.loop.runner import Experiment
from alseg.uncertainty.measures import bald
from conftest import copy_demo_cases

pytestmark = pytest.mark.nnunet


@pytest.fixture(scope="module", params=[("3d_fullres", "box"), ("2d", "slice")], ids=["3d", "2d"])
def dropout_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A predictor of a tiny MC-dropout model trained on 6 real cases, and one pool case's image."""
    configuration, unit = request.param
    root = tmp_path_factory.mktemp(f"mcd_{configuration}")
    data = copy_demo_cases(root / "data", n_cases=8)
    cfg = ExperimentConfig(
        dataset=data,
        strategy="random",
        seed=1,
        rounds=2,
        query_size=3,
        unit=unit,
        configuration=configuration,
        profile="cpu",
        device="cpu",
        num_threads=2,
        schedule={"epochs": 1, "iterations_per_epoch": 3, "warm_start": True},
        uncertainty={"source": "mc_dropout", "n_samples": 3},
    )
    exp_dir = run_experiment(cfg, root / "exp", until_round=0)
    exp = Experiment(exp_dir, load_config(exp_dir / "config.yaml"))
    try:
        backend = exp.backend
        predictor = backend._load_predictor(exp.model_dir(0))
        case = next(iter(exp.pool))
        image, spacing = backend.read_image(case)
    finally:
        exp.state.close()
    return predictor, np.ascontiguousarray(image, dtype=np.float32), {"spacing": [float(s) for s in spacing]}


@pytest.mark.parametrize("smaller_patch", [False, True], ids=["planned_patch", "overlapping_tiles"])
def test_batched_passes_equal_nnunet_without_dropout(
    dropout_model: tuple, smaller_patch: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """p = 0: every batched pass is nnU-Net's prediction (tiles, Gaussian weights, export), also where tiles
    overlap (a patch smaller than the image). nnU-Net sums the weighted tiles in half precision, which loses the
    image corners, where the Gaussian weights are below 1e-4; the reference here sums them in float32 (its
    accumulators' ``torch.half`` read as float32), the only change to nnU-Net's own path."""
    import torch

    from alseg.backends.nnunet.backend import _enable_mc_dropout
    from alseg.backends.nnunet.sampling import mc_dropout_probabilities, per_pass_probabilities

    monkeypatch.setattr(torch, "half", torch.float32)
    predictor, image, props = dropout_model
    conf = predictor.configuration_manager.configuration
    planned = list(conf["patch_size"])
    try:
        if smaller_patch:
            conf["patch_size"] = [max(8, p - 16) for p in planned]
            from alseg.backends.nnunet.sampling import preprocess

            data, _ = preprocess(predictor, image, props)
            tiles = len(predictor._internal_get_sliding_window_slicers(data.shape[1:]))
            assert tiles > (data.shape[1] if len(planned) == 2 else 1), "the tiles do not overlap"
        _enable_mc_dropout(predictor.network, 0.0)
        ref = per_pass_probabilities(predictor, image, props, 1, seed=5)[0]
        got = mc_dropout_probabilities(predictor, image, props, k=3, seed=5)
    finally:
        conf["patch_size"] = planned
    assert got.shape == (3, *ref.shape) and got.dtype == np.float32
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)
    for sample in got:
        np.testing.assert_allclose(sample, ref, atol=5e-3)


def test_batched_passes_are_independent_and_seeded(dropout_model: tuple) -> None:
    """At the query rate the K passes differ from each other (own dropout masks per batch element), the same seed
    gives the same samples, and another seed other samples."""
    from alseg.backends.nnunet.backend import _enable_mc_dropout
    from alseg.backends.nnunet.sampling import mc_dropout_probabilities

    predictor, image, props = dropout_model
    _enable_mc_dropout(predictor.network, 0.1)
    a = mc_dropout_probabilities(predictor, image, props, k=4, seed=11)
    b = mc_dropout_probabilities(predictor, image, props, k=4, seed=11)
    c = mc_dropout_probabilities(predictor, image, props, k=4, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.max(bald(a)) > 1e-4, "the 4 dropout passes are (nearly) identical"
    assert all(not np.array_equal(a[0], a[i]) for i in range(1, 4))


def test_features_are_deterministic_while_mc_dropout_is_on(dropout_model: tuple) -> None:
    """Core-Set's and BADGE's features come from the deterministic network even after the predictor's dropout
    layers were switched on for MC passes; the passes stay stochastic afterwards."""
    from alseg.backends.nnunet.backend import _enable_mc_dropout, _features
    from alseg.backends.nnunet.sampling import mc_dropout_probabilities

    predictor, image, props = dropout_model
    _enable_mc_dropout(predictor.network, 0.5)
    first = _features(predictor, image, props)
    second = _features(predictor, image, props)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    after = mc_dropout_probabilities(predictor, image, props, k=2, seed=3)
    assert not np.array_equal(after[0], after[1])
