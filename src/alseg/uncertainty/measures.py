"""Voxel uncertainty measures: pure numpy functions of probability samples.

Every function takes ``probs`` of shape ``(K, C, *spatial)``: K probability samples (ensemble members,
MC-dropout passes, test-time augmentations; K = 1 for a single softmax) of C classes per voxel. Results are
float32 maps of shape ``spatial`` (natural log; 0 · log 0 = 0). Work is done one class / one sample at a time,
so no ``K × C × spatial`` temporary is made beyond the float32 copy of a non-float32 input.

>>> import numpy as np
>>> p = np.full((1, 4, 2, 2), 0.25, dtype=np.float32)
>>> bool(np.allclose(predictive_entropy(p), np.log(4)))
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _as_samples(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim < 3:
        raise ValueError(f"probability samples must have shape (K, C, *spatial), got shape {probs.shape}")
    if probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(f"probability samples need K >= 1 and C >= 1, got shape {probs.shape}")
    return probs.astype(np.float32, copy=False)


def _neg_xlogx(p: np.ndarray) -> np.ndarray:
    """−p · log p elementwise in float32, with 0 · log 0 = 0 (and no warning for p = 0)."""
    p = np.asarray(p, dtype=np.float32)
    safe = np.where(p > 0, p, np.float32(1))
    return -(p * np.log(safe))


def _entropy_over_classes(channels: Iterable[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    for p_c in channels:
        out += _neg_xlogx(p_c)
    return out


def mean_probabilities(probs: np.ndarray) -> np.ndarray:
    """The mean over samples ``p̄`` of shape ``(C, *spatial)`` (float32)."""
    probs = _as_samples(probs)
    return probs.mean(axis=0, dtype=np.float32)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """PE(x) = −Σ_c p̄_c log p̄_c. With K = 1 this is the entropy of the single softmax."""
    mean = mean_probabilities(probs)
    return _entropy_over_classes(mean, mean.shape[1:])


def expected_entropy(probs: np.ndarray) -> np.ndarray:
    """EE(x) = −(1/K) Σ_k Σ_c p^(k)_c log p^(k)_c."""
    probs = _as_samples(probs)
    n_samples, spatial = probs.shape[0], probs.shape[2:]
    out = np.zeros(spatial, dtype=np.float32)
    for k in range(n_samples):
        out += _entropy_over_classes(probs[k], spatial)
    if n_samples > 1:
        out /= np.float32(n_samples)
    return out


def bald(probs: np.ndarray) -> np.ndarray:
    """BALD (mutual information) MI(x) = PE(x) − EE(x), clipped at 0. Zero for K = 1."""
    probs = _as_samples(probs)
    if probs.shape[0] == 1:
        return np.zeros(probs.shape[2:], dtype=np.float32)
    mi = predictive_entropy(probs)
    mi -= expected_entropy(probs)
    np.maximum(mi, np.float32(0), out=mi)
    return mi


def mean_std(probs: np.ndarray) -> np.ndarray:
    """Mean STD (Kendall et al.): (1/C) Σ_c std_k p^(k)_c(x), population std over the K samples."""
    probs = _as_samples(probs)
    n_classes, spatial = probs.shape[1], probs.shape[2:]
    out = np.zeros(spatial, dtype=np.float32)
    for c in range(n_classes):
        out += probs[:, c].std(axis=0, dtype=np.float32)
    out /= np.float32(n_classes)
    return out


def class_weighted_variance(probs: np.ndarray, weights: Mapping[int, float] | Sequence[float]) -> np.ndarray:
    """USIM's class-weighted uncertainty u(x) = Σ_c w_c var_k p^(k)_c(x) (population variance).

    ``weights`` maps a class channel to its weight (nnU-Net: channel index = label value), or is a sequence
    with one weight per channel. Channels without a weight count 0; :func:`usim_class_weights` gives the
    USIM weights (background 0).
    """
    probs = _as_samples(probs)
    n_classes, spatial = probs.shape[1], probs.shape[2:]
    if isinstance(weights, Mapping):
        items = [(int(c), float(w)) for c, w in weights.items()]
    else:
        if len(weights) != n_classes:
            raise ValueError(f"got {len(weights)} class weights for {n_classes} probability channels")
        items = list(enumerate(float(w) for w in weights))
    out = np.zeros(spatial, dtype=np.float32)
    for c, w in items:
        if not 0 <= c < n_classes:
            raise ValueError(f"class weight for channel {c}, but probabilities have channels 0..{n_classes - 1}")
        if not np.isfinite(w):
            raise ValueError(f"class weight for channel {c} is {w}; weights must be finite")
        if w == 0:
            continue
        out += np.float32(w) * probs[:, c].var(axis=0, dtype=np.float32)
    return out


def usim_class_weights(
    annotated_class_voxels: Mapping[int, int], foreground_labels: Sequence[int], background: int = 0
) -> dict[int, float]:
    """USIM class weights: w_c ∝ 1 / (annotated voxels of class c), background 0, Σ w = 1.

    A foreground class with no annotated voxel yet counts as one voxel, so it gets the largest weight any
    class can have (1/1 before normalising) and never inf. Returns ``{background: 0.0, c: w_c, ...}``.

    >>> usim_class_weights({1: 300, 2: 100}, (1, 2))
    {0: 0.0, 1: 0.25, 2: 0.75}
    """
    labels = [int(c) for c in foreground_labels]
    if not labels:
        raise ValueError("usim_class_weights needs at least one foreground label")
    if background in labels:
        raise ValueError(f"background label {background} is listed among the foreground labels {labels}")
    for c, n in annotated_class_voxels.items():
        if n < 0:
            raise ValueError(f"annotated voxel count of class {c} is {n}; counts must be >= 0")
    raw = {c: 1.0 / max(int(annotated_class_voxels.get(c, 0)), 1) for c in labels}
    total = sum(raw.values())
    weights = {background: 0.0}
    weights.update({c: w / total for c, w in raw.items()})
    return weights


def classwise_pe(probs: np.ndarray, foreground_channels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """ClaSP maps: u_c(x) = PE(x) · p̄_c(x) per foreground channel, and PE(x) itself.

    Returns ``(maps, pe)`` with ``maps`` of shape ``(len(foreground_channels), *spatial)``.
    """
    mean = mean_probabilities(probs)
    n_classes, spatial = mean.shape[0], mean.shape[1:]
    pe = _entropy_over_classes(mean, spatial)
    maps = np.empty((len(foreground_channels), *spatial), dtype=np.float32)
    for i, c in enumerate(foreground_channels):
        if not 0 <= int(c) < n_classes:
            raise ValueError(f"foreground channel {c} is outside the probability channels 0..{n_classes - 1}")
        np.multiply(pe, mean[int(c)], out=maps[i])
    return maps, pe
