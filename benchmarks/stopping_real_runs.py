"""The stopping signals of finished real runs, computed after the fact from their stored models (no training).

For each experiment given (nnU-Net backend, every round trained and evaluated) the script does what the evaluate
stage of a round now does on top of the held-out cases: predict the stop set with the round's model, store the
segmentations, compute the stability against the previous round and the stop-set entropy
(``alseg.loop.stopping.StopSetRound``). It works in a scratch copy (config, database, evaluation.json files; the
models are read in place), so the experiments are left as they are. It reports the rows ``alseg status`` would
show (stability, entropy, held-out Dice gain, recommendation, rule), the FG-Eff 95% budget with its bootstrap
interval, and the time of the stop-set step against the round's time. Predicting here competes with whatever
else the machine runs; the estimate in the loop uses the run's own evaluate time per case (same machine, same
moment as its training) plus the measured time of the signals.

    python benchmarks/stopping_real_runs.py EXP [EXP ...] [--work DIR] [--stop-set-size N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result


def _scratch_copy(exp: Path, scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copyfile(exp / "config.yaml", scratch / "config.yaml")
    src = sqlite3.connect(f"{(exp / 'alseg.sqlite').resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(scratch / "alseg.sqlite")
    src.backup(dst)
    src.close()
    dst.close()
    for ev in sorted((exp / "rounds").glob("*/evaluation.json")):
        (scratch / "rounds" / ev.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ev, scratch / "rounds" / ev.parent.name / ev.name)


def signals(exp: Path, work: Path, stop_set_size: int | None) -> dict[str, Any]:
    from alseg.backends.nnunet import make_backend
    from alseg.config import load_config
    from alseg.data.dataset import load_dataset
    from alseg.loop.stopping import StopSetRound, stopping_status
    from alseg.store.layout import STOP_SET_META, model_dir
    from alseg.store.state import ExperimentState

    scratch = work / exp.name
    _scratch_copy(exp, scratch)
    cfg = load_config(scratch / "config.yaml")
    if stop_set_size is not None:
        cfg = cfg.model_copy(update={"stopping": cfg.stopping.model_copy(update={"stop_set_size": stop_set_size})})
    ds = load_dataset(cfg.dataset)
    backend = make_backend(cfg, ds, scratch / "nnunet")
    state = ExperimentState(scratch / "alseg.sqlite")
    pool, test = state.split()
    stage_seconds: dict[int, dict[str, float]] = {}
    for s in state.stages():
        stage_seconds.setdefault(s["round"], {})[s["stage"]] = s["seconds"]
    timing = []
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        stop = StopSetRound(scratch, state, cfg, pool, r, ds.foreground_labels)
        for _ in stop.take(backend.predict(model_dir(exp, r), stop.case_ids)):
            pass
        detail = stop.finish()
        seconds = time.perf_counter() - t0
        with state.transaction() as conn:
            row = conn.execute("SELECT detail FROM stages WHERE round = ? AND stage = 'evaluate'", (r,)).fetchone()
            merged = {**(json.loads(row[0]) if row and row[0] else {}), "stopping": detail}
            conn.execute("UPDATE stages SET detail = ? WHERE round = ? AND stage = 'evaluate'", (json.dumps(merged), r))
        round_s = sum(stage_seconds.get(r, {}).values())
        # in the loop the stop set is predicted in the evaluate stage's prediction run (the model loads once): its
        # cost is about the stage's time per held-out case (which includes computing the metrics) per stop-set case
        per_case = stage_seconds.get(r, {}).get("evaluate", 0.0) / max(len(test), 1)
        in_loop = per_case * len(stop.case_ids) + stop.compute_seconds
        timing.append(
            {
                "round": r,
                "measured_here_seconds": round(seconds, 2),
                "measured_here_per_case_seconds": round(seconds / max(len(stop.case_ids), 1), 3),
                "signals_seconds": round(stop.compute_seconds, 3),
                "round_seconds": round(round_s, 1),
                "evaluate_seconds_per_case_in_run": round(per_case, 3),
                "estimated_in_loop_seconds": round(in_loop, 2),
                "estimated_fraction_of_round": round(in_loop / round_s, 4) if round_s else None,
            }
        )
        print(f"{exp.name} round {r}: {detail}", file=sys.stderr)
    stop_set = json.loads(state.get_meta(STOP_SET_META) or "[]")
    rows, summary = stopping_status(scratch, cfg, state.stages(), state.metrics(), stop_set)
    metrics = state.metrics()
    state.close()
    return {
        "experiment": str(exp),
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "pool_cases": len(pool),
        "test_cases": len(test),
        "stop_set": stop_set,
        "rounds": [
            {
                "round": r,
                "dice": metrics.get(r, {}).get("dice_mean"),
                "fg_fraction": (metrics.get(r, {}).get("cost") or {}).get("fg_fraction"),
                **{k: v for k, v in row.items() if k != "stability_per_class"},
                "stability_per_class": row["stability_per_class"],
            }
            for r, row in sorted(rows.items())
        ],
        "stopping": summary,
        "timing": timing,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiments", type=Path, nargs="+", help="finished experiment directories (nnU-Net backend)")
    p.add_argument("--work", type=Path, default=Path("/tmp/alseg_stopping_real_runs"), help="scratch folder")
    p.add_argument("--stop-set-size", type=int, default=None, help="default: the experiment's config (20)")
    args = p.parse_args()
    results = [signals(exp, args.work, args.stop_set_size) for exp in args.experiments]
    save_result("stopping_real_runs", {"experiments": results})


if __name__ == "__main__":
    main()
