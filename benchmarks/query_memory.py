"""Peak memory of a full query (entropy and ClaSP PE) on 50 and on all pool cases of Hippocampus.

Trains nothing itself: it runs a 1-round experiment on the full Hippocampus dataset (the cpu profile's starting
round) unless ``--model`` names a trained alseg nnU-Net model, then measures, each in a fresh subprocess, the
peak RSS of streaming the pool through the backend and the strategy's query. Scoring streams case by case, so
the target (issue 3) is a 195-case peak at most 1.2x the 50-case peak.

    python benchmarks/query_memory.py [--dataset PATH] [--exp DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result, shared_hippocampus


def child(exp_dir: Path, strategy: str, n_cases: int) -> None:
    from alseg.config import load_config
    from alseg.loop.runner import Experiment
    from alseg.strategies.base import QueryContext
    from alseg.strategies.registry import get_strategy

    cfg = load_config(exp_dir / "config.yaml")
    exp = Experiment(exp_dir, cfg)
    exp.pool = exp.pool[:n_cases]
    strat = get_strategy(strategy)
    model = exp.model_dir(0)

    def stream():
        yield from exp.backend.predict(model, exp.pool, seed=1)

    ctx = QueryContext(
        pool=exp.pool_view(1, stream),
        query_size=cfg.query_size,
        round_index=1,
        n_rounds=5,
        seed=cfg.seed,
        strategy_key=strategy,
        n_per_case=cfg.n_per_case,
    )
    before = _hwm_mb()
    regions = strat.query(ctx)
    print(json.dumps({"n_regions": len(regions), "peak_rss_mb": _hwm_mb(), "rss_before_query_mb": before}))


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", type=Path, default=shared_hippocampus())
    p.add_argument("--exp", type=Path, default=Path("/tmp/alseg_query_memory/exp"))
    p.add_argument("--child", nargs=3, metavar=("EXP", "STRATEGY", "N"))
    args = p.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], int(args.child[2]))
        return
    from alseg.config import ExperimentConfig
    from alseg.loop.drivers import run_experiment

    if not (args.exp / "rounds" / "000" / "model").exists():
        if args.dataset is None:
            sys.exit("the full Hippocampus dataset was not found; pass --dataset PATH")
        cfg = ExperimentConfig(dataset=args.dataset, strategy="entropy", rounds=1, profile="cpu", device="cpu")
        run_experiment(cfg, args.exp)
    from alseg.config import load_config
    from alseg.loop.runner import Experiment

    n_pool = len(Experiment(args.exp, load_config(args.exp / "config.yaml")).pool)
    out: dict[str, dict] = {}
    for strategy in ("entropy", "clasp_pe"):
        for n in (50, n_pool):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(args.exp), strategy, str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            out[f"{strategy}_{n}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(strategy, n, out[f"{strategy}_{n}"], flush=True)
    ratios = {s: out[f"{s}_{n_pool}"]["peak_rss_mb"] / out[f"{s}_50"]["peak_rss_mb"] for s in ("entropy", "clasp_pe")}
    save_result(
        "query_memory",
        {
            "pool_cases": n_pool,
            "runs": out,
            "peak_ratio_by_strategy": {k: round(v, 3) for k, v in ratios.items()},
            "peak_ratio": round(max(ratios.values()), 3),
            "target_at_most_1.2": max(ratios.values()) <= 1.2,
        },
    )


if __name__ == "__main__":
    main()
