"""How a round's query grows with the pool: predict, score and select of one strategy at 50, 100 and 195 pool cases.

Takes a finished run of a study (its models and config), restricts its pool to N cases (``pool_size``'s seeded subset),
and times the query of round ``--round`` with the model of the round before, exactly as the loop runs it
(``Experiment.query_context`` and the strategy's ``query``; nothing is written to the run). The time spent inside
the pool's prediction stream (the K forward passes per case) and inside the gradient embedder is measured apart by
wrapping the two callables the strategy is given; the rest is scoring, selection and bookkeeping. Run it once per
strategy family, on a run of that family: single softmax (``entropy`` of the 3D study), MC dropout (``bald`` of the
2D study, K = 10), gradient embeddings (``badge`` / ``usim_f`` of the 2D study). Alone on the machine: timings.

    python benchmarks/studies/pool_scaling.py RUN_DIR [RUN_DIR ...] [--sizes 50 100 195] [--round 1]
        [--strategies KEY[:name=value,...] ...] [--name pool_scaling]

``--strategies`` times other strategies' queries on the same run's models (all of one study's strategies share
round 0 and the uncertainty source): one query of each kind measured on one calibration run, before the runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import save_result


def family(strategy: str, source: str) -> str:
    if strategy in ("badge", "usim_c", "usim_f"):
        return "gradient embeddings"
    if strategy == "coreset":
        return "bottleneck features"
    if strategy.startswith("random"):
        return "no model"
    return "MC dropout" if source == "mc_dropout" else "single softmax"


class StageClock:
    """Seconds spent inside the pool view's ``predictions`` stream and ``region_gradients`` calls."""

    def __init__(self) -> None:
        self.predict = 0.0
        self.gradients = 0.0

    def wrap(self, pool: Any) -> None:
        if pool.predictions is not None:
            stream = pool.predictions

            def predictions() -> Iterator[Any]:
                it = stream()
                while True:
                    t0 = time.perf_counter()
                    try:
                        item = next(it)
                    except StopIteration:
                        self.predict += time.perf_counter() - t0
                        return
                    self.predict += time.perf_counter() - t0
                    yield item

            pool.predictions = predictions
        if pool.region_gradients is not None:
            embed = pool.region_gradients

            def region_gradients(*args: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return embed(*args)
                finally:
                    self.gradients += time.perf_counter() - t0

            pool.region_gradients = region_gradients


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``KEY`` or ``KEY:name=value,name=value`` (values read as YAML) -> (key, params)."""
    import yaml

    key, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        name, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--strategies: {spec!r}: expected KEY or KEY:name=value,...; got {item!r}")
        params[name.strip()] = yaml.safe_load(value)
    return key, params


def time_query(run: Path, sizes: list[int], r: int, strategy: str | None = None) -> dict[str, Any]:
    """One query of round ``r`` of ``run`` (with ``strategy`` instead of the run's own, if given) at each pool size.

    Pools are the seeded subsets of the run's whole split pool (``pool_size``'s draw: 50 within 100 within 195),
    so a run of a study with ``pool_size: 60`` is timed at 100 and 195 cases too; cases outside the run's pool
    simply have nothing annotated.
    """
    from alseg.config import load_config
    from alseg.data.split import pool_subset, split_pool_and_test
    from alseg.loop.runner import Experiment
    from alseg.strategies.registry import get_strategy

    cfg = load_config(run / "config.yaml")
    exp = Experiment(run, cfg)
    key, params = (cfg.strategy, dict(cfg.strategy_params)) if strategy is None else parse_strategy(strategy)
    if strategy is not None:
        exp.strategy = get_strategy(key, params)
    full, _ = split_pool_and_test(exp.ds, cfg.holdout_fraction, cfg.split_seed)
    out: dict[str, Any] = {
        "run": str(run),
        "strategy": key,
        "params": params,
        "uncertainty": cfg.uncertainty.source,
        "n_samples": cfg.uncertainty.n_samples,
        "family": family(key, cfg.uncertainty.source),
        "round": r,
        "by_pool_size": {},
    }
    try:
        for n in sizes:
            n_eff = min(n, len(full))
            exp.pool = pool_subset(full, n_eff, cfg.split_seed)
            clock = StageClock()
            t0 = time.perf_counter()
            ctx = exp.query_context(r)
            clock.wrap(ctx.pool)
            regions = exp.strategy.query(ctx)
            seconds = time.perf_counter() - t0
            out["by_pool_size"][str(n_eff)] = {
                "seconds": round(seconds, 2),
                "predict_seconds": round(clock.predict, 2),
                "gradient_seconds": round(clock.gradients, 2),
                "score_select_seconds": round(seconds - clock.predict - clock.gradients, 2),
                "regions": len(regions),
            }
            print(
                f"{run.name} {key}: pool {n_eff}: {seconds:.1f} s (predict {clock.predict:.1f} s, "
                f"gradients {clock.gradients:.1f} s)",
                flush=True,
            )
    finally:
        exp.state.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 195])
    p.add_argument("--round", type=int, default=1)
    p.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="time these strategies (KEY or KEY:name=value,...) on each run's models instead of the run's own",
    )
    p.add_argument("--name", default="pool_scaling")
    args = p.parse_args()
    specs = args.strategies or [None]
    runs = [time_query(run, args.sizes, args.round, spec) for run in args.runs for spec in specs]
    save_result(args.name, {"runs": runs})


if __name__ == "__main__":
    main()
