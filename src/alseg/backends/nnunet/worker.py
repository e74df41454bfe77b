"""nnU-Net work that runs in its own process: planning and training.

nnU-Net reads its folders from environment variables at import time and starts worker pools, so
:class:`~alseg.backends.nnunet.backend.NnUNetBackend` runs these steps as
``python -m alseg.backends.nnunet.worker {plan,train} SPEC.json`` with the variables set for that process
only. The spec is plain JSON; the results are files under the folders the spec names.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _seed_everything(seed: int) -> None:
    """nnU-Net's data loader and augmentations draw from the global numpy / python / torch generators.

    This process exists only to run nnU-Net, so seeding its global state here is the only way to make its
    crops repeatable; alseg's own code never uses global random state.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - nnU-Net's own sampling uses the global generator
    torch.manual_seed(seed)


def plan(spec: dict[str, Any]) -> None:
    """Fingerprint and plan once from the starting data; the plans stay frozen afterwards."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )

    raw = Path(os.environ["nnUNet_raw"]) / spec["dataset_name"]
    _write_json(raw / "dataset.json", spec["planning_dataset_json"])
    extract_fingerprint_dataset(
        spec["dataset_id"],
        num_processes=int(spec.get("num_processes", 2)),
        clean=True,
        verbose=False,
        show_progress_bar=False,
    )
    _, plans_identifier = plan_experiment_dataset(spec["dataset_id"])
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec["dataset_name"]
    outputs = ((f"{plans_identifier}.json", spec["plans_out"]), ("dataset_fingerprint.json", spec["fingerprint_out"]))
    for src, dst in outputs:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pre / src, Path(dst).with_suffix(".tmp"))
        os.replace(Path(dst).with_suffix(".tmp"), dst)


def _trainer_class(optimizer: str) -> type:
    """nnU-Net's own trainer for an optimiser: ``sgd`` is nnUNetTrainer (SGD, Nesterov momentum 0.99),
    ``adam`` its variant nnUNetTrainerAdam (AdamW with AMSGrad); both decay the learning rate polynomially."""
    if optimizer == "sgd":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    if optimizer == "adam":
        from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam

        return nnUNetTrainerAdam
    raise ValueError(f"unknown optimizer {optimizer!r} in the training spec; expected 'sgd' or 'adam'")


def _fold(spec: dict[str, Any]) -> int | str:
    """The spec's fold: ``"all"`` (train on every case) or k, member k of a cross-validation given by ``splits``.

    nnU-Net quietly falls back to a random 80:20 split for a fold its ``splits_final.json`` lacks; a spec asking
    for such a fold, or naming cases it does not preprocess, is refused here instead.
    """
    fold = spec.get("fold", "all")
    if fold == "all":
        return "all"
    splits = spec.get("splits") or []
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise ValueError(f"training fold {fold!r} needs a 'splits' entry for it; the spec has {len(splits)} splits")
    for k, split in enumerate(splits):
        unknown = (set(split["train"]) | set(split["val"])) - set(spec["cases"])
        if unknown:
            raise ValueError(f"split {k} names cases the spec does not hold: {sorted(unknown)}")
        if not split["train"]:
            raise ValueError(f"split {k} has no training case")
    return fold


class _TrainingProgressFile:
    """Writes where training stands to a small JSON file (atomically), for the parent to poll.

    Written at the start, after an iteration when ``interval`` seconds have passed since the last write (and after
    the first iteration), at every epoch end and when training ends. The fields are those of
    :class:`alseg.backends.base.TrainingProgress`, plus ``phase`` (``starting``, ``training``, ``done``),
    ``started_at`` / ``updated_at`` (Unix time of the first iteration / of this write) and ``epochs_done``: the
    last epochs completed (``epoch`` 1-based, ``loss``, ``pseudo_dice``, ``seconds`` the epoch took, ``elapsed``
    since the first iteration), so a parent that polls less often than epochs end still sees each of them.
    """

    KEEP_EPOCHS = 100

    def __init__(self, path: Path, epochs: int, iterations_per_epoch: int, member: int, members: int) -> None:
        self.path = path
        self.epochs = int(epochs)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.member, self.members = int(member), int(members)
        self.iteration = 0
        self.epoch = 0
        self.epoch_losses: list[float] = []
        self.loss: float | None = None
        self.pseudo_dice: float | None = None
        self.epochs_done: list[dict[str, Any]] = []
        self.t_first: float | None = None
        self.started_at: float | None = None
        self.last_write = 0.0
        self.interval = 2.0

    def write(self, phase: str) -> None:
        now = time.perf_counter()
        self.last_write = now
        _write_json(
            self.path,
            {
                "phase": phase,
                "member": self.member,
                "members": self.members,
                "epoch": self.epoch,
                "epochs": self.epochs,
                "iteration": self.iteration,
                "iterations": self.epochs * self.iterations_per_epoch,
                "loss": self.loss,
                "pseudo_dice": self.pseudo_dice,
                "seconds": 0.0 if self.t_first is None else now - self.t_first,
                "started_at": self.started_at,
                "updated_at": time.time(),
                "epochs_done": self.epochs_done[-self.KEEP_EPOCHS :],
            },
        )

    def before_step(self) -> None:
        if self.t_first is None:
            self.t_first, self.started_at = time.perf_counter(), time.time()

    def after_step(self, loss: Any) -> None:
        self.iteration += 1
        try:
            self.epoch_losses.append(float(loss))
            self.loss = sum(self.epoch_losses) / len(self.epoch_losses)
        except (TypeError, ValueError):
            pass
        if self.iteration == 1 or time.perf_counter() - self.last_write >= self.interval:
            self.write("training")

    def epoch_end(self, trainer: Any) -> None:
        """After nnU-Net's ``on_epoch_end``: the epoch's train loss, pseudo-Dice and duration from its logger."""
        self.epoch += 1
        self.iteration = self.epoch * self.iterations_per_epoch
        logged = _logged_values(trainer)
        loss = _last(logged.get("train_losses"))
        self.loss = loss if loss is not None else self.loss
        self.pseudo_dice = _last(logged.get("mean_fg_dice"))
        start, end = _last(logged.get("epoch_start_timestamps")), _last(logged.get("epoch_end_timestamps"))
        seconds = end - start if start is not None and end is not None else None
        elapsed = 0.0 if self.t_first is None else time.perf_counter() - self.t_first
        self.epochs_done.append(
            {
                "epoch": self.epoch,
                "loss": self.loss,
                "pseudo_dice": self.pseudo_dice,
                "seconds": seconds,
                "elapsed": elapsed,
            }
        )
        self.epoch_losses = []
        self.write("training")

    def watch(self, trainer: Any) -> None:
        """Count ``trainer``'s iterations and epochs; what it trains and how is unchanged.

        nnU-Net's ``run_training`` calls ``self.train_step(batch)`` and ``self.on_epoch_end()``; instance attributes
        that call the class's methods and then record come first in that lookup.
        """
        train_step, on_epoch_end = trainer.train_step, trainer.on_epoch_end

        def counted_train_step(batch: Any) -> Any:
            self.before_step()
            out = train_step(batch)
            self.after_step(out.get("loss") if isinstance(out, dict) else None)
            return out

        def recorded_on_epoch_end() -> None:
            on_epoch_end()
            self.epoch_end(trainer)

        trainer.train_step = counted_train_step
        trainer.on_epoch_end = recorded_on_epoch_end


def _logged_values(trainer: Any) -> dict[str, list]:
    """nnU-Net's per-epoch log (``my_fantastic_logging``), of its MetaLogger's local logger or of the logger itself."""
    logger = getattr(trainer, "logger", None)
    store = getattr(getattr(logger, "local_logger", logger), "my_fantastic_logging", None)
    return store if isinstance(store, dict) else {}


def _last(values: Any) -> float | None:
    if not values:
        return None
    try:
        v = float(values[-1])
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN (no foreground in the validation batch): unknown


def train(spec: dict[str, Any]) -> None:
    """Preprocess the annotated cases with the frozen plans and train one model.

    ``spec["fold"]``: ``"all"`` (the default) trains on every case; an int k trains nnU-Net's fold k of the
    cross-validation ``spec["splits"]`` (nnU-Net's ``splits_final.json`` format, written into the preprocessed
    dataset folder), i.e. on ``splits[k]["train"]``. The report records the cases nnU-Net trained and validated on.
    """
    import numpy as np  # noqa: F401 - imported before torch on purpose (thread settings)
    import torch

    torch.set_num_threads(int(spec.get("num_threads", os.cpu_count() or 1)))
    _seed_everything(int(spec["seed"]))
    schedule = spec["schedule"]
    progress = None
    if spec.get("progress_file"):
        progress = _TrainingProgressFile(
            Path(spec["progress_file"]),
            int(schedule["epochs"]),
            int(schedule["iterations_per_epoch"]),
            int(spec.get("member", 0)),
            int(spec.get("members", 1)),
        )
        progress.write("starting")

    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads(Path(spec["plans_file"]).read_text())
    dataset_json = spec["dataset_json"]
    configuration = spec["configuration"]
    name = spec["dataset_name"]
    pre_base = Path(os.environ["nnUNet_preprocessed"]) / name
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    data_dir = pre_base / cm.data_identifier
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_json(pre_base / "nnUNetPlans.json", plans)
    _write_json(pre_base / "dataset.json", dataset_json)
    shutil.copyfile(spec["fingerprint_file"], pre_base / "dataset_fingerprint.json")
    fold = _fold(spec)
    if fold != "all":
        _write_json(pre_base / "splits_final.json", spec["splits"])

    t0 = time.perf_counter()
    preprocessor = DefaultPreprocessor(verbose=False)
    for case_id, files in sorted(spec["cases"].items()):
        preprocessor.run_case_save(str(data_dir / case_id), files["images"], files["label"], pm, cm, dataset_json)
    t_pre = time.perf_counter() - t0

    device = torch.device(spec.get("device", "cpu"))
    plans["continue_training"] = False  # nnU-Net 2.8 passes this flag through the plans dict
    trainer_class = _trainer_class(schedule.get("optimizer", "sgd"))
    trainer = trainer_class(
        plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json, device=device
    )
    trainer.num_epochs = int(schedule["epochs"])
    trainer.num_iterations_per_epoch = int(schedule["iterations_per_epoch"])
    trainer.num_val_iterations_per_epoch = int(schedule.get("val_iterations_per_epoch", 1))
    trainer.save_every = 10**9  # one checkpoint at the end; alseg resumes whole rounds
    if "initial_lr" in schedule:
        trainer.initial_lr = float(schedule["initial_lr"])
    if "oversample_foreground_percent" in schedule:
        trainer.oversample_foreground_percent = float(schedule["oversample_foreground_percent"])
    if spec.get("disable_mirroring", True):
        # alseg predicts without mirroring; training without it matches that and saves time
        trainer.inference_allowed_mirroring_axes = None
    trainer.initialize()
    init = spec.get("init_checkpoint")
    if init:
        # all weights, the segmentation heads included: nnU-Net's load_pretrained_weights skips the heads (it is
        # meant for fine-tuning to another task), which re-initialised them at every warm-started round
        checkpoint = torch.load(init, map_location="cpu", weights_only=False)
        trainer.network.load_state_dict(checkpoint["network_weights"])
    if progress is not None:
        progress.watch(trainer)
    t1 = time.perf_counter()
    trainer.run_training()
    t_train = time.perf_counter() - t1
    if progress is not None:
        progress.write("done")
    train_keys, val_keys = trainer.do_split()  # what nnU-Net trained on (reads the split file it used)
    _write_json(
        Path(spec["report_file"]),
        {
            "preprocess_seconds": t_pre,
            "train_seconds": t_train,
            "n_cases": len(train_keys),
            "fold": fold,
            "train_cases": sorted(str(c) for c in train_keys),
            "val_cases": sorted(str(c) for c in val_keys),
            "output_folder": trainer.output_folder_base,
            "train_losses": [float(v) for v in trainer.logger.local_logger.my_fantastic_logging["train_losses"]],
        },
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in {"plan", "train"}:
        print("usage: python -m alseg.backends.nnunet.worker {plan,train} SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    {"plan": plan, "train": train}[argv[0]](spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
