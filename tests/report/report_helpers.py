"""Experiments for the report tests: a fake backend whose Dice grows with the labelled foreground.

A plain module, not a conftest (a second ``conftest`` module would shadow ``tests/conftest.py`` for the
``from conftest import ...`` lines of other test folders). :func:`report_experiments` runs, once per test
process, on the synthetic dataset: ``random`` and ``random_fg33`` with seeds 0 and 1 (3 rounds each), an
``entropy`` run stopped after round 1 (as if still running) and a full-data reference; a few seconds.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from alseg.backends.base import CasePrediction
from alseg.config import ExperimentConfig
from alseg.data.dataset import Dataset
from alseg.loop.drivers import run_experiment
from alseg.loop.full_data import run_full_data
from conftest import make_config
from fake_backend import MODEL_FILE, FakeBackend

STRATEGIES = ("random", "random_fg33")
SEEDS = (0, 1)
ROUNDS = 3
RUNNING = "entropy"


class NoisyBackend(FakeBackend):
    """Predicts the ground truth with foreground voxels missed at a rate that falls with the labelled
    foreground of the training labels (and a seeded per-model jitter), so curves rise and seeds differ."""

    def __init__(self, cfg: ExperimentConfig, ds: Dataset, exp_dir: Path, stop_at_round: int | None = None) -> None:
        super().__init__(cfg, ds, exp_dir)
        self.stop_at_round = stop_at_round
        self._total_fg: int | None = None
        self._quality = 0.0

    def train(self, cases: Any, out_dir: Path, seed: int, init_from: Path | None = None) -> Any:
        if self.stop_at_round is not None and seed % 1000 >= self.stop_at_round:
            raise RuntimeError("experiment stopped (simulates a run still in progress)")
        return super().train(cases, out_dir, seed, init_from)

    def _labelled_fraction(self, model_dir: Path) -> float:
        if self._total_fg is None:
            self._total_fg = sum(int(np.count_nonzero(self.ds.read_label(c))) for c in self.ds.case_ids)
        record = json.loads((Path(model_dir) / MODEL_FILE).read_text())
        ignore = max(self.ds.labels) + 1
        n = 0
        for case in record["cases"].values():
            lab = sitk.GetArrayFromImage(sitk.ReadImage(case["label"]))
            n += int(np.count_nonzero((lab > 0) & (lab != ignore)))
        return n / max(self._total_fg, 1)

    def predict(
        self, model_dir: Path, case_ids: Sequence[str], n_samples: int = 1, with_features: bool = False, seed: int = 0
    ) -> Iterator[CasePrediction]:
        self._quality = self._labelled_fraction(model_dir)
        yield from super().predict(model_dir, case_ids, n_samples, with_features, seed)

    def probabilities(self, case_id: str, model_seed: int, n_samples: int = 1) -> np.ndarray:
        gt = self.ds.read_label(case_id)
        rng = np.random.default_rng([zlib.crc32(case_id.encode()), model_seed & 0xFFFFFFFF])
        jitter = float(np.random.default_rng(model_seed).uniform(-0.05, 0.05))
        p_miss = float(np.clip(0.75 * np.exp(-5.0 * self._quality) + jitter, 0.0, 0.95))
        pred = np.where((gt > 0) & (rng.random(gt.shape) < p_miss), 0, gt)
        n_classes = max(self.ds.labels) + 1
        onehot = np.moveaxis(np.eye(n_classes, dtype=np.float32)[pred.astype(np.int64)], -1, 0)
        samples = []
        for _ in range(n_samples):
            eps = rng.uniform(0.0, 0.3, size=gt.shape).astype(np.float32)
            samples.append(onehot * (1.0 - eps) + eps / n_classes)
        return np.stack(samples)


def noisy_factory(stop_at_round: int | None = None) -> Any:
    def make(cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> NoisyBackend:
        return NoisyBackend(cfg, ds, exp_dir, stop_at_round)

    return make


def run_stopped(cfg: ExperimentConfig, exp_dir: Path, stop_at_round: int) -> Path:
    """Run ``cfg`` until the training of ``stop_at_round`` fails: the state of an experiment still running."""
    with pytest.raises(RuntimeError, match="stopped"):
        run_experiment(cfg, exp_dir, noisy_factory(stop_at_round))
    return exp_dir


_CACHE: dict[str, dict[str, Any]] = {}


def report_experiments(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``{"root", "runs": {(strategy, seed): dir}, "running": dir, "full_data": dir}`` (built once)."""
    if str(template) in _CACHE:
        return _CACHE[str(template)]
    root = tmp_path_factory.mktemp("report_experiments")
    runs: dict[tuple[str, int], Path] = {}
    for strategy in STRATEGIES:
        for seed in SEEDS:
            cfg = make_config(template, strategy=strategy, seed=seed, rounds=ROUNDS)
            runs[(strategy, seed)] = run_experiment(cfg, root / f"{strategy}_seed{seed}", noisy_factory())
    running = run_stopped(make_config(template, strategy=RUNNING, seed=0, rounds=ROUNDS), root / f"{RUNNING}_seed0", 2)
    full = run_full_data(make_config(template, rounds=ROUNDS), root / "full_data", noisy_factory())
    _CACHE[str(template)] = {"root": root, "runs": runs, "running": running, "full_data": full}
    return _CACHE[str(template)]


def copy_without_metrics(exp_dir: Path, dest: Path) -> Path:
    """A copy of ``exp_dir`` whose first round is not evaluated yet (its metrics rows deleted)."""
    import shutil
    import sqlite3

    from alseg.store.layout import DB_FILE

    shutil.copytree(exp_dir, dest)
    conn = sqlite3.connect(dest / DB_FILE)
    conn.execute("DELETE FROM metrics")
    conn.commit()
    conn.close()
    return dest


def shared_range_aubc(res: Any, experiment: str, axis: str) -> float:
    """A run's AUBC on cost axis ``axis`` computed by hand: Dice interpolated on the range from the largest
    starting cost to the smallest final cost of the finished runs of its setting and seed, mapped to [0, 1]."""
    import numpy as np

    def curve(path: str) -> Any:
        df = res.rounds[res.rounds["experiment"] == path].sort_values("round")
        return df[np.isfinite(df["dice"])]

    me = next(e for e in res.al_experiments if str(e.path) == experiment)
    paired = [e for e in res.al_experiments if (e.setting, e.seed) == (me.setting, me.seed)]
    finished = [curve(str(e.path)) for e in paired if e.complete] or [curve(str(e.path)) for e in paired]
    lo = max(float(c[axis].iloc[0]) for c in finished)
    hi = min(float(c[axis].iloc[-1]) for c in finished)
    c = curve(experiment)
    x, y = c[axis].to_numpy(dtype=float), c["dice"].to_numpy(dtype=float)
    if not hi > lo or x[0] > lo or x[-1] < hi:
        return float("nan")
    # the mean of the piecewise-linear curve over [lo, hi] by the midpoint rule on a fine grid: each midpoint's
    # Dice from the segment of positive width that holds it (rounds of equal cost have no width)
    t = lo + (np.arange(200_000) + 0.5) * (hi - lo) / 200_000
    seg = np.searchsorted(x, t, side="right") - 1
    x0, x1, y0, y1 = x[seg], x[seg + 1], y[seg], y[seg + 1]
    return float(np.mean(y0 + (y1 - y0) * (t - x0) / (x1 - x0)))
