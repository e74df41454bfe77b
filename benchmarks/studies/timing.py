"""Write ``benchmarks/studies/TIMING.md`` from the studies' folders and the pool-scaling benchmark.

Per study: the wall time of each stage (query = predict + score + select, annotate, train, evaluate) per round
and of each run, per strategy (mean over seeds and rounds 1 on; round 0 is trained once per seed in the base
experiment and listed apart), and the share of a round spent outside training per strategy family (single
softmax, MC dropout, gradient embeddings, bottleneck features, no model). Then how the query grows with the
pool (``benchmarks/results/pool_scaling*.json``, from ``pool_scaling.py``). Every number is read from the runs'
databases (each stage's seconds as the loop recorded them) or the benchmark's result files.

    python benchmarks/studies/timing.py --study3d DIR [--study2d DIR] [--out benchmarks/studies/TIMING.md]
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from pool_scaling import family  # noqa: E402

from _common import RESULTS, provenance, study_arguments, write_report  # noqa: E402

STAGES = ("query", "annotate", "train", "evaluate")
#: parts of a stage its record details: nnU-Net's own training inside the train stage, the stop set's prediction
#: inside the evaluate stage
PARTS = ("train_net", "stop_set")


def stage_seconds(exp: Path) -> dict[int, dict[str, float]]:
    """Per round, each finished stage's seconds, and the parts of a stage its details record (:data:`PARTS`)."""
    with sqlite3.connect(f"{(exp / 'alseg.sqlite').resolve().as_uri()}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT round, stage, seconds, detail FROM stages WHERE status = 'done'").fetchall()
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for r, s, sec, detail in rows:
        out[int(r)][s] = float(sec or 0.0)
        d = json.loads(detail) if detail else {}
        if s == "train" and d.get("train_seconds") is not None:
            out[int(r)]["train_net"] = float(d["train_seconds"])
        if s == "evaluate" and (d.get("stopping") or {}).get("seconds") is not None:
            out[int(r)]["stop_set"] = float(d["stopping"]["seconds"])
    return dict(out)


def round_seconds(stages: dict[str, float]) -> float:
    """A round's wall time: its stages (the parts are inside them)."""
    return sum(v for k, v in stages.items() if k not in PARTS)


def study_timing(study: Path) -> dict[str, Any]:
    from alseg.config import load_config
    from alseg.report.results import strategy_label

    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs_total: dict[str, list[float]] = defaultdict(list)
    fam: dict[str, str] = {}
    for cfg_file in sorted((study / "runs").glob("*/*/seed*/config.yaml")):
        exp = cfg_file.parent
        cfg = load_config(cfg_file)
        label = strategy_label(cfg)
        fam[label] = family(cfg.strategy, cfg.uncertainty.source)
        secs = stage_seconds(exp)
        later = {r: s for r, s in secs.items() if r > 0}
        for s in later.values():
            for stage in (*STAGES, *PARTS):
                if stage in s:
                    per[label][stage].append(s[stage])
            if all(st in s for st in STAGES):
                per[label]["round"].append(round_seconds(s))
        if len([r for r, s in later.items() if "evaluate" in s]) == cfg.rounds - 1:
            runs_total[label].append(sum(round_seconds(s) for s in later.values()))
    bases = [stage_seconds(p.parent).get(0, {}) for p in sorted((study / "runs").glob("*/round0/*/config.yaml"))]
    bases = [{k: v for k, v in b.items() if k not in PARTS} for b in bases]
    refs = [stage_seconds(p.parent).get(0, {}) for p in sorted((study / "runs").glob("*/full_data/config.yaml"))]
    table = []
    for label, stages in sorted(per.items()):
        row: dict[str, Any] = {"strategy": label, "family": fam[label], "rounds": len(stages.get("round", []))}
        for stage in (*STAGES, *PARTS, "round"):
            v = stages.get(stage, [])
            row[stage] = float(np.mean(v)) if v else float("nan")
        # training = nnU-Net's own training; the rest of the train stage (writing the dataset, planning,
        # loading) is bookkeeping outside training
        net = row["train_net"] if row["train_net"] == row["train_net"] else row["train"]
        row["outside_training_share"] = (
            1 - net / row["round"] if row["round"] == row["round"] and row["round"] > 0 else float("nan")
        )
        row["run_minutes"] = float(np.mean(runs_total[label])) / 60 if runs_total.get(label) else float("nan")
        row["complete_runs"] = len(runs_total.get(label, []))
        table.append(row)
    pooled = {stage: [v for stages in per.values() for v in stages.get(stage, [])] for stage in (*STAGES, *PARTS)}
    families: dict[str, list[float]] = defaultdict(list)
    for row in table:
        if row["outside_training_share"] == row["outside_training_share"]:
            families[row["family"]].append(row["outside_training_share"])
    round0 = [sum(b.values()) for b in bases if b]
    full_data = [round_seconds(r) for r in refs if r]
    return {
        "strategies": table,
        "families": {k: float(np.mean(v)) for k, v in families.items()},
        "round0_seconds": round0,
        "round0_train_seconds": [b.get("train", float("nan")) for b in bases if b],
        "full_data_seconds": full_data,
        "stage_means": {stage: mean(v) for stage, v in pooled.items()},
        "total_seconds": sum(sum(v) for v in runs_total.values()) + sum(round0) + sum(full_data),
        "finished_runs": sum(len(v) for v in runs_total.values()),
    }


def share_outside_training(query_seconds: float, stage_means: dict[str, float]) -> float:
    """A round's share outside nnU-Net's training with this query time and the study's mean annotate, train,
    evaluate stages (the train stage's own bookkeeping counted outside)."""
    net = stage_means.get("train_net", float("nan"))
    net = net if net == net else stage_means["train"]
    rest = query_seconds + stage_means["annotate"] + stage_means["evaluate"] + stage_means["train"] - net
    return rest / (rest + net)


def mean(v: list[float]) -> float:
    return float(np.mean(v)) if v else float("nan")


def study_of(run: Path, studies: dict[str, Path | None]) -> str | None:
    """Which study's folder holds ``run``."""
    for key, study in studies.items():
        if study is not None and run.resolve().is_relative_to(study.resolve()):
            return key
    return None


def fmt(v: float, digits: int = 0) -> str:
    return "–" if v != v else f"{v:.{digits}f}"


def main() -> None:
    args = study_arguments(__doc__, "timing")
    prov = provenance()
    data: dict[str, Any] = {"provenance": prov}
    md = [
        f"# Timing of the studies ({prov.get('machine')}, cpu profile)",
        "",
        f"Written by `python benchmarks/studies/timing.py` at commit {prov.get('commit')} from the runs' stage "
        "records (seconds as the loop measured them; runs that shared the machine with other work are slower).",
        "",
    ]
    for key, study in (("3d", args.study3d), ("2d", args.study2d)):
        if study is None or not (study / "runs").is_dir():
            md += [f"## {key.upper()} study", "", "Not run yet.", ""]
            continue
        t = study_timing(study)
        data[key] = t
        md += [
            f"## {key.upper()} study",
            "",
            f"Round 0, trained once per seed in the base experiment: {fmt(mean(t['round0_seconds']) / 60, 1)} min "
            f"(training {fmt(mean(t['round0_train_seconds']) / 60, 1)} min; {len(t['round0_seconds'])} bases). "
            f"Full-data reference: {fmt(mean(t['full_data_seconds']) / 60, 1) if t['full_data_seconds'] else '–'}"
            f" min. In all, the {t['finished_runs']} finished runs (rounds 1 on), the round-0 models and the "
            f"reference: {fmt(t['total_seconds'] / 3600, 1)} h.",
            "",
            "Seconds per round (rounds 1 on, mean over seeds and rounds) and minutes per run (rounds 1 on). Query = "
            "predicting the pool, scoring and selecting; train = the stage, of which nnU-Net's own training (the "
            "rest: writing the round's dataset, planning, loading); evaluate = the held-out cases, of which the "
            "stop set's prediction. Outside training = everything but nnU-Net's training:",
            "",
            "| strategy | family | query | annotate | train (nnU-Net) | evaluate (stop set) | round | outside "
            "training | run (min) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in t["strategies"]:
            md.append(
                f"| `{r['strategy']}` | {r['family']} | {fmt(r['query'])} | {fmt(r['annotate'])} | {fmt(r['train'])} "
                f"({fmt(r['train_net'])}) | {fmt(r['evaluate'])} ({fmt(r['stop_set'])}) | {fmt(r['round'])} | "
                f"{fmt(100 * r['outside_training_share'])}% | {fmt(r['run_minutes'], 1)} ({r['complete_runs']} runs) |"
            )
        md += ["", "Share of a round outside training, per family (mean over its strategies):", ""]
        md += [f"- {k}: {fmt(100 * v)}%" for k, v in sorted(t["families"].items())]
        md.append("")
    scaling = sorted(RESULTS.glob("pool_scaling*.json"))
    md += ["## The query against the pool size", ""]
    if not scaling:
        md += ["Not measured yet (`benchmarks/studies/pool_scaling.py`).", ""]
    for f in scaling:
        res = json.loads(f.read_text())
        data[f.stem] = res
        md += [
            f"`{f.name}` (commit {res['provenance'].get('commit')}"
            + (
                f", modified: {', '.join(res['provenance']['modified_files'])}"
                if "modified_files" in res["provenance"]
                else ""
            )
            + "): seconds of one query of round 1 with the pool restricted to N cases (a strategy other than the "
            "run's own is timed on that run's models): total (prediction / gradient embeddings / scoring, selection "
            "and bookkeeping):",
            "",
            "| run | strategy | family | " + " | ".join(f"N = {n}" for n in res["runs"][0]["by_pool_size"]) + " |",
            "|---|---|---|" + "---|" * len(res["runs"][0]["by_pool_size"]),
        ]
        for r in res["runs"]:
            cells = " | ".join(
                f"{fmt(v['seconds'], 1)} ({fmt(v.get('predict_seconds', float('nan')), 1)} / "
                f"{fmt(v.get('gradient_seconds', float('nan')), 1)} / "
                f"{fmt(v.get('score_select_seconds', float('nan')), 1)})"
                for v in r["by_pool_size"].values()
            )
            md.append(
                f"| {Path(r['run']).parent.name}/{Path(r['run']).name} | `{r['strategy']}` | {r['family']} | {cells} |"
            )
        md.append("")
        shares = []
        for r in res["runs"]:
            key = study_of(Path(r["run"]), {"3d": args.study3d, "2d": args.study2d})
            if key is None or key not in data:
                continue
            sm = data[key]["stage_means"]
            row = {n: share_outside_training(v["seconds"], sm) for n, v in r["by_pool_size"].items()}
            r["share_outside_training"] = row
            shares.append(
                f"| {key.upper()} | `{r['strategy']}` | "
                + " | ".join(f"{fmt(100 * v)}%" for v in row.values())
                + f" | {fmt(sm['train'])} ({fmt(sm['train_net'])}) + {fmt(sm['annotate'])} + {fmt(sm['evaluate'])} |"
            )
        if shares:
            md += [
                "The share of a round outside training with this query, the study's mean training, annotation and "
                "evaluation of a round (rounds 1 on, all its runs) held fixed (they do not depend on the pool):",
                "",
                "| study | strategy | "
                + " | ".join(f"N = {n}" for n in res["runs"][0]["by_pool_size"])
                + " | train (nnU-Net) + annotate + evaluate (s) |",
                "|---|---|" + "---|" * len(res["runs"][0]["by_pool_size"]) + "---|",
                *shares,
                "",
            ]
    batching = RESULTS / "mc_dropout_batching.json"
    md += ["## MC dropout prediction", ""]
    if batching.is_file():
        b = json.loads(batching.read_text())
        data["mc_dropout_batching"] = b
        md += [
            f"`benchmarks/mc_dropout_batching.py` (commit {b['provenance'].get('commit')}, {b['cases']} pool cases "
            f"of `{Path(b['run']).parent.name}/{Path(b['run']).name}`, {b['configuration']}, K = {b['k']}): "
            f"{fmt(b['seconds_per_case_per_pass_calls'], 2)} s per case with nnU-Net's predictor called once per "
            f"pass, {fmt(b['seconds_per_case_batched'], 2)} s with the passes batched over the tiles "
            f"({fmt(b['speedup'], 1)}x); with dropout at p = 0 the two agree to {b['max_abs_diff_at_p0']:.1e} "
            "(nnU-Net sums tiles in half precision). alseg predicts MC dropout passes batched since commit d953da7; "
            "`study.json` records the commit of every run.",
            "",
        ]
    else:
        md += ["Not measured yet (`benchmarks/mc_dropout_batching.py`).", ""]
    mc = [r for r in data.get("2d", {}).get("strategies", []) if r["family"] in ("MC dropout", "gradient embeddings")]
    if mc:
        md += [
            "Share of a 2D round spent in the query (MC dropout prediction, and for USIM the gradient embeddings) "
            "per strategy: "
            + "; ".join(f"`{r['strategy']}` {fmt(100 * r['query'] / r['round'])}%" for r in mc if r["round"] > 0)
            + ".",
            "",
        ]
    # the strategies that read the K passes (Core-Set and BADGE query one deterministic prediction)
    mc_scaling = [
        r
        for f in scaling
        for r in data[f.stem]["runs"]
        if r.get("n_samples", 1) > 1 and (r["family"] == "MC dropout" or r["strategy"].startswith("usim"))
    ]
    if mc_scaling:
        speedup = data.get("mc_dropout_batching", {}).get("speedup", float("nan"))
        md += ["Where the K MC dropout passes make prediction dominate a round (one query at N pool cases):", ""]
        for r in mc_scaling:
            key = study_of(Path(r["run"]), {"3d": args.study3d, "2d": args.study2d})
            net = data.get(key, {}).get("stage_means", {}).get("train_net", float("nan")) if key else float("nan")
            cells = [
                f"N = {n}: prediction {fmt(v['predict_seconds'])} s = "
                f"{fmt(100 * v['predict_seconds'] / v['seconds'], 1)}% of the query, "
                f"{fmt(v['predict_seconds'] / net, 1)}x a round's nnU-Net training ({fmt(net)} s)"
                for n, v in r["by_pool_size"].items()
                if v["seconds"] > 0
            ]
            md.append(f"- `{r['strategy']}` (K = {r.get('n_samples')}): " + "; ".join(cells) + ".")
        md += [
            "",
            "What cuts the prediction without changing the method (the same K dropout passes of the same network over "
            "nnU-Net's same tiles):",
            "",
            f"- batching the passes over the tiles, one preprocessing per case (done: {fmt(speedup, 1)}x, above);",
            "- a GPU: the same prediction code runs there (`device: cuda`, the `gpu` profile); not measured here, "
            "no GPU machine was lent to these sessions;",
            "- predicting the pool's cases in parallel workers: the cases are independent and each case's passes are "
            "seeded by the case, so the result would not change; alseg does not do it, and on 2 cores the network "
            "already uses both.",
            "",
            "BADGE's gradient embeddings are computed in closed form from the prediction's features and "
            "probabilities (inside its prediction column); USIM's per-region gradients go through the network's "
            "backward pass (the gradient column).",
            "",
        ]
    write_report(args.out, md, args.json, data)


if __name__ == "__main__":
    main()
