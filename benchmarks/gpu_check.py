"""GPU check of the ``gpu`` profile: run alseg on CUDA, measure nnU-Net's own plans there, extrapolate.

On a machine with CUDA it

1. runs ``alseg run`` for 2 rounds on the bundled 40-case Hippocampus subset with ``profile: gpu`` (nnU-Net's
   own plans) and a short schedule override, once with ``entropy`` (softmax) and once with ``bald`` (MC
   dropout, K = 10), and checks that every round is evaluated (Dice recorded), that nnU-Net's training log
   names the CUDA device and that the predictor's network is on CUDA with GPU memory allocated;
2. measures training seconds per iteration (``3d_fullres``, its dropout variant, ``2d``; optionally a compiled
   ``3d_fullres`` training when the runs had compile off, and ``3d_fullres`` with nnU-Net's own
   data-augmentation workers instead of alseg's ``nnUNet_n_proc_DA=0``), prediction seconds per case with and
   without mirroring, MC-dropout seconds per case at K = 10 and peak GPU memory;
3. extrapolates the hours of a 5-round experiment on full Hippocampus (260 cases: 195 pool, 65 held out)
   under the ``gpu`` profile's schedule and under nnActive's setting, from the measured figures only;
4. writes one JSON (``benchmarks/results/gpu_check.json``, or ``OUT/gpu_check.json`` with ``--out``) after
   every phase, so a run stopped by a time limit still leaves what it measured. The JSON separates
   ``measured`` from ``extrapolated`` figures.

``--dry-run`` does all of this on the CPU (tiny schedule, 6 cases, 3 boxes a round, 1 case timed) and checks
everything but CUDA; ``tests/test_gpu_check.py`` runs it. The phases the issue asks for always run; the optional
ones (``train_compiled``, ``train_da_workers``) start only within ``--budget-s`` (the JSON says what was skipped
and why). A phase that fails is recorded and the next one runs. A missing Python module is reported by name
before anything runs (exit code 3); see DEVELOPERS.md for carrying the wheels to a machine without them.

    python benchmarks/gpu_check.py                       # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry
    python benchmarks/gpu_check.py --out "$OUT" --no-compile    # the device call in DEVELOPERS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

ROOT = _common.ROOT
SRC = ROOT / "src"

#: full Hippocampus (MSD Task04): 260 labelled cases; alseg's default hold-out of 25% leaves 195 pool, 65 test
FULL_CASES = 260
FULL_TEST = 65
FULL_POOL = FULL_CASES - FULL_TEST
ROUNDS_EXTRAPOLATED = 5
#: nnActive's training: a 5-fold ensemble, 200 epochs of 250 iterations, from scratch every round
NNACTIVE = {"members": 5, "epochs": 200, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50}
MC_K = 10
#: torch.compile off (nnU-Net still logs "Using torch.compile...": torch.compile then returns the network as it is)
COMPILE_OFF = {"TORCH_COMPILE_DISABLE": "1", "TORCHDYNAMO_DISABLE": "1"}
PHASES = ("entropy", "predict", "bald", "mc_dropout", "train_2d", "train_compiled", "train_da_workers")
#: the issue's figures: these phases start whatever the time budget; the others only within --budget-s
REQUIRED = ("entropy", "predict", "bald", "mc_dropout", "train_2d")

#: modules the run path imports (the CLI, the loop, evaluation, nnU-Net's planning, training and inference)
RUN_PATH_MODULES = (
    "numpy",
    "scipy.ndimage",
    "torch",
    "yaml",
    "pydantic",
    "typer",
    "rich",
    "tqdm",
    "SimpleITK",
    "nibabel",
    "monai.metrics.utils",
    "alseg.cli",
    "alseg.loop.runner",
    "alseg.loop.status",
    "alseg.evaluation.metrics",
    "alseg.backends.nnunet.backend",
    "acvl_utils.cropping_and_padding.bounding_boxes",
    "batchgenerators",
    "batchgeneratorsv2",
    "dynamic_network_architectures",
    "blosc2",
    "nnunetv2.experiment_planning.plan_and_preprocess_api",
    "nnunetv2.preprocessing.preprocessors.default_preprocessor",
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam",
    "nnunetv2.inference.predict_from_raw_data",
)


# ----------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rounded(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def check_imports(modules: Iterable[str] = RUN_PATH_MODULES) -> list[dict[str, str]]:
    """Import every module of the run path; one entry per failure, naming the module that is missing."""
    import importlib

    problems = []
    for name in modules:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints on import
                importlib.import_module(name)
        except ModuleNotFoundError as err:
            problems.append({"importing": name, "missing_module": str(err.name), "error": str(err)})
        except Exception as err:  # an installed package that fails to import (a version clash, say)
            problems.append({"importing": name, "missing_module": "", "error": f"{type(err).__name__}: {err}"})
    if not problems:
        # what nnUNetPredictor.initialize_from_trained_model_folder does: import every trainer module
        try:
            with contextlib.redirect_stdout(sys.stderr):
                from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

                recursive_find_trainer_class_by_name("nnUNetTrainer")
        except ModuleNotFoundError as err:
            problems.append(
                {"importing": "nnU-Net's trainer lookup", "missing_module": str(err.name), "error": str(err)}
            )
        except Exception as err:
            problems.append({"importing": "nnU-Net's trainer lookup", "missing_module": "", "error": repr(err)})
    return problems


def imports_only() -> int:
    """``--imports-only``: import the run path, print where each top-level package comes from; 3 if one is missing."""
    problems = check_imports()
    for name in sorted({m.partition(".")[0] for m in RUN_PATH_MODULES}):
        mod = sys.modules.get(name)
        if mod is None:
            where = "MISSING"
        else:  # a namespace package (batchgeneratorsv2) has a __path__ and no __file__
            where = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", None) or ["?"]))
        print(f"{name:32s} {where}")
    for p in problems:
        print(f"problem: importing {p['importing']}: {p['error']}")
    return 3 if problems else 0


def environment(device: str, compile_disabled: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_compile": "off in the runs (--no-compile: TORCH_COMPILE_DISABLE=1, TORCHDYNAMO_DISABLE=1); "
        "phase train_compiled measures one compiled training"
        if compile_disabled
        else "nnU-Net's default: on for CUDA training (alseg leaves nnUNet_compile unset), never on the CPU",
        "nnUNet_n_proc_DA_in_alseg_training": "0 (set by alseg's backend)",
        "source_commit": os.environ.get("ALSEG_GIT_COMMIT"),
    }
    for dist in ("nnunetv2", "SimpleITK", "nibabel", "monai", "numpy", "pydantic"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            env[dist] = version(dist)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


class GpuMemorySampler:
    """Peak device-wide GPU memory in use (all processes: nnU-Net trains in a child) while the block runs.

    Polls ``torch.cuda.mem_get_info`` every 0.1 s; the figure is the peak minus the use just before the block.
    Does nothing on the CPU.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.peak_mib: float | None = None
        self._stop = threading.Event()

    def _used(self) -> float:
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    def __enter__(self) -> GpuMemorySampler:
        if self.enabled:
            self._base = self._used()
            self._peak = self._base
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception):
                self._peak = max(self._peak, self._used())

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self.peak_mib = round(self._peak - self._base, 1)


def make_subset(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` cases of an MSD-layout dataset, copied (the files are small)."""
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"] = meta["training"][:n]
    meta["numTraining"] = n
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for entry in meta["training"]:
        for key in ("image", "label"):
            shutil.copyfile(src / entry[key], dst / entry[key])
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    return dst


def epoch_times(train_log: str) -> list[float]:
    return [float(v) for v in re.findall(r"Epoch time: ([0-9.]+) s", train_log)]


def training_devices(train_log: str) -> list[str]:
    return re.findall(r"Using device: (\S+)", train_log)


def _resolved_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    conf = plans["configurations"][name]
    if "inherits_from" in conf:
        merged = dict(_resolved_configuration(plans, conf["inherits_from"]))
        merged.update({k: v for k, v in conf.items() if k != "inherits_from"})
        return merged
    return conf


def model_record(model_dir: Path, stage_train_seconds: float | None, schedule: dict[str, Any]) -> dict[str, Any]:
    """What one trained model tells about speed and device: nnU-Net's log, alseg's summary, the plans."""
    summary = json.loads((model_dir / "alseg_model.json").read_text())
    logs = sorted(model_dir.glob("fold_*/alseg_train.log"))
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    epochs = epoch_times(text)
    conf = summary["configuration"]
    plans = json.loads((model_dir / "plans.json").read_text())
    resolved = _resolved_configuration(plans, conf)
    iters = int(schedule["iterations_per_epoch"])
    n_epochs = int(schedule["epochs"])
    steady = epochs[1:] if len(epochs) > 1 else []
    return {
        "configuration": conf,
        "patch_size": resolved.get("patch_size"),
        "batch_size": resolved.get("batch_size"),
        "features_per_stage": resolved.get("architecture", {}).get("arch_kwargs", {}).get("features_per_stage"),
        "training_devices": sorted(set(training_devices(text))),
        "nnunet_logged_torch_compile": "Using torch.compile" in text,
        "epoch_seconds": [round(e, 3) for e in epochs],
        "train_seconds": round(float(summary["train_seconds"]), 2),
        "stage_train_seconds": rounded(stage_train_seconds, 2),
        "iterations": n_epochs * iters,
        "iterations_per_epoch": iters,
        "val_iterations_per_epoch": int(schedule.get("val_iterations_per_epoch", 1)),
        # the epochs after the first (cudnn autotuning, torch.compile and the data loaders' start fall in the first)
        "seconds_per_iteration_steady": rounded(statistics.median(steady) / iters) if steady else None,
        "seconds_per_iteration_overall": rounded(float(summary["train_seconds"]) / (n_epochs * iters)),
        "first_epoch_extra_seconds": rounded(epochs[0] - statistics.median(steady), 2) if steady else None,
    }


def speed_of(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One training speed from several models: median of the steady figures, else of the overall ones."""
    steady = [r["seconds_per_iteration_steady"] for r in records if r.get("seconds_per_iteration_steady")]
    overall = [r["seconds_per_iteration_overall"] for r in records if r.get("seconds_per_iteration_overall")]
    if not steady and not overall:
        return None
    # round 0's train stage also plans nnU-Net (once per experiment): leave it out where another training exists
    later = [r for r in records if not r.get("stage_includes_planning")] or records
    fixed = [
        r["stage_train_seconds"] - r["iterations"] * (r["seconds_per_iteration_steady"] or 0.0)
        for r in later
        if r.get("stage_train_seconds") is not None and r.get("seconds_per_iteration_steady")
    ]
    return {
        "seconds_per_iteration": rounded(statistics.median(steady or overall)),
        "basis": "median epoch time after the first / iterations per epoch"
        if steady
        else "training seconds / iterations (first epoch included: too few epochs for a steady figure)",
        "val_iterations_per_epoch": records[0]["val_iterations_per_epoch"],
        "iterations_per_epoch": records[0]["iterations_per_epoch"],
        "first_epoch_extra_seconds": [r["first_epoch_extra_seconds"] for r in records],
        # per training: worker start, nnU-Net import, preprocessing, first-epoch extra, checkpoint (train stage
        # seconds minus the iterations at the steady speed)
        "fixed_overhead_seconds": rounded(statistics.median(fixed), 2) if fixed else None,
        "patch_size": records[0]["patch_size"],
        "batch_size": records[0]["batch_size"],
        "models": len(records),
    }


def time_predictions(stream: Iterable[Any], n_samples: int) -> dict[str, Any]:
    """Seconds per case of a prediction stream; the first case (predictor load, warm-up) is reported apart, and
    counts only when it is the only one."""
    times, t = [], time.perf_counter()
    shape = None
    for pred in stream:
        now = time.perf_counter()
        times.append(now - t)
        shape = list(pred.probs.shape)
        t = time.perf_counter()
    if not times:
        return {"cases": 0}
    rest = times[1:] or times
    return {
        "seconds_per_case": rounded(statistics.mean(rest)),
        "seconds_per_case_median": rounded(statistics.median(rest)),
        "seconds_per_sample": rounded(statistics.mean(rest) / n_samples),
        "first_case_seconds_incl_load": rounded(times[0], 3),
        "cases_timed": len(rest),
        "samples_per_case": n_samples,
        "probs_shape_last_case": shape,
    }


# ---------------------------------------------------------------------------------------------- the check
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.t0 = time.perf_counter()
        self.out_dir: Path | None = args.out
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="alseg_gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_lines: list[str] = []
        self.models: dict[str, list[dict[str, Any]]] = {}
        self.experiments: dict[str, Path] = {}
        self.schedule = {
            "epochs": args.epochs,
            "iterations_per_epoch": args.iterations,
            "val_iterations_per_epoch": args.val_iterations,
            "warm_start": False,  # as the gpu profile: from scratch every round
            "optimizer": "sgd",  # as the gpu profile: nnU-Net's own trainer and learning rate
        }
        self.result: dict[str, Any] = {
            "what": "alseg gpu profile on CUDA: 2-round runs (entropy; bald with MC dropout K=10), speed and memory "
            "at nnU-Net's own plans, and the extrapolated hours of 5-round experiments",
            "dry_run": self.dry,
            "complete": False,
            "passed": None,
            "checks": {},
            "environment": {},
            "settings": {},
            "runs": {},
            "measured": {},
            "extrapolated": {},
            "skipped": {},
            "errors": [],
            "wall_seconds": None,
        }

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self, final: bool = False) -> None:
        self.result["wall_seconds"] = round(self.elapsed(), 1)
        if self.out_dir is not None:
            _common.RESULTS = Path(self.out_dir)
        if final:
            _common.save_result("gpu_check", self.result)  # adds provenance, prints the JSON as the last line
        else:
            _common.RESULTS.mkdir(parents=True, exist_ok=True)
            data = {**self.result, "provenance": _common.provenance()}
            tmp = _common.RESULTS / "gpu_check.json.tmp"
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, _common.RESULTS / "gpu_check.json")
        if self.out_dir is not None and self.log_lines:
            (Path(self.out_dir) / "gpu_check_logs.txt").write_text("\n".join(self.log_lines)[-2_000_000:] + "\n")

    def keep_log(self, title: str, text: str, head: int = 60, tail: int = 80) -> None:
        lines = text.splitlines()
        if len(lines) > head + tail:
            lines = [*lines[:head], f"... ({len(lines) - head - tail} lines left out) ...", *lines[-tail:]]
        self.log_lines += [f"===== {title}", *lines]

    def check(self, name: str, ok: bool) -> None:
        self.result["checks"][name] = bool(ok)
        if not ok:
            log(f"CHECK FAILED: {name}")

    def phase(self, name: str, fn: Callable[[], None], needs: tuple[str, ...] = ()) -> None:
        if name in self.args.skip:
            self.result["skipped"][name] = self.args.skip_reasons[name]
            return
        missing = [n for n in needs if n not in self.done]
        if missing:
            self.result["skipped"][name] = f"needs {', '.join(missing)}, which did not finish"
            return
        if name not in REQUIRED and self.elapsed() > self.args.budget_s:
            self.result["skipped"][name] = (
                f"time budget spent ({self.elapsed():.0f} s of --budget-s {self.args.budget_s})"
            )
            log(f"skipping {name}: {self.result['skipped'][name]}")
            return
        log(f"phase {name} (at {self.elapsed():.0f} s)")
        t = time.perf_counter()
        try:
            fn()
            self.done.add(name)
        except Exception as err:
            self.result["errors"].append({"phase": name, "error": f"{type(err).__name__}: {err}"})
            self.keep_log(f"{name}: traceback", traceback.format_exc())
            log(f"phase {name} FAILED: {type(err).__name__}: {err}")
        self.result.setdefault("phase_seconds", {})[name] = round(time.perf_counter() - t, 1)
        self.save()

    # ------------------------------------------------------------------ setup
    def prepare(self) -> bool:
        problems = check_imports()  # first: everything below imports the run path's modules
        if problems:
            self.result["errors"].append({"phase": "imports", "missing": problems})
            names = sorted({p["missing_module"] for p in problems if p["missing_module"]})
            log("missing Python modules on the run path: " + (", ".join(names) or "(none; an import failed)"))
            for p in problems:
                log(f"  importing {p['importing']}: {p['error']}")
            log("carry them as wheels: see DEVELOPERS.md, 'Carrying wheels to the GPU machine'")
            self.result["passed"] = False
            self.save()
            return False
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            self.result["errors"].append({"phase": "cuda", "error": "torch sees no CUDA device"})
            log("torch sees no CUDA device: run with --dry-run to check everything but CUDA on this machine")
            self.result["passed"] = False
            self.save()
            return False
        from alseg.data.dataset import demo_dataset_path

        self.result["environment"] = environment(self.device, self.args.no_compile)
        demo = demo_dataset_path()
        self.dataset = make_subset(demo, self.work / "data", self.args.cases) if self.dry else demo
        n = self.args.cases if self.dry else len(json.loads((demo / "dataset.json").read_text())["training"])
        self.result["settings"] = {
            "dataset": str(self.dataset),
            "cases": n,
            "rounds": 2,
            "query_size": self.args.query_size,
            "profile": "gpu",
            "schedule_override": self.schedule,
            "mc_dropout_k": MC_K,
            "prediction_cases_timed": self.args.measure_cases,
            "budget_s": self.args.budget_s,
            "work": str(self.work),
        }
        self.done: set[str] = set()
        self.save()
        return True

    def config(self, strategy: str, uncertainty: dict[str, Any] | None) -> Path:
        import yaml

        cfg: dict[str, Any] = {
            "dataset": str(self.dataset),
            "strategy": strategy,
            "seed": 0,
            "rounds": 2,
            "query_size": self.args.query_size,
            "profile": "gpu",
            "device": self.device,
            "schedule": self.schedule,
        }
        if uncertainty:
            cfg["uncertainty"] = uncertainty
        path = self.work / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    # ------------------------------------------------------------------ phases
    def run_experiment(self, strategy: str, uncertainty: dict[str, Any] | None) -> None:
        from alseg.loop.status import experiment_status

        cfg = self.config(strategy, uncertainty)
        exp = self.work / f"exp_{strategy}"
        shutil.rmtree(exp, ignore_errors=True)
        t = time.perf_counter()
        with GpuMemorySampler(self.device == "cuda") as mem:
            proc = subprocess.run(
                [sys.executable, "-m", "alseg.cli", "run", str(cfg), "--out", str(exp)],
                capture_output=True,
                text=True,
                timeout=self.args.run_timeout_s,
                check=False,
            )
        wall = time.perf_counter() - t
        self.keep_log(f"alseg run {strategy}: exit {proc.returncode}", proc.stdout + "\n" + proc.stderr)
        for p in sorted(exp.glob("rounds/*/model/fold_*/alseg_train.log")):
            self.keep_log(f"{strategy}: {p.relative_to(exp)}", p.read_text(errors="replace"), head=40, tail=30)
        run: dict[str, Any] = {"exit_code": proc.returncode, "wall_seconds": round(wall, 1)}
        run["peak_gpu_memory_used_mib_device_wide"] = mem.peak_mib
        self.result["runs"][strategy] = run
        if proc.returncode != 0:
            run["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"alseg run ({strategy}) exited {proc.returncode}; see gpu_check_logs.txt")
        status = experiment_status(exp)
        run["uncertainty"] = status["uncertainty"]
        rounds, records = [], []
        for row in status["rounds"]:
            r = row["round"]
            model = exp / "rounds" / f"{r:03d}" / "model"
            rec = model_record(model, row["seconds"].get("train"), self.schedule) if model.exists() else None
            if rec:
                rec["stage_includes_planning"] = r == 0
                records.append(rec)
            rounds.append(
                {
                    "round": r,
                    "n_regions": row["n_regions"],
                    "dice_mean": rounded(row["dice_mean"]),
                    "dice_per_class": {k: rounded(v) for k, v in row["dice_per_class"].items()},
                    "stages_done": row["stages_done"],
                    "stage_seconds": {k: rounded(v, 2) for k, v in row["seconds"].items()},
                    "model": rec,
                }
            )
        run["rounds"] = rounds
        self.models[strategy] = records
        self.experiments[strategy] = exp
        ok_rounds = [r["round"] for r in rounds if "evaluate" in r["stages_done"]] == [0, 1]
        self.check(f"{strategy}.rounds_0_and_1_evaluated", ok_rounds)
        self.check(f"{strategy}.dice_recorded", len(rounds) == 2 and all(r["dice_mean"] is not None for r in rounds))
        devices = {d for rec in records for d in rec["training_devices"]}
        self.check(
            f"{strategy}.nnunet_training_log_names_{self.device}",
            bool(devices) and all(d.startswith(self.device) for d in devices) and len(records) == 2,
        )
        if strategy == "bald":
            k = status["uncertainty"]["n_samples"]
            self.check("bald.mc_dropout_k_is_10", status["uncertainty"]["source"] == "mc_dropout" and k == MC_K)
            self.check("bald.trained_with_dropout", all(rec["configuration"].endswith("_dropout") for rec in records))
        speed = speed_of(records)
        key = "3d_fullres_dropout" if strategy == "bald" else "3d_fullres"
        self.result["measured"].setdefault("train_seconds_per_iteration", {})[key] = speed and {
            **speed,
            "source": f"the 2 trainings of the {strategy} run (alseg's backend: nnUNet_n_proc_DA=0)",
        }

    def _experiment(self, strategy: str) -> Any:
        from alseg.config import load_config
        from alseg.loop.runner import Experiment

        exp_dir = self.experiments[strategy]
        return Experiment(exp_dir, load_config(exp_dir / "config.yaml"))

    def _capture_predictor(self, backend: Any, mirroring: bool) -> list[Any]:
        """Wrap the backend's predictor loading: keep each predictor, and switch mirroring on if asked."""
        loaded: list[Any] = []
        original = type(backend)._load_predictor

        def load(model_dir: Path) -> Any:
            predictor = original(backend, model_dir)
            if mirroring:
                predictor.use_mirroring = True
                if not predictor.allowed_mirroring_axes:  # alseg trains with mirroring off: nnU-Net's default axes
                    predictor.allowed_mirroring_axes = tuple(range(len(predictor.configuration_manager.patch_size)))
            loaded.append(predictor)
            return predictor

        backend._load_predictor = load
        return loaded

    def _device_checks(self, prefix: str, predictors: list[Any]) -> dict[str, Any]:
        import torch

        net_devices = sorted({str(next(p.network.parameters()).device.type) for p in predictors})
        info: dict[str, Any] = {"predictor_devices": sorted({str(p.device) for p in predictors})}
        info["network_devices_after_prediction"] = net_devices
        self.check(f"{prefix}.network_on_{self.device}", net_devices == [self.device])
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            info["max_memory_allocated_mib"] = round(peak, 1)
            self.check(f"{prefix}.cuda_max_memory_allocated_positive", peak > 0)
        return info

    def measure_predict(self) -> None:
        import torch

        exp = self._experiment("entropy")
        try:
            model, cases = exp.model_dir(1), list(exp.pool)[: self.args.measure_cases]
            out: dict[str, Any] = {"model": "entropy round 1", "pool_cases": len(exp.pool), "timed_on": len(cases)}
            for mirroring in (False, True):
                backend = exp.backend
                loaded = self._capture_predictor(backend, mirroring)
                if self.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                timing = time_predictions(backend.predict(model, cases), 1)
                timing.update(self._device_checks("predict_mirroring" if mirroring else "predict", loaded))
                if mirroring:
                    timing["mirror_axes"] = list(loaded[0].allowed_mirroring_axes or ())
                out["mirroring" if mirroring else "no_mirroring"] = timing
                del backend._load_predictor  # back to the class's method
            self.result["measured"]["predict_3d_fullres"] = out
        finally:
            exp.state.close()

    def measure_mc_dropout(self) -> None:
        import torch

        exp = self._experiment("bald")
        try:
            model, cases = exp.model_dir(1), list(exp.pool)[: self.args.measure_cases]
            backend = exp.backend
            loaded = self._capture_predictor(backend, mirroring=False)
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timing = time_predictions(backend.predict(model, cases, n_samples=MC_K), MC_K)
            timing.update(self._device_checks("mc_dropout", loaded))
            self.check("mc_dropout.k_samples_per_case", timing.get("samples_per_case") == MC_K)
            self.check("mc_dropout.samples_returned", (timing.get("probs_shape_last_case") or [0])[0] == MC_K)
            self.result["measured"]["mc_dropout_3d_fullres"] = {"model": "bald round 1 (dropout)", "k": MC_K, **timing}
        finally:
            exp.state.close()

    def measure_training(self, key: str, configuration: str, extra_env: dict[str, str | None]) -> None:
        """One training of the entropy run's round-1 cases outside the loop (the gpu profile, the short schedule)."""
        from alseg.backends.nnunet.backend import NnUNetBackend
        from alseg.backends.nnunet.profiles import get_profile
        from alseg.config import Schedule

        class EnvBackend(NnUNetBackend):
            def _env(self, *a: Any, **kw: Any) -> dict[str, str]:
                env = super()._env(*a, **kw)
                for k, v in extra_env.items():
                    if v is None:
                        env.pop(k, None)
                    else:
                        env[k] = v
                return env

        exp = self._experiment("entropy")
        try:
            cases = exp.training_cases(1)
            ws = self.work / f"measure_{key}"
            shutil.rmtree(ws, ignore_errors=True)
            (ws / "nnunet").mkdir(parents=True)
            for f in ("plans.json", "fingerprint.json", "dataset.json"):
                shutil.copyfile(exp.dir / "nnunet" / f, ws / "nnunet" / f)

            def read_image(case_id: str) -> tuple:
                return exp.ds.read_image(case_id), exp.ds.geometry(case_id).spacing

            backend = EnvBackend(
                ws / "nnunet",
                read_image,
                configuration=configuration,
                profile=get_profile("gpu", Schedule(**self.schedule)),
                device=self.device,
                num_threads=exp.cfg.num_threads,
            )
            t = time.perf_counter()
            with GpuMemorySampler(self.device == "cuda") as mem:
                result = backend.train(cases, ws / "model", seed=0)
            stage = time.perf_counter() - t
            rec = model_record(result.model_dir, stage, self.schedule)
            for p in sorted(result.model_dir.glob("fold_*/alseg_train.log")):
                self.keep_log(f"{key}: train log", p.read_text(errors="replace"), head=40, tail=30)
            self.check(
                f"{key}.nnunet_training_log_names_{self.device}",
                bool(rec["training_devices"]) and all(d.startswith(self.device) for d in rec["training_devices"]),
            )
            speed = speed_of([rec])
            env_text = ", ".join(f"{k}={'unset' if v is None else v}" for k, v in extra_env.items()) or "alseg's"
            self.result["measured"].setdefault("train_seconds_per_iteration", {})[key] = speed and {
                **speed,
                "source": f"one training of {len(cases)} cases outside the loop ({configuration}; environment: "
                f"{env_text})",
                "peak_gpu_memory_used_mib_device_wide": mem.peak_mib,
            }
        finally:
            exp.state.close()

    def summarise_memory(self) -> None:
        """Peak GPU memory in one place: the prediction process's own allocations (torch's allocator) and the
        device-wide use while nnU-Net trained in its child processes."""
        m = self.result["measured"]
        alloc = {
            "predict_no_mirroring": ((m.get("predict_3d_fullres") or {}).get("no_mirroring") or {}).get(
                "max_memory_allocated_mib"
            ),
            "predict_mirroring": ((m.get("predict_3d_fullres") or {}).get("mirroring") or {}).get(
                "max_memory_allocated_mib"
            ),
            "mc_dropout_k10": (m.get("mc_dropout_3d_fullres") or {}).get("max_memory_allocated_mib"),
        }
        device_wide = {
            f"run_{k}": v.get("peak_gpu_memory_used_mib_device_wide") for k, v in self.result["runs"].items()
        }
        for k, v in (m.get("train_seconds_per_iteration") or {}).items():
            if v and "peak_gpu_memory_used_mib_device_wide" in v:
                device_wide[f"train_{k}"] = v["peak_gpu_memory_used_mib_device_wide"]
        m["peak_gpu_memory_mib"] = {
            "prediction_max_memory_allocated": alloc,
            "device_wide_used_above_baseline": device_wide,
            "how": "prediction: torch.cuda.max_memory_allocated in this process; training (a child process) and "
            "whole runs: device-wide use polled every 0.1 s with torch.cuda.mem_get_info, minus the use before",
        }

    # ------------------------------------------------------------------ extrapolation
    def extrapolate(self) -> None:
        from alseg.backends.nnunet.profiles import GPU_SCHEDULE

        m = self.result["measured"]
        train = m.get("train_seconds_per_iteration", {})
        pred = (m.get("predict_3d_fullres") or {}).get("no_mirroring") or {}
        mc = m.get("mc_dropout_3d_fullres") or {}
        s_pred = pred.get("seconds_per_case")
        load = pred.get("first_case_seconds_incl_load")
        s_load = max(0.0, load - s_pred) if load is not None and s_pred is not None else 0.0
        s_mc = mc.get("seconds_per_case")
        out: dict[str, Any] = {
            "method": "measured seconds per training iteration (median epoch time after the first, at the gpu "
            "profile's ratio of 1 validation to 5 training iterations, divided by the training iterations) x the "
            "schedule's iterations + the measured fixed overhead per training (worker start, preprocessing, "
            "first-epoch extra: compile, cudnn autotuning) + measured seconds per case of prediction x pool / "
            "held-out cases + the measured predictor load per prediction pass. Nothing here was run at full length.",
            "assumptions": {
                "dataset": f"full Hippocampus (MSD Task04): {FULL_CASES} cases, {FULL_POOL} pool, "
                f"{FULL_TEST} held out; "
                "the demo subset's cases have the same image size",
                "rounds": ROUNDS_EXTRAPOLATED,
                "prediction": "no mirroring, as alseg predicts; the pool is predicted before rounds 1-4, the held-out "
                "cases after every round",
                "training_speed": "alseg's backend as it is (nnUNet_n_proc_DA=0 in training)",
                "not_included": "planning (once, seconds), scoring and selection (CPU, measured separately by "
                "benchmarks/round_profile.py), annotation simulation",
            },
        }
        if self.dry:
            out["warning"] = "dry run on the CPU with a tiny schedule: these hours say nothing about a GPU"

        def scenario(
            speed: dict[str, Any] | None,
            iterations_per_round: int,
            trainings_per_round: int,
            pool_seconds_per_case: float | None,
            test_seconds_per_case: float | None,
            note: str,
        ) -> dict[str, Any] | None:
            if not speed or not speed.get("seconds_per_iteration") or pool_seconds_per_case is None:
                return None
            s_it = float(speed["seconds_per_iteration"])
            fixed = float(speed.get("fixed_overhead_seconds") or 0.0)
            train_s = ROUNDS_EXTRAPOLATED * (iterations_per_round * s_it + trainings_per_round * fixed)
            query_s = (ROUNDS_EXTRAPOLATED - 1) * (FULL_POOL * pool_seconds_per_case + s_load)
            eval_s = ROUNDS_EXTRAPOLATED * (FULL_TEST * (test_seconds_per_case or 0.0) + s_load)
            total = train_s + query_s + eval_s
            return {
                "hours": round(total / 3600, 2),
                "training_hours": round(train_s / 3600, 2),
                "query_prediction_hours": round(query_s / 3600, 3),
                "evaluation_hours": round(eval_s / 3600, 3),
                "hours_per_round": round(total / 3600 / ROUNDS_EXTRAPOLATED, 2),
                "training_iterations_per_round": iterations_per_round,
                "seconds_per_iteration_used": s_it,
                "note": note,
            }

        gpu_iters = GPU_SCHEDULE.epochs * GPU_SCHEDULE.iterations_per_epoch
        nna_iters = NNACTIVE["members"] * NNACTIVE["epochs"] * NNACTIVE["iterations_per_epoch"]
        ens_pred = None if s_pred is None else NNACTIVE["members"] * s_pred
        d3 = train.get("3d_fullres")
        scen = {
            "gpu_profile_entropy_3d_fullres": scenario(
                d3,
                gpu_iters,
                1,
                s_pred,
                s_pred,
                f"{GPU_SCHEDULE.epochs} epochs x {GPU_SCHEDULE.iterations_per_epoch}"
                " iterations from scratch each round; softmax: one prediction per pool case",
            ),
            "gpu_profile_bald_mc_dropout_3d_fullres": scenario(
                train.get("3d_fullres_dropout") or d3,
                gpu_iters,
                1,
                s_mc,
                s_pred,
                f"as above with dropout; MC dropout K = {MC_K} passes per pool case",
            ),
            "gpu_profile_entropy_2d": scenario(
                train.get("2d"), gpu_iters, 1, s_pred, s_pred, "2d configuration (prediction cost taken from 3d)"
            ),
            "nnactive_5_fold_ensemble_3d_fullres": scenario(
                d3,
                nna_iters,
                NNACTIVE["members"],
                ens_pred,
                ens_pred,
                f"{NNACTIVE['members']} ensemble members x {NNACTIVE['epochs']} epochs x "
                f"{NNACTIVE['iterations_per_epoch']} iterations from scratch each round; every member predicts every "
                "pool and held-out case",
            ),
            "gpu_profile_entropy_3d_fullres_compiled": scenario(
                train.get("3d_fullres_compiled"),
                gpu_iters,
                1,
                s_pred,
                s_pred,
                "alseg's default on CUDA (nnU-Net compiles the network): the speed of the compiled training, its "
                "compile time in the fixed overhead",
            ),
            "gpu_profile_entropy_3d_fullres_with_nnunet_da_workers": scenario(
                train.get("3d_fullres_nnunet_da_workers"),
                gpu_iters,
                1,
                s_pred,
                s_pred,
                "if alseg's backend let nnU-Net start its data-augmentation workers (it sets nnUNet_n_proc_DA=0)",
            ),
        }
        out["scenarios"] = scen
        self.result["extrapolated"] = out

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        try:
            if not self.prepare():
                return 3
            self.phase("entropy", lambda: self.run_experiment("entropy", None))
            self.phase("predict", self.measure_predict, needs=("entropy",))
            self.phase("bald", lambda: self.run_experiment("bald", {"source": "mc_dropout", "n_samples": MC_K}))
            self.phase("mc_dropout", self.measure_mc_dropout, needs=("bald",))
            self.phase("train_2d", lambda: self.measure_training("2d", "2d", {}), needs=("entropy",))
            self.phase(
                "train_compiled",
                lambda: self.measure_training("3d_fullres_compiled", "3d_fullres", dict.fromkeys(COMPILE_OFF)),
                needs=("entropy",),
            )
            self.phase(
                "train_da_workers",
                lambda: self.measure_training(
                    "3d_fullres_nnunet_da_workers", "3d_fullres", {"nnUNet_n_proc_DA": self.args.da_workers}
                ),
                needs=("entropy",),
            )
            self.extrapolate()
            self.summarise_memory()
            self.result["measured"]["labels"] = (
                "every figure under 'measured' was timed in this run; 'extrapolated' derives from them"
            )
            required = ("entropy", "predict", "bald", "mc_dropout")  # the runs and the CUDA checks
            self.result["complete"] = all(p in self.done for p in PHASES if p not in self.args.skip)
            self.result["passed"] = (
                all(self.result["checks"].values())
                and all(p in self.done for p in required)
                and not self.result["errors"]
            )
            self.save(final=True)
            log(f"done in {self.elapsed():.0f} s: passed={self.result['passed']} complete={self.result['complete']}")
            return 0 if self.result["passed"] else 1
        finally:
            if not self.args.keep_work and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU: tiny schedule, few cases, no CUDA checks")
    p.add_argument("--imports-only", action="store_true", help="only import the run path and say where from")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for gpu_check.json (default benchmarks/results; dry run: /tmp)"
    )
    p.add_argument("--work", type=Path, default=None, help="folder for the experiments (default: a temporary one)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training (default 3; dry run 1)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default 50; dry run 2)")
    p.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch (10; dry 1)")
    p.add_argument("--cases", type=int, default=6, help="dry run: cases of the demo subset used (4 pool, 2 held out)")
    p.add_argument("--query-size", type=int, default=None, help="boxes per round (default 20; dry run 3)")
    p.add_argument("--measure-cases", type=int, default=None, help="pool cases timed (30; dry 1)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="start no optional phase after this many seconds (240; dry 900)"
    )
    p.add_argument("--run-timeout-s", type=float, default=900, help="limit of one alseg run")
    p.add_argument("--da-workers", default="12", help="nnUNet_n_proc_DA of the data-augmentation comparison")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="TORCH_COMPILE_DISABLE=1 in the runs (nnU-Net compiles on CUDA by default); phase train_compiled then "
        "measures one compiled 3d_fullres training",
    )
    p.add_argument("--skip", default="", help=f"comma-separated phases to skip: {', '.join(PHASES)}")
    args = p.parse_args(argv)
    dry = args.dry_run
    defaults = {
        "epochs": 1 if dry else 3,
        "iterations": 2 if dry else 50,
        "val_iterations": 1 if dry else 10,
        "query_size": 3 if dry else 20,
        "measure_cases": 1 if dry else 30,
        "budget_s": 900.0 if dry else 240.0,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; valid: {', '.join(PHASES)}")
    args.skip_reasons = {s: "skipped by --skip" for s in args.skip}
    if "train_compiled" not in args.skip and (dry or not args.no_compile):
        args.skip.add("train_compiled")
        args.skip_reasons["train_compiled"] = (
            "dry run: nnU-Net never compiles on the CPU" if dry else "the runs themselves compiled (no --no-compile)"
        )
    if dry and "train_da_workers" not in args.skip:
        # on 2 CPU cores the comparison only repeats the 2d measurement's code path with another environment
        args.skip.add("train_da_workers")
        args.skip_reasons["train_da_workers"] = "dry run: the same code path as train_2d with another environment"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # this checkout's alseg, also where it is not installed (the GPU machine): for this process and its children
    sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    if args.imports_only:
        return imports_only()
    if args.dry_run and args.out is None:  # never over the real result in benchmarks/results
        args.out = Path(tempfile.gettempdir()) / "alseg_gpu_check_dry_run"
        args.out.mkdir(parents=True, exist_ok=True)
        log(f"dry run: the JSON goes to {args.out / 'gpu_check.json'}")
    if args.no_compile:
        os.environ.update(COMPILE_OFF)
    return Check(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
