"""The report: one self-contained HTML file (inline CSS, figures as base64 PNG, no JavaScript, no URLs).

It reads only the experiments' saved results (config, database, the dataset for the region gallery), needs
no model and no GPU, and works while experiments are still running (it shows the rounds done so far).

>>> # build_report([Path("experiments")], Path("report.html"), csv_dir=Path("tables"))
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from alseg.report.compare import SHARED_RANGE, AubcX, Comparison, CostAxis, compare, format_mean_std, write_csv
from alseg.report.costs import annotators_section, cost_axes_section
from alseg.report.gallery import render_gallery
from alseg.report.markup import escape as _e
from alseg.report.markup import img as _img
from alseg.report.markup import note as _note
from alseg.report.markup import num as _num
from alseg.report.markup import table as _table
from alseg.report.plots import cost_figure, learning_curves_figure, metrics_figure, ppm_figure, strategy_colors
from alseg.report.results import COST_AXES, Results, load_results
from alseg.report.stopping import stopping_section

__all__ = ["SECTIONS", "build_report", "render_html", "write_figures"]

# (id, heading): the sections every report has, in order
SECTIONS = [
    ("experiments", "Experiments"),
    ("learning-curves", "Learning curves"),
    ("annotation-cost", "Annotation cost"),
    ("cost-axes", "Cost axes"),
    ("annotators", "Annotators"),
    ("ppm", "Pairwise penalty matrix"),
    ("summary-table", "Summary table"),
    ("rankings", "Rankings"),
    ("when-to-stop", "When to stop"),
    ("queried-regions", "Queried regions"),
]

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; line-height: 1.45; }
header { background: #1d2b45; color: #fff; padding: 1.2em 2em; }
header h1 { margin: 0 0 .2em 0; font-size: 1.6em; }
header p { margin: .1em 0; color: #d5dcea; }
nav { margin-top: .6em; }
nav a { color: #9fc3ff; margin-right: 1.1em; text-decoration: none; }
main { padding: 0 2em 2em 2em; max-width: 1500px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; margin: 1.2em 0; padding: .6em 1.4em 1.2em; }
h2 { border-bottom: 2px solid #1d2b45; padding-bottom: .2em; }
h3 { margin-top: 1.2em; color: #2c3e63; }
img { max-width: 100%; height: auto; display: block; margin: .6em 0; border: 1px solid #eceef2; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #d0d5de; padding: .3em .7em; text-align: right; }
th { background: #eef1f6; }
td.l, th.l { text-align: left; }
tr.baseline td { background: #fff8dc; }
tr.reference td { background: #eef6ee; font-style: italic; }
.up { color: #137333; font-weight: bold; }
.down { color: #b3261e; font-weight: bold; }
.note { background: #fff4e5; border-left: 4px solid #f0a030; padding: .4em .8em; margin: .6em 0; }
.muted { color: #5f6b7a; font-size: .9em; }
.running { color: #b06000; font-weight: bold; }
span.path { display: block; text-align: left; font-family: monospace; font-size: .9em; }
code { background: #f0f2f5; padding: 0 .25em; border-radius: 3px; }
"""


def _int_range(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _label_names(results: Results) -> dict[str, str]:
    """Foreground label value -> name, from the first readable dataset (the value itself otherwise)."""
    from alseg.data.dataset import DatasetError, load_dataset

    labels = sorted({lab for e in results.experiments for lab in e.foreground_labels}, key=lambda s: (len(s), s))
    names = {lab: lab for lab in labels}
    for e in results.experiments:
        try:
            ds = load_dataset(e.config.dataset)
        except (DatasetError, OSError):
            continue
        names.update({str(k): v for k, v in ds.labels.items() if str(k) in names})
        break
    return names


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------
def _section_experiments(cmp: Comparison) -> str:
    res = cmp.results
    rows, classes = [], []
    for e in sorted(res.experiments, key=lambda e: (e.full_data, e.setting, e.strategy, e.seed)):
        done = len(e.rounds_evaluated)
        status = "complete" if e.complete else '<span class="running">running / stopped</span>'
        last = res.rounds[res.rounds["experiment"] == str(e.path)]
        dice = _num(float(last.sort_values("round")["dice"].iloc[-1])) if len(last) else "–"
        u = e.config.uncertainty
        samples = f"{_e(u.source)}, K = {u.n_samples}" + (f" ({_e(u.ensemble)})" if u.source == "ensemble" else "")
        rows.append(
            [
                _e(e.strategy),
                _e(e.setting),
                str(e.seed),
                samples,
                f"{done} / {e.rounds_planned}",
                status,
                dice,
                _e(e.path),
            ]
        )
        classes.append("reference" if e.full_data else "")
    rows = [[*r[:-1], f'<span class="path">{r[-1]}</span>'] for r in rows]
    out = _table(
        [
            "strategy",
            "setting",
            "seed",
            "uncertainty",
            "rounds evaluated / planned",
            "status",
            "last Dice",
            "directory",
        ],
        rows,
        left=2,
        row_classes=classes,
    )
    corrected = [f"{e.name}: {c}" for e in res.experiments for c in e.corrections]
    return out + "".join(_note(n) for n in [*cmp.notes, *corrected])


def _section_curves(cmp: Comparison, colors: dict, labels: dict[str, str]) -> tuple[str, int]:
    res = cmp.results
    rounds = res.al_rounds
    if rounds.empty:
        return _note("no evaluated rounds yet: curves appear once the first round is evaluated"), 0
    parts, n = [], 0
    ref_rows = res.rounds[res.rounds["full_data"]]
    for setting in res.settings:
        rows = rounds[rounds["setting"] == setting]
        if rows.empty:
            parts.append(f"<h3>{_e(setting)}</h3>" + _note("no evaluated rounds yet"))
            continue
        ref = res.reference_for_setting(setting)
        keys = {e.dataset_key for e in res.al_experiments if e.setting == setting}
        srefs = ref_rows[ref_rows["dataset_key"].isin(keys)]
        parts.append(f"<h3>{_e(setting)}</h3>")
        if ref is None:
            parts.append(_note("no full-data reference for this dataset: no dashed upper-bound line"))
        parts.append(
            _img(
                learning_curves_figure(rows, colors, ref, f"Learning curves: {setting}", cmp.cost_axis),
                f"learning curves: {setting}",
            )
        )
        parts.append(
            _img(
                metrics_figure(rows, colors, labels, f"2D Dice, HD95 and Dice per class: {setting}", srefs),
                f"per-round metrics: {setting}",
            )
        )
        n += 2
    parts.insert(
        0,
        '<p class="muted">Held-out Dice (3D, foreground mean over classes, mean over test cases) after each round. '
        "Thick line: mean over seeds; band: ± 1 standard deviation over seeds; thin lines: single seeds; "
        "dashed: full-data reference (all pool cases fully labelled, same schedule). Cost axis "
        f"(<code>--cost</code>): {_e(COST_AXES[cmp.cost_axis])}; every axis in the Cost axes section.</p>",
    )
    return "".join(parts), n


def _section_cost(cmp: Comparison, colors: dict, labels: dict[str, str]) -> tuple[str, int]:
    res = cmp.results
    rounds = res.al_rounds
    if rounds.empty:
        return _note("no evaluated rounds yet"), 0
    parts = [
        '<p class="muted">Cumulative annotation cost after each round: voxels inside queried regions, the '
        "foreground among them, and slices (along the slice axis) and cases touched.</p>"
    ]
    n = 0
    for setting in res.settings:
        rows = rounds[rounds["setting"] == setting]
        if rows.empty:
            continue
        parts.append(f"<h3>{_e(setting)}</h3>")
        parts.append(
            _img(cost_figure(rows, colors, labels, f"Annotation cost: {setting}"), f"annotation cost: {setting}")
        )
        n += 1
        last = rows.loc[rows.groupby("experiment")["round"].idxmax()]
        trs = []
        for strategy, df in last.groupby("strategy", sort=True):
            trs.append(
                [
                    _e(strategy),
                    str(len(df)),
                    _e(_int_range(df["round"])),
                    format_mean_std(df["voxels"].mean(), df["voxels"].std(), 0),
                    format_mean_std(df["fg_voxels"].mean(), df["fg_voxels"].std(), 0),
                    format_mean_std(100 * df["fg_fraction"].mean(), 100 * df["fg_fraction"].std(), 2),
                    format_mean_std(df["slices_touched"].mean(), df["slices_touched"].std(), 1),
                ]
            )
        parts.append(
            _table(["strategy", "runs", "last round", "voxels", "fg voxels", "% of pool fg", "slices touched"], trs)
        )
    return "".join(parts), n


def _section_ppm(cmp: Comparison) -> tuple[str, int]:
    intro = (
        '<p class="muted">Entry (row i, column j): share of budget points (rounds) at which strategy i has a '
        "significantly higher Dice than j (two-sided paired t-test over seeds, paired by seed value, p &lt; 0.05). "
        "Left: plain p-values; right: Holm-corrected over all tests of a setting. Settings merge by averaging. "
        "Φ (last row) = column mean: how often a strategy is beaten (lower is better). "
        "–: the pair has fewer than two seeds in common, no test possible.</p>"
    )
    if cmp.ppm is None:
        return intro + _note(cmp.ppm_note or "not available"), 0
    p = cmp.ppm
    png = ppm_figure(
        [(p.matrix, p.phi, "PPM, paired t-test p < 0.05"), (p.matrix_holm, p.phi_holm, "PPM, Holm-corrected")]
    )
    rows = [[_e(s), _num(p.phi.get(s, np.nan)), _num(p.phi_holm.get(s, np.nan))] for s in p.phi.index]
    extra = ""
    if p.max_paired < 3:
        extra = _note(
            f"at most {p.max_paired} seeds are paired: a paired t-test over so few seeds rarely reaches p < 0.05"
        )
    return intro + extra + _img(png, "pairwise penalty matrix") + _table(["strategy", "Φ", "Φ (Holm)"], rows), 1


def _mark_html(mark: str) -> str:
    if mark == "▲":
        return ' <span class="up" title="significantly above the baseline">▲</span>'
    if mark == "▼":
        return ' <span class="down" title="significantly below the baseline">▼</span>'
    return ""


def _section_summary(cmp: Comparison) -> str:
    s = cmp.summary
    if s.empty or cmp.results.al_rounds.empty:
        return _note("no evaluated rounds yet")
    x = "round index" if cmp.aubc_column == "round" else f"{COST_AXES[cmp.aubc_column]} {SHARED_RANGE},"
    parts = [
        f'<p class="muted">Mean ± standard deviation over seeds. AUBC: area under the Dice curve with x = {x} '
        "normalised to [0, 1]. Final Dice: last evaluated round. FG-Eff: b of the fit Dice(x) = c − a·exp(−b·(x − x₀)) "
        "over all seeds and rounds, x = annotated share of the pool's foreground, c = full-data Dice (± standard "
        "error of the fit; higher is better). Φ: column mean of the pairwise penalty matrix (lower is better). "
        + (
            f"▲ / ▼: significantly above / below the baseline <b>{_e(cmp.baseline)}</b> (two-sided paired t-test "
            "over seeds, paired by seed value, p &lt; 0.05).</p>"
            if cmp.baseline
            else "No baseline: no significance marks.</p>"
        )
    ]
    for setting, df in s.groupby("setting", sort=True):
        parts.append(f"<h3>{_e(setting)}</h3>")
        rows, classes = [], []
        for r in df.itertuples(index=False):
            seeds = f"{r.n_seeds}" + (f' <span class="running">({r.n_running} running)</span>' if r.n_running else "")
            fg = "–"
            if math.isfinite(r.fg_eff):
                fg = f"{r.fg_eff:.2f}" + (f" ± {r.fg_eff_stderr:.2f}" if math.isfinite(r.fg_eff_stderr) else "")
            rows.append(
                [
                    _e(r.strategy) + (" (baseline)" if r.baseline else ""),
                    seeds,
                    _e(r.rounds),
                    _e(format_mean_std(r.aubc_mean, r.aubc_std)) + _mark_html(r.aubc_mark),
                    _e(format_mean_std(r.final_dice_mean, r.final_dice_std)) + _mark_html(r.final_dice_mark),
                    fg,
                    _num(r.phi, 2),
                    _num(r.phi_holm, 2),
                ]
            )
            classes.append("baseline" if r.baseline else "")
        ref = cmp.results.reference_for_setting(str(setting))
        if ref is not None:
            rows.append(["full data (reference)", "", "1", "", _num(ref), "", "", ""])
            classes.append("reference")
        parts.append(
            _table(
                ["strategy", "seeds", "rounds", "AUBC", "Final Dice", "FG-Eff", "Φ", "Φ (Holm)"],
                rows,
                row_classes=classes,
            )
        )
    fg_notes = cmp.fg_eff[cmp.fg_eff["reason"].notna()]
    for r in fg_notes.itertuples(index=False):
        parts.append(f'<p class="muted">FG-Eff of {_e(r.strategy)} ({_e(r.setting)}): {_e(r.reason)}</p>')
    return "".join(parts)


def _section_rankings(cmp: Comparison) -> str:
    rk = cmp.rankings
    n_settings = len(cmp.results.settings)
    if rk is None:
        return _note("no evaluated rounds yet")
    parts = [
        '<p class="muted">Per setting, strategies are ranked by AUBC, final Dice and FG-Eff (1 = best, ties '
        "averaged); across settings a Friedman test with Nemenyi post-hoc tells whether the ranks differ.</p>"
    ]
    if n_settings < 2:
        parts.append(_note(f"Friedman / Nemenyi needs at least two settings; found {n_settings}."))
    parts.extend(_note(n) for n in rk.notes if not n.startswith("the Friedman test with Nemenyi"))
    settings = [c for c in rk.ranks.columns if c not in ("metric", "strategy", "mean rank")]
    rows = [
        [_e(r["metric"]), _e(r["strategy"]), *(_num(r[c], 1) for c in settings), _num(r["mean rank"], 2)]
        for _, r in rk.ranks.iterrows()
    ]
    parts.append(_table(["metric", "strategy", *(_e(c) for c in settings), "mean rank"], rows, left=2))
    for metric, fr in rk.friedman.items():
        name = {"aubc": "AUBC", "final_dice": "Final Dice", "fg_eff": "FG-Eff"}[metric]
        parts.append(
            f"<h3>{_e(name)}: Friedman χ² = {fr.statistic:.2f}, p = {fr.pvalue:.3g} over {fr.n_settings} settings</h3>"
        )
        strategies = list(fr.nemenyi.index)
        rows = [[_e(a), *(_num(fr.nemenyi.loc[a, b], 3) for b in strategies)] for a in strategies]
        parts.append('<p class="muted">Nemenyi post-hoc p-values:</p>')
        parts.append(_table(["", *(_e(b) for b in strategies)], rows))
    return "".join(parts)


def _section_gallery(cmp: Comparison) -> tuple[str, int]:
    res = cmp.results
    parts = [
        '<p class="muted">Per strategy, up to 12 of its queried regions (rounds ≥ 1, evenly spread over seeds and '
        "rounds): one slice through the region's centre along the slice axis, the image in grey, the ground truth "
        "coloured with its contour, and the region's box in yellow.</p>"
    ]
    n = 0
    if not res.strategies:
        return parts[0] + _note("no active-learning experiments"), 0
    for strategy in res.strategies:
        parts.append(f"<h3>{_e(strategy)}</h3>")
        png, notes = render_gallery(res, strategy)
        parts.extend(_note(t) for t in notes)
        if png is not None:
            parts.append(_img(png, f"queried regions of {strategy}"))
            n += 1
    return "".join(parts), n


# --------------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------------
def render_html(cmp: Comparison, title: str = "Active-learning report") -> str:
    """The whole report page as one HTML string."""
    res = cmp.results
    colors = strategy_colors(res.strategies)
    labels = _label_names(res)
    curves, _ = _section_curves(cmp, colors, labels)
    cost, _ = _section_cost(cmp, colors, labels)
    ppm, _ = _section_ppm(cmp)
    gallery, _ = _section_gallery(cmp)
    axes, _ = cost_axes_section(cmp, colors)
    bodies = {
        "experiments": _section_experiments(cmp),
        "learning-curves": curves,
        "annotation-cost": cost,
        "cost-axes": axes,
        "annotators": annotators_section(res),
        "ppm": ppm,
        "summary-table": _section_summary(cmp),
        "rankings": _section_rankings(cmp),
        "when-to-stop": stopping_section(res),
        "queried-regions": gallery,
    }
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    n_run = sum(1 for e in res.al_experiments if not e.complete)
    sub = (
        f"{len(res.al_experiments)} runs ({n_run} not finished), {len(res.strategies)} strategies, "
        f"{len(res.settings)} setting(s), {len(res.references)} full-data reference(s). "
        f"Baseline: {cmp.baseline or 'none'}. Generated {now} by alseg."
    )
    nav = "".join(f'<a href="#{sid}">{_e(h)}</a>' for sid, h in SECTIONS)
    sections = "".join(
        f'<section id="{sid}"><h2>{_e(heading)}</h2>{bodies[sid]}</section>' for sid, heading in SECTIONS
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{_e(title)}</title><link rel="icon" href="data:,"><style>{CSS}</style></head>'
        f"<body><header><h1>{_e(title)}</h1><p>{_e(sub)}</p><nav>{nav}</nav></header>"
        f"<main>{sections}</main></body></html>\n"
    )


_IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def write_figures(page: str, out_dir: Path) -> list[Path]:
    """Save the report's embedded figures as ``NN_<alt text>.png`` files (e.g. for a README)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (alt, data) in enumerate(_IMG_RE.findall(page)):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", html.unescape(alt)).strip("_").lower() or "figure"
        path = out_dir / f"{k:02d}_{slug}.png"
        path.write_bytes(base64.b64decode(data))
        written.append(path)
    return written


def build_report(
    exp_dirs: Sequence[Path],
    out: Path,
    full_data: Sequence[Path] = (),
    baseline: str | None = None,
    csv_dir: Path | None = None,
    aubc_x: AubcX | None = None,
    title: str = "Active-learning report",
    figures_dir: Path | None = None,
    cost: CostAxis | None = None,
) -> Comparison:
    """Load the experiments, compare them and write the HTML report to ``out``.

    Optionally the tables as CSV files into ``csv_dir`` and the figures as PNG files into ``figures_dir``.
    ``cost``: the cost axis of the learning curves (default annotated voxels); ``aubc_x``: AUBC's x (default the
    round index, or the cost axis when ``cost`` is given; see :func:`alseg.report.compare.compare`).
    """
    results = load_results(exp_dirs, full_data)
    cmp = compare(results, baseline=baseline, aubc_x=aubc_x, cost=cost)
    page = render_html(cmp, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    if csv_dir is not None:
        write_csv(cmp, csv_dir)
    if figures_dir is not None:
        write_figures(page, figures_dir)
    return cmp
