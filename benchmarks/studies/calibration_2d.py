"""Calibration of the ``cpu`` profile for 2D: the ``random`` runs of the hippocampus-2d study, as the 3D profile was.

Reads ``runs/slice10/random/seed*`` of the study folder (run them first: ``alseg bench
benchmarks/studies/hippocampus-2d/study.yaml --out DIR --only random``) and reports, per number of annotated
slices (10, 20, ... per round), the held-out Dice of every seed, its mean, standard deviation and range; the
seconds per training iteration (nnU-Net's epoch times) and the wall minutes of each round. Targets, as for 3D
(``benchmarks/cpu_profile.py``): the mean Dice rises at every step and the seeds' standard deviation stays at
most 0.05 at each point. Result: ``benchmarks/results/cpu_profile_2d.json``.

    python benchmarks/studies/calibration_2d.py --study DIR [--setting slice10] [--strategy random]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import save_result
from cpu_profile import round_minutes, seconds_per_iteration, training_patch


def main() -> None:
    from alseg.config import load_config
    from alseg.report.results import load_experiment

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, required=True)
    p.add_argument("--setting", default="slice10")
    p.add_argument("--strategy", default="random")
    args = p.parse_args()
    runs = sorted((args.study / "runs" / args.setting / args.strategy).glob("seed*"))
    if not runs:
        sys.exit(f"no runs under {args.study / 'runs' / args.setting / args.strategy}")
    per_seed: dict[str, dict[int, float]] = {}
    iters: list[float] = []
    minutes: dict[str, list[float]] = {}
    cfg = load_config(runs[0] / "config.yaml")
    for run in runs:
        _, rounds, _ = load_experiment(run)
        per_seed[run.name] = {int(r["round"]): float(r["dice"]) for r in rounds if r.get("dice") is not None}
        iters += seconds_per_iteration(run)[1:]  # round 0 is the base's, copied into every run
        minutes[run.name] = round_minutes(run)
    n_rounds = max(len(v) for v in per_seed.values())
    table: list[dict[str, Any]] = []
    for r in range(n_rounds):
        values = [v[r] for v in per_seed.values() if r in v]
        table.append(
            {
                "slices": cfg.starting_size + r * cfg.query_size,
                "dice_by_seed": [round(x, 4) for x in values],
                "mean": round(float(np.mean(values)), 4),
                "std": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None,
                "range": round(float(np.max(values) - np.min(values)), 4),
            }
        )
    means = [row["mean"] for row in table]
    result = {
        "study": str(args.study),
        "strategy": args.strategy,
        "seeds": len(runs),
        "pool_size": cfg.pool_size,
        "uncertainty": cfg.uncertainty.model_dump(),
        "schedule": cfg.schedule.model_dump() if cfg.schedule else None,
        "training_patch": training_patch(runs[0]),
        "dice_by_slices": table,
        "mean_rises_every_step": all(b > a for a, b in itertools.pairwise(means)),
        "std_at_most_0.05": all((row["std"] or 0) <= 0.05 for row in table),
        "seconds_per_iteration_median": round(float(np.median(iters)), 3) if iters else None,
        "round_minutes": minutes,
    }
    save_result("cpu_profile_2d", result)


if __name__ == "__main__":
    main()
