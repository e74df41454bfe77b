"""Strategies x seeds on the full Hippocampus dataset, the full-data reference and the report over them.

The issue-4 acceptance run: every strategy of ``--strategies`` with every seed of ``--seeds`` as one
experiment (3D boxes of 20^3, starting budget 20, 20 boxes per round, ``cpu`` profile: the setting of
``cpu_profile.py``), then ``alseg run --full-data`` of the same config, then ``alseg report`` over all of
them (HTML, CSV tables, the figures as PNG files). Experiments are resumed, so a second call only rebuilds the
report; ``--from-cpu-profile DIR`` copies the ``random_fg33`` runs of ``cpu_profile.py`` (``DIR/seedN``) in
instead of training them again (the configs are the same). Takes about 14 minutes per experiment and
10 minutes for the full-data reference on 2 cores: this is not a 10-minute benchmark.

    python benchmarks/strategy_comparison.py [--strategies random_fg33 entropy] [--seeds 0 1]
        [--work DIR] [--from-cpu-profile /tmp/alseg_cpu_profile]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import box_setting_config, save_result, shared_hippocampus


def _num(v: object) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else round(float(v), 4)


def _timed_run(run: Callable[[Any, Path], object], cfg: Any, exp: Path, minutes: dict[str, float | str]) -> None:
    """Run or resume ``exp``; record this call's wall minutes, or that it had finished before this call."""
    from alseg.report.results import load_experiment

    if exp.exists() and load_experiment(exp)[0].complete:
        minutes[exp.name] = "finished before this call"
    else:
        t0 = time.perf_counter()
        run(cfg, exp)
        minutes[exp.name] = round((time.perf_counter() - t0) / 60, 2)
    print(f"{exp.name}: {minutes[exp.name]}", flush=True)


def main() -> None:
    from alseg.config import ExperimentConfig
    from alseg.loop.drivers import run_experiment
    from alseg.loop.full_data import run_full_data
    from alseg.report.html import build_report

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", type=Path, default=shared_hippocampus())
    p.add_argument("--strategies", nargs="+", default=["random_fg33", "entropy"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--query-size", type=int, default=20)
    p.add_argument("--baseline", default="random_fg33")
    p.add_argument("--work", type=Path, default=Path("/tmp/alseg_strategy_comparison"))
    p.add_argument("--from-cpu-profile", type=Path, default=None, help="cpu_profile.py's --work directory")
    args = p.parse_args()
    if args.dataset is None:
        sys.exit("the full Hippocampus dataset was not found; pass --dataset PATH")

    def config(strategy: str, seed: int) -> ExperimentConfig:
        return box_setting_config(args.dataset, strategy, seed, args.rounds, args.query_size)

    exps: list[Path] = []
    minutes: dict[str, float | str] = {}
    for strategy in args.strategies:
        for seed in args.seeds:
            exp = args.work / f"{strategy}_s{seed}"
            src = args.from_cpu_profile / f"seed{seed}" if args.from_cpu_profile else None
            if strategy == "random_fg33" and src is not None and src.is_dir() and not exp.exists():
                shutil.copytree(src, exp)
            _timed_run(run_experiment, config(strategy, seed), exp, minutes)
            exps.append(exp)
    full = args.work / "full_data"
    _timed_run(run_full_data, config(args.strategies[0], args.seeds[0]), full, minutes)

    out = args.work / "report.html"
    cmp = build_report(
        exps,
        out,
        full_data=[full],
        baseline=args.baseline,
        csv_dir=args.work / "tables",
        figures_dir=args.work / "figures",
    )
    summary = {
        row["strategy"]: {
            "aubc": [_num(row["aubc_mean"]), _num(row["aubc_std"])],
            "final_dice": [_num(row["final_dice_mean"]), _num(row["final_dice_std"])],
            "aubc_vs_baseline_p": _num(row["aubc_p"]),
            "final_dice_vs_baseline_p": _num(row["final_dice_p"]),
            "fg_eff": _num(row["fg_eff"]),
            "phi": _num(row["phi"]),
        }
        for _, row in cmp.summary.iterrows()
    }
    rounds = cmp.results.rounds
    curves = {
        name: {
            int(r["round"]): {
                "dice": _num(r["dice"]),
                "dice2d": _num(r["dice2d"]),
                "hd95": _num(r["hd95"]),
                "regions": int(r["regions"]),
                "fg_voxels": int(r["fg_voxels"]),
            }
            for _, r in rows.sort_values("round").iterrows()
        }
        for name, rows in rounds.groupby(rounds["experiment"].map(lambda p: Path(p).name), sort=True)
    }
    save_result(
        "strategy_comparison",
        {
            "report": str(out),
            "summary_mean_std": summary,
            "by_round": curves,
            "full_data_dice": {k: _num(v) for k, v in cmp.results.reference_dice().items()},
            "wall_minutes": minutes,
            "notes": cmp.notes,
        },
    )


if __name__ == "__main__":
    main()
