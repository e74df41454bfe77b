"""Test-time augmentation: seeded transforms of an image and their inverses on probability maps.

Seed 002 uses 8 passes with flips, small rotations (±10°) and Gaussian noise (σ = 0.01). A random
:func:`sample_tta` only draws parameters; :class:`TTATransform` applies them deterministically, so each step is
testable alone. Rotations turn in the plane of the two last axes (the in-slice plane for slice axis 0);
their inverse rotates the probabilities back and renormalises them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class TTATransform:
    """One augmentation: flip these spatial axes, rotate by ``angle`` degrees, add noise of ``noise_std``."""

    flip_axes: tuple[int, ...] = ()
    angle: float = 0.0
    noise_std: float = 0.0
    noise_seed: int = 0

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Transform an image of shape ``(C, *spatial)``."""
        out = np.asarray(image, dtype=np.float32)
        if self.noise_std > 0:
            rng = np.random.default_rng(self.noise_seed)
            scale = self.noise_std * out.reshape(out.shape[0], -1).std(axis=1)
            out = out + rng.standard_normal(out.shape, dtype=np.float32) * scale.reshape(-1, *[1] * (out.ndim - 1))
        if self.angle:
            out = _rotate(out, self.angle, order=1)
        if self.flip_axes:
            out = np.flip(out, axis=tuple(a + 1 for a in self.flip_axes))
        return np.ascontiguousarray(out, dtype=np.float32)

    def invert_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """Map probabilities ``(C, *spatial)`` predicted on the transformed image back to the original grid."""
        out = np.asarray(probs, dtype=np.float32)
        if self.flip_axes:
            out = np.flip(out, axis=tuple(a + 1 for a in self.flip_axes))
        if self.angle:
            out = np.clip(_rotate(out, -self.angle, order=1), 0.0, None)
            total = out.sum(axis=0, keepdims=True)
            # voxels rotated in from outside the image have no prediction: uniform there
            out = np.where(total > 1e-6, out / np.maximum(total, 1e-6), 1.0 / out.shape[0])
        return np.ascontiguousarray(out, dtype=np.float32)


def _rotate(volume: np.ndarray, angle: float, order: int) -> np.ndarray:
    if volume.ndim < 3:  # (C, x): nothing to rotate
        return volume
    axes = (volume.ndim - 2, volume.ndim - 1)
    return ndimage.rotate(volume, angle, axes=axes, reshape=False, order=order, mode="nearest")


def sample_tta(
    n_samples: int,
    n_spatial: int,
    rng: np.random.Generator,
    flip_axes: Sequence[int] | None = None,
    max_angle: float = 10.0,
    noise_std: float = 0.01,
) -> list[TTATransform]:
    """``n_samples`` transforms: the first is the identity; the others cycle through the flip combinations
    of ``flip_axes`` (all spatial axes by default) and draw a rotation in ``[-max_angle, max_angle]`` and a noise
    seed from ``rng``."""
    axes = tuple(range(n_spatial)) if flip_axes is None else tuple(flip_axes)
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    out = [TTATransform()]
    for k in range(1, n_samples):
        angle = float(rng.uniform(-max_angle, max_angle)) if max_angle > 0 else 0.0
        seed = int(rng.integers(0, 2**31 - 1))
        out.append(TTATransform(combos[k % len(combos)], angle, noise_std, seed))
    return out
