"""Comparing strategies over seeds and settings (definitions: shared/reference/evaluation.md).

Input tables are tidy: one row per (strategy, seed, setting, budget) with a metric column (default
``"dice"``), given as a pandas DataFrame or a list of dicts. ``setting`` is optional (one setting assumed
when absent). Runs are always paired by seed *value*, never by row order.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "FriedmanResult",
    "PairedTest",
    "friedman_nemenyi",
    "mean_std_table",
    "paired_test",
    "pairwise_penalty_matrix",
    "pairwise_penalty_tests",
    "strategy_setting_scores",
    "to_frame",
]

Correction = Literal["none", "holm"]
TableLike = pd.DataFrame | Sequence[Mapping[str, Any]]

_SINGLE_SETTING = "__all__"


def to_frame(table: TableLike, required: Sequence[str] = ()) -> pd.DataFrame:
    """DataFrame copy of a tidy table; checks the required columns."""
    df = table.copy() if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; has {list(df.columns)}")
    return df


def _with_setting(df: pd.DataFrame) -> pd.DataFrame:
    if "setting" not in df.columns:
        df = df.assign(setting=_SINGLE_SETTING)
    return df


def _check_unique(df: pd.DataFrame, keys: Sequence[str]) -> None:
    dup = df.duplicated(subset=list(keys), keep=False)
    if dup.any():
        example = df.loc[dup, list(keys)].head(3).to_dict("records")
        raise ValueError(f"duplicate rows for {list(keys)} (pairing by seed needs one value each): {example}")


def _strategy_order(df: pd.DataFrame, strategies: Sequence[Hashable] | None) -> list[Hashable]:
    present = list(pd.unique(df["strategy"]))
    if strategies is None:
        try:
            return sorted(present)
        except TypeError:
            return present
    unknown = [s for s in present if s not in strategies]
    if unknown:
        raise ValueError(f"strategies {unknown} are in the table but not in `strategies`")
    return list(strategies)


# --------------------------------------------------------------------------------------------------
# paired test
# --------------------------------------------------------------------------------------------------
class PairedTest(NamedTuple):
    """Paired test of x − y over the seeds present in both (``seeds``)."""

    mean_diff: float
    pvalue: float
    n: int
    seeds: tuple[Hashable, ...]


def paired_test(
    x_by_seed: Mapping[Hashable, float] | pd.Series,
    y_by_seed: Mapping[Hashable, float] | pd.Series,
    test: Literal["ttest", "wilcoxon"] = "ttest",
) -> PairedTest:
    """Two-sided paired test of x − y, pairing by seed value (only seeds with finite values in both).

    p is NaN when fewer than 2 pairs or when all differences are zero.
    """
    xs = pd.Series(x_by_seed, dtype=np.float64)
    ys = pd.Series(y_by_seed, dtype=np.float64)
    if not xs.index.is_unique or not ys.index.is_unique:
        raise ValueError("paired_test: seeds must be unique")
    common = [s for s in xs.index if s in ys.index and np.isfinite(xs[s]) and np.isfinite(ys[s])]
    try:
        common = sorted(common)
    except TypeError:
        pass
    if not common:
        return PairedTest(float("nan"), float("nan"), 0, ())
    d = xs.loc[common].to_numpy() - ys.loc[common].to_numpy()
    mean_diff = float(d.mean())
    p = float("nan")
    if len(common) >= 2 and np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if test == "ttest":
                p = float(stats.ttest_1samp(d, 0.0).pvalue)
            elif test == "wilcoxon":
                p = float(stats.wilcoxon(d).pvalue)
            else:
                raise ValueError(f"unknown test {test!r}")
    return PairedTest(mean_diff, p, len(common), tuple(common))


# --------------------------------------------------------------------------------------------------
# pairwise penalty matrix
# --------------------------------------------------------------------------------------------------
def pairwise_penalty_tests(
    table: TableLike,
    alpha: float = 0.05,
    correction: Correction = "none",
    metric: str = "dice",
    strategies: Sequence[Hashable] | None = None,
) -> pd.DataFrame:
    """All PPM tests: one row per (setting, budget, unordered strategy pair).

    Columns: setting, budget, strategy_i, strategy_j, n (paired seeds), mean_diff (i − j), pvalue,
    pvalue_adj (Holm over all tests of the setting, or = pvalue), winner (i, j or None), weight
    (1 / number of budget points of the setting). The ordered tests (i, j) and (j, i) are the same
    two-sided test, so each is listed (and, for Holm, counted) once.
    """
    if correction not in ("none", "holm"):
        raise ValueError(f"correction must be 'none' or 'holm', got {correction!r}")
    df = _with_setting(to_frame(table, ("strategy", "seed", "budget", metric)))
    _check_unique(df, ("setting", "strategy", "seed", "budget"))
    order = _strategy_order(df, strategies)
    rows: list[dict[str, Any]] = []
    for setting, sdf in df.groupby("setting", sort=False):
        budgets = list(pd.unique(sdf["budget"]))
        weight = 1.0 / len(budgets)
        setting_rows: list[dict[str, Any]] = []
        for budget in budgets:
            wide = sdf[sdf["budget"] == budget].pivot(index="seed", columns="strategy", values=metric)
            for si, sj in itertools.combinations(order, 2):
                if si not in wide.columns or sj not in wide.columns:
                    continue
                t = paired_test(wide[si], wide[sj])
                setting_rows.append(
                    {
                        "setting": setting,
                        "budget": budget,
                        "strategy_i": si,
                        "strategy_j": sj,
                        "n": t.n,
                        "mean_diff": t.mean_diff,
                        "pvalue": t.pvalue,
                        "weight": weight,
                    }
                )
        p = np.array([r["pvalue"] for r in setting_rows], dtype=np.float64)
        p_adj = p.copy()
        finite = np.isfinite(p)
        if correction == "holm" and finite.any():
            from statsmodels.stats.multitest import multipletests

            p_adj[finite] = multipletests(p[finite], alpha=alpha, method="holm")[1]
        for r, pa in zip(setting_rows, p_adj, strict=True):
            r["pvalue_adj"] = float(pa)
            winner = None
            if math.isfinite(pa) and pa < alpha:
                if r["mean_diff"] > 0:
                    winner = r["strategy_i"]
                elif r["mean_diff"] < 0:
                    winner = r["strategy_j"]
            r["winner"] = winner
        rows.extend(setting_rows)
    cols = [
        "setting",
        "budget",
        "strategy_i",
        "strategy_j",
        "n",
        "mean_diff",
        "pvalue",
        "pvalue_adj",
        "winner",
        "weight",
    ]
    return pd.DataFrame(rows, columns=cols)


def pairwise_penalty_matrix(
    table: TableLike,
    alpha: float = 0.05,
    correction: Correction = "none",
    metric: str = "dice",
    strategies: Sequence[Hashable] | None = None,
) -> tuple[pd.DataFrame, pd.Series]:
    """Pairwise penalty matrix P and column means Φ.

    Per setting: for every budget point and pair, a two-sided paired t-test over seeds (paired by seed
    value); when the mean difference Dice_i − Dice_j > 0 and p < alpha (Holm-adjusted p with
    ``correction="holm"``, over all tests of the setting), ``P[i, j] += 1/(number of budget points)``.
    Settings merge by averaging (over the settings in which both strategies occur; NaN if none).
    Rows/columns follow ``strategies`` (default: sorted). ``P[i, j]`` = how often i beats j; diagonal 0.
    Φ_j = mean of column j over i ≠ j (how often j is beaten; lower is better).
    """
    df = _with_setting(to_frame(table, ("strategy", "seed", "budget", metric)))
    order = _strategy_order(df, strategies)
    tests = pairwise_penalty_tests(df, alpha=alpha, correction=correction, metric=metric, strategies=order)
    idx = {s: k for k, s in enumerate(order)}
    k = len(order)
    total = np.zeros((k, k))
    count = np.zeros((k, k))
    for setting, sdf in df.groupby("setting", sort=False):
        present = [idx[s] for s in pd.unique(sdf["strategy"])]
        mat = np.zeros((k, k))
        for r in tests[tests["setting"] == setting].itertuples(index=False):
            if pd.isna(r.winner):
                continue
            loser = r.strategy_j if r.winner == r.strategy_i else r.strategy_i
            mat[idx[r.winner], idx[loser]] += r.weight
        sel = np.ix_(present, present)
        total[sel] += mat[sel]
        count[sel] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        merged = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    np.fill_diagonal(merged, 0.0)
    matrix = pd.DataFrame(merged, index=pd.Index(order, name="winner"), columns=pd.Index(order, name="loser"))
    off = merged.copy()
    np.fill_diagonal(off, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        phi_values = np.nanmean(off, axis=0) if k > 1 else np.full(k, np.nan)
    phi = pd.Series(phi_values, index=pd.Index(order, name="strategy"), name="phi")
    return matrix, phi


# --------------------------------------------------------------------------------------------------
# Friedman / Nemenyi
# --------------------------------------------------------------------------------------------------
class FriedmanResult(NamedTuple):
    statistic: float
    pvalue: float
    nemenyi: pd.DataFrame  # strategy x strategy p-values
    mean_ranks: pd.Series  # rank 1 = best
    n_settings: int


def strategy_setting_scores(table: TableLike, value: str, agg: str = "mean") -> pd.DataFrame:
    """Strategy × setting table of ``value`` aggregated over seeds (e.g. AUBC, final Dice, FG-Eff)."""
    df = _with_setting(to_frame(table, ("strategy", value)))
    return df.pivot_table(index="strategy", columns="setting", values=value, aggfunc=agg)


def friedman_nemenyi(
    scores: pd.DataFrame | Mapping[Hashable, Mapping[Hashable, float]],
    higher_is_better: bool = True,
) -> FriedmanResult:
    """Friedman test over settings (blocks) with Nemenyi post-hoc.

    ``scores``: strategy × setting (DataFrame with strategies as index, or ``{strategy: {setting: v}}``).
    Settings with a missing value are dropped (with a warning). Ranks per setting: 1 = best
    (highest score when ``higher_is_better``), ties averaged.
    """
    import scikit_posthocs as sp

    df = pd.DataFrame(scores) if not isinstance(scores, pd.DataFrame) else scores
    if not isinstance(scores, pd.DataFrame):
        df = df.T  # {strategy: {setting: v}} -> rows = strategies
    df = df.astype(np.float64)
    complete = df.notna().all(axis=0)
    if not complete.all():
        warnings.warn(
            f"friedman_nemenyi: dropping settings with missing values: {list(df.columns[~complete])}",
            RuntimeWarning,
            stacklevel=2,
        )
        df = df.loc[:, complete]
    k, n = df.shape
    if k < 3:
        raise ValueError(f"Friedman test needs at least 3 strategies, got {k}")
    if n < 2:
        raise ValueError(f"Friedman test needs at least 2 complete settings, got {n}")
    blocks = df.T.to_numpy()  # settings x strategies
    stat, p = stats.friedmanchisquare(*[blocks[:, j] for j in range(k)])
    signed = -blocks if higher_is_better else blocks
    ranks = np.apply_along_axis(stats.rankdata, 1, signed)
    mean_ranks = pd.Series(ranks.mean(axis=0), index=df.index, name="mean_rank")
    nem = sp.posthoc_nemenyi_friedman(blocks)
    nem = pd.DataFrame(nem.to_numpy(), index=df.index, columns=df.index)
    return FriedmanResult(float(stat), float(p), nem, mean_ranks, int(n))


# --------------------------------------------------------------------------------------------------
# mean ± std table
# --------------------------------------------------------------------------------------------------
def mean_std_table(
    table: TableLike,
    metric: str,
    baseline: Hashable,
    alpha: float = 0.05,
    by: Sequence[str] | None = None,
    test: Literal["ttest", "wilcoxon"] = "ttest",
    strategies: Sequence[Hashable] | None = None,
) -> list[dict[str, Any]]:
    """Mean ± std over seeds per strategy (and per ``by`` group), with a paired test vs ``baseline``.

    ``by`` defaults to ``["setting"]`` when the table has that column. Within a group each
    (strategy, seed) must occur once (aggregate budgets first, or add ``"budget"`` to ``by``).
    Rows: group keys, strategy, mean, std (ddof=1; NaN for n=1), n, n_paired, mean_diff (vs baseline),
    p_value (two-sided paired test over the seeds shared with the baseline), significant (p < alpha).
    The baseline's own row has p_value NaN and significant False.
    """
    df = to_frame(table, ("strategy", "seed", metric))
    groups = list(by) if by is not None else (["setting"] if "setting" in df.columns else [])
    _check_unique(df, [*groups, "strategy", "seed"])
    order = _strategy_order(df, strategies)
    order = [baseline, *[s for s in order if s != baseline]]
    out: list[dict[str, Any]] = []
    grouped = df.groupby(groups, sort=False) if groups else [((), df)]
    for key, gdf in grouped:
        key_t = key if isinstance(key, tuple) else (key,)
        keys = dict(zip(groups, key_t, strict=True))
        by_strategy = {s: g.set_index("seed")[metric].astype(np.float64) for s, g in gdf.groupby("strategy")}
        base = by_strategy.get(baseline)
        for s in order:
            if s not in by_strategy:
                continue
            v = by_strategy[s]
            vals = v[np.isfinite(v)]
            row: dict[str, Any] = {
                **keys,
                "strategy": s,
                "mean": float(vals.mean()) if len(vals) else float("nan"),
                "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
                "n": len(vals),
            }
            if s == baseline or base is None:
                row.update(n_paired=0, mean_diff=float("nan"), p_value=float("nan"), significant=False)
            else:
                t = paired_test(v, base, test=test)
                row.update(
                    n_paired=t.n,
                    mean_diff=t.mean_diff,
                    p_value=t.pvalue,
                    significant=bool(math.isfinite(t.pvalue) and t.pvalue < alpha),
                )
            out.append(row)
    return out
