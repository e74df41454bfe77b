"""Test-time augmentation: transforms are seeded, and their inverses map probabilities back."""

from __future__ import annotations

import numpy as np

from alseg.uncertainty.tta import TTATransform, sample_tta


def test_flip_inverse_restores_probabilities() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(6, 7, 8)).astype(np.float32)
    probs = np.moveaxis(probs, -1, 0)
    t = TTATransform(flip_axes=(0, 2))
    # a "network" that is equivariant: the prediction of the flipped image is the flipped prediction
    predicted_on_flipped = np.flip(probs, axis=(1, 3))
    assert np.allclose(t.invert_probabilities(predicted_on_flipped), probs)


def test_rotation_inverse_is_close_inside_and_normalised() -> None:
    probs = np.zeros((2, 4, 32, 32), np.float32)
    probs[1, :, 10:22, 10:22] = 1.0
    probs[0] = 1.0 - probs[1]
    t = TTATransform(angle=8.0)
    rotated = t.apply(probs)  # rotate as if it were an image
    back = t.invert_probabilities(rotated)
    assert np.allclose(back.sum(axis=0), 1.0, atol=1e-5)
    # interpolation blurs only the square's edges: the interior and the labels survive the round trip
    assert np.allclose(back[1, :, 13:19, 13:19], 1.0, atol=0.02)
    assert (back.argmax(0) == probs.argmax(0)).mean() > 0.97


def test_sample_tta_is_seeded_and_starts_with_identity() -> None:
    a = sample_tta(8, 3, np.random.default_rng(1))
    b = sample_tta(8, 3, np.random.default_rng(1))
    c = sample_tta(8, 3, np.random.default_rng(2))
    assert a == b and a != c
    assert a[0] == TTATransform()
    assert all(abs(t.angle) <= 10.0 for t in a)
    assert len({t.flip_axes for t in a}) == 8  # all flip combinations of 3 axes


def test_noise_is_reproducible_and_small() -> None:
    img = np.random.default_rng(3).normal(size=(1, 8, 8, 8)).astype(np.float32)
    t = TTATransform(noise_std=0.01, noise_seed=5)
    assert np.array_equal(t.apply(img), t.apply(img))
    assert 0 < np.abs(t.apply(img) - img).std() < 0.05
