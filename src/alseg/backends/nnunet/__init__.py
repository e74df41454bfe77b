"""nnU-Net v2 backend: the only package of alseg that imports nnunetv2 (lazily, inside its functions)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from alseg.backends.nnunet.backend import NnUNetBackend
from alseg.backends.nnunet.profiles import get_profile

if TYPE_CHECKING:
    from alseg.backends.base import ProgressCallback
    from alseg.config import ExperimentConfig
    from alseg.data.dataset import Dataset

__all__ = ["NnUNetBackend", "make_backend"]


def make_backend(
    cfg: ExperimentConfig, ds: Dataset, workspace: Path, progress: ProgressCallback | None = None
) -> NnUNetBackend:
    """The nnU-Net backend for an experiment's config; its messages go to the ``alseg`` log (the experiment's
    ``alseg.log``), ``progress`` gets the training reports of every ``train`` not given its own callback."""
    profile = get_profile(cfg.profile if cfg.profile != "auto" else "cpu", cfg.schedule)

    def read_image(case_id: str) -> tuple:
        return ds.read_image(case_id), ds.geometry(case_id).spacing

    return NnUNetBackend(
        workspace,
        read_image,
        configuration=cfg.configuration or "3d_fullres",
        profile=profile,
        device=cfg.device,
        num_threads=cfg.num_threads,
        uncertainty=cfg.uncertainty.source,
        n_models=cfg.uncertainty.n_samples,
        ensemble=cfg.uncertainty.ensemble,
        dropout_train_p=cfg.uncertainty.dropout_train_p,
        dropout_query_p=cfg.uncertainty.dropout_query_p,
        tta_flip_axes=cfg.uncertainty.tta_flip_axes,
        tta_max_angle=cfg.uncertainty.tta_max_angle,
        tta_noise_std=cfg.uncertainty.tta_noise_std,
        log=logging.getLogger("alseg").info,
        progress=progress,
    )
