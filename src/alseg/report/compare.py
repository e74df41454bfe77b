"""Comparing experiments: per-run AUBC and final Dice, FG-Eff, PPM, mean ± std tables, rankings.

Definitions in ``shared/reference/evaluation.md``; the statistics themselves live in
:mod:`alseg.evaluation.stats` and :mod:`alseg.evaluation.curves`. Everything here is computed from a
:class:`~alseg.report.results.Results` (saved results only) and is shared by the HTML report, the CSV export
and ``alseg compare``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from alseg.evaluation.curves import aubc, final_dice, fit_fg_eff_detailed
from alseg.evaluation.stats import friedman_nemenyi, mean_std_table, pairwise_penalty_matrix, pairwise_penalty_tests
from alseg.report.results import COST_AXES, MEASURED_AXES, ReportError, Results

__all__ = [
    "AubcX",
    "Comparison",
    "CostAxis",
    "PPMResult",
    "RankingResult",
    "aubc_by_axis",
    "choose_baseline",
    "compare",
    "fg_eff_table",
    "per_experiment_table",
    "resolve_cost_axis",
    "significance_mark",
    "write_csv",
]

#: AUBC's x: the round index, the report's cost axis (``--cost``), or annotated voxels whatever the cost axis
AubcX = Literal["round", "cost", "voxels"]
AUBC_XS = ("round", "cost", "voxels")
#: the cumulative cost a report draws its curves against (:data:`alseg.report.results.COST_AXES`)
CostAxis = Literal["voxels", "fg_voxels", "corrected_voxels", "strokes"]
#: the budget range of an AUBC on a cost axis (:func:`_shared_ranges`), as the report and ``alseg compare`` state it
SHARED_RANGE = (
    "over one range per setting and seed (the largest starting cost to the smallest final cost of its finished "
    "runs, or of all its runs while none has finished)"
)
ALPHA = 0.05
SUMMARY_METRICS = {"aubc": "AUBC", "final_dice": "Final Dice"}


def choose_baseline(strategies: list[str], requested: str | None = None) -> str | None:
    """``requested`` (must be present), else ``random``, else the first ``random*`` strategy, else None."""
    if requested is not None:
        if requested not in strategies:
            raise ReportError(f"baseline {requested!r} is not among the strategies: {', '.join(strategies) or 'none'}")
        return requested
    if "random" in strategies:
        return "random"
    family = sorted(s for s in strategies if s.startswith("random"))
    return family[0] if family else None


def significance_mark(row: dict[str, Any] | pd.Series) -> str:
    """▲ significantly above the baseline, ▼ below (paired test over seeds, p < 0.05), else ''."""
    if not bool(row.get("significant", False)):
        return ""
    return "▲" if float(row.get("mean_diff", 0.0)) > 0 else "▼"


# --------------------------------------------------------------------------------------------------
# per experiment and FG-Eff
# --------------------------------------------------------------------------------------------------
def resolve_cost_axis(results: Results, cost: str) -> tuple[str, str | None]:
    """The cost axis the report uses for ``cost`` and a note when it differs: ``corrected_voxels`` and ``strokes``
    need a measure for every annotated region of every active-learning run; when one run lacks them the whole
    report falls back to annotated voxels (runs are never drawn against two different axes)."""
    if cost not in COST_AXES:
        raise ReportError(f"cost axis {cost!r} is not one of {', '.join(COST_AXES)}")
    if cost not in MEASURED_AXES:
        return cost, None
    missing = [e for e in results.al_experiments if e.unmeasured_regions]
    if not missing:
        return cost, None
    shown = "; ".join(f"{e.path} ({e.unmeasured_regions} regions)" for e in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    note = (
        f"cost axis {cost} ({COST_AXES[cost]}) is unavailable: {len(missing)} of {len(results.al_experiments)} runs "
        f"have annotated regions without correction measures (made before alseg measured them): {shown}{more}. "
        f"The learning curves and AUBC use {COST_AXES['voxels']} instead; `alseg remeasure EXP` measures an "
        "experiment's regions again from its stored models"
    )
    return "voxels", note


def _aubc_column(aubc_x: str, cost_axis: str) -> str:
    if aubc_x not in AUBC_XS:
        raise ReportError(f"aubc_x must be 'round', 'cost' (the cost axis, {cost_axis}) or 'voxels', got {aubc_x!r}")
    return {"round": "round", "cost": cost_axis, "voxels": "voxels"}[aubc_x]


def _run_aubc(df: pd.DataFrame, x: str, x_range: tuple[float, float] | None = None) -> float:
    """AUBC of one run's evaluated rounds (sorted by round, finite Dice) against column ``x``, over ``x_range``
    when given (a cost axis: :func:`_shared_ranges`); NaN if impossible."""
    if not len(df):
        return float("nan")
    xs = df[x].to_numpy(dtype=float)
    try:
        if x_range is not None:
            return aubc(df["dice"].to_numpy(), xs, x_range)
        return aubc(df["dice"].to_numpy(), xs if len(df) > 1 else None)
    except ValueError:  # an x that is NaN, not increasing, of zero width or short of the range
        return float("nan")


def _evaluated(results: Results) -> dict[str, pd.DataFrame]:
    """Each run's evaluated rounds with a finite Dice, sorted by round, by experiment path."""
    rounds = results.al_rounds
    out = {}
    for e in results.al_experiments:
        df = rounds[rounds["experiment"] == str(e.path)].sort_values("round")
        out[str(e.path)] = df[np.isfinite(df["dice"])]
    return out


def _shared_ranges(
    results: Results, evaluated: dict[str, pd.DataFrame], axis: str
) -> dict[tuple[str, Any], tuple[float, float]]:
    """Per (setting, seed), the budget range on cost axis ``axis`` that every finished run of that seed covers:
    from the largest starting cost (the runs of a seed share their starting budget, so normally the one) to the
    smallest final cost (over the finished runs; over all runs while none has finished).

    A cost axis's AUBC is taken over this one range for every run paired by the seed: normalising each run's x
    to its own [first, last] would give a run that spent twice the budget the same x range, and the cost would
    drop out of the comparison. A run that stops short of the range (unfinished) gets NaN.
    """
    spans: dict[tuple[str, Any], list[tuple[float, float, bool]]] = {}
    for e in results.al_experiments:
        df = evaluated[str(e.path)]
        xs = df[axis].to_numpy(dtype=float) if axis in df else np.array([])
        if len(xs) >= 2 and np.all(np.isfinite(xs)):
            spans.setdefault((str(e.setting), e.seed), []).append((float(xs[0]), float(xs[-1]), bool(e.complete)))
    out = {}
    for key, s in spans.items():
        use = [v for v in s if v[2]] or s
        lo, hi = max(v[0] for v in use), min(v[1] for v in use)
        if hi > lo:
            out[key] = (lo, hi)
    return out


def per_experiment_table(results: Results, aubc_x: AubcX = "round", cost_axis: str = "voxels") -> pd.DataFrame:
    """One row per active-learning run: AUBC (x: ``aubc_x``, where ``cost`` is ``cost_axis``) and final Dice over
    the rounds evaluated so far, and the cost axis's final value."""
    x = _aubc_column(aubc_x, cost_axis)
    rows = []
    evaluated = _evaluated(results)
    ranges = _shared_ranges(results, evaluated, x) if x != "round" else {}
    for e in results.al_experiments:
        df = evaluated[str(e.path)]
        row: dict[str, Any] = {
            "experiment": str(e.path),
            "strategy": e.strategy,
            "seed": e.seed,
            "setting": e.setting,
            "complete": e.complete,
            "rounds_planned": e.rounds_planned,
            "rounds_evaluated": len(e.rounds_evaluated),
            "final_round": int(df["round"].iloc[-1]) if len(df) else -1,
            "aubc": float("nan"),
            "final_dice": float("nan"),
            "final_voxels": float(df["voxels"].iloc[-1]) if len(df) else float("nan"),
            "final_fg_fraction": float(df["fg_fraction"].iloc[-1]) if len(df) else float("nan"),
            "aubc_x": x,
            "final_cost": float(df[cost_axis].iloc[-1]) if len(df) else float("nan"),
        }
        if len(df):
            if x == "round":
                row["aubc"] = _run_aubc(df, x)
            elif (str(e.setting), e.seed) in ranges:
                row["aubc"] = _run_aubc(df, x, ranges[(str(e.setting), e.seed)])
            row["final_dice"] = final_dice(df["dice"].to_numpy())
        rows.append(row)
    cols = [
        "experiment",
        "strategy",
        "seed",
        "setting",
        "complete",
        "rounds_planned",
        "rounds_evaluated",
        "final_round",
        "aubc",
        "final_dice",
        "final_voxels",
        "final_fg_fraction",
        "aubc_x",
        "final_cost",
    ]
    return pd.DataFrame(rows, columns=cols)


def aubc_by_axis(results: Results) -> pd.DataFrame:
    """One row per (active-learning run, cost axis): the run's AUBC with x = that axis over the budget range
    every finished run of its setting and seed covers (:func:`_shared_ranges`), and the axis's final value; NaN
    where the run has no measure of the axis (:data:`alseg.report.results.MEASURED_AXES`) or stops short of the
    range."""
    rows = []
    evaluated = _evaluated(results)
    ranges = {axis: _shared_ranges(results, evaluated, axis) for axis in COST_AXES}
    for e in results.al_experiments:
        df = evaluated[str(e.path)]
        for axis in COST_AXES:
            shared = ranges[axis].get((str(e.setting), e.seed))
            rows.append(
                {
                    "experiment": str(e.path),
                    "strategy": e.strategy,
                    "seed": e.seed,
                    "setting": e.setting,
                    "axis": axis,
                    "aubc": _run_aubc(df, axis, shared) if shared is not None else float("nan"),
                    "final_cost": float(df[axis].iloc[-1]) if len(df) else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=["experiment", "strategy", "seed", "setting", "axis", "aubc", "final_cost"])


def fg_eff_table(results: Results) -> pd.DataFrame:
    """FG-Eff per (setting, strategy), fitted over all seeds and rounds (nnActive).

    x = annotated fraction of the pool's foreground; c = full-data Dice of the setting's dataset;
    x0, d0 = means over the strategy's seeds of x and Dice at the starting budget (round 0).
    """
    rows = []
    rounds = results.al_rounds
    for (setting, strategy), df in rounds.groupby(["setting", "strategy"], sort=True):
        c = results.reference_for_setting(str(setting))
        start = df[df["round"] == 0]
        x0 = float(start["fg_fraction"].mean()) if len(start) else float("nan")
        d0 = float(start["dice"].mean()) if len(start) else float("nan")
        row: dict[str, Any] = {
            "setting": setting,
            "strategy": strategy,
            "fg_eff": float("nan"),
            "fg_eff_stderr": float("nan"),
            "rmse": float("nan"),
            "c": float("nan") if c is None else c,
            "x0": x0,
            "d0": d0,
            "n_points": len(df),
            "reason": None,
        }
        if c is None:
            row["reason"] = "no full-data reference for this dataset"
        elif not len(start):
            row["reason"] = "no evaluated starting round"
        else:
            fit = fit_fg_eff_detailed(df["fg_fraction"].to_numpy(), df["dice"].to_numpy(), c, x0, d0)
            row.update(fg_eff=fit.b, fg_eff_stderr=fit.b_stderr, rmse=fit.rmse, n_points=fit.n_points)
            row["reason"] = fit.reason
        rows.append(row)
    cols = ["setting", "strategy", "fg_eff", "fg_eff_stderr", "rmse", "c", "x0", "d0", "n_points", "reason"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------------
# PPM and rankings
# --------------------------------------------------------------------------------------------------
@dataclass
class PPMResult:
    """Pairwise penalty matrices (plain and Holm) with column means Φ, and every test behind them."""

    matrix: pd.DataFrame
    phi: pd.Series
    matrix_holm: pd.DataFrame
    phi_holm: pd.Series
    tests: pd.DataFrame
    tests_holm: pd.DataFrame
    max_paired: int


def _ppm(results: Results) -> tuple[PPMResult | None, str | None]:
    rounds = results.al_rounds
    if rounds.empty:
        return None, "no evaluated rounds yet"
    strategies = results.strategies
    if len(strategies) < 2:
        return None, f"the pairwise penalty matrix needs at least two strategies; found {len(strategies)}"
    table = rounds[["strategy", "seed", "setting", "round", "dice"]].rename(columns={"round": "budget"})
    tests = pairwise_penalty_tests(table, alpha=ALPHA, correction="none", strategies=strategies)
    max_paired = int(tests["n"].max()) if len(tests) else 0
    if max_paired < 2:
        return None, (
            "no paired t-test is possible: the pairwise penalty matrix needs at least two strategies run with "
            "at least two common seeds (runs are paired by seed value)"
        )
    m, phi = pairwise_penalty_matrix(table, alpha=ALPHA, correction="none", strategies=strategies)
    mh, phih = pairwise_penalty_matrix(table, alpha=ALPHA, correction="holm", strategies=strategies)
    tests_holm = pairwise_penalty_tests(table, alpha=ALPHA, correction="holm", strategies=strategies)
    m, phi = _mask_untested(m, tests)
    mh, phih = _mask_untested(mh, tests)
    return PPMResult(m, phi, mh, phih, tests, tests_holm, max_paired), None


def _mask_untested(matrix: pd.DataFrame, tests: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """NaN where a pair was never testable (fewer than two common seeds at every budget), Φ without them.

    A pair that could not be tested has no evidence either way; counting it as 0 wins would make a strategy
    run with a single seed look never beaten.
    """
    tested = {(r.strategy_i, r.strategy_j) for r in tests.itertuples(index=False) if r.n >= 2}
    tested |= {(j, i) for i, j in tested}
    out = matrix.copy()
    for i in out.index:
        for j in out.columns:
            if i != j and (i, j) not in tested:
                out.loc[i, j] = np.nan
    off = out.to_numpy(dtype=float).copy()
    np.fill_diagonal(off, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        phi = pd.Series(np.nanmean(off, axis=0), index=pd.Index(out.columns, name="strategy"), name="phi")
    return out, phi


@dataclass
class RankingResult:
    """Per-setting ranks (1 = best) of AUBC, final Dice and FG-Eff, and Friedman/Nemenyi where possible."""

    ranks: pd.DataFrame  # rows: (metric, strategy); columns: settings + mean rank
    friedman: dict[str, Any] = field(default_factory=dict)  # metric -> FriedmanResult
    notes: list[str] = field(default_factory=list)


def _rankings(per_exp: pd.DataFrame, fg_eff: pd.DataFrame, n_settings: int) -> RankingResult | None:
    scores: dict[str, pd.DataFrame] = {}
    for metric in ("aubc", "final_dice"):
        if len(per_exp):
            scores[metric] = per_exp.pivot_table(index="strategy", columns="setting", values=metric, aggfunc="mean")
    if len(fg_eff) and fg_eff["fg_eff"].notna().any():
        scores["fg_eff"] = fg_eff.pivot_table(index="strategy", columns="setting", values="fg_eff", aggfunc="mean")
    if not scores:
        return None
    parts = []
    out = RankingResult(pd.DataFrame())
    for metric, sc in scores.items():
        ranks = sc.rank(axis=0, ascending=False, method="average")
        ranks["mean rank"] = ranks.mean(axis=1)
        ranks.insert(0, "metric", {"aubc": "AUBC", "final_dice": "Final Dice", "fg_eff": "FG-Eff"}[metric])
        parts.append(ranks.reset_index())
        complete = sc.dropna(axis=1, how="any")
        if n_settings < 2:
            continue
        if sc.shape[0] < 3:
            out.notes.append(f"{metric}: the Friedman test needs at least three strategies; found {sc.shape[0]}")
            continue
        if complete.shape[1] < 2:
            out.notes.append(f"{metric}: fewer than two settings have a value for every strategy")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.friedman[metric] = friedman_nemenyi(complete)
    if n_settings < 2:
        out.notes.insert(
            0,
            f"the Friedman test with Nemenyi post-hoc needs at least two settings; found {n_settings} "
            "(ranks within the setting shown)",
        )
    out.ranks = pd.concat(parts, ignore_index=True)
    return out


# --------------------------------------------------------------------------------------------------
# the whole comparison
# --------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Everything the report, the CSV export and ``alseg compare`` show."""

    results: Results
    baseline: str | None
    aubc_x: AubcX
    per_experiment: pd.DataFrame
    fg_eff: pd.DataFrame
    summary: pd.DataFrame
    ppm: PPMResult | None
    ppm_note: str | None
    rankings: RankingResult | None
    notes: list[str] = field(default_factory=list)
    #: the cost axis asked for (``--cost``) and the one used (``voxels`` when it is unavailable: see the notes)
    cost: str = "voxels"
    cost_axis: str = "voxels"
    #: AUBC and final cost of every run against every cost axis (:func:`aubc_by_axis`)
    by_axis: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def aubc_column(self) -> str:
        """The column of ``results.rounds`` AUBC is computed against: ``round`` or a cost axis."""
        return _aubc_column(self.aubc_x, self.cost_axis)


def _summary(per_exp: pd.DataFrame, fg_eff: pd.DataFrame, baseline: str | None, ppm: PPMResult | None) -> pd.DataFrame:
    """One row per (setting, strategy): mean ± std over seeds of AUBC and final Dice vs the baseline."""
    if per_exp.empty:
        return pd.DataFrame()
    base = baseline if baseline is not None else object()
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for metric in SUMMARY_METRICS:
        table = per_exp[["strategy", "seed", "setting", metric]]
        for r in mean_std_table(table, metric, baseline=base, alpha=ALPHA, by=["setting"]):
            key = (r["setting"], r["strategy"])
            row = merged.setdefault(key, {"setting": r["setting"], "strategy": r["strategy"]})
            row[f"{metric}_mean"] = r["mean"]
            row[f"{metric}_std"] = r["std"]
            row[f"{metric}_n"] = r["n"]
            row[f"{metric}_diff"] = r["mean_diff"]
            row[f"{metric}_p"] = r["p_value"]
            row[f"{metric}_mark"] = significance_mark(r)
    for (setting, strategy), row in merged.items():
        runs = per_exp[(per_exp["setting"] == setting) & (per_exp["strategy"] == strategy)]
        row["n_seeds"] = len(runs)
        row["n_running"] = int((~runs["complete"].astype(bool)).sum())
        row["rounds"] = f"{int(runs['rounds_evaluated'].min())}-{int(runs['rounds_evaluated'].max())}"
        if runs["rounds_evaluated"].min() == runs["rounds_evaluated"].max():
            row["rounds"] = str(int(runs["rounds_evaluated"].min()))
        fe = fg_eff[(fg_eff["setting"] == setting) & (fg_eff["strategy"] == strategy)]
        row["fg_eff"] = float(fe["fg_eff"].iloc[0]) if len(fe) else float("nan")
        row["fg_eff_stderr"] = float(fe["fg_eff_stderr"].iloc[0]) if len(fe) else float("nan")
        row["phi"] = float(ppm.phi.get(strategy, float("nan"))) if ppm is not None else float("nan")
        row["phi_holm"] = float(ppm.phi_holm.get(strategy, float("nan"))) if ppm is not None else float("nan")
        row["baseline"] = strategy == baseline
    cols = [
        "setting",
        "strategy",
        "baseline",
        "n_seeds",
        "n_running",
        "rounds",
        *[f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std", "n", "diff", "p", "mark")],
        "fg_eff",
        "fg_eff_stderr",
        "phi",
        "phi_holm",
    ]
    return pd.DataFrame(list(merged.values()), columns=cols)


def compare(
    results: Results, baseline: str | None = None, aubc_x: AubcX | None = None, cost: CostAxis | None = None
) -> Comparison:
    """Compute every table of the report from ``results``.

    ``cost``: the cumulative cost the learning curves are drawn against (default ``voxels``); ``aubc_x``: AUBC's
    x, ``round`` (default), ``cost`` (the cost axis; the default when ``cost`` is given) or ``voxels``. A cost
    axis some run has no measure of falls back to ``voxels`` for every run, with a note.
    """
    if aubc_x is None:
        aubc_x = "round" if cost is None else "cost"
    cost_axis, cost_note = resolve_cost_axis(results, cost or "voxels")
    strategies = results.strategies
    base = choose_baseline(strategies, baseline)
    notes = list(results.problems)
    if cost_note is not None:
        notes.append(cost_note)
    if base is None and strategies:
        notes.append("no random baseline among the strategies: no significance marks (choose one with --baseline)")
    per_exp = per_experiment_table(results, aubc_x, cost_axis)
    fg = fg_eff_table(results)
    ppm, ppm_note = _ppm(results)
    summary = _summary(per_exp, fg, base, ppm)
    rankings = _rankings(per_exp, fg, len(results.settings))
    if not results.references:
        notes.append("no full-data reference given: FG-Eff needs one (alseg run CONFIG --out DIR --full-data)")
    running = [e for e in results.al_experiments if not e.complete]
    if running:
        notes.append(
            f"{len(running)} of {len(results.al_experiments)} runs are not finished; their AUBC over the round "
            "index and final Dice use the rounds evaluated so far; on a cost axis a run that has not reached the "
            "range of the finished runs of its seed has no AUBC and is left out of the means"
        )
    return Comparison(
        results,
        base,
        aubc_x,
        per_exp,
        fg,
        summary,
        ppm,
        ppm_note,
        rankings,
        notes,
        cost=cost or "voxels",
        cost_axis=cost_axis,
        by_axis=aubc_by_axis(results),
    )


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "–"
    if not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_csv(comparison: Comparison, out_dir: Path) -> list[Path]:
    """Write the report's tables as CSV files into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = comparison.results
    tables: dict[str, pd.DataFrame] = {
        "experiments": pd.DataFrame(
            [
                {
                    "experiment": str(e.path),
                    "strategy": e.strategy,
                    "seed": e.seed,
                    "setting": e.setting,
                    "full_data": e.full_data,
                    "rounds_planned": e.rounds_planned,
                    "rounds_evaluated": len(e.rounds_evaluated),
                    "complete": e.complete,
                }
                for e in res.experiments
            ]
        ),
        "rounds": res.rounds,
        "per_experiment": comparison.per_experiment,
        "fg_eff": comparison.fg_eff,
        "summary": comparison.summary,
        "aubc_by_cost_axis": comparison.by_axis,
    }
    if len(res.annotators):
        tables["annotators"] = res.annotators
    if comparison.ppm is not None:
        tables["ppm"] = _ppm_with_phi(comparison.ppm.matrix, comparison.ppm.phi)
        tables["ppm_holm"] = _ppm_with_phi(comparison.ppm.matrix_holm, comparison.ppm.phi_holm)
        tables["ppm_tests"] = comparison.ppm.tests_holm.rename(columns={"pvalue_adj": "pvalue_holm"}).assign(
            winner_plain=comparison.ppm.tests["winner"].to_numpy(),
        )
    if comparison.rankings is not None:
        tables["rankings"] = comparison.rankings.ranks
        for metric, fr in comparison.rankings.friedman.items():
            tables[f"nemenyi_{metric}"] = fr.nemenyi.reset_index(names="strategy")
    written = []
    for name, df in tables.items():
        path = out_dir / f"{name}.csv"
        df.to_csv(path, index=False)
        written.append(path)
    return written


def _ppm_with_phi(matrix: pd.DataFrame, phi: pd.Series) -> pd.DataFrame:
    df = matrix.copy()
    df.loc["Φ (column mean)"] = phi.to_numpy()
    return df.reset_index(names="winner \\ loser")
