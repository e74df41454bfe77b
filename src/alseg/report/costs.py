"""The report's "Cost axes" and "Annotators" sections.

*Cost axes*: per setting, held-out Dice against each cumulative annotation cost (annotated voxels, annotated
foreground voxels, corrected voxels, correction strokes; :data:`alseg.report.results.COST_AXES`) and the AUBC of
every strategy on each axis. *Annotators*: per run labelled by people, one row per annotator (as ``alseg status``
shows it). Both read only the saved results (:class:`~alseg.report.results.Results`).
"""

from __future__ import annotations

import math

import pandas as pd

from alseg.report.compare import Comparison, format_mean_std
from alseg.report.markup import escape, img, note, num, table
from alseg.report.plots import cost_axes_figure
from alseg.report.results import COST_AXES, MEASURED_AXES, Results

__all__ = ["annotators_section", "cost_axes_section"]


def _mean_std(values: pd.Series, digits: int) -> str:
    v = values.dropna()
    if v.empty:
        return "–"
    return escape(format_mean_std(float(v.mean()), float(v.std()) if len(v) > 1 else math.nan, digits))


def cost_axes_section(cmp: Comparison, colors: dict) -> tuple[str, int]:
    """Per setting: a figure of Dice against each cost axis and a table of AUBC per axis; returns the HTML and
    the number of figures."""
    res = cmp.results
    rounds = res.al_rounds
    parts = [
        '<p class="muted">Held-out Dice against each cumulative annotation cost, per round: annotated voxels '
        "(inside the queried regions), annotated foreground voxels, corrected voxels (voxels whose label differs "
        "from the prefill the annotator started from: the previous round's model prediction from round 1 on, "
        "background in round 0 or with <code>prefill: false</code>) and correction strokes (the connected pieces of "
        "the corrected voxels, 26 neighbours in 3D, 8 in 2D). AUBC per axis: area under the Dice curve over one "
        "budget range of that axis per seed (the runs' shared start to the smallest final cost of the finished "
        "runs, mapped to [0, 1]: strategies compared at equal cost), mean ± standard deviation over seeds. "
        f"The report's cost axis (<code>--cost</code>): {escape(COST_AXES[cmp.cost_axis])}.</p>"
    ]
    if cmp.cost != cmp.cost_axis:
        parts.append(note(next((n for n in cmp.notes if n.startswith(f"cost axis {cmp.cost} ")), "")))
    missing = [e for e in res.al_experiments if e.unmeasured_regions]
    if missing:
        names = ", ".join(f"{e.name} ({e.unmeasured_regions} regions)" for e in missing)
        parts.append(
            note(
                f"{len(missing)} runs have annotated regions without correction measures (made before alseg measured "
                f"them): {names}; they are left out of the corrected-voxel and stroke panels and their AUBC there is "
                "–. `alseg remeasure EXP` measures them from the experiment's stored models."
            )
        )
    if rounds.empty:
        return "".join(parts) + note("no evaluated rounds yet"), 0
    n = 0
    by_axis = cmp.by_axis
    for setting in res.settings:
        rows = rounds[rounds["setting"] == setting]
        if rows.empty:
            continue
        ref = res.reference_for_setting(setting)
        parts.append(f"<h3>{escape(setting)}</h3>")
        png = cost_axes_figure(rows, colors, ref, f"Dice against each cost axis: {setting}")
        parts.append(img(png, f"cost axes: {setting}"))
        n += 1
        sub = by_axis[by_axis["setting"] == setting]
        trs = []
        for strategy, df in sub.groupby("strategy", sort=True):
            cells = [escape(strategy), str(df["experiment"].nunique())]
            cells += [_mean_std(df[df["axis"] == axis]["aubc"], 3) for axis in COST_AXES]
            cells += [_mean_std(df[df["axis"] == axis]["final_cost"], 0) for axis in MEASURED_AXES]
            trs.append(cells)
        headers = ["strategy", "runs", *(f"AUBC vs {escape(label)}" for label in COST_AXES.values())]
        headers += [f"final {escape(COST_AXES[a])}" for a in MEASURED_AXES]
        parts.append(table(headers, trs))
    return "".join(parts), n


def annotators_section(results: Results) -> str:
    """Per run labelled by people (``oracle: human``): annotator, regions, voxels, corrected voxels, strokes,
    imports and minutes."""
    people = [e for e in results.experiments if e.config.oracle == "human"]
    intro = (
        '<p class="muted">Per run labelled by people (<code>oracle: human</code>), per annotator: the regions they '
        "labelled (a region counts for whoever labelled it last), their voxels, corrected voxels and correction "
        "strokes (against the prefill each region started from), the imports they made and the minutes they "
        "reported (<code>--minutes</code>; – when never given).</p>"
    )
    if not people:
        return intro + '<p class="muted">no run in this report is labelled by people.</p>'
    parts = [intro]
    table_rows = results.annotators
    for e in sorted(people, key=lambda e: (e.setting, e.strategy, e.seed)):
        parts.append(f"<h3>{escape(f'{e.strategy}, seed {e.seed} ({e.name})')}</h3>")
        mine = table_rows[table_rows["experiment"] == str(e.path)]
        if mine.empty:
            parts.append(note("nothing imported yet"))
            continue
        trs = []
        for r in mine.itertuples(index=False):
            minutes = "–" if pd.isna(r.minutes) else num(r.minutes, 1)
            if minutes != "–" and r.imports_without_minutes:
                minutes += f" ({int(r.imports_without_minutes)} imports without)"
            trs.append(
                [
                    escape(r.annotator),
                    *(str(int(getattr(r, k))) for k in ("regions", "voxels", "corrected_voxels", "strokes", "imports")),
                    minutes,
                ]
            )
        headers = ["annotator", "regions", "voxels", "corrected voxels", "strokes", "imports", "minutes"]
        parts.append(table(headers, trs))
    return "".join(parts)
