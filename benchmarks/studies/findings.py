"""Write ``benchmarks/studies/FINDINGS.md`` from the two studies' folders: every table and verdict computed here.

For each paper's claim: AUBC, final Dice and FG-Eff per strategy (mean ± std over seeds), the paired t-tests of
the claimed strategy against each comparator on AUBC and final Dice (pairing by seed, Holm over the claim's
comparisons per metric), each comparison's power at the observed effect and the smallest difference the seeds
could detect (80% power, two-sided alpha 0.05, the observed spread of the paired differences), the strategies'
Φ from the pairwise penalty matrix (plain and Holm), and a verdict by a fixed rule:

- *reproduced*: the claimed strategy's AUBC is above every comparator's with Holm-adjusted p < 0.05;
- *not reproduced*: some comparator is above it with Holm-adjusted p < 0.05;
- *inconclusive at this scale*: neither.

Then the ranking of the strategies under each annotation cost measure (AUBC with x = voxels, foreground voxels,
corrected voxels, strokes), and the stopping rule's validation over all runs: the round after which held-out Dice
gains stay below 0.01 against the round the label-free rule (prediction stability) first says stop, and the rank
correlation of each round's stability with the next round's Dice gain.

    python benchmarks/studies/findings.py --study3d DIR [--study2d DIR] [--out benchmarks/studies/FINDINGS.md]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import provenance, study_arguments, write_report  # noqa: E402

SB_ENTROPY = "stochastic_batches(base=entropy)"
SB_CLASP = "stochastic_batches(base=clasp_pe)"
CLAIMS: list[dict[str, Any]] = [
    {
        "paper": "seed 000 (nnActive, ClaSP PE)",
        "claim": "ClaSP PE beats foreground-aware (improved) random sampling, and random sampling",
        "study": "3d",
        "strategy": "clasp_pe",
        "against": ["random_fg33", "random_fg66", "random"],
    },
    {
        "paper": "seed 001 (nnU-Net in the loop), USIMC",
        "claim": "USIMC beats the other strategies with nnU-Net in the loop",
        "study": "2d",
        "strategy": "usim_c",
        "against": ["random", "entropy", SB_ENTROPY, "mean_std", "bald", "coreset", "badge"],
    },
    {
        "paper": "seed 001 (nnU-Net in the loop), USIMF",
        "claim": "USIMF beats the other strategies with nnU-Net in the loop",
        "study": "2d",
        "strategy": "usim_f",
        "against": ["random", "entropy", SB_ENTROPY, "mean_std", "bald", "coreset", "badge"],
    },
    {
        "paper": "seed 002 (stochastic batches), 3D boxes",
        "claim": "stochastic batches lift uncertainty sampling (entropy) above random sampling",
        "study": "3d",
        "strategy": SB_ENTROPY,
        "against": ["entropy", "random"],
    },
    {
        "paper": "seed 002 (stochastic batches), 2D slices",
        "claim": "stochastic batches lift uncertainty sampling (entropy) above random sampling",
        "study": "2d",
        "strategy": SB_ENTROPY,
        "against": ["entropy", "random"],
    },
    {
        "paper": "new: stochastic batches over ClaSP PE (no paper tried it)",
        "claim": "stochastic batches over ClaSP PE beat ClaSP PE",
        "study": "3d",
        "strategy": SB_CLASP,
        "against": ["clasp_pe", "random_fg33"],
    },
]
# Every parameter of the studies that differs from the paper behind a claim, with the reason (the papers' values
# from ../shared/seeds and ../shared/reference/strategies.md). Text, not results: no number here is a finding.
DIFFERENCES: dict[str, list[tuple[str, str, str, str]]] = {
    "3d": [
        (
            "uncertainty source",
            "5-model ensemble (nnActive: the 5 cross-validation fold models)",
            "one softmax of one model",
            "5x the training and prediction of every round: beyond the cpu budget",
        ),
        (
            "training per round",
            "nnU-Net from scratch, 200 epochs of 250 iterations (nnActive)",
            "the cpu profile: halved network, 8 warm-started epochs of 50 iterations (12 in round 0)",
            "the full schedule takes days per run on 2 cores; warm starts keep a run at about 15 minutes",
        ),
        (
            "held-out evaluation",
            "nnActive's split of the dataset",
            "195 pool and 65 held-out cases, split seed 0, the same for every run",
            "one fixed split that every study and benchmark of alseg shares",
        ),
        (
            "seeds",
            "nnActive's repetitions",
            "3 seeds (the issue's minimum), paired by seed",
            "compute; the power and MDE columns say what 3 seeds can detect",
        ),
    ],
    "2d": [
        (
            "query size and starting budget",
            "seed 001: 100 random samples to start, 100 per round (seed 002: 10 and 10, as here)",
            "10 class-covering slices to start, 10 per round",
            "training on 100 new slices per round is beyond the cpu budget; 10 is seed 002's setting",
        ),
        (
            "rounds",
            "seed 001: several sampling rounds of 100 slices; seed 002: AL cycles of 10 samples",
            "4 rounds: 10 + 3 x 10 = 40 slices",
            "the issue's second shrink (after the pool), to fit both studies in about 12 hours",
        ),
        (
            "training per round",
            "seed 001: nnU-Net 2D, 300 epochs per round, batch 366, patch 56 x 40",
            "the cpu profile: halved 2D network, batch 32, 8 warm-started epochs of 50 iterations (12 in round 0)",
            "300 epochs per round take days per run on 2 cores",
        ),
        (
            "pool",
            "the whole training set of nnU-Net's first two folds (seed 001)",
            "a fixed draw of 60 pool cases (pool_size, split seed 0) and the 65 held-out cases of the 3D study",
            "the issue's first allowed shrink: MC dropout scores every pool slice 10 times each round",
        ),
        (
            "uncertainty for every strategy",
            "seed 001: MC dropout (p = 0.01 training, 0.1 at query time, K = 10) for its uncertainty measures",
            "the same MC dropout model for all nine strategies, random and entropy included",
            "one round-0 model per seed shared by every strategy, so the runs are paired",
        ),
        (
            "seeds",
            "seed 001: the first two cross-validation folds; seed 002: 5 repetitions",
            "3 seeds, paired by seed",
            "compute; the power and MDE columns say what the seeds can detect",
        ),
    ],
}
ALPHA = 0.05
COST_AXES = ("voxels", "fg_voxels", "corrected_voxels", "strokes")
MIN_GAIN = 0.01


def load(study_dir: Path) -> tuple[Any, Any]:
    """(results, comparison) of a study folder: every AL run and the references that finished."""
    from alseg.report.compare import compare
    from alseg.report.results import load_results

    runs = sorted(p.parent for p in (study_dir / "runs").glob("*/*/seed*/config.yaml") if "round0" not in p.parts)
    refs = [p.parent for p in (study_dir / "runs").glob("*/full_data/config.yaml")]
    results = load_results(runs, refs)
    return results, compare(results)


def power_and_mde(diffs: np.ndarray) -> tuple[float, float]:
    """(power at the observed mean difference, smallest detectable difference at 80% power) of a two-sided
    paired t-test at ALPHA with these paired differences; NaN when fewer than 2 or no spread."""
    from statsmodels.stats.power import TTestPower

    n = len(diffs)
    sd = float(np.std(diffs, ddof=1)) if n >= 2 else float("nan")
    if n < 2 or not sd > 0:
        return float("nan"), float("nan")
    tp = TTestPower()
    power = float(tp.power(effect_size=abs(float(np.mean(diffs))) / sd, nobs=n, alpha=ALPHA))
    d80 = float(tp.solve_power(nobs=n, alpha=ALPHA, power=0.8))
    return power, d80 * sd


def study_seeds(study_dir: Path) -> int:
    """How many seeds the study file behind a study folder asks for (``study.json`` names the file)."""
    import yaml

    study_file = Path(json.loads((study_dir / "study.json").read_text())["study_file"])
    return len(yaml.safe_load(study_file.read_text())["seeds"])


def claim_table(claim: dict[str, Any], cmp: Any, seeds: int | None = None) -> dict[str, Any]:
    from statsmodels.stats.multitest import multipletests

    from alseg.evaluation.stats import paired_test

    per = cmp.per_experiment
    strategies = [claim["strategy"], *claim["against"]]
    missing = [s for s in strategies if s not in set(per["strategy"])]
    out: dict[str, Any] = {**claim, "missing": missing, "rows": [], "tests": []}
    for s in strategies:
        runs = per[per["strategy"] == s]
        if runs.empty:
            continue
        fg = cmp.fg_eff[cmp.fg_eff["strategy"] == s]
        out["rows"].append(
            {
                "strategy": s,
                "seeds": len(runs),
                "complete": int(runs["complete"].astype(bool).sum()),
                "aubc_mean": float(runs["aubc"].mean()),
                "aubc_std": float(runs["aubc"].std(ddof=1)) if len(runs) > 1 else float("nan"),
                "final_dice_mean": float(runs["final_dice"].mean()),
                "final_dice_std": float(runs["final_dice"].std(ddof=1)) if len(runs) > 1 else float("nan"),
                "fg_eff": float(fg["fg_eff"].iloc[0]) if len(fg) else float("nan"),
                "fg_eff_stderr": float(fg["fg_eff_stderr"].iloc[0]) if len(fg) else float("nan"),
                "phi": float(cmp.ppm.phi.get(s, float("nan"))) if cmp.ppm is not None else float("nan"),
                "phi_holm": float(cmp.ppm.phi_holm.get(s, float("nan"))) if cmp.ppm is not None else float("nan"),
            }
        )
    a = per[per["strategy"] == claim["strategy"]].set_index("seed")
    for metric in ("aubc", "final_dice"):
        tests = []
        for other in claim["against"]:
            b = per[per["strategy"] == other].set_index("seed")
            if a.empty or b.empty:
                continue
            t = paired_test(a[metric], b[metric])
            common = list(t.seeds)
            diffs = (a.loc[common, metric] - b.loc[common, metric]).to_numpy(dtype=float)
            power, mde = power_and_mde(diffs)
            tests.append(
                {
                    "metric": metric,
                    "against": other,
                    "n": t.n,
                    "diff": t.mean_diff,
                    "p": t.pvalue,
                    "power": power,
                    "mde": mde,
                }
            )
        ps = np.array([r["p"] for r in tests], dtype=float)
        adj = ps.copy()
        finite = np.isfinite(ps)
        if finite.any():
            adj[finite] = multipletests(ps[finite], alpha=ALPHA, method="holm")[1]
        for r, pa in zip(tests, adj, strict=True):
            r["p_holm"] = float(pa)
        out["tests"].extend(tests)
    aubc = [r for r in out["tests"] if r["metric"] == "aubc"]
    unfinished = [f"{r['strategy']} {r['complete']} of {seeds}" for r in out["rows"] if seeds and r["complete"] < seeds]
    if missing or not aubc:
        out["verdict"] = (
            "not run yet" if not out["rows"] else "incomplete (strategies missing: " + ", ".join(missing) + ")"
        )
    elif unfinished:
        out["verdict"] = "incomplete (seeds finished: " + ", ".join(unfinished) + ")"
    elif any(math.isfinite(r["p_holm"]) and r["p_holm"] < ALPHA and r["diff"] < 0 for r in aubc):
        out["verdict"] = "not reproduced"
    elif all(math.isfinite(r["p_holm"]) and r["p_holm"] < ALPHA and r["diff"] > 0 for r in aubc):
        out["verdict"] = "reproduced"
    else:
        out["verdict"] = "inconclusive at this scale"
    return out


def cost_rankings(results: Any) -> pd.DataFrame:
    """Per cost axis: each strategy's mean AUBC (x = that axis) over seeds and its rank (1 = best)."""
    from alseg.report.compare import aubc_by_axis

    t = aubc_by_axis(results)
    if t.empty:
        return t
    g = t.groupby(["axis", "strategy"], as_index=False)["aubc"].mean()
    g["rank"] = g.groupby("axis")["aubc"].rank(ascending=False, method="min")
    return g.pivot(index="strategy", columns="axis", values=["aubc", "rank"])


def stopping_validation(results: Any) -> dict[str, Any]:
    """Per run: the plateau round (after it every Dice gain < MIN_GAIN; None if the last gain is >= MIN_GAIN) and
    the first round the stability rule says stop; and stability against the next round's gain."""
    from scipy.stats import spearmanr

    from alseg.report.stopping import experiment_stopping

    rows = []
    pairs: list[tuple[float, float]] = []
    for e in results.al_experiments:
        per_round, summary = experiment_stopping(e.path, e.config)
        gains = {r: float(v["dice_gain"]) for r, v in per_round.items() if v.get("dice_gain") is not None}
        rounds = sorted(per_round)
        plateau = None
        for r in rounds:
            if all(g < MIN_GAIN for rr, g in gains.items() if rr > r) and any(rr > r for rr in gains):
                plateau = r
                break
        stab = {r: v.get("stability") for r, v in per_round.items()}
        for r, s in stab.items():
            if s is not None and r + 1 in gains:
                pairs.append((float(s), float(gains[r + 1])))
        rows.append(
            {
                "run": f"{e.strategy}/seed{e.seed}",
                "complete": e.complete,
                "plateau_round": plateau,
                "rule_stop_round": summary.get("first_stop_round"),
                "max_stability": max((s for s in stab.values() if s is not None), default=None),
            }
        )
    rho = p = float("nan")
    if len(pairs) >= 3:
        res = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        rho, p = float(res.statistic), float(res.pvalue)
    return {"runs": rows, "spearman_stability_next_gain": rho, "spearman_p": p, "n_pairs": len(pairs)}


def fmt(v: float, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_p(v: float) -> str:
    return "–" if not math.isfinite(v) else ("<0.001" if v < 0.001 else f"{v:.3f}")


def verdict_sentence(c: dict[str, Any]) -> str:
    """The claim's verdict in one sentence with each AUBC comparison's difference, Holm p, power and MDE."""
    aubc = [t for t in c["tests"] if t["metric"] == "aubc"]
    if not aubc or c["verdict"] in ("not run yet",) or c["verdict"].startswith("incomplete"):
        return f"**Verdict: {c['verdict']}.**"
    parts = [
        f"against `{t['against']}` {fmt(t['diff'], 4)} (Holm p {fmt_p(t['p_holm'])}, power {fmt(t['power'], 2)}, "
        f"MDE {fmt(t['mde'], 4)}, {t['n']} seeds)"
        for t in aubc
    ]
    return f"**Verdict: {c['verdict']}.** AUBC of `{c['strategy']}` minus each comparator's: " + "; ".join(parts) + "."


def ppm_markdown(cmp: Any) -> list[str]:
    """The study's pairwise penalty matrix with Holm (row beats column, summed over budgets) and Φ."""
    if cmp.ppm is None:
        return ["No pairwise penalty matrix yet (it needs two strategies with two common seeds).", ""]
    m, phi = cmp.ppm.matrix_holm, cmp.ppm.phi_holm
    names = list(m.columns)
    short = {s: s.replace("stochastic_batches(base=", "sb(").replace("random_", "r_") for s in names}
    lines = [
        "| beats → | " + " | ".join(f"`{short[s]}`" for s in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for r in names:
        lines.append(f"| `{short[r]}` | " + " | ".join(fmt(float(m.loc[r, s]), 2) for s in names) + " |")
    lines.append("| **Φ (Holm)** | " + " | ".join(f"**{fmt(float(phi[s]), 2)}**" for s in names) + " |")
    return [*lines, ""]


def claim_markdown(c: dict[str, Any]) -> list[str]:
    lines = [f"### {c['paper']}: {c['claim']}", "", verdict_sentence(c), ""]
    if not c["rows"]:
        return [*lines, "No run of this study yet.", ""]
    lines += [
        "| strategy | seeds (complete) | AUBC | final Dice | FG-Eff | Φ | Φ (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in c["rows"]:
        lines.append(
            f"| `{r['strategy']}` | {r['seeds']} ({r['complete']}) | {fmt(r['aubc_mean'])} ± {fmt(r['aubc_std'])} | "
            f"{fmt(r['final_dice_mean'])} ± {fmt(r['final_dice_std'])} | {fmt(r['fg_eff'], 2)} ± "
            f"{fmt(r['fg_eff_stderr'], 2)} | {fmt(r['phi'], 2)} | {fmt(r['phi_holm'], 2)} |"
        )
    lines += [
        "",
        f"Paired t-tests of `{c['strategy']}` against each comparator (difference = it minus the comparator; Holm "
        "over this claim's comparisons per metric; power at the observed difference; MDE: the smallest difference "
        "these seeds detect with 80% power):",
        "",
        "| metric | against | seeds | difference | p | p (Holm) | power | MDE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in c["tests"]:
        lines.append(
            f"| {t['metric']} | `{t['against']}` | {t['n']} | {fmt(t['diff'], 4)} | {fmt_p(t['p'])} | "
            f"{fmt_p(t['p_holm'])} | {fmt(t['power'], 2)} | {fmt(t['mde'], 4)} |"
        )
    return [*lines, ""]


def main() -> None:
    args = study_arguments(__doc__, "findings")
    studies = {"3d": args.study3d, "2d": args.study2d}
    loaded = {k: load(v) for k, v in studies.items() if v is not None and (v / "runs").is_dir()}
    data: dict[str, Any] = {"claims": [], "rankings": {}, "stopping": {}, "provenance": provenance()}
    md = [
        "# Findings: the three papers' claims at the scale of the cpu profile",
        "",
        f"Written by `python benchmarks/studies/findings.py` at commit {data['provenance'].get('commit')} from the "
        "study folders; every number below comes from the runs (nothing typed in). Verdict rule: *reproduced* when "
        "the claimed strategy's AUBC is above every comparator's with Holm-adjusted p < 0.05 (paired t-test over "
        "seeds), *not reproduced* when a comparator is above it with Holm-adjusted p < 0.05, else *inconclusive at "
        "this scale*. See [README.md](README.md) for the studies' settings and every difference from the papers.",
        "",
        "## The claims",
        "",
    ]
    for claim in CLAIMS:
        if claim["study"] not in loaded:
            c = {**claim, "rows": [], "tests": [], "verdict": "not run yet", "missing": []}
        else:
            c = claim_table(claim, loaded[claim["study"]][1], study_seeds(studies[claim["study"]]))
        data["claims"].append(c)
        md += claim_markdown(c)
    md += ["## Pairwise penalty matrices", ""]
    for key, (_, cmp) in loaded.items():
        md += [
            f"**{key.upper()} study**: entry (row, column) = the fraction of the rounds at which the row's strategy "
            "has a higher held-out Dice than the column's with Holm-adjusted p < 0.05 (paired t-test over seeds; "
            "Holm over all tests of the study); Φ = the column's mean, how often a strategy is beaten (lower is "
            "better).",
            "",
            *ppm_markdown(cmp),
        ]
    md += ["## Ranking under each annotation cost measure", ""]
    for key, (results, _) in loaded.items():
        table = cost_rankings(results)
        data["rankings"][key] = json.loads(table.to_json()) if not table.empty else {}
        if table.empty:
            continue
        md += [f"**{key.upper()} study** (mean AUBC over seeds with x = the cumulative cost; rank 1 = best):", ""]
        axes = [a for a in COST_AXES if ("aubc", a) in table.columns]
        md.append("| strategy | " + " | ".join(f"{a}: AUBC (rank)" for a in axes) + " |")
        md.append("|---|" + "---|" * len(axes))
        for s in table.index:
            cells = [f"{fmt(table.loc[s, ('aubc', a)])} ({fmt(table.loc[s, ('rank', a)], 0)})" for a in axes]
            md.append(f"| `{s}` | " + " | ".join(cells) + " |")
        md.append("")
    md += ["## The stopping rule over all runs", ""]
    for key, (results, _) in loaded.items():
        v = stopping_validation(results)
        data["stopping"][key] = v
        runs = v["runs"]
        n = len(runs)
        plateau = [r for r in runs if r["plateau_round"] is not None]
        fired = [r for r in runs if r["rule_stop_round"] is not None]
        agree = sum(1 for r in runs if r["plateau_round"] == r["rule_stop_round"])
        md += [
            f"**{key.upper()} study**, {n} runs: held-out Dice gains stayed below {MIN_GAIN} after some round in "
            f"{len(plateau)} runs; the stability rule said stop in {len(fired)}; both agree (same round, or both "
            f"never) in {agree}. Spearman correlation of a round's stability with the next round's Dice gain: "
            f"{fmt(v['spearman_stability_next_gain'], 2)} (p {fmt_p(v['spearman_p'])}, {v['n_pairs']} round pairs).",
            "",
            "| run | plateau round | rule's stop round | highest stability |",
            "|---|---|---|---|",
        ]
        for r in runs:
            md.append(
                f"| {r['run']} | {r['plateau_round'] if r['plateau_round'] is not None else 'not reached'} | "
                f"{r['rule_stop_round'] if r['rule_stop_round'] is not None else 'never'} | "
                f"{fmt(r['max_stability'])} |"
            )
        md.append("")
    md += [
        "## Differences from the papers",
        "",
        "No strategy parameter was tuned, on the held-out split or elsewhere: every strategy runs with the "
        "parameters of its paper (the project's strategy reference as corrected by the reviews; see the "
        "[README's strategy table](../../README.md#strategies)). What differs is the training and the scale, "
        "all forced by the cpu budget:",
        "",
        "| study | parameter | paper | here | why |",
        "|---|---|---|---|---|",
    ]
    for key, rows in DIFFERENCES.items():
        md += [f"| {key.upper()} | {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    md.append("")
    data["differences"] = DIFFERENCES
    write_report(args.out, md, args.json, data)


if __name__ == "__main__":
    main()
