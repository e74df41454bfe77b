"""Voxel uncertainty measures: known values and properties over random probability samples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from alseg.uncertainty.measures import (
    bald,
    class_weighted_variance,
    classwise_pe,
    expected_entropy,
    mean_std,
    predictive_entropy,
    usim_class_weights,
)

TOL = 1e-5
MEASURES = (predictive_entropy, expected_entropy, bald, mean_std)


@st.composite
def probability_samples(draw: st.DrawFn, min_samples: int = 1) -> np.ndarray:
    """(K, C, *spatial) float32 samples summing to 1 over C; exact zeros and one-hots included."""
    n_samples = draw(st.integers(min_samples, 4))
    n_classes = draw(st.integers(2, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple))
    raw = draw(
        hnp.arrays(
            np.float64,
            (n_samples, n_classes, *spatial),
            elements=st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_subnormal=False)),
        )
    )
    total = raw.sum(axis=1, keepdims=True)
    probs = np.where(total > 0, raw / np.where(total > 0, total, 1.0), 1.0 / n_classes)
    return probs.astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(probability_samples())
def test_entropies_and_bald_are_bounded(probs: np.ndarray) -> None:
    n_classes = probs.shape[1]
    pe, ee, mi = predictive_entropy(probs), expected_entropy(probs), bald(probs)
    for m in (pe, ee, mi):
        assert m.dtype == np.float32 and m.shape == probs.shape[2:]
        assert np.all(np.isfinite(m))
    assert np.all(pe >= 0) and np.all(ee >= 0)
    assert np.all(pe <= math.log(n_classes) + TOL)
    assert np.all(mi >= 0) and np.all(mi <= pe + TOL)
    assert np.all(mean_std(probs) >= 0)


@settings(max_examples=100, deadline=None)
@given(probability_samples(), st.randoms(use_true_random=False))
def test_measures_ignore_class_and_sample_order(probs: np.ndarray, rnd) -> None:  # type: ignore[no-untyped-def]
    class_order = list(range(probs.shape[1]))
    sample_order = list(range(probs.shape[0]))
    rnd.shuffle(class_order)
    rnd.shuffle(sample_order)
    permuted = probs[sample_order][:, class_order]
    for measure in MEASURES:
        np.testing.assert_allclose(measure(permuted), measure(probs), atol=TOL, err_msg=measure.__name__)


@settings(max_examples=50, deadline=None)
@given(probability_samples())
def test_single_sample_has_no_bald_or_spread(probs: np.ndarray) -> None:
    one = probs[:1]
    assert np.all(bald(one) == 0)
    assert np.all(mean_std(one) == 0)
    np.testing.assert_allclose(expected_entropy(one), predictive_entropy(one), atol=TOL)


def test_known_values() -> None:
    uniform = np.full((2, 4, 3), 0.25, dtype=np.float32)
    np.testing.assert_allclose(predictive_entropy(uniform), math.log(4), rtol=1e-6)
    np.testing.assert_allclose(bald(uniform), 0.0, atol=1e-6)
    # two confident samples that disagree: PE = log 2, EE = 0 (0 · log 0 = 0), MI = log 2
    disagree = np.zeros((2, 2, 1), dtype=np.float32)
    disagree[0, 0] = disagree[1, 1] = 1.0
    assert expected_entropy(disagree)[0] == 0.0
    np.testing.assert_allclose(bald(disagree), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(mean_std(disagree), 0.5, rtol=1e-6)  # std of (1, 0) is 0.5 for each class
    one_hot = np.zeros((1, 3, 2, 2), dtype=np.float32)
    one_hot[:, 1] = 1.0
    with np.errstate(all="raise"):
        assert np.all(predictive_entropy(one_hot) == 0)


def test_float16_input_gives_float32() -> None:
    probs = np.full((2, 2, 3), 0.5, dtype=np.float16)
    for measure in MEASURES:
        assert measure(probs).dtype == np.float32


def test_bad_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\(K, C, \*spatial\)"):
        predictive_entropy(np.ones((2, 3), dtype=np.float32))


def test_class_weighted_variance() -> None:
    probs = np.zeros((2, 3, 1), dtype=np.float32)
    probs[0, :, 0] = (1.0, 0.0, 0.0)
    probs[1, :, 0] = (0.0, 1.0, 0.0)  # var of channel 0 and 1 = 0.25, channel 2 = 0
    np.testing.assert_allclose(class_weighted_variance(probs, {0: 0.0, 1: 0.4, 2: 0.6}), [0.1])
    np.testing.assert_allclose(class_weighted_variance(probs, [1.0, 1.0, 1.0]), [0.5])
    with pytest.raises(ValueError, match="channel 5"):
        class_weighted_variance(probs, {5: 1.0})
    with pytest.raises(ValueError, match="2 class weights for 3"):
        class_weighted_variance(probs, [1.0, 1.0])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=5, unique=True),
    st.dictionaries(st.integers(1, 9), st.integers(0, 10**9), max_size=9),
)
def test_usim_weights_sum_to_one_and_favour_unannotated(labels: list[int], counts: dict[int, int]) -> None:
    weights = usim_class_weights(counts, labels)
    assert set(weights) == {0, *labels}
    assert weights[0] == 0.0
    assert all(math.isfinite(w) and w > 0 for c, w in weights.items() if c != 0)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
    fg = {c: weights[c] for c in labels}
    unannotated = [c for c in labels if counts.get(c, 0) == 0]
    if unannotated:
        assert all(fg[c] == max(fg.values()) for c in unannotated)
    annotated = sorted((c for c in labels if counts.get(c, 0) > 0), key=lambda c: counts[c])
    assert all(fg[a] >= fg[b] for a, b in itertools.pairwise(annotated))


def test_usim_weights_inverse_to_counts() -> None:
    assert usim_class_weights({1: 300, 2: 100}, (1, 2)) == pytest.approx({0: 0.0, 1: 0.25, 2: 0.75})
    with pytest.raises(ValueError, match="foreground"):
        usim_class_weights({}, ())


def test_classwise_pe() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(4, 5, 6)).transpose(0, 3, 1, 2).astype(np.float32)  # (K, C, 5, 6)
    maps, pe = classwise_pe(probs, (1, 2))
    assert maps.shape == (2, 5, 6) and maps.dtype == np.float32
    np.testing.assert_allclose(pe, predictive_entropy(probs), atol=1e-6)
    np.testing.assert_allclose(maps[1], pe * probs.mean(axis=0)[2], rtol=1e-5)
    with pytest.raises(ValueError, match="channel 3"):
        classwise_pe(probs, (3,))
