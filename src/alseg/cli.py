"""The ``alseg`` command line: thin commands over the library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Active learning for biomedical image segmentation on nnU-Net v2."
)
err_console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    # the message is plain text: paths like "data/[v2]" must not be read as Rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn``; expected failures become one clear message and exit code 1."""
    from alseg.backends.nnunet.backend import BackendError
    from alseg.config import ConfigError
    from alseg.data.dataset import DatasetError
    from alseg.errors import ExperimentError
    from alseg.store.state import ExperimentLockedError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, DatasetError, ExperimentError, ExperimentLockedError, BackendError) as err:
        _fail(str(err))
    except ValueError as err:  # e.g. unknown strategy name or parameter
        _fail(str(err))


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="experiment config (YAML)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="experiment directory (created or resumed)")],
    full_data: Annotated[
        bool,
        typer.Option(
            "--full-data",
            help="run the full-data reference of CONFIG instead: every pool case fully labelled, one training with "
            "the schedule's epochs (the upper bound in reports)",
        ),
    ] = False,
) -> None:
    """Run or resume an experiment to its last round."""
    from alseg.config import load_config
    from alseg.loop.drivers import run_experiment
    from alseg.loop.full_data import run_full_data

    cfg = _guarded(load_config, config)
    _guarded(run_full_data if full_data else run_experiment, cfg, out)
    _print_status(out, as_json=False)
    _print_waiting(out)


@app.command()
def status(
    exp_dir: Annotated[Path, typer.Argument(help="experiment directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show Dice and annotation cost per round."""
    _print_status(exp_dir, as_json)


def _print_status(exp_dir: Path, as_json: bool) -> None:
    from alseg.loop.status import experiment_status

    data = _guarded(experiment_status, exp_dir)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    u = data["uncertainty"]
    table = Table(title=f"{exp_dir} ({data['strategy']}, seed {data['seed']}, {u['source']} K = {u['n_samples']})")
    for col in ("round", "regions", "voxels", "fg voxels", "Dice (fg mean)", "Dice per class", "stages"):
        table.add_column(col, justify="right" if col != "Dice per class" else "left")
    for row in data["rounds"]:
        dice = "-" if row["dice_mean"] is None else f"{row['dice_mean']:.3f}"
        per = ", ".join(f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in row["dice_per_class"].items())
        table.add_row(
            str(row["round"]),
            str(row["n_regions"]),
            str(row["annotated_voxels"]),
            str(row["annotated_fg_voxels"]),
            dice,
            per,
            f"{len(row['stages_done'])}/4",
        )
    Console().print(table)
    if "in_progress" in data:
        Console().print(running_line(data["in_progress"]), markup=False, highlight=False, soft_wrap=True)
    if "annotation" in data:
        _print_annotation(data["annotation"])


def running_line(p: dict[str, Any]) -> str:
    """``running: round 1, train (epoch 4/12), 43% done, about 3 min left`` from ``in_progress``."""
    stage = str(p.get("stage", "?")) + (f" ({p['detail']})" if p.get("detail") else "")
    parts = [f"running: round {p.get('round', '?')}", stage]
    fraction = p.get("fraction")
    if isinstance(fraction, int | float):
        parts.append(f"{fraction * 100:.0f}% done")
    eta = p.get("eta_seconds")
    if isinstance(eta, int | float) and (isinstance(fraction, int | float) and fraction > 0):
        if eta < 60:
            parts.append("less than a minute left")
        elif eta < 90 * 60:
            parts.append(f"about {round(eta / 60)} min left")
        else:
            h, m = divmod(round(eta / 60), 60)
            parts.append(f"about {h} h {m:02d} min left")
    return ", ".join(parts)


def _print_annotation(annotation: dict[str, Any]) -> None:
    """Annotation mode: every region's state and the file that labelled it."""
    rows = annotation["regions"]
    waiting = annotation["waiting_round"]
    counts = {s: sum(1 for g in rows if g["state"] == s) for s in ("done", "waiting", "closed unlabelled")}
    title = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no regions yet"
    table = Table(title=f"annotation: {title}" + (f"; round {waiting} waits for labels" if waiting is not None else ""))
    for col in ("region", "round", "case", "start (z, y, x)", "size", "state", "file"):
        table.add_column(col, justify="right" if col in ("region", "round") else "left")
    for g in rows:
        table.add_row(
            str(g["region_id"]),
            str(g["round"]),
            g["case_id"],
            " ".join(map(str, g["start"])),
            " ".join(map(str, g["size"])),
            g["state"],
            g["source"] or "-",
        )
    Console().print(table)


def _print_waiting(exp_dir: Path) -> None:
    """Annotation mode: say which round waits for labels and what to do next."""
    from alseg.config import load_config
    from alseg.oracle.human import pending_annotation

    cfg = _guarded(load_config, exp_dir / "config.yaml")
    if cfg.oracle != "human":
        return
    waiting = _guarded(pending_annotation, exp_dir)
    if waiting is None:
        err_console.print(f"{exp_dir}: every round is done", markup=False, highlight=False)
    else:
        err_console.print(waiting.message(exp_dir), markup=False, highlight=False, soft_wrap=True)


@app.command()
def query(
    exp_dir: Annotated[Path, typer.Argument(help="experiment directory (oracle: human)")],
    allow_open: Annotated[
        bool,
        typer.Option(
            "--allow-open", help="train on the labelled regions although some are open; the open ones are closed"
        ),
    ] = False,
) -> None:
    """Annotation mode: train on what is labelled, query the next round and export its work package."""
    from alseg.loop.drivers import advance_experiment

    _guarded(advance_experiment, exp_dir, allow_open)
    _print_status(exp_dir, as_json=False)
    _print_waiting(exp_dir)


@app.command("import")
def import_(
    exp_dir: Annotated[Path, typer.Argument(help="experiment directory (oracle: human)")],
    labels_dir: Annotated[Path, typer.Argument(help="folder of label files named {case_id}.nii.gz")],
    strict: Annotated[
        bool, typer.Option("--strict", help="refuse files with labelled voxels outside the requested regions")
    ] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="replace already imported files that changed (old copies are kept)")
    ] = False,
) -> None:
    """Annotation mode: check and import the annotators' label files of the waiting round."""
    from alseg.oracle.importer import import_labels

    report = _guarded(import_labels, exp_dir, labels_dir, strict=strict, replace=replace)
    for line in report.warnings:
        err_console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
    for line in report.notes:
        err_console.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
    for item in report.imported:
        what = f" (replaces {item['replaced']})" if item["replaced"] else ""
        sys.stdout.write(f"imported {item['file']}: case {item['case_id']}, regions {item['regions']}{what}\n")
    if report.unchanged:
        sys.stdout.write(f"unchanged (imported before): {', '.join(report.unchanged)}\n")
    if not report.imported:
        sys.stdout.write("nothing new to import\n")
    if report.open_regions:
        shown = ", ".join(f"{rid} ({cid})" for rid, cid in report.open_regions)
        sys.stdout.write(f"round {report.round_index}: {len(report.open_regions)} regions still open: {shown}\n")
    elif report.round_index is not None:
        sys.stdout.write(f"round {report.round_index}: every region is labelled; run `alseg query {exp_dir}` next\n")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="experiment directory")] = Path("demo_exp"),
    strategy: Annotated[str, typer.Option(help="query strategy")] = "random_fg33",
    rounds: Annotated[int, typer.Option(help="training rounds including the starting one")] = 3,
    seed: Annotated[int, typer.Option(help="experiment seed")] = 0,
) -> None:
    """Run a small real experiment on the bundled Hippocampus subset (CPU, a few minutes)."""
    from alseg.demo import demo_config
    from alseg.loop.drivers import run_experiment

    cfg = _guarded(demo_config, strategy=strategy, rounds=rounds, seed=seed)
    _guarded(run_experiment, cfg, out)
    _print_status(out, as_json=False)


@app.command()
def strategies(
    as_json: Annotated[
        bool, typer.Option("--json", help="print every strategy's key, description, parameters and needs as JSON")
    ] = False,
) -> None:
    """List the registered query strategies."""
    from alseg.strategies.registry import describe_strategies, list_strategies

    if as_json:
        sys.stdout.write(json.dumps(describe_strategies(), indent=1) + "\n")
        return
    items = list_strategies()
    table = Table(title="query strategies")
    table.add_column("key")
    table.add_column("description")
    for key, desc in items:
        table.add_row(key, desc)
    Console().print(table)


# the arguments and options ``report`` and ``compare`` share
ExpDirs = Annotated[list[Path], typer.Argument(help="experiment directories (a folder of experiments stands for all)")]
Baseline = Annotated[
    str | None, typer.Option("--baseline", help="strategy the significance marks refer to (default: random)")
]
FullData = Annotated[list[Path] | None, typer.Option("--full-data", help="full-data reference experiment (repeatable)")]
AubcX = Annotated[str, typer.Option("--aubc-x", help="AUBC's x axis: 'round' (default) or 'voxels'")]


@app.command()
def report(
    exp_dirs: ExpDirs,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")] = Path("report.html"),
    csv: Annotated[
        Path | None, typer.Option("--csv", help="also write the tables as CSV files into this folder")
    ] = None,
    baseline: Baseline = None,
    full_data: FullData = None,
    aubc_x: AubcX = "round",
    figures: Annotated[
        Path | None, typer.Option("--figures", help="also save the figures as PNG files into this folder")
    ] = None,
) -> None:
    """Write one self-contained HTML report (curves, PPM, tables, queried regions) from saved results."""
    from alseg.report.html import build_report

    cmp = _guarded(
        build_report, exp_dirs, out, full_data or (), baseline, csv, aubc_x, "Active-learning report", figures
    )
    res = cmp.results
    err_console.print(
        f"wrote {out} ({len(res.al_experiments)} runs, {len(res.strategies)} strategies, "
        f"{len(res.references)} full-data reference(s))" + (f"; CSV tables in {csv}" if csv else ""),
        markup=False,
        highlight=False,
    )


@app.command()
def compare(
    exp_dirs: ExpDirs,
    baseline: Baseline = None,
    full_data: FullData = None,
    aubc_x: AubcX = "round",
) -> None:
    """Print the comparison table: AUBC, final Dice, FG-Eff and Φ per strategy (mean ± std over seeds)."""
    from alseg.report.compare import compare as compare_results
    from alseg.report.compare import format_mean_std
    from alseg.report.results import load_results

    res = _guarded(load_results, exp_dirs, full_data or ())
    cmp = _guarded(compare_results, res, baseline, aubc_x)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if cmp.summary.empty:
        console.print("no evaluated rounds yet", markup=False)
    for setting, df in cmp.summary.groupby("setting", sort=True):
        table = Table(title=str(setting), title_justify="left")
        for col in ("strategy", "seeds", "rounds", "AUBC", "Final Dice", "FG-Eff", "Φ", "Φ (Holm)"):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for r in df.itertuples(index=False):
            fg = "-" if r.fg_eff != r.fg_eff else f"{r.fg_eff:.2f}"
            table.add_row(
                r.strategy + (" (baseline)" if r.baseline else ""),
                f"{r.n_seeds}" + (f" ({r.n_running} running)" if r.n_running else ""),
                r.rounds,
                f"{format_mean_std(r.aubc_mean, r.aubc_std)} {r.aubc_mark}".rstrip(),
                f"{format_mean_std(r.final_dice_mean, r.final_dice_std)} {r.final_dice_mark}".rstrip(),
                fg,
                "-" if r.phi != r.phi else f"{r.phi:.2f}",
                "-" if r.phi_holm != r.phi_holm else f"{r.phi_holm:.2f}",
            )
        ref = res.reference_for_setting(str(setting))
        if ref is not None:
            table.add_row("full data (reference)", "", "1", "", f"{ref:.3f}", "", "", "")
        console.print(table)
    mark = f"▲/▼: significantly above/below {cmp.baseline} (paired t-test over seeds, p < 0.05)" if cmp.baseline else ""
    for line in [mark, cmp.ppm_note or "", *cmp.notes]:
        if line:
            console.print(line, markup=False, highlight=False)


if __name__ == "__main__":
    app()
