"""Loading saved results into tables, pairing by seed value, per-run summaries, FG-Eff, PPM and CSV export."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from report_helpers import (
    ROUNDS,
    RUNNING,
    SEEDS,
    STRATEGIES,
    copy_without_metrics,
    report_experiments,
    shared_range_aubc,
)
from scipy import stats as scipy_stats

from alseg.evaluation.curves import aubc
from alseg.report.compare import choose_baseline, compare, write_csv
from alseg.report.results import ReportError, load_results


@pytest.fixture
def exps(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return report_experiments(_synthetic_template, tmp_path_factory)


def test_load_results_tables(exps: dict[str, Any]) -> None:
    res = load_results([exps["root"]])  # a folder of experiments stands for all of them
    assert len(res.experiments) == len(STRATEGIES) * len(SEEDS) + 2
    assert res.strategies == sorted([*STRATEGIES, RUNNING])
    assert len(res.settings) == 1
    (ref,) = res.references
    assert ref.full_data and ref.strategy == "full data" and ref.path.name == "full_data"
    rounds = res.rounds
    assert len(rounds) == len(STRATEGIES) * len(SEEDS) * ROUNDS + 2 + 1
    assert {"dice", "dice2d", "hd95", "voxels", "fg_voxels", "fg_fraction", "dice_1", "dice_2", "hd95_1"} <= set(
        rounds.columns
    )
    al = res.al_rounds
    assert not al["full_data"].any()
    for _, df in al.groupby("experiment"):
        df = df.sort_values("round")
        assert (np.diff(df["voxels"]) > 0).all() and (np.diff(df["fg_voxels"]) >= 0).all()
        assert df["regions"].tolist() == [4 * (r + 1) for r in df["round"]]
        assert df["dice"].between(0, 1).all()
    # the reference annotates the whole pool
    ref_rows = rounds[rounds["full_data"]]
    assert ref_rows["fg_fraction"].tolist() == [1.0]
    assert res.reference_for_setting(res.settings[0]) == pytest.approx(float(ref_rows["dice"].iloc[0]))
    # the running experiment: two of three rounds evaluated
    running = next(e for e in res.experiments if e.strategy == RUNNING)
    assert running.rounds_evaluated == (0, 1) and not running.complete and running.rounds_planned == ROUNDS
    # regions: the strategy's and the shared starting budget's
    regs = res.regions
    assert set(regs[regs["round"] == 0]["query_strategy"]) == {"starting_budget", "full_data"}
    assert len(regs[(regs["strategy"] == "random") & (regs["seed"] == 0)]) == 4 * ROUNDS


def test_load_results_reads_only(exps: dict[str, Any], tmp_path: Path) -> None:
    """The report never writes into an experiment."""
    src = exps["runs"][("random", 0)]
    copy = tmp_path / "ro"
    shutil.copytree(src, copy)

    def files() -> dict[str, bytes]:  # SQLite's shared-memory index (-shm) is no data
        return {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and not p.name.endswith("-shm")}

    before = files()
    res = load_results([copy])
    assert len(res.rounds) == ROUNDS
    assert files() == before


def test_pairs_by_seed_value_not_order(exps: dict[str, Any]) -> None:
    runs = exps["runs"]
    ordered = [runs[(s, seed)] for s in STRATEGIES for seed in SEEDS]
    shuffled = [runs[("random", 1)], runs[("random_fg33", 0)], runs[("random", 0)], runs[("random_fg33", 1)]]
    a = compare(load_results(ordered))
    b = compare(load_results(shuffled))
    assert a.ppm is not None and b.ppm is not None
    cols = ["budget", "strategy_i", "strategy_j", "n", "mean_diff", "pvalue"]
    pd.testing.assert_frame_equal(a.ppm.tests[cols], b.ppm.tests[cols])
    # the paired difference at each round is the mean over seeds of (fg33 - random) of the same seed
    per_exp = a.per_experiment.set_index(["strategy", "seed"])
    rounds = load_results(ordered).al_rounds.set_index(["strategy", "seed", "round"])["dice"]
    for t in a.ppm.tests.itertuples(index=False):
        assert t.n == len(SEEDS)
        diffs = [rounds[(t.strategy_i, s, t.budget)] - rounds[(t.strategy_j, s, t.budget)] for s in SEEDS]
        assert t.mean_diff == pytest.approx(np.mean(diffs))
    assert set(per_exp.index) == {(s, seed) for s in STRATEGIES for seed in SEEDS}


def test_per_experiment_aubc_and_final_dice(exps: dict[str, Any]) -> None:
    res = load_results([exps["root"]])
    cmp = compare(res)
    for row in cmp.per_experiment.itertuples(index=False):
        curve = res.rounds[res.rounds["experiment"] == row.experiment].sort_values("round")
        assert row.aubc == pytest.approx(aubc(curve["dice"].to_numpy()))
        assert row.final_dice == pytest.approx(float(curve["dice"].iloc[-1]))
        assert row.final_round == int(curve["round"].iloc[-1])
    vox = compare(res, aubc_x="voxels").per_experiment
    for row in vox.itertuples(index=False):
        assert row.aubc == pytest.approx(shared_range_aubc(res, row.experiment, "voxels"), nan_ok=True)
    assert vox["aubc"].notna().sum() >= len(STRATEGIES) * len(SEEDS)  # every finished run is measured
    with pytest.raises(ReportError, match="aubc_x"):
        compare(res, aubc_x="regions")  # type: ignore[arg-type]


def test_summary_fg_eff_and_baseline(exps: dict[str, Any]) -> None:
    res = load_results([exps["root"]])
    cmp = compare(res)
    assert cmp.baseline == "random"
    s = cmp.summary.set_index("strategy")
    assert bool(s.loc["random", "baseline"]) and not bool(s.loc["random_fg33", "baseline"])
    assert s.loc["random", "n_seeds"] == 2 and s.loc[RUNNING, "n_running"] == 1
    finals = cmp.per_experiment[cmp.per_experiment["strategy"] == "random_fg33"]["final_dice"]
    assert s.loc["random_fg33", "final_dice_mean"] == pytest.approx(finals.mean())
    assert s.loc["random_fg33", "final_dice_std"] == pytest.approx(finals.std(ddof=1))
    # the mark, from a paired t-test over the seeds computed here with scipy
    pe = cmp.per_experiment
    ours = pe[pe["strategy"] == "random_fg33"].set_index("seed")["final_dice"]
    base = pe[pe["strategy"] == "random"].set_index("seed")["final_dice"]
    seeds = ours.index.intersection(base.index)
    assert len(seeds) == 2
    p = float(scipy_stats.ttest_rel(ours[seeds], base[seeds]).pvalue)
    diff = float((ours[seeds] - base[seeds]).mean())
    want = ("▲" if diff > 0 else "▼") if p < 0.05 else ""
    assert s.loc["random_fg33", "final_dice_mark"] == want
    assert math.isnan(s.loc["random", "aubc_p"])  # the baseline is not tested against itself
    fg = cmp.fg_eff.set_index("strategy")
    c = res.reference_for_setting(res.settings[0])
    assert fg.loc["random", "c"] == pytest.approx(c)
    rising = 0
    for strategy in STRATEGIES:
        assert fg.loc[strategy, "reason"] is None and math.isfinite(fg.loc[strategy, "fg_eff"])
        curves = res.al_rounds[res.al_rounds["strategy"] == strategy].groupby("round")["dice"].mean()
        if curves.iloc[-1] > curves.iloc[0]:  # Dice rises with annotation: the fitted rate is positive
            rising += 1
            assert fg.loc[strategy, "fg_eff"] > 0
    assert rising > 0
    # PPM: Φ of strategies with a single seed is undefined, not "never beaten"
    assert cmp.ppm is not None
    assert math.isnan(cmp.ppm.phi[RUNNING]) and math.isfinite(cmp.ppm.phi["random"])
    # baseline choice
    assert choose_baseline(["entropy", "random_fg33", "random_fg66"]) == "random_fg33"
    assert choose_baseline(["entropy", "bald"]) is None
    with pytest.raises(ReportError, match="not among the strategies"):
        compare(res, baseline="nope")
    assert compare(res, baseline="random_fg33").baseline == "random_fg33"


def test_missing_pieces(exps: dict[str, Any]) -> None:
    """One seed per strategy: no PPM test possible, said so; no reference: FG-Eff says why."""
    runs = exps["runs"]
    cmp = compare(load_results([runs[("random", 0)], runs[("random_fg33", 0)]]))
    assert cmp.ppm is None and "two common seeds" in (cmp.ppm_note or "")
    assert cmp.fg_eff["fg_eff"].isna().all()
    assert set(cmp.fg_eff["reason"]) == {"no full-data reference for this dataset"}
    assert any("full-data reference" in n for n in cmp.notes)
    single = compare(load_results([runs[("random", 0)]]))
    assert single.ppm is None and "at least two strategies" in (single.ppm_note or "")
    # the same run listed twice counts once
    twice = load_results([runs[("random", 0)], runs[("random", 0)]])
    assert len(twice.experiments) == 1


def test_duplicate_run_and_errors(exps: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "copy_of_random_seed0"
    shutil.copytree(exps["runs"][("random", 0)], copy)
    res = load_results([exps["runs"][("random", 0)], copy])
    assert len(res.experiments) == 1 and "repeats strategy 'random', seed 0" in res.problems[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not an alseg experiment"):
        load_results([tmp_path / "empty"])
    with pytest.raises(ReportError, match="does not exist"):
        load_results([tmp_path / "missing"])


def test_experiment_without_metrics(exps: dict[str, Any], tmp_path: Path) -> None:
    """An experiment whose first round is not evaluated yet loads with no rows."""
    copy = copy_without_metrics(exps["runs"][("random", 1)], tmp_path / "fresh")
    res = load_results([copy])
    assert res.rounds.empty and res.experiments[0].rounds_evaluated == ()
    cmp = compare(res)
    assert cmp.ppm is None and cmp.per_experiment["aubc"].isna().all()


def test_write_csv(exps: dict[str, Any], tmp_path: Path) -> None:
    cmp = compare(load_results([exps["root"]]))
    files = {p.name for p in write_csv(cmp, tmp_path / "csv")}
    assert {
        "experiments.csv",
        "rounds.csv",
        "per_experiment.csv",
        "fg_eff.csv",
        "summary.csv",
        "ppm.csv",
        "ppm_holm.csv",
        "ppm_tests.csv",
        "rankings.csv",
    } <= files
    rounds = pd.read_csv(tmp_path / "csv" / "rounds.csv")
    assert len(rounds) == len(cmp.results.rounds)
    summary = pd.read_csv(tmp_path / "csv" / "summary.csv")
    assert set(summary["strategy"]) == set(cmp.results.strategies)
    ppm = pd.read_csv(tmp_path / "csv" / "ppm.csv")
    assert ppm.iloc[-1, 0] == "Φ (column mean)" and len(ppm) == len(cmp.results.strategies) + 1
