"""Real nnU-Net planning on a synthetic anisotropic dataset: the cpu profile's patch budget holds on the plans
nnU-Net makes, and the default region follows the physical geometry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alseg.backends.base import TrainingCase
from alseg.backends.nnunet.backend import NnUNetBackend
from alseg.backends.nnunet.profiles import CPU_MAX_PATCH_VOXELS_3D, derive_configuration, get_profile
from alseg.data.dataset import load_dataset
from alseg.data.regions import default_region_size, default_slice_axis
from alseg.data.synthetic import write_cardiac_like

pytestmark = pytest.mark.nnunet


def test_cpu_profile_patch_budget_on_nnunet_plans_of_an_anisotropic_dataset(tmp_path: Path) -> None:
    root = write_cardiac_like(tmp_path / "cardiac", n_cases=3, seed=0)
    ds = load_dataset(root)
    shapes = [ds.geometry(c).shape for c in ds.case_ids]
    spacings = [ds.geometry(c).spacing for c in ds.case_ids]
    assert default_region_size(shapes, spacings) == (4, 44, 44)
    assert default_slice_axis(spacings) == 0

    def read_image(case_id: str) -> tuple:
        return ds.read_image(case_id), ds.geometry(case_id).spacing

    backend = NnUNetBackend(tmp_path / "nnunet", read_image, profile="cpu", device="cpu", num_threads=2)
    cases = {c: TrainingCase(tuple(ds.image_files(c)), ds.label_file(c)) for c in ds.case_ids}
    backend.prepare(cases, ds.labels, max(ds.labels) + 1)
    plans = json.loads(backend.plans_file.read_text())
    nnunet_patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert math.prod(nnunet_patch) > 4 * CPU_MAX_PATCH_VOXELS_3D  # what nnU-Net plans for a GPU
    name = derive_configuration(plans, "3d_fullres", get_profile("cpu"))
    patch = plans["configurations"][name]["patch_size"]
    assert math.prod(patch) <= CPU_MAX_PATCH_VOXELS_3D
    assert derive_configuration(plans, "3d_fullres", get_profile("gpu")) == "3d_fullres"
