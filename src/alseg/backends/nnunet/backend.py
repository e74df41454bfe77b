"""The nnU-Net v2 backend: plan once, train on partial labels with the ignore label, predict in memory.

Layout under the backend's workspace (one experiment directory's ``nnunet/``)::

    plans.json             frozen plans (nnU-Net's planner, run once on the starting data)
    fingerprint.json       the dataset fingerprint used for planning
    dataset.json           the training dataset.json, with ``"ignore"`` declared
    planning/              nnU-Net raw / preprocessed folders used only for planning

Training runs ``python -m alseg.backends.nnunet.worker train`` in a child process whose environment alone
holds nnU-Net's folder variables; the child dies with its parent. A model directory is assembled next to
its final place and renamed into it when complete, so a directory that exists is a finished model.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alseg import durable
from alseg.backends.base import CasePrediction, ProgressCallback, TrainingCase, TrainingProgress, TrainResult
from alseg.backends.nnunet.profiles import Profile, derive_configuration, get_profile
from alseg.backends.nnunet.sampling import mc_dropout_probabilities, preprocess
from alseg.errors import AlsegError
from alseg.uncertainty.tta import sample_tta

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_alseg"
MODEL_COMPLETE = "alseg_model.json"

ImageReader = Callable[[str], tuple[np.ndarray, Sequence[float]]]
UncertaintySource = Literal["softmax", "mc_dropout", "tta", "ensemble"]


class BackendError(AlsegError, RuntimeError):
    """nnU-Net failed; the message names the log file with its output."""


#: how often ``_run_worker`` reads a training child's progress file (the child writes it every ~2 s)
PROGRESS_POLL_SECONDS = 1.0


class TrainingProgressReader:
    """Turns a training worker's progress file into :class:`TrainingProgress` reports, each one once.

    The worker (``_TrainingProgressFile`` in ``worker.py``) rewrites the file atomically; each :meth:`poll`
    returns what is new since the last one: one ``epoch_end`` report per epoch completed since (from the file's
    ``epochs_done``, so no epoch is missed however seldom it is polled), then the current state if it moved on.
    A missing, unreadable or unchanged file gives nothing. ``launched_at`` (Unix time the child was started)
    gives ``setup_seconds``: the time until its first iteration.
    """

    def __init__(self, path: Path, launched_at: float | None = None) -> None:
        self.path = Path(path)
        self.launched_at = launched_at
        self.epochs_reported = 0
        self._last: tuple | None = None

    def poll(self) -> list[TrainingProgress]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(data, dict):
            return []
        try:
            return self._reports(data)
        except (KeyError, TypeError, ValueError):  # not a progress file of this version: nothing to show
            return []

    def _reports(self, data: dict[str, Any]) -> list[TrainingProgress]:
        key = (data.get("updated_at"), data.get("phase"), data["iteration"], data["epoch"])
        if key == self._last:
            return []
        self._last = key
        epochs, iterations = int(data["epochs"]), int(data["iterations"])
        per_epoch = iterations // max(epochs, 1)
        started = data.get("started_at")
        setup = None
        if started is not None and self.launched_at is not None:
            setup = max(0.0, float(started) - self.launched_at)
        common = {
            "iterations": iterations,
            "epochs": epochs,
            "member": int(data.get("member", 0)),
            "members": int(data.get("members", 1)),
            "setup_seconds": setup,
        }
        out: list[TrainingProgress] = []
        for done in data.get("epochs_done") or []:
            n = int(done["epoch"])
            if n <= self.epochs_reported:
                continue
            self.epochs_reported = n
            out.append(
                TrainingProgress(
                    iteration=min(n * per_epoch, iterations),
                    epoch=n,
                    loss=_number(done.get("loss")),
                    pseudo_dice=_number(done.get("pseudo_dice")),
                    seconds=float(done.get("elapsed") or 0.0),
                    epoch_end=True,
                    epoch_seconds=_number(done.get("seconds")),
                    **common,
                )
            )
        current = TrainingProgress(
            iteration=int(data["iteration"]),
            epoch=int(data["epoch"]),
            loss=_number(data.get("loss")),
            pseudo_dice=_number(data.get("pseudo_dice")),
            seconds=float(data.get("seconds") or 0.0),
            **common,
        )
        if not out or (current.iteration, current.epoch) != (out[-1].iteration, out[-1].epoch):
            out.append(current)
        return out


def _number(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if v == v else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class NnUNetBackend:
    """nnU-Net v2 (unmodified, from PyPI) as an alseg segmentation backend."""

    name = "nnunet"

    def __init__(
        self,
        workspace: Path,
        read_image: ImageReader,
        configuration: str = "3d_fullres",
        profile: Profile | str = "cpu",
        device: str = "auto",
        num_threads: int | None = None,
        log: Callable[[str], None] | None = None,
        uncertainty: UncertaintySource = "softmax",
        n_models: int = 1,
        dropout_train_p: float = 0.01,
        dropout_query_p: float = 0.1,
        tta_flip_axes: Sequence[int] | None = None,
        tta_max_angle: float = 10.0,
        tta_noise_std: float = 0.01,
        ensemble: Literal["seeds", "folds"] = "seeds",
        progress: ProgressCallback | None = None,
    ) -> None:
        if uncertainty not in ("softmax", "mc_dropout", "tta", "ensemble"):
            raise ValueError(f"unknown uncertainty source {uncertainty!r}; expected softmax, mc_dropout, tta, ensemble")
        if ensemble not in ("seeds", "folds"):
            raise ValueError(f"unknown ensemble kind {ensemble!r}; expected seeds or folds")
        self.uncertainty = uncertainty
        self.n_models = int(n_models) if uncertainty == "ensemble" else 1
        # ensemble: "seeds" trains every member on all cases; "folds" trains member k on all cases outside
        # validation fold k of a cross-validation (nnActive); only meaningful for the ensemble source
        self.ensemble = ensemble if uncertainty == "ensemble" else "seeds"
        if self.ensemble == "folds" and self.n_models < 2:
            raise ValueError(f"a cross-validation ensemble needs at least 2 folds (n_samples), got {self.n_models}")
        self.dropout_train_p = dropout_train_p
        self.dropout_query_p = dropout_query_p
        self.tta_flip_axes = tta_flip_axes
        self.tta_max_angle = tta_max_angle
        self.tta_noise_std = tta_noise_std
        self.workspace = Path(workspace).resolve()
        self.read_image = read_image
        self.base_configuration = configuration
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.device = device
        self.num_threads = num_threads or os.cpu_count() or 1
        self.log = log or (lambda msg: None)
        self.progress = progress  # training progress reports, unless ``train`` is given its own callback

    # ------------------------------------------------------------------ paths
    @property
    def plans_file(self) -> Path:
        return self.workspace / "plans.json"

    @property
    def fingerprint_file(self) -> Path:
        return self.workspace / "fingerprint.json"

    @property
    def dataset_json_file(self) -> Path:
        return self.workspace / "dataset.json"

    def configuration(self) -> str:
        plans = json.loads(self.plans_file.read_text())
        return derive_configuration(plans, self.base_configuration, self.profile)

    # ------------------------------------------------------------------ worker
    def _env(self, raw: Path, preprocessed: Path, results: Path, training: bool) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            nnUNet_raw=str(raw),
            nnUNet_preprocessed=str(preprocessed),
            nnUNet_results=str(results),
            nnUNet_def_n_proc=str(min(2, self.num_threads)),
            OMP_NUM_THREADS=str(self.num_threads),
        )
        if training:
            env["nnUNet_n_proc_DA"] = "0"  # faster on few cores; it breaks planning, so training only
        else:
            env.pop("nnUNet_n_proc_DA", None)
        env.pop("nnUNet_compile", None)
        return env

    def _run_worker(
        self,
        command: str,
        spec: dict[str, Any],
        work: Path,
        training: bool,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Run the worker's ``command`` in a child process and wait for it.

        With ``progress``, the child is given a progress file next to its log (``{command}_progress.json``,
        spec key ``progress_file``), which is polled about once a second while it runs; every new report goes
        to ``progress`` (see :class:`TrainingProgressReader`). An exception here (the callback's, or an
        interrupt) kills the child before it propagates.
        """
        work.mkdir(parents=True, exist_ok=True)
        work = work.resolve()  # the worker runs with cwd=work: every path it gets is absolute
        reader = None
        if progress is not None:
            progress_file = work / f"{command}_progress.json"
            progress_file.unlink(missing_ok=True)
            spec = {**spec, "progress_file": str(progress_file)}
        spec_file = work / f"{command}_spec.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        log_file = work / f"{command}.log"
        env = self._env(work / "raw", work / "preprocessed", work / "results", training)
        for key in ("raw", "preprocessed", "results"):
            (work / key).mkdir(exist_ok=True)
        with open(log_file, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "alseg.backends.nnunet.worker", command, str(spec_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
                preexec_fn=_die_with_parent,
            )
            try:
                if progress is not None:
                    reader = TrainingProgressReader(progress_file, launched_at=time.time())
                while True:
                    try:
                        proc.wait(timeout=None if reader is None else PROGRESS_POLL_SECONDS)
                        break
                    except subprocess.TimeoutExpired:
                        for report in reader.poll() if reader is not None else ():
                            progress(report)  # type: ignore[misc]
                if reader is not None and proc.returncode == 0:
                    for report in reader.poll():  # the last epochs, if they ended after the last poll
                        progress(report)  # type: ignore[misc]
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if proc.returncode != 0:
            tail = log_file.read_text(errors="replace")[-3000:]
            if "No space left on device" in tail or "ENOSPC" in tail:
                raise BackendError(
                    f"nnU-Net {command} ran out of disk space in {work} (see {log_file}); free space there and run "
                    "the same command again: the round's training starts over, nothing annotated is lost"
                )
            raise BackendError(f"nnU-Net {command} failed (exit {proc.returncode}); see {log_file}:\n{tail}")

    # ------------------------------------------------------------------ protocol
    def _dataset_json(
        self, labels: Mapping[int, str], ignore_value: int | None, n: int, n_channels: int
    ) -> dict[str, Any]:
        names: dict[str, int] = {}
        for value, name in sorted(labels.items()):
            key = "background" if value == 0 else str(name)
            if key in names or key == "ignore":
                key = f"{key}_{value}"
            names[key] = int(value)
        if ignore_value is not None:
            names["ignore"] = int(ignore_value)
        return {
            "channel_names": {str(i): f"channel{i}" for i in range(n_channels)},
            "labels": names,
            "numTraining": n,
            "file_ending": ".nii.gz",
        }

    def prepare(self, planning_cases: Mapping[str, TrainingCase], labels: Mapping[int, str], ignore_value: int) -> None:
        """Fingerprint and plan from ``planning_cases`` (labels without the ignore value), once."""
        if self.plans_file.exists() and self.dataset_json_file.exists():
            return
        if not planning_cases:
            raise ValueError("nnU-Net planning needs at least one annotated case")
        n_channels = len(next(iter(planning_cases.values())).images)
        work = self.workspace / "planning"
        shutil.rmtree(work, ignore_errors=True)
        dj = self._dataset_json(labels, None, len(planning_cases), n_channels)
        dj["dataset"] = {
            cid: {"images": [str(p) for p in c.images], "label": str(c.label)}
            for cid, c in sorted(planning_cases.items())
        }
        spec = {
            "dataset_name": DATASET_NAME,
            "dataset_id": DATASET_ID,
            "planning_dataset_json": dj,
            "plans_out": str(self.fingerprint_file.with_name("plans.json.new")),
            "fingerprint_out": str(self.fingerprint_file.with_name("fingerprint.json.new")),
            "num_processes": min(2, self.num_threads),
        }
        t0 = time.perf_counter()
        self._run_worker("plan", spec, work, training=False)
        train_dj = self._dataset_json(labels, ignore_value, 0, n_channels)
        tmp = self.dataset_json_file.with_suffix(".json.new")
        tmp.write_text(json.dumps(train_dj, indent=2))
        durable.replace(self.fingerprint_file.with_name("fingerprint.json.new"), self.fingerprint_file)
        durable.replace(tmp, self.dataset_json_file)
        durable.replace(self.fingerprint_file.with_name("plans.json.new"), self.plans_file)  # plans last: the marker
        shutil.rmtree(work, ignore_errors=True)
        self.log(f"nnU-Net planned from {len(planning_cases)} cases in {time.perf_counter() - t0:.1f} s")

    def _fold_names(self) -> list[str]:
        return ["all"] if self.n_models == 1 else [str(k) for k in range(self.n_models)]

    def train(
        self,
        cases: Mapping[str, TrainingCase],
        out_dir: Path,
        seed: int,
        init_from: Path | None = None,
        case_classes: Mapping[str, set[int]] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        """Train one model (or ``n_models`` ensemble members) on ``cases``.

        Members are stored as nnU-Net folds: ``fold_all`` for one model, ``fold_0 ... fold_{K-1}`` for an
        ensemble. ``ensemble="seeds"`` (deep ensemble): every member sees all annotated data, from its own
        initialisation / seed. ``ensemble="folds"`` (nnActive): the cases are split into K validation folds in
        which every class of ``case_classes`` (present in at least two cases) lies in at least two folds
        (:func:`alseg.data.folds.cross_validation_folds`, drawn from ``fold_generator(seed)``, so a rerun of
        the round draws the same split), and member k is nnU-Net's fold k: it trains on every case outside
        fold k. The split goes to nnU-Net as ``splits_final.json``; a copy stays in the model directory and
        the summary records it (``validation_folds``) with each member's training and validation cases.
        Without ``case_classes`` the folds are drawn without the class rule. Warm start: member k starts from
        ``fold_k`` of ``init_from``.

        ``progress`` (else the one the backend was made with): called with a :class:`TrainingProgress` about
        once a second and at every epoch end while a member trains (the worker counts nnU-Net's iterations).
        """
        progress = progress if progress is not None else self.progress
        out_dir = Path(out_dir)
        if (out_dir / MODEL_COMPLETE).exists():
            report = json.loads((out_dir / MODEL_COMPLETE).read_text())
            return TrainResult(out_dir, float(report.get("train_seconds", 0.0)), report)
        if not cases:
            raise ValueError("nothing is annotated: no case to train on")
        plans = json.loads(self.plans_file.read_text())
        dropout = self.dropout_train_p if self.uncertainty == "mc_dropout" else None
        configuration = derive_configuration(plans, self.base_configuration, self.profile, dropout)
        dataset_json = json.loads(self.dataset_json_file.read_text())
        dataset_json["numTraining"] = len(cases)
        work = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        plans_path = work / "plans.json"
        plans_path.write_text(json.dumps(plans))
        model = work / "model"
        folds: list[list[str]] | None = None
        splits: list[dict[str, list[str]]] | None = None
        short: list[int] = []
        if self.ensemble == "folds":
            from alseg.data.folds import cross_validation_folds, fold_generator, nnunet_splits, short_classes

            if case_classes is None:
                self.log("no classes per case given: the cross-validation folds ignore the class rule")
            classes = {cid: {int(c) for c in (case_classes or {}).get(cid, ())} for cid in cases}
            folds = cross_validation_folds(classes, self.n_models, fold_generator(seed))
            splits = nnunet_splits(folds)
            short = short_classes(folds, classes)
            if short:
                self.log(f"classes {short} lie in fewer than two cross-validation folds; some members miss them")
        t0 = time.perf_counter()
        reports = []
        for k, fold in enumerate(self._fold_names()):
            init_ckpt = None
            if init_from is not None and self.profile.schedule.warm_start:
                init_ckpt = str(Path(init_from) / f"fold_{fold}" / "checkpoint_final.pth")
            member = work / (f"member_{k}" if self.n_models > 1 else "")
            spec = {
                "plans_file": str(plans_path),
                "fingerprint_file": str(self.fingerprint_file),
                "dataset_json": dataset_json,
                "configuration": configuration,
                "dataset_name": DATASET_NAME,
                "cases": {
                    cid: {"images": [str(p) for p in c.images], "label": str(c.label)}
                    for cid, c in sorted(cases.items())
                },
                "seed": int(seed) * 100 + k,
                "num_threads": self.num_threads,
                "device": resolve_device(self.device),
                "schedule": self.profile.schedule.to_spec(from_scratch=init_ckpt is None),
                "init_checkpoint": init_ckpt,
                "report_file": str(member / "report.json"),
                "fold": k if splits is not None else "all",
                "splits": splits,
            }
            if progress is not None:
                spec.update(member=k, members=self.n_models)
            self._run_worker("train", spec, member, training=True, progress=progress)
            report = json.loads((member / "report.json").read_text())
            if splits is not None and report.get("train_cases") != splits[k]["train"]:
                raise BackendError(
                    f"nnU-Net trained member {k} on {report.get('train_cases')}, not on its split {splits[k]['train']}"
                )
            trained = Path(report["output_folder"])
            nn_fold = f"fold_{spec['fold']}"  # nnU-Net's folder: fold_all, or fold_k of the split
            if not model.exists():
                trained.rename(model)  # plans.json, dataset.json, the fold folder
            else:
                (trained / nn_fold).rename(model / nn_fold)
            if nn_fold != f"fold_{fold}":
                (model / nn_fold).rename(model / f"fold_{fold}")
            (model / f"fold_{fold}" / "checkpoint_best.pth").unlink(missing_ok=True)
            shutil.copyfile(member / "train.log", model / f"fold_{fold}" / "alseg_train.log")
            report["init_from"] = init_ckpt
            reports.append(report)
        summary = {
            "configuration": configuration,
            "profile": self.profile.name,
            "uncertainty": self.uncertainty,
            "ensemble": self.ensemble if self.uncertainty == "ensemble" else None,
            "folds": self._fold_names(),
            "validation_folds": folds,
            "classes_short_of_two_folds": short if folds is not None else None,
            "seconds": time.perf_counter() - t0,
            "train_seconds": sum(r["train_seconds"] for r in reports),
            "members": reports,
        }
        if splits is not None:
            (model / "splits_final.json").write_text(json.dumps(splits, indent=2))
        (model / MODEL_COMPLETE).write_text(json.dumps(summary, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        durable.fsync_tree(model)  # checkpoints and plans on disk before the loop commits the round
        os.replace(model, out_dir)
        durable.fsync_dir(out_dir.parent)
        shutil.rmtree(work, ignore_errors=True)
        return TrainResult(out_dir, float(summary["train_seconds"]), summary)

    def predict(
        self,
        model_dir: Path,
        case_ids: Sequence[str],
        n_samples: int = 1,
        with_features: bool = False,
        seed: int = 0,
    ) -> Iterator[CasePrediction]:
        """Stream ``(K, C, *spatial)`` probability samples per case from the configured uncertainty source.

        ``softmax``: K = 1. ``ensemble``: one sample per member (K = n_models). ``mc_dropout``: K passes with
        dropout on (p raised to ``dropout_query_p``), normalisation in eval mode. ``tta``: K seeded
        augmentations (flips, rotation, noise), each mapped back. With ``n_samples=1`` MC dropout and TTA give
        the plain deterministic prediction (used for evaluation); an ensemble always gives all its members.
        """
        if self.uncertainty == "softmax" and n_samples > 1:
            raise ValueError(
                f"{n_samples} probability samples were asked for, but the uncertainty source is a single softmax; "
                "set uncertainty.source to mc_dropout, tta or ensemble"
            )
        if self.uncertainty == "ensemble" and n_samples > self.n_models:
            raise ValueError(f"{n_samples} samples asked for, but the ensemble has {self.n_models} members")
        k = self.n_models if self.uncertainty == "ensemble" else (n_samples if self.uncertainty != "softmax" else 1)
        predictor = self._load_predictor(Path(model_dir))
        import torch

        params = list(predictor.list_of_parameters)
        if self.uncertainty == "mc_dropout" and k > 1:  # one sample (evaluation): the deterministic network
            _enable_mc_dropout(predictor.network, self.dropout_query_p)
        for case_id in case_ids:
            image, spacing = self.read_image(case_id)
            image = np.ascontiguousarray(image, dtype=np.float32)
            props = {"spacing": [float(s) for s in spacing]}
            case_seed = _case_seed(seed, case_id)
            samples = []
            if self.uncertainty == "tta":
                rng = np.random.default_rng(case_seed)
                transforms = sample_tta(
                    k, image.ndim - 1, rng, self.tta_flip_axes, self.tta_max_angle, self.tta_noise_std
                )
                for t in transforms:
                    _, probs = predictor.predict_single_npy_array(t.apply(image), props, None, None, True)
                    samples.append(t.invert_probabilities(probs))
            elif self.uncertainty == "mc_dropout" and k > 1:  # the K passes batched (sampling.py)
                samples = list(mc_dropout_probabilities(predictor, image, props, k, case_seed))
            else:
                for i in range(k):
                    if self.uncertainty == "ensemble":
                        predictor.list_of_parameters = [params[i]]
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(case_seed + i)
                        _, probs = predictor.predict_single_npy_array(image, props, None, None, True)
                    samples.append(np.asarray(probs, dtype=np.float32))
            pred = CasePrediction(case_id, np.stack(samples))
            if with_features:
                if self.uncertainty == "ensemble":
                    predictor.list_of_parameters = [params[0]]
                pred.features, pred.extras["last_features"] = _features(predictor, image, props)
            yield pred

    def gradient_embedder(self, model_dir: Path, layers: str = "bottleneck") -> Callable[..., np.ndarray]:
        """``(case_id, boxes, index) -> (len(boxes), len(index))`` gradient embeddings of the weights chosen by
        ``layers`` (``"bottleneck"``: USIMC, ``"decoder"``: USIMF; see :func:`gradient_parameters`).

        The callable has ``n_params`` (the length of the full flat embedding), ``layers``, and
        ``parameter_ranges``: ``(parameter name, start, stop)`` of each weight's flat range in it.
        """
        check_gradient_layers(layers)
        grads = RegionGradients(self._load_predictor(Path(model_dir)), layers)

        def embed(case_id: str, boxes: Sequence[Any], index: np.ndarray | None) -> np.ndarray:
            image, spacing = self.read_image(case_id)
            props = {"spacing": [float(s) for s in spacing]}
            return grads(np.ascontiguousarray(image, dtype=np.float32), props, boxes, index)

        embed.n_params = grads.n_params  # type: ignore[attr-defined]
        embed.layers = layers  # type: ignore[attr-defined]
        embed.parameter_ranges = list(grads.parameter_ranges)  # type: ignore[attr-defined]
        return embed

    def _load_predictor(self, model_dir: Path) -> Any:
        if not (model_dir / MODEL_COMPLETE).exists():
            raise BackendError(f"{model_dir} is not a complete alseg nnU-Net model (no {MODEL_COMPLETE})")
        device = resolve_device(self.device)
        # nnU-Net prints notes and its imports raise torch's FutureWarnings: they would break the progress bars
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import torch
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            predictor = nnUNetPredictor(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=False,
                perform_everything_on_device=device != "cpu",
                device=torch.device(device),
                verbose=False,
                allow_tqdm=False,
            )
            predictor.initialize_from_trained_model_folder(
                str(model_dir), use_folds=tuple(self._fold_names()), checkpoint_name="checkpoint_final.pth"
            )
        return predictor


def _case_seed(seed: int, case_id: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(case_id.encode())) % (2**31 - 1)


def _enable_mc_dropout(network: Any, p: float) -> None:
    """Keep dropout active at inference (the predictor calls ``eval()`` before every use)."""
    import torch

    drop = [m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if not drop:
        raise BackendError("MC dropout needs a network trained with dropout; this model has no dropout layers")
    for m in drop:
        m.p = float(p)
    network._alseg_mc_dropout = True  # _features switches it off for its deterministic pass

    def hook(module: Any, args: Any) -> None:
        if getattr(network, "_alseg_mc_dropout", False):
            for m in drop:
                m.train()

    network.register_forward_pre_hook(hook)


def _features(predictor: Any, image: np.ndarray, props: dict) -> tuple[np.ndarray, np.ndarray]:
    """Bottleneck activations and the last layer's input features of one case, in the image's own grid.

    One whole-image forward pass of the (deterministic) network on the preprocessed case, padded to a multiple
    of the network's total stride; a forward hook on ``encoder.stages[-1]`` gives the bottleneck and one on the
    last segmentation layer gives its input ``h(x)`` (BADGE's features). Both are mapped back like nnU-Net's
    probabilities: resampled to the cropped shape, put back into the crop's bounding box (zeros outside) and
    transposed back. The bottleneck is upsampled (trilinear) to the preprocessed grid first.
    """
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    data, pp = preprocess(predictor, image, dict(props))
    data = torch.as_tensor(data, dtype=torch.float32)
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    mc_dropout = getattr(network, "_alseg_mc_dropout", False)
    network._alseg_mc_dropout = False  # the deterministic network, also while MC dropout passes are on
    total = np.prod(np.asarray(cm.pool_op_kernel_sizes), axis=0).astype(int)
    slicewise = len(total) == data.ndim - 2  # a 2d network on a 3D case: slices are the batch
    x = data.permute(1, 0, 2, 3) if slicewise else data[None]
    shape = np.asarray(x.shape[2:])
    padded = (np.ceil(shape / total) * total).astype(int)
    pad: list[int] = []
    for n, m in zip(reversed(shape.tolist()), reversed(padded.tolist()), strict=True):
        pad += [0, int(m - n)]
    x = torch.nn.functional.pad(x, pad)
    bottlenecks, lasts = [], []
    captured: dict[str, torch.Tensor] = {}
    h1 = network.encoder.stages[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("b", o))
    h2 = network.decoder.seg_layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0]))
    crop = (slice(None), slice(None), *(slice(0, int(n)) for n in shape))
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], 16):
                network(x[start : start + 16].to(predictor.device))
                up = torch.nn.functional.interpolate(
                    captured["b"], size=tuple(int(v) for v in padded), mode=mode, align_corners=False
                )
                bottlenecks.append(up[crop].cpu())
                lasts.append(captured["h"][crop].cpu())
    finally:
        h1.remove()
        h2.remove()
        network._alseg_mc_dropout = mc_dropout
    b, h = torch.cat(bottlenecks), torch.cat(lasts)
    # back to (F, *preprocessed shape)
    b, h = (t.permute(1, 0, 2, 3) if slicewise else t[0] for t in (b, h))

    spacing_t = [pp["spacing"][i] for i in pm.transpose_forward]
    after_crop = pp["shape_after_cropping_and_before_resampling"]
    current = cm.spacing if len(cm.spacing) == len(after_crop) else [spacing_t[0], *cm.spacing]

    def revert(arr: torch.Tensor) -> np.ndarray:
        res = cm.resampling_fn_probabilities(arr, after_crop, current, spacing_t)
        res = res.cpu().numpy() if isinstance(res, torch.Tensor) else np.asarray(res)
        full = np.zeros((res.shape[0], *pp["shape_before_cropping"]), dtype=np.float32)
        full = insert_crop_into_image(full, res.astype(np.float32), [[0, res.shape[0]], *pp["bbox_used_for_cropping"]])
        return np.ascontiguousarray(full.transpose([0, *[i + 1 for i in pm.transpose_backward]]))

    return revert(b), revert(h)


#: weight sets a region gradient embedding can be taken of (``NnUNetBackend.gradient_embedder(layers=...)``)
GRADIENT_LAYERS = ("bottleneck", "decoder")


def check_gradient_layers(layers: str) -> None:
    """A ValueError naming ``layers`` and the valid ones unless it is one of :data:`GRADIENT_LAYERS`."""
    if layers not in GRADIENT_LAYERS:
        raise ValueError(f"unknown gradient layers {layers!r}; valid: {', '.join(map(repr, GRADIENT_LAYERS))}")


def gradient_parameters(network: Any, layers: str = "bottleneck") -> list[tuple[str, Any]]:
    """The named parameters of a (PlainConv / ResidualEncoder) U-Net whose gradients make a region embedding.

    The order is the order of concatenation of the flat embedding.

    - ``"bottleneck"`` (USIMC, seed 001 "gradient embeddings of the bottleneck layer"): the weight of the last
      convolution of ``encoder.stages[-1]``. ALUNET's ``layer_used='mid'`` takes the same layer (the last
      ``encoder…convs.1.conv``); its bias is left out, as ALUNET only ever keeps the first 10,000 numbers,
      all of them weights.
    - ``"decoder"`` (USIMF): weight and bias of every convolution of every decoder stage
      ``decoder.stages[i]`` (i = 0 is the lowest resolution, as nnU-Net computes them), stage by stage,
      convolution by convolution. This is ALUNET's ``layer_used='decoder'`` collection
      (USIMFStrategyUNet.py:61, 219-223; layercollection.py:62-81 and 30-35): module names containing
      ``decoder``, ``convs`` and ``0.conv`` or ``1.conv``, kept only when the module is a Conv2d/Conv3d, then
      all of each module's parameters, so weight *and* bias. That holds the stage convolutions only: the
      transposed convolutions (``decoder.transpconvs``, not Conv2d/Conv3d and named without ``convs.N.conv``),
      the 1×1 segmentation heads (``decoder.seg_layers``) and the norms are not in it. Taking every
      convolution of a stage (not only ``convs.0`` / ``convs.1``) is the same with nnU-Net's default two
      convolutions per decoder stage.

    An unknown ``layers`` is a ValueError. Parameter names are those of ``network.named_parameters()`` (a
    ``torch.compile`` wrapper is looked through).
    """
    import torch

    check_gradient_layers(layers)
    net = getattr(network, "_orig_mod", network)
    conv_nd, transposed = torch.nn.modules.conv._ConvNd, torch.nn.modules.conv._ConvTransposeNd
    chosen: list[Any] = []
    if layers == "bottleneck":
        convs = [m for m in net.encoder.stages[-1].modules() if isinstance(m, conv_nd)]
        if not convs:
            raise ValueError("the network's bottleneck stage (encoder.stages[-1]) has no convolution")
        chosen.append(convs[-1].weight)
    elif layers == "decoder":
        for stage in net.decoder.stages:
            for m in stage.modules():
                if isinstance(m, conv_nd) and not isinstance(m, transposed):
                    chosen.extend(p for p in (m.weight, m.bias) if p is not None)
        if not chosen:
            raise ValueError("the network's decoder stages (decoder.stages) have no convolution")
    names = {id(p): n for n, p in net.named_parameters()}
    return [(names[id(p)], p) for p in chosen]


def parameter_ranges(named: Sequence[tuple[str, Any]]) -> list[tuple[str, int, int]]:
    """``(name, start, stop)``: the flat range of each parameter in the concatenated embedding."""
    out, start = [], 0
    for name, p in named:
        stop = start + int(p.numel())
        out.append((name, start, stop))
        start = stop
    return out


def region_loss_gradients(
    losses: Any, params: Sequence[Any], index: np.ndarray | None = None, max_batch: int = 16
) -> np.ndarray:
    """Row i: ∂ losses[i] / ∂ params, each flattened, concatenated in order, restricted to columns ``index``.

    Batched backward passes (``is_grads_batched``) of at most ``max_batch`` rows each; if an op has no
    batching rule, one backward per row. The graph is kept until the caller drops ``losses``.
    """
    import torch

    n = int(losses.shape[0])
    sizes = [int(p.numel()) for p in params]
    spans = [(int(a), int(a) + size) for a, size in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)]
    total = sum(sizes)
    # per parameter: the output columns it fills and (with ``index``) the flat positions it gives them
    picks: list[tuple[np.ndarray | slice, Any]] = []
    if index is None:
        picks = [(slice(a, b), None) for a, b in spans]
        width = total
    else:
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= total):
            raise ValueError(f"parameter index out of range [0, {total})")
        for a, b in spans:
            cols = np.flatnonzero((index >= a) & (index < b))
            picks.append((cols, torch.as_tensor(index[cols] - a, device=losses.device)))
        width = int(index.size)
    out = np.zeros((n, width), dtype=np.float32)
    eye = torch.eye(n, device=losses.device, dtype=losses.dtype)
    batched = True
    for lo in range(0, n, max(1, int(max_batch))):
        hi = min(n, lo + max(1, int(max_batch)))
        grads: Sequence[Any] | None = None
        if batched:
            try:
                grads = torch.autograd.grad(
                    losses, params, grad_outputs=eye[lo:hi], is_grads_batched=True, retain_graph=True, allow_unused=True
                )
            except RuntimeError:  # an op without a batching rule: one backward per region from now on
                batched = False
        if grads is None:
            rows = [torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True) for i in range(lo, hi)]
            grads = [
                torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
                for j, p in enumerate(params)
            ]
        for (cols, pos), g in zip(picks, grads, strict=True):
            if g is None:  # the loss does not depend on this parameter
                continue
            flat = g.reshape(hi - lo, -1)
            if pos is not None:
                if len(cols) == 0:
                    continue
                flat = flat[:, pos]
            out[lo:hi, cols] = flat.detach().float().cpu().numpy()
    return out


def network_region_gradients(
    network: Any,
    x: Any,
    masks: Any,
    params: Sequence[Any],
    index: np.ndarray | None = None,
    *,
    slicewise: bool = False,
    crop: tuple[slice, ...] | None = None,
    max_batch: int = 16,
) -> np.ndarray:
    """Gradient embeddings of regions of one case: row i = ∂/∂params Σ_x masks[i](x) · CE(p(x), ŷ(x)).

    ``x``: the network input, ``(1, C, *spatial)``, or ``(S, C, *slice)`` for a 2D network run slice by slice
    (``slicewise``: the batch axis is the case's first axis). ``crop`` cuts the padding off the logits.
    ``masks``: ``(R, *case shape)`` region masks on the input grid. ŷ is the argmax pseudo-label, so CE =
    −max_c log p_c. Flat columns follow :func:`region_loss_gradients`.
    """
    import torch

    with torch.enable_grad():
        logits = network(x)
        logits = logits[0] if isinstance(logits, list | tuple) else logits
        if crop is not None:
            logits = logits[crop]
        logp = torch.log_softmax(logits.float(), dim=1)
        ce = -logp.max(dim=1).values  # CE against the argmax pseudo-label, (B, *shape)
        ce_case = ce if slicewise else ce[0]
        losses = (masks.to(ce_case.device, ce_case.dtype) * ce_case[None]).flatten(1).sum(1)
        return region_loss_gradients(losses, params, index, max_batch=max_batch)


class RegionGradients:
    """Per-region gradient embeddings of a trained nnU-Net (USIM): ∂/∂W Σ_{x∈region} CE(p(x), ŷ(x)).

    W is the list of weights chosen by ``layers`` (:func:`gradient_parameters`): the last convolution of the
    encoder's bottleneck stage (``"bottleneck"``, USIMC) or every convolution of every decoder stage
    (``"decoder"``, USIMF, as ALUNET). ŷ is the argmax pseudo-label. One forward pass per case; the gradients
    of the case's regions come from batched backward passes (``is_grads_batched``), flattened and concatenated
    in the order of ``parameter_ranges`` and restricted to the flat indices ``index`` (≤ 10,000 numbers).
    """

    def __init__(self, predictor: Any, layers: str = "bottleneck", max_batch: int = 16) -> None:
        self.predictor = predictor
        self.network = predictor.network
        self.layers = layers
        self.max_batch = max_batch
        named = gradient_parameters(self.network, layers)  # validates ``layers`` before loading any weights
        self.network.load_state_dict(predictor.list_of_parameters[0])  # in place: ``named`` stays valid
        self.network.eval()
        self.params = [p for _, p in named]
        self.parameter_ranges = parameter_ranges(named)
        self.n_params = self.parameter_ranges[-1][2]

    def __call__(self, image: np.ndarray, props: dict, boxes: Sequence[Any], index: np.ndarray | None) -> np.ndarray:
        import torch

        p = self.predictor
        pm, cm = p.plans_manager, p.configuration_manager
        data, pp = preprocess(p, image, dict(props))
        data = torch.as_tensor(data, dtype=torch.float32)
        masks = torch.stack([torch.as_tensor(_box_mask_preprocessed(b, pp, pm, data.shape[1:])) for b in boxes])
        total = np.prod(np.asarray(cm.pool_op_kernel_sizes), axis=0).astype(int)
        slicewise = len(total) == data.ndim - 2
        x = data.permute(1, 0, 2, 3) if slicewise else data[None]
        shape = np.asarray(x.shape[2:])
        padded = (np.ceil(shape / total) * total).astype(int)
        pad: list[int] = []
        for n, m in zip(reversed(shape.tolist()), reversed(padded.tolist()), strict=True):
            pad += [0, int(m - n)]
        x = torch.nn.functional.pad(x, pad).to(p.device)
        crop = (slice(None), slice(None), *(slice(0, int(n)) for n in shape))
        self.network.zero_grad(set_to_none=True)
        return network_region_gradients(
            self.network, x, masks, self.params, index, slicewise=slicewise, crop=crop, max_batch=self.max_batch
        )


def _box_mask_preprocessed(box: Any, pp: dict, pm: Any, pre_shape: Sequence[int]) -> np.ndarray:
    """A region (image voxel coordinates) as a mask on nnU-Net's preprocessed grid (transposed, cropped,
    resampled)."""
    order = list(pm.transpose_forward)
    start = np.asarray(box.start)[order].astype(float)
    stop = (np.asarray(box.start) + np.asarray(box.size))[order].astype(float)
    lo = np.asarray([b[0] for b in pp["bbox_used_for_cropping"]], dtype=float)
    after = np.asarray(pp["shape_after_cropping_and_before_resampling"], dtype=float)
    pre = np.asarray(pre_shape, dtype=float)
    scale = pre / np.maximum(after, 1)
    a = np.clip(np.floor((start - lo) * scale), 0, pre).astype(int)
    b = np.clip(np.ceil((stop - lo) * scale), 0, pre).astype(int)
    mask = np.zeros(tuple(int(v) for v in pre), dtype=np.float32)
    mask[tuple(slice(i, j) for i, j in zip(a, b, strict=True))] = 1.0
    return mask
