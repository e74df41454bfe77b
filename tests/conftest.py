"""Shared fixtures: a fake segmentation backend, a small synthetic MSD dataset, config files, demo-case copies."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from alseg.config import ExperimentConfig  # noqa: E402
from alseg.data.dataset import Dataset, demo_dataset_path  # noqa: E402
from fake_backend import FakeBackend, make_fake_backend  # noqa: E402

SYN_SHAPE = (24, 28, 20)  # z, y, x (array order)
SYN_SPACING = (1.5, 1.0, 1.25)  # array order
SYN_LABELS = {"0": "background", "1": "anterior", "2": "posterior"}


# --------------------------------------------------------------------------- writers
def write_volume(path: Path, array: np.ndarray, spacing: tuple[float, ...] = SYN_SPACING) -> Path:
    """Write ``array`` (array order) as NIfTI with ``spacing`` given in array order."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def synthetic_label(seed: int, shape: tuple[int, ...] = SYN_SHAPE) -> np.ndarray:
    """Two adjacent ellipsoid halves (labels 1 and 2) at a seeded position; background elsewhere."""
    rng = np.random.default_rng(seed)
    centre = [int(rng.integers(n // 3, n - n // 3)) for n in shape]
    radii = [int(rng.integers(4, 7)) for _ in shape]
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
    lab = np.zeros(shape, dtype=np.uint8)
    lab[inside] = 1
    upper = np.zeros(shape, dtype=bool)
    upper[:, centre[1] :, :] = True
    lab[inside & upper] = 2
    return lab


def synthetic_image(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    return (label.astype(np.float32) * 40.0 + rng.normal(100.0, 10.0, size=label.shape)).astype(np.float32)


def make_synthetic_dataset(
    root: Path, n_cases: int = 8, shape: tuple[int, ...] = SYN_SHAPE, labels: dict[str, str] | None = None
) -> Path:
    """A Medical Segmentation Decathlon layout dataset of ``n_cases`` cases with labels 0/1/2."""
    training = []
    for i in range(n_cases):
        case = f"syn_{i:03d}"
        lab = synthetic_label(i, shape)
        write_volume(root / "imagesTr" / f"{case}.nii.gz", synthetic_image(lab, i))
        write_volume(root / "labelsTr" / f"{case}.nii.gz", lab)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    write_dataset_json(root, training, labels or SYN_LABELS, name="Synthetic")
    return root


def write_dataset_json(root: Path, training: list[dict[str, str]], labels: dict[str, str], name: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": name,
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": labels,
        "numTraining": len(training),
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))


def copy_demo_cases(dst: Path, n_cases: int = 4) -> Path:
    """Copy the first ``n_cases`` bundled Hippocampus cases into an MSD dataset at ``dst``."""
    src = demo_dataset_path()
    meta = json.loads((src / "dataset.json").read_text())
    training = sorted(meta["training"], key=lambda e: e["image"])[:n_cases]
    for entry in training:
        for key in ("image", "label"):
            rel = Path(entry[key])
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dst / rel)
    write_dataset_json(dst, training, meta["labels"], name=meta.get("name", "Hippocampus"))
    return dst


def config_dict(dataset: Path, **overrides: Any) -> dict[str, Any]:
    """A small, fast experiment config on a synthetic dataset (profile cpu: no torch import)."""
    data: dict[str, Any] = {
        "dataset": str(dataset),
        "strategy": "random_fg33",
        "seed": 0,
        "rounds": 3,
        "query_size": 4,
        "region_size": [8, 8, 8],
        "profile": "cpu",
        "device": "cpu",
    }
    data.update(overrides)
    return data


def write_config(path: Path, dataset: Path, **overrides: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_dict(dataset, **overrides), sort_keys=False))
    return path


def make_config(dataset: Path, **overrides: Any) -> ExperimentConfig:
    return ExperimentConfig.model_validate(config_dict(dataset, **overrides))


# --------------------------------------------------------------------------- fixtures
class RecordingFactory:
    """``(cfg, ds, exp_dir) -> FakeBackend``, remembering every backend it made."""

    def __init__(self) -> None:
        self.backends: list[FakeBackend] = []

    def __call__(self, cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> FakeBackend:
        backend = make_fake_backend(cfg, ds, exp_dir)
        self.backends.append(backend)
        return backend

    @property
    def calls(self) -> list[tuple[str, Any]]:
        return [c for b in self.backends for c in b.calls]


@pytest.fixture
def fake_backend_factory() -> RecordingFactory:
    """Use as ``run_experiment(cfg, exp_dir, backend_factory=fake_backend_factory)``."""
    return RecordingFactory()


@pytest.fixture(scope="session")
def _synthetic_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic_template") / "Synthetic")


@pytest.fixture
def synthetic_dataset(tmp_path: Path, _synthetic_template: Path) -> Path:
    """A fresh copy (safe to corrupt) of an 8-case 24x28x20 MSD dataset with labels 0/1/2."""
    dst = tmp_path / "Synthetic"
    shutil.copytree(_synthetic_template, dst)
    return dst


@pytest.fixture
def demo_cases(tmp_path: Path) -> Callable[[int], Path]:
    """``demo_cases(n)``: the first ``n`` bundled Hippocampus cases copied to ``tmp_path / 'Hippocampus'``."""

    def make(n_cases: int = 4) -> Path:
        return copy_demo_cases(tmp_path / "Hippocampus", n_cases)

    return make


@contextlib.contextmanager
def lock_held_by_another_process(exp_dir: Path) -> Iterator[subprocess.Popen]:
    """Another process holds ``exp_dir``'s experiment lock while the block runs; yields that process."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom alseg.store.state import experiment_lock\n"
            "with experiment_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n",
            str(exp_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)
