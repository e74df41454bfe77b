"""Wall time and peak memory per stage of one active-learning round on the CPU demo settings.

Runs the demo setting (bundled 40 Hippocampus cases, cpu profile, 20 boxes of 20^3 per round) for two rounds
with ``entropy`` so that round 1 has every stage: predict the pool with the round-0 model, score
(predictive entropy, box means, per-case non-overlap), select (global top-k), annotate, train, evaluate.
Predict, score and select are then timed separately on the same model and pool. Target (issue 2): the query
stages (predict + score + select) take at most 25% of the round. The evaluate stage also predicts the stop set
and computes the stopping signals (issue 13): ``stop_set`` reports that step's time (from the stage's record)
and its share of the round (target: a few percent). ``prefill_export`` times the human oracle's work package of
round 1 with the prefill (predict the round's cases with the round-0 model, write the boxes' prediction, the
masks and the images) into a scratch folder: the export a person would get, against the simulated round.

Peak memory: this process's peak RSS is reset before each stage (Linux ``/proc/self/clear_refs``); training
runs in a child process whose peak RSS is reported separately.

    python benchmarks/round_profile.py [--strategy entropy] [--work DIR]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    from alseg.config import load_config
    from alseg.demo import demo_config
    from alseg.loop.drivers import run_experiment
    from alseg.loop.runner import Experiment
    from alseg.scoring.boxes import top_k
    from alseg.strategies.base import QueryContext
    from alseg.strategies.uncertainty import score_pool
    from alseg.uncertainty.measures import predictive_entropy

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategy", default="entropy")
    p.add_argument("--work", type=Path, default=Path("/tmp/alseg_round_profile"))
    p.add_argument("--reuse", action="store_true", help="reuse a finished experiment in --work (stage times from it)")
    args = p.parse_args()
    if not args.reuse:
        shutil.rmtree(args.work, ignore_errors=True)
    cfg = demo_config(strategy=args.strategy, rounds=2, seed=0)
    exp_dir = args.work / "exp"
    t0 = time.perf_counter()
    run_experiment(cfg, exp_dir)
    total = time.perf_counter() - t0

    cfg = load_config(exp_dir / "config.yaml")  # the resolved config (region size, stride...)
    exp = Experiment(exp_dir, cfg)
    stages = {s["stage"]: s for s in exp.state.stages() if s["round"] == 1}

    # the query of round 1 again, stage by stage, with the round-0 model
    model = exp.model_dir(0)
    pool = exp.pool
    reset_peak()
    t = time.perf_counter()
    for _ in exp.backend.predict(model, pool):  # streamed and dropped, as in the loop
        pass
    predict_s, predict_mb = time.perf_counter() - t, peak_mb()
    preds = list(exp.backend.predict(model, pool))  # kept in memory only to time scoring alone

    ctx = QueryContext(
        pool=exp.pool_view(1, lambda: iter(preds)),
        query_size=cfg.query_size,
        round_index=1,
        n_rounds=cfg.rounds,
        seed=cfg.seed,
        strategy_key=args.strategy,
        n_per_case=cfg.n_per_case,
    )
    reset_peak()
    t = time.perf_counter()
    candidates = score_pool(ctx, predictive_entropy)
    score_s, score_mb = time.perf_counter() - t, peak_mb()
    reset_peak()
    t = time.perf_counter()
    chosen = top_k(candidates, cfg.query_size)
    select_s, select_mb = time.perf_counter() - t, peak_mb()
    assert len(chosen) == cfg.query_size

    # the human work package of round 1 with its prefill, written into a scratch copy of the folder's layout
    from alseg.loop.prefill import model_segmentations
    from alseg.oracle.package import export_work_package
    from alseg.store.layout import model_dir

    scratch = args.work / "export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch_model = model_dir(scratch, 0)
    scratch_model.parent.mkdir(parents=True)
    scratch_model.symlink_to(model.resolve(), target_is_directory=True)
    segs = model_segmentations(lambda: exp.backend, scratch, cfg.seed)
    t = time.perf_counter()
    wrote = export_work_package(scratch, exp.state, exp.ds, 1, segs)
    export_s = time.perf_counter() - t
    assert wrote, "the scratch work package was not written"
    export_cases = len({g.region.case_id for g in exp.state.regions(round_index=1)})

    round_s = sum(stages[s]["seconds"] for s in ("query", "annotate", "train", "evaluate"))
    query_s = stages["query"]["seconds"]
    stop = (stages["evaluate"].get("detail") or {}).get("stopping") or {}  # inside the evaluate stage
    result = {
        "strategy": args.strategy,
        "pool_cases": len(pool),
        "test_cases": len(exp.test),
        "round_seconds": round(round_s, 2),
        "stages": {
            "predict": {"seconds": round(predict_s, 2), "peak_rss_mb": round(predict_mb, 1)},
            "score": {"seconds": round(score_s, 2), "peak_rss_mb": round(score_mb, 1)},
            "select": {"seconds": round(select_s, 4), "peak_rss_mb": round(select_mb, 1)},
            "annotate": {"seconds": round(stages["annotate"]["seconds"], 2)},
            "train": {
                "seconds": round(stages["train"]["seconds"], 2),
                "peak_rss_mb_incl_child": round(stages["train"]["peak_rss_mb"] or 0.0, 1),
            },
            "evaluate": {"seconds": round(stages["evaluate"]["seconds"], 2)},
        },
        "stop_set": {
            "cases": stop.get("cases"),
            "seconds": stop.get("seconds"),
            "signals_seconds": stop.get("compute_seconds"),
            "fraction_of_round": None if stop.get("seconds") is None else round(stop["seconds"] / round_s, 4),
        },
        "prefill_export": {
            "cases": export_cases,
            "seconds": round(export_s, 2),
            "fraction_of_round": round(export_s / round_s, 4),
        },
        "query_stage_seconds_in_loop": round(query_s, 2),
        "query_fraction_of_round": round(query_s / round_s, 4),
        "target_query_at_most_25pct": query_s / round_s <= 0.25,
        "experiment_seconds": None if args.reuse else round(total, 1),
    }
    exp.state.close()
    save_result("round_profile", result)


if __name__ == "__main__":
    main()
