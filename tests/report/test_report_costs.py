"""The report against every cost axis (voxels, foreground voxels, corrected voxels, strokes), its fallback when a
run has regions without correction measures, and the per-annotator table of runs labelled by people.

Expected numbers are summed here by hand from each experiment's SQLite file."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from report_helpers import ROUNDS, RUNNING, STRATEGIES, noisy_factory, report_experiments, shared_range_aubc
from typer.testing import CliRunner

from alseg.cli import app
from alseg.loop.drivers import advance_experiment, run_experiment
from alseg.oracle.importer import import_labels
from alseg.report.compare import compare
from alseg.report.html import SECTIONS, build_report
from alseg.report.plots import learning_curves_figure, strategy_colors
from alseg.report.results import ReportError, load_results
from alseg.store.layout import DB_FILE
from conftest import TESTS_DIR, make_config

sys.path.insert(0, str(TESTS_DIR / "oracle"))
from annotator import annotate

IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
AXES = ("voxels", "fg_voxels", "corrected_voxels", "strokes")


@pytest.fixture
def exps(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return report_experiments(_synthetic_template, tmp_path_factory)


def _sections(page: str) -> dict[str, str]:
    out = {}
    for sid, _ in SECTIONS:
        m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
        assert m is not None, f"section {sid} missing"
        out[sid] = m.group(1)
    return out


def _hand_sums(exp: Path) -> dict[int, tuple[int, int]]:
    """``{evaluated round: (corrected voxels, strokes)}`` of the regions annotated up to it, summed with sqlite3."""
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        rounds = [r for (r,) in conn.execute("SELECT round FROM metrics ORDER BY round")]
        out = {}
        for r in rounds:
            cv, st = conn.execute(
                "SELECT SUM(c.corrected_voxels), SUM(c.strokes) FROM regions g JOIN region_costs c "
                "ON c.region_id = g.id WHERE g.status = 'annotated' AND g.round <= ?",
                (r,),
            ).fetchone()
            out[r] = (int(cv), int(st))
        return out
    finally:
        conn.close()


def _curve(res: Any, exp: Path) -> pd.DataFrame:
    return res.rounds[res.rounds["experiment"] == str(exp)].sort_values("round")


# --------------------------------------------------------------------------- the rounds table
def test_rounds_hold_cumulative_correction_measures(exps: dict[str, Any]) -> None:
    res = load_results([exps["root"]])
    assert {"corrected_voxels", "strokes"} <= set(res.rounds.columns)
    for e in res.experiments:
        curve = _curve(res, e.path)
        want = _hand_sums(e.path)
        assert e.unmeasured_regions == 0
        assert curve["round"].tolist() == sorted(want)
        assert curve["corrected_voxels"].tolist() == [want[r][0] for r in sorted(want)]
        assert curve["strokes"].tolist() == [want[r][1] for r in sorted(want)]
    al = res.al_rounds
    assert (al["corrected_voxels"] > 0).all() and (al["strokes"] > 0).all()
    # the model predicts some foreground as background, so later rounds correct fewer voxels than they annotate
    later = al[al["round"] > 0]
    assert (later["corrected_voxels"] < later["fg_voxels"]).any()


def test_a_run_without_measures_falls_back_to_voxels(exps: dict[str, Any], tmp_path: Path) -> None:
    runs = exps["runs"]
    old = tmp_path / "old_run"
    shutil.copytree(runs[("random", 0)], old)
    conn = sqlite3.connect(old / DB_FILE)
    conn.execute("DELETE FROM region_costs WHERE region_id IN (SELECT id FROM regions WHERE round = 1)")
    conn.commit()
    conn.close()
    res = load_results([old, runs[("random_fg33", 0)]])
    rec = next(e for e in res.experiments if e.path == old)
    assert rec.unmeasured_regions == 4
    curve = _curve(res, old)
    assert curve["corrected_voxels"].isna().all() and curve["strokes"].isna().all()  # round 0 too: never half
    assert curve["voxels"].notna().all()
    other = _curve(res, runs[("random_fg33", 0)])
    assert other["strokes"].tolist() == [v[1] for _, v in sorted(_hand_sums(runs[("random_fg33", 0)]).items())]

    cmp = compare(res, cost="corrected_voxels")
    assert (cmp.cost, cmp.cost_axis, cmp.aubc_column) == ("corrected_voxels", "voxels", "voxels")
    (note,) = [n for n in cmp.notes if n.startswith("cost axis corrected_voxels")]
    assert str(old) in note and "(4 regions)" in note and "alseg remeasure" in note and "annotated voxels" in note
    for row in cmp.per_experiment.itertuples(index=False):
        assert row.aubc_x == "voxels"
        assert row.aubc == pytest.approx(shared_range_aubc(res, row.experiment, "voxels"))
    # every run has voxels and foreground voxels: no fallback for them
    assert compare(res, cost="fg_voxels").cost_axis == "fg_voxels"

    out = tmp_path / "r.html"
    build_report([old, runs[("random_fg33", 0)]], out, cost="corrected_voxels")
    sections = _sections(out.read_text(encoding="utf-8"))
    assert "cost axis corrected_voxels (corrected voxels) is unavailable" in sections["experiments"]
    assert "is unavailable" in sections["cost-axes"] and "old_run (4 regions)" in sections["cost-axes"]
    assert "Cost axis (<code>--cost</code>): annotated voxels" in sections["learning-curves"]
    assert "x = annotated voxels" in sections["summary-table"]


# --------------------------------------------------------------------------- AUBC against each axis
def test_aubc_against_the_cost_axis(exps: dict[str, Any]) -> None:
    res = load_results([exps["root"]])
    plain = compare(res)
    assert (plain.cost_axis, plain.aubc_column) == ("voxels", "round")  # today's behaviour
    cmp = compare(res, cost="strokes")
    assert cmp.aubc_x == "cost" and cmp.aubc_column == "strokes" and not any("unavailable" in n for n in cmp.notes)
    for row in cmp.per_experiment.itertuples(index=False):
        hand = _hand_sums(Path(row.experiment))
        strokes = np.array([hand[r][1] for r in sorted(hand)], dtype=float)
        assert _curve(res, Path(row.experiment))["strokes"].tolist() == strokes.tolist()
        assert row.aubc == pytest.approx(shared_range_aubc(res, row.experiment, "strokes"), nan_ok=True)
        assert row.final_cost == strokes[-1]
    by_round = compare(res, cost="strokes", aubc_x="round").per_experiment
    assert by_round["aubc"].tolist() == pytest.approx(plain.per_experiment["aubc"].tolist())
    # AUBC of every run against every axis
    assert len(cmp.by_axis) == len(AXES) * len(res.al_experiments)
    for row in cmp.by_axis.itertuples(index=False):
        assert row.aubc == pytest.approx(shared_range_aubc(res, row.experiment, row.axis), nan_ok=True)
    assert cmp.by_axis.groupby("axis")["aubc"].apply(lambda v: v.notna().any()).all()  # each axis measured
    with pytest.raises(ReportError, match="cost axis 'time' is not one of voxels, fg_voxels, corrected_voxels"):
        compare(res, cost="time")  # type: ignore[arg-type]


def test_report_draws_curves_against_every_cost_axis(exps: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    build_report([exps["root"]], out, csv_dir=tmp_path / "csv", cost="corrected_voxels")
    sections = _sections(out.read_text(encoding="utf-8"))
    (alt, _), *more = IMG_RE.findall(sections["cost-axes"])
    assert not more and alt.startswith("cost axes: ")
    axes = sections["cost-axes"]
    for label in ("annotated voxels", "annotated foreground voxels", "corrected voxels", "correction strokes"):
        assert f"AUBC vs {label}" in axes
    for strategy in [*STRATEGIES, RUNNING]:
        assert f'<td class="l">{strategy}</td>' in axes
    assert "x = corrected voxels" in sections["summary-table"]
    assert "Cost axis (<code>--cost</code>): corrected voxels" in sections["learning-curves"]
    assert "no run in this report is labelled by people" in sections["annotators"]
    table = pd.read_csv(tmp_path / "csv" / "aubc_by_cost_axis.csv")
    assert sorted(table["axis"].unique()) == sorted(AXES)
    assert not (tmp_path / "csv" / "annotators.csv").exists()
    assert set(pd.read_csv(tmp_path / "csv" / "per_experiment.csv")["aubc_x"]) == {"corrected_voxels"}
    # the learning-curve figure's cost panel follows the axis
    res = load_results([exps["root"]])
    rows = res.al_rounds
    colors = strategy_colors(res.strategies)
    pngs = {axis: learning_curves_figure(rows, colors, None, "t", axis) for axis in ("voxels", "strokes")}
    assert pngs["voxels"] != pngs["strokes"]
    assert learning_curves_figure(rows, colors, None, "t") == pngs["voxels"]


def test_cli_cost_option(exps: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.html"
    result = runner.invoke(app, ["report", str(exps["root"]), "-o", str(out), "--cost", "strokes"])
    assert result.exit_code == 0, result.output
    assert "x = correction strokes" in out.read_text(encoding="utf-8")
    result = runner.invoke(app, ["report", str(exps["root"]), "-o", str(out), "--cost", "minutes"])
    assert result.exit_code == 1 and "cost axis 'minutes' is not one of" in result.output
    result = runner.invoke(app, ["compare", str(exps["root"]), "--cost", "strokes"])
    assert result.exit_code == 0 and "AUBC: x = strokes" in result.output
    result = runner.invoke(app, ["compare", str(exps["root"])])
    assert result.exit_code == 0 and "AUBC: x = round index" in result.output


# --------------------------------------------------------------------------- people
@pytest.fixture(scope="module")
def human_run(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rounds 0 and 1 labelled by people: round 0 by ana (12.5 minutes) and bo (no minutes), round 1 by ana (5)."""
    root = tmp_path_factory.mktemp("report_human")
    exp = root / "human"
    cfg = make_config(_synthetic_template, strategy="entropy", oracle="human", rounds=ROUNDS)
    run_experiment(cfg, exp, noisy_factory())
    manifest = json.loads((exp / "rounds" / "000" / "to_annotate" / "manifest.json").read_text())
    cases = sorted(c["case_id"] for c in manifest["cases"])
    assert len(cases) >= 2
    annotate(exp, 0, root / "ana_0", cases=cases[:1])
    import_labels(exp, root / "ana_0", annotator="ana", minutes=12.5)
    annotate(exp, 0, root / "bo_0", cases=cases[1:])
    import_labels(exp, root / "bo_0", annotator="bo")
    advance_experiment(exp, backend_factory=noisy_factory())
    annotate(exp, 1, root / "ana_1")
    import_labels(exp, root / "ana_1", annotator="ana", minutes=5)
    advance_experiment(exp, backend_factory=noisy_factory())
    return exp


def _hand_annotators(exp: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(exp / DB_FILE)
    try:
        out: dict[str, dict[str, Any]] = {}
        for who, n, vox, cv, st in conn.execute(
            "SELECT c.annotator, COUNT(*), SUM(g.n_voxels), SUM(c.corrected_voxels), SUM(c.strokes) "
            "FROM regions g JOIN region_costs c ON c.region_id = g.id WHERE g.status = 'annotated' "
            "GROUP BY c.annotator"
        ):
            out[who] = {"regions": n, "voxels": vox, "corrected_voxels": cv, "strokes": st}
        for who, n, minutes in conn.execute("SELECT annotator, COUNT(*), SUM(minutes) FROM imports GROUP BY annotator"):
            out[who].update(imports=n, minutes=minutes)
        return out
    finally:
        conn.close()


def test_annotator_table_of_a_human_run(human_run: Path, exps: dict[str, Any], tmp_path: Path) -> None:
    want = _hand_annotators(human_run)
    assert set(want) == {"ana", "bo"} and want["ana"]["minutes"] == 17.5 and want["bo"]["minutes"] is None
    res = load_results([human_run, exps["runs"][("random", 0)]])
    table = res.annotators
    assert set(table["experiment"]) == {str(human_run)}  # simulated runs have no annotators
    got = table.set_index("annotator")
    for who, w in want.items():
        for key in ("regions", "voxels", "corrected_voxels", "strokes", "imports"):
            assert got.loc[who, key] == w[key], (who, key)
    assert got.loc["ana", "minutes"] == 17.5 and pd.isna(got.loc["bo", "minutes"])
    assert got.loc["bo", "imports_without_minutes"] == 1

    out = tmp_path / "r.html"
    build_report([human_run, exps["runs"][("random", 0)]], out, csv_dir=tmp_path / "csv")
    section = _sections(out.read_text(encoding="utf-8"))["annotators"]
    assert "<h3>entropy, seed 0 (human)</h3>" in section
    for who, w in want.items():
        minutes = "–" if w["minutes"] is None else f"{w['minutes']:.1f}"
        cells = [w["regions"], w["voxels"], w["corrected_voxels"], w["strokes"], w["imports"]]
        row = f'<tr><td class="l">{who}</td>' + "".join(f"<td>{v}</td>" for v in cells) + f"<td>{minutes}</td></tr>"
        assert row in section, row
    csv = pd.read_csv(tmp_path / "csv" / "annotators.csv")
    assert sorted(csv["annotator"]) == ["ana", "bo"] and math.isnan(csv.set_index("annotator").loc["bo", "minutes"])
