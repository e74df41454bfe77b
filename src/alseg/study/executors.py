"""Where a study's runs execute: this process, one after another (the default), or a Ray cluster.

An executor takes the runs to do and calls ``on_done(run, seconds, error)`` as each ends (``error``: None, or the
message of what stopped it). A run that fails does not stop the others; the study reports it at the end. A
stopped executor loses nothing: every run resumes from its own experiment folder the next time.

The Ray executor (``alseg bench --executor ray``, extra ``alseg[ray]``) submits one Ray task per base experiment
(round 0 of a group of runs) and one per run, which Ray starts once its base task has finished. Each task asks
for ``cpus_per_run`` CPUs (and one GPU under the ``gpu`` profile) and trains with that many threads; a task whose
worker process died is retried (``max_retries``) and resumes the run where it stopped. Every node must see the
study folder and the dataset at the same paths (a shared file system) and have alseg installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from alseg.errors import AlsegError
from alseg.loop.runner import BackendFactory
from alseg.study.runner import StudyRun, execute_run, run_base

OnDone = Callable[[StudyRun, float, "str | None"], None]


def _message(err: BaseException) -> str:
    if isinstance(err, AlsegError):
        return str(err)
    return f"{type(err).__name__}: {err}"


class Executor(Protocol):
    name: str
    slots: int  # runs that execute at the same time (for the time estimate)
    shares_databases: bool  # False: the runs' SQLite files are written on other machines (not read meanwhile)

    def start(self) -> None: ...

    def run(self, runs: Sequence[StudyRun], on_done: OnDone) -> None: ...


class InProcessExecutor:
    """Every run in this process, one after another (Ctrl-C stops the study; it resumes next time)."""

    name = "in this process"
    slots = 1
    shares_databases = True  # the study may read the runs' databases while they run

    def __init__(self, num_threads: int | None = None, backend_factory: BackendFactory | None = None) -> None:
        self.num_threads = num_threads
        self.backend_factory = backend_factory  # None: nnU-Net (tests pass a fake one)

    def start(self) -> None:
        pass

    def run(self, runs: Sequence[StudyRun], on_done: OnDone) -> None:
        for run in runs:
            t0 = time.perf_counter()
            try:
                execute_run(run, self.num_threads, backend_factory=self.backend_factory)
            except Exception as err:  # one run's failure does not stop the study
                on_done(run, time.perf_counter() - t0, _message(err))
                continue
            on_done(run, time.perf_counter() - t0, None)


class RayExecutor:
    """Each run a Ray task on the cluster at ``address`` (None: a local Ray instance this process starts)."""

    def __init__(
        self,
        address: str | None = None,
        cpus_per_run: int = 2,
        gpus_per_run: float | None = None,
        max_retries: int = 3,
        num_cpus: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise AlsegError("--executor ray needs Ray: pip install 'alseg[ray]' (or pip install 'ray>=2.9')") from None
        self.ray = ray
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self.name = f"Ray at {address}" if address else "a local Ray instance"
        self.shares_databases = address is None  # a cluster's runs write their databases on other machines
        self.slots = 1
        self.slots_known = False

    def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
            elif self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            ray.init(**kwargs)
        if self.slots_known:
            return
        self.slots_known = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < self.cpus_per_run:
            raise AlsegError(
                f"the Ray cluster has {cpus} CPUs but each run asks for {self.cpus_per_run} (--cpus-per-run); "
                "lower --cpus-per-run or add workers (ray start --address ...)"
            )
        self.slots = max(1, cpus // max(1, self.cpus_per_run))
        self.name = f"{self.name}, {cpus} CPUs, {self.slots} runs at a time"

    def _gpus(self, run: StudyRun) -> float:
        """``gpus_per_run`` when given; else one GPU for a run that trains on one (``profile: gpu`` or
        ``device: cuda``, or ``profile: auto`` on a cluster with GPUs), none otherwise."""
        if self.gpus_per_run is not None:
            return self.gpus_per_run
        cfg = run.cell.cfg
        if cfg.device == "cpu" or cfg.profile == "cpu":
            return 0.0
        if cfg.profile == "gpu" or cfg.device == "cuda":
            return 1.0
        return 1.0 if self.ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def run(self, runs: Sequence[StudyRun], on_done: OnDone) -> None:
        self.start()
        ray = self.ray
        remote_run = ray.remote(execute_run)
        remote_base = ray.remote(run_base)
        bases: dict[Any, Any] = {}  # base folder -> its task
        pending: dict[Any, tuple[StudyRun, float]] = {}
        for run in runs:
            opts = {"num_cpus": self.cpus_per_run, "num_gpus": self._gpus(run), "max_retries": self.max_retries}
            dep = None
            if run.base_dir is not None and not (run.exp_dir / "config.yaml").exists():
                if run.base_dir not in bases:
                    bases[run.base_dir] = remote_base.options(**opts).remote(run, self.cpus_per_run)
                dep = bases[run.base_dir]
            ref = remote_run.options(**opts).remote(run, self.cpus_per_run, dep)
            pending[ref] = (run, time.perf_counter())
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                run, t0 = pending.pop(ready[0])
                try:
                    ray.get(ready[0])
                except Exception as err:
                    cause = getattr(err, "cause", None) or err
                    message = _message(cause)
                    base = bases.get(run.base_dir)
                    if base is not None and self._failed(base):
                        message = f"round 0 in {run.base_dir}: {message}"
                    on_done(run, time.perf_counter() - t0, message)
                    continue
                on_done(run, time.perf_counter() - t0, None)
        except KeyboardInterrupt:
            for ref in [*pending, *bases.values()]:
                ray.cancel(ref, force=True)
            raise

    def _failed(self, ref: Any) -> bool:
        try:
            self.ray.get(ref, timeout=0)
        except Exception:
            return True
        return False
