"""A SegmentationBackend without nnU-Net, for fast loop tests.

A plain module (not a conftest) so that a subprocess can import it: ``sys.path.insert(0, TESTS_DIR)`` then
``from fake_backend import make_fake_backend``.

* ``prepare`` writes a marker file (``nnunet/fake_prepared.json``) recording the planning cases.
* ``train`` reports progress (when given ``progress``) as a training under the config's schedule would: per model
  (ensemble member) at iteration 0, after ``min(20, iterations per epoch)`` iterations and at every epoch end, with
  ``seconds = iteration * seconds_per_iteration`` (a class attribute; no time passes) and ``setup_seconds``.
* ``train`` records which cases and label files it got (with the label files' SHA-256) and the classes per case
  (``case_classes``) in ``out_dir/alseg_model.json``, written atomically: into ``out_dir.name + '.partial'`` and
  then renamed. With ``uncertainty: {source: ensemble, ensemble: folds}`` it also records the cross-validation
  folds drawn as the nnU-Net backend draws them, and each member's training and validation cases.
* ``predict`` yields probabilities ``(K, C, *spatial)`` built deterministically from the ground truth of the
  case: the one-hot label smoothed by a per-voxel amount (< 0.5, so argmax is the ground truth) drawn from a
  generator seeded by the case id and the model's training seed. Uncertainty strategies therefore see
  varying, reproducible scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alseg.backends.base import CasePrediction, ProgressCallback, TrainingCase, TrainingProgress, TrainResult
from alseg.config import ExperimentConfig
from alseg.data.dataset import Dataset
from alseg.data.folds import cross_validation_folds, fold_generator, nnunet_splits

MODEL_FILE = "alseg_model.json"
PREPARED_FILE = "fake_prepared.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FakeBackend:
    """Implements :class:`alseg.backends.base.SegmentationBackend` from the ground truth of the dataset."""

    name = "fake"
    #: what the progress reports of ``train`` say one iteration and a model's start-up take (fake seconds)
    seconds_per_iteration = 0.5
    setup_seconds = 0.0

    def __init__(self, cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> None:
        self.cfg = cfg
        self.ds = ds
        self.exp_dir = Path(exp_dir)
        self.work_dir = self.exp_dir / "nnunet"
        self.calls: list[tuple[str, Any]] = []
        self.predict_samples: list[int] = []  # n_samples of each predict call

    # ------------------------------------------------------------------ protocol
    def prepare(self, planning_cases: Mapping[str, TrainingCase], labels: Mapping[int, str], ignore_value: int) -> None:
        self.calls.append(("prepare", sorted(planning_cases)))
        marker = self.work_dir / PREPARED_FILE
        if marker.exists():
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "cases": {cid: str(case.label) for cid, case in sorted(planning_cases.items())},
            "labels": {str(k): v for k, v in labels.items()},
            "ignore_value": int(ignore_value),
        }
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, marker)

    def train(
        self,
        cases: Mapping[str, TrainingCase],
        out_dir: Path,
        seed: int,
        init_from: Path | None = None,
        case_classes: Mapping[str, set[int]] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        t0 = time.perf_counter()
        self.calls.append(("train", sorted(cases)))
        out_dir = Path(out_dir)
        if not cases:
            raise ValueError("FakeBackend.train: no training cases")
        if init_from is not None and not (Path(init_from) / MODEL_FILE).is_file():
            raise FileNotFoundError(f"FakeBackend.train: init_from {init_from} holds no model")
        record = {
            "seed": int(seed),
            "init_from": None if init_from is None else str(init_from),
            "cases": {
                cid: {
                    "images": [str(p) for p in case.images],
                    "label": str(case.label),
                    "label_sha256": _sha256(case.label),
                }
                for cid, case in sorted(cases.items())
            },
            "case_classes": None
            if case_classes is None
            else {cid: sorted(int(c) for c in v) for cid, v in sorted(case_classes.items())},
        }
        u = self.cfg.uncertainty
        if u.source == "ensemble" and u.ensemble == "folds":  # as NnUNetBackend: member k trains outside fold k
            classes = {cid: set((case_classes or {}).get(cid, ())) for cid in cases}
            folds = cross_validation_folds(classes, int(u.n_samples or 2), fold_generator(seed))
            record["validation_folds"] = folds
            record["members"] = [
                {"fold": k, "train_cases": split["train"], "val_cases": split["val"]}
                for k, split in enumerate(nnunet_splits(folds))
            ]
        if progress is not None:
            self.report_progress(progress, from_scratch=init_from is None)
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with open(partial / MODEL_FILE, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if out_dir.exists():  # a model left by a run killed before its train stage committed
            shutil.rmtree(out_dir)
        os.replace(partial, out_dir)
        return TrainResult(out_dir, time.perf_counter() - t0, {"n_cases": len(cases)})

    def predict(
        self,
        model_dir: Path,
        case_ids: Sequence[str],
        n_samples: int = 1,
        with_features: bool = False,
        seed: int = 0,
    ) -> Iterator[CasePrediction]:
        model_file = Path(model_dir) / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"FakeBackend.predict: {model_dir} holds no model")
        model_seed = int(json.loads(model_file.read_text())["seed"])
        case_ids = list(case_ids)
        self.calls.append(("predict", case_ids))
        self.predict_samples.append(n_samples)
        for cid in case_ids:
            pred = CasePrediction(cid, self.probabilities(cid, model_seed, n_samples))
            if with_features:  # features: the mean probabilities and a seeded noise channel
                noise = np.random.default_rng(zlib.crc32(cid.encode())).normal(size=pred.probs.shape[2:])
                pred.features = np.concatenate([pred.probs.mean(axis=0), noise[None].astype(np.float32)])
                pred.extras["last_features"] = pred.features[:2].copy()
            yield pred

    def gradient_embedder(self, model_dir: Path, layers: str = "bottleneck") -> Any:
        """Fake region gradients: seeded per (case, box) vectors of 64 numbers plus the region's fg fraction.

        ``parameter_ranges`` names fake weights of the requested ``layers`` (one bottleneck weight, or two
        decoder stages of 32 numbers), so a query record shows which set a strategy asked for."""
        if layers not in ("bottleneck", "decoder"):
            raise ValueError(f"unknown gradient layers {layers!r}; valid: 'bottleneck', 'decoder'")

        def embed(case_id: str, boxes: Sequence[Any], index: np.ndarray | None) -> np.ndarray:
            gt = self.ds.read_label(case_id)
            rows = []
            for b in boxes:
                rng = np.random.default_rng([zlib.crc32(case_id.encode()), *b.start])
                fg = float((gt[b.slices()] > 0).mean())
                rows.append(np.concatenate([[fg * 10], rng.normal(size=63)]).astype(np.float32))
            g = np.stack(rows)
            return g if index is None else g[:, index]

        embed.n_params = 64
        embed.layers = layers
        if layers == "decoder":
            embed.parameter_ranges = [("decoder.stages.0.fake.weight", 0, 32), ("decoder.stages.1.fake.weight", 32, 64)]
        else:
            embed.parameter_ranges = [("encoder.stages.-1.fake.weight", 0, 64)]
        return embed

    # ------------------------------------------------------------------ helpers
    def report_progress(self, progress: ProgressCallback, from_scratch: bool) -> None:
        """The progress reports of a training under the config's schedule (no time passes)."""
        sched = self.cfg.schedule
        assert sched is not None, "the experiment's config is resolved: it has a schedule"
        spec = sched.to_spec(from_scratch=from_scratch or not sched.warm_start)
        epochs, per_epoch = int(spec["epochs"]), int(spec["iterations_per_epoch"])
        u = self.cfg.uncertainty
        members = int(u.n_samples or 1) if u.source == "ensemble" else 1
        spi = self.seconds_per_iteration
        for k in range(members):
            common = {"iterations": epochs * per_epoch, "epochs": epochs, "member": k, "members": members}
            common["setup_seconds"] = self.setup_seconds
            progress(TrainingProgress(iteration=0, epoch=0, **common))
            early = min(20, per_epoch)
            progress(TrainingProgress(iteration=early, epoch=0, loss=1.0, seconds=early * spi, **common))
            for e in range(1, epochs + 1):
                it = e * per_epoch
                loss, dice = 1.0 / (e + 1), e / (epochs + 1)
                progress(
                    TrainingProgress(
                        iteration=it,
                        epoch=e,
                        loss=loss,
                        pseudo_dice=dice,
                        seconds=it * spi,
                        epoch_end=True,
                        epoch_seconds=per_epoch * spi,
                        **common,
                    )
                )

    def _truth(self, case_id: str) -> np.ndarray:
        """The case's label; for a case without one (a dataset people annotate), classes by image intensity."""
        if self.ds.has_label(case_id):
            return self.ds.read_label(case_id)
        image = np.asarray(self.ds.read_image(case_id), dtype=np.float32)
        image = image.reshape(-1, *self.ds.geometry(case_id).shape)[0]  # the first channel
        n_classes = max(self.ds.labels) + 1
        edges = np.quantile(image, np.linspace(0, 1, n_classes + 1)[1:-1])
        return np.digitize(image, edges).astype(np.uint8)

    def probabilities(self, case_id: str, model_seed: int, n_samples: int = 1) -> np.ndarray:
        gt = self._truth(case_id)
        shape = self.ds.geometry(case_id).shape
        assert gt.shape == shape, (case_id, gt.shape, shape)
        n_classes = max(self.ds.labels) + 1
        rng = np.random.default_rng([zlib.crc32(case_id.encode()), model_seed & 0xFFFFFFFF])
        onehot = np.eye(n_classes, dtype=np.float32)[gt.astype(np.int64)]  # (*spatial, C)
        onehot = np.moveaxis(onehot, -1, 0)  # (C, *spatial)
        samples = []
        for _ in range(n_samples):
            eps = rng.uniform(0.0, 0.45, size=shape).astype(np.float32)
            samples.append(onehot * (1.0 - eps) + eps / n_classes)
        return np.stack(samples, axis=0)


def make_fake_backend(cfg: ExperimentConfig, ds: Dataset, exp_dir: Path) -> FakeBackend:
    """A backend factory for ``run_experiment(cfg, exp_dir, backend_factory=make_fake_backend)``."""
    return FakeBackend(cfg, ds, exp_dir)


def read_model(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / MODEL_FILE).read_text())
