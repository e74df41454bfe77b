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
    """Run ``fn``; expected failures become one clear message and exit code 1 (the traceback, where an experiment
    was running, is in its ``alseg.log``). Anything else is a bug and keeps its traceback."""
    import errno

    from pydantic import ValidationError

    from alseg.errors import AlsegError

    try:
        return fn(*args, **kwargs)
    except AlsegError as err:
        _fail(str(err))
    except ValidationError as err:  # a config built from command-line options (alseg demo)
        _fail(f"invalid option: {err}")
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{err.filename}: " if err.filename else ""
        _fail(
            f"{where}the disk is full ({err.strerror}); free space and run the same command again: every finished "
            "stage is kept and the interrupted one starts over"
        )


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
    dataset: Annotated[
        Path | None,
        typer.Option(
            "--dataset",
            help="dataset folder, instead of the one CONFIG names; for an experiment whose dataset moved: accepted "
            "when it holds the same files (names, sizes, SHA-256), and then stored in OUT/config.yaml",
        ),
    ] = None,
    accept_dataset_change: Annotated[
        bool,
        typer.Option(
            "--accept-dataset-change",
            help="go on although files of the dataset changed, appeared or disappeared since the experiment was "
            "created; the change is recorded in the experiment (a pool case with selected regions must not be gone)",
        ),
    ] = False,
) -> None:
    """Run or resume an experiment to its last round."""
    from alseg.config import load_config
    from alseg.loop.create import open_or_create
    from alseg.loop.drivers import run_experiment
    from alseg.loop.full_data import run_full_data
    from alseg.store.layout import CONFIG_FILE

    cfg = _guarded(load_config, config)
    if full_data:
        if (dataset is not None or accept_dataset_change) and (out / CONFIG_FILE).exists():
            # check and record the dataset first: the full-data run then finds it as stored
            _guarded(open_or_create, None, out, dataset=dataset, accept_dataset_change=accept_dataset_change)
        if dataset is not None:
            cfg = cfg.model_copy(update={"dataset": dataset.expanduser().resolve()})
        _guarded(run_full_data, cfg, out)
    else:
        _guarded(run_experiment, cfg, out, dataset=dataset, accept_dataset_change=accept_dataset_change)
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
    cols = ("round", "regions", "voxels", "fg voxels", "corrected", "strokes", "Dice (fg mean)", "Dice per class")
    for col in (*cols, "stages"):
        table.add_column(col, justify="right" if col != "Dice per class" else "left")
    for row in data["rounds"]:
        dice = "-" if row["dice_mean"] is None else f"{row['dice_mean']:.3f}"
        per = ", ".join(f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in row["dice_per_class"].items())
        table.add_row(
            str(row["round"]),
            str(row["n_regions"]),
            str(row["annotated_voxels"]),
            str(row["annotated_fg_voxels"]),
            str(row["corrected_voxels"]) if row["n_regions_measured"] else "-",
            str(row["strokes"]) if row["n_regions_measured"] else "-",
            dice,
            per,
            f"{len(row['stages_done'])}/4",
        )
    Console().print(table)
    _print_stopping(data)
    if "in_progress" in data:
        Console().print(running_line(data["in_progress"]), markup=False, highlight=False, soft_wrap=True)
    if "annotation" in data:
        _print_annotation(data["annotation"])


def _print_stopping(data: dict[str, Any]) -> None:
    """When to stop: one recommendation line per round and the rule behind it, then the run's 95% budget."""
    for line in stopping_lines(data):
        Console().print(line, markup=False, highlight=False, soft_wrap=True)


def stopping_lines(data: dict[str, Any]) -> list[str]:
    """``round 2: stopping looks safe: stability 0.981 ≥ 0.97 for 2 rounds (patience 2); held-out Dice gain ...``"""
    lines = []
    for row in data["rounds"]:
        if row.get("recommendation") is None:
            lines.append(f"round {row['round']}: not evaluated yet")
            continue
        line = f"round {row['round']}: {row['recommendation']}: {row['rule']}"
        if row.get("stop_set_entropy") is not None:
            line += f", stop-set entropy {row['stop_set_entropy']:.3f}"
        if row.get("dice_gain") is not None:
            below = "below" if row["gain_below_min"] else "at or above"
            min_gain = data["stopping"]["min_gain"]
            line += f"; held-out Dice gain {row['dice_gain']:+.3f} ({below} min_gain {min_gain:g}; shown, not used)"
        lines.append(line)
    x95 = (data.get("stopping") or {}).get("fg_eff_x95")
    if x95 and any(row.get("dice_mean") is not None for row in data["rounds"]):
        if x95.get("x95") is None:
            lines.append(f"95% budget (FG-Eff fit of this run): none, {x95['reason']}")
        else:
            text = f"95% budget (FG-Eff fit of this run): {x95['x95'] * 100:.1f}% of the pool's foreground annotated"
            if x95.get("interval"):
                low, high = x95["interval"]
                text += f" (95% bootstrap interval {low * 100:.1f}-{high * 100:.1f}%)"
            elif x95.get("interval_reason"):
                text += f" (no interval: {x95['interval_reason']})"
            text += _extrapolation_note(x95)
            lines.append(text)
    return lines


def _extrapolation_note(x95: dict[str, Any]) -> str:
    """How far to trust a 95% budget: beyond the budget spent, beyond the pool's foreground, asymptote at 1."""
    notes = []
    if x95.get("x95") is not None and x95["x95"] > 1:
        notes.append("more than the pool's whole foreground: not reachable")
    elif x95.get("beyond_observed"):
        notes.append("beyond the budget spent so far (an extrapolation)")
    if x95.get("c_at_bound"):
        notes.append("the fitted asymptote is the bound Dice 1 (no levelling off seen yet)")
    return "".join(f"; {n}" for n in notes)


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
    counts = {s: sum(1 for g in rows if g["state"].startswith(s)) for s in ("done", "waiting", "closed unlabelled")}
    empty = sum(1 for g in rows if g.get("all_background"))
    title = (
        ", ".join(
            f"{n} {s}" + (f" ({empty} all background)" if s == "done" and empty else "") for s, n in counts.items() if n
        )
        or "no regions yet"
    )
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
    if annotation.get("annotators"):
        people = Table(title="annotators (corrected voxels and strokes: against the prefill each region started from)")
        for col in ("annotator", "regions", "voxels", "corrected voxels", "strokes", "imports", "minutes"):
            people.add_column(col, justify="left" if col == "annotator" else "right")
        for a in annotation["annotators"]:
            mins = "-" if a["minutes"] is None else f"{a['minutes']:g}"
            if a["minutes"] is not None and a["imports_without_minutes"]:
                mins += f" ({a['imports_without_minutes']} imports without)"
            people.add_row(
                a["annotator"],
                *(str(a[k]) for k in ("regions", "voxels", "corrected_voxels", "strokes", "imports")),
                mins,
            )
        Console().print(people)


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
        bool,
        typer.Option(
            "--strict",
            help="refuse files with labelled voxels outside the requested regions or a region left all background",
        ),
    ] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="replace already imported files that changed (old copies are kept)")
    ] = False,
    round_index: Annotated[
        int | None,
        typer.Option(
            "--round",
            help="with --replace: correct the labels of cases of this finished round (the next training uses them)",
        ),
    ] = None,
    annotator: Annotated[
        str | None, typer.Option("--annotator", help="who labelled these files (default: your login name)")
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option("--minutes", help="minutes spent labelling the files of this import (a number >= 0)"),
    ] = None,
) -> None:
    """Annotation mode: check and import the annotators' label files of the waiting round."""
    from alseg.oracle.importer import import_labels

    report = _guarded(
        import_labels,
        exp_dir,
        labels_dir,
        strict=strict,
        replace=replace,
        round_index=round_index,
        annotator=annotator,
        minutes=minutes,
    )
    for line in report.warnings:
        err_console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
    for line in report.notes:
        err_console.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
    verb = "corrected" if report.correction else "imported"
    for item in report.imported:
        what = f" (replaces {item['replaced']})" if item["replaced"] else ""
        where = f", round {report.round_index}" if report.correction else ""
        sys.stdout.write(f"{verb} {item['file']}: case {item['case_id']}{where}, regions {item['regions']}{what}\n")
    if report.unchanged:
        sys.stdout.write(f"unchanged (imported before): {', '.join(report.unchanged)}\n")
    if not report.imported:
        sys.stdout.write("nothing new to import" + (" (--minutes not recorded)" if minutes is not None else "") + "\n")
    else:
        spent = "" if report.minutes is None else f", {report.minutes:g} minutes"
        sys.stdout.write(f"annotator: {report.annotator}{spent}\n")
    if report.correction:
        if report.imported:
            sys.stdout.write(
                f"round {report.round_index}: labels corrected; round {report.rebuilt_at}'s training uses them "
                f"(`alseg query {exp_dir}` rebuilds the training labels of the corrected cases); metrics recorded "
                "so far stay as they were\n"
            )
    elif report.open_regions:
        shown = ", ".join(f"{rid} ({cid})" for rid, cid in report.open_regions)
        sys.stdout.write(f"round {report.round_index}: {len(report.open_regions)} regions still open: {shown}\n")
    elif report.round_index is not None:
        sys.stdout.write(f"round {report.round_index}: every region is labelled; run `alseg query {exp_dir}` next\n")


@app.command()
def remeasure(
    exp_dir: Annotated[Path, typer.Argument(help="experiment directory (not running)")],
    force: Annotated[
        bool, typer.Option("--force", help="measure again the rounds that already have measures too")
    ] = False,
) -> None:
    """Compute the corrected voxels and strokes of an experiment's regions again from its stored models (simulated)
    or imported files and work packages (human), and store them; rounds already measured are skipped."""
    from alseg.loop.remeasure import remeasure_experiment

    def show(result: Any) -> None:  # a round's warnings are on the terminal already (from the experiment's log)
        sys.stdout.write(result.line() + "\n")
        sys.stdout.flush()

    results = _guarded(remeasure_experiment, exp_dir, force, report=show)
    if not results:
        sys.stdout.write(f"{exp_dir}: no annotated regions yet; nothing to measure\n")
    else:
        done = sum(1 for r in results if not r.skipped)
        sys.stdout.write(f"{exp_dir}: {done} of {len(results)} rounds measured, {len(results) - done} skipped\n")


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
AubcX = Annotated[
    str | None,
    typer.Option(
        "--aubc-x",
        help="AUBC's x axis: 'round' (the default without --cost), 'cost' (the --cost axis; the default with --cost) "
        "or 'voxels' (annotated voxels)",
    ),
]
Cost = Annotated[
    str | None,
    typer.Option(
        "--cost",
        help="the cumulative cost the learning curves (and, unless --aubc-x says otherwise, AUBC) are drawn against: "
        "voxels (default), fg_voxels, corrected_voxels or strokes; a run without correction measures makes the "
        "last two fall back to voxels, with a note",
    ),
]


@app.command()
def report(
    exp_dirs: ExpDirs,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")] = Path("report.html"),
    csv: Annotated[
        Path | None, typer.Option("--csv", help="also write the tables as CSV files into this folder")
    ] = None,
    baseline: Baseline = None,
    full_data: FullData = None,
    aubc_x: AubcX = None,
    figures: Annotated[
        Path | None, typer.Option("--figures", help="also save the figures as PNG files into this folder")
    ] = None,
    cost: Cost = None,
) -> None:
    """Write one self-contained HTML report (curves, PPM, tables, queried regions) from saved results."""
    from alseg.report.html import build_report

    cmp = _guarded(
        build_report,
        exp_dirs,
        out,
        full_data or (),
        baseline,
        csv,
        aubc_x,
        "Active-learning report",
        figures,
        cost=cost,
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
    aubc_x: AubcX = None,
    cost: Cost = None,
) -> None:
    """Print the comparison table: AUBC, final Dice, FG-Eff and Φ per strategy (mean ± std over seeds)."""
    from alseg.report.compare import SHARED_RANGE, format_mean_std
    from alseg.report.compare import compare as compare_results
    from alseg.report.results import load_results

    res = _guarded(load_results, exp_dirs, full_data or ())
    cmp = _guarded(compare_results, res, baseline, aubc_x, cost)
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
    x = (
        "round index, normalised to [0, 1]"
        if cmp.aubc_column == "round"
        else f"{cmp.aubc_column} {SHARED_RANGE}, normalised to [0, 1]"
    )
    for line in [f"AUBC: x = {x}", mark, cmp.ppm_note or "", *cmp.notes]:
        if line:
            console.print(line, markup=False, highlight=False)


@app.command()
def bench(
    study: Annotated[Path, typer.Argument(help="study file (YAML): settings, strategies, seeds")],
    out: Annotated[Path, typer.Option("--out", "-o", help="study folder (created or resumed)")],
    executor: Annotated[
        str, typer.Option("--executor", help="'local': one run after another in this process; 'ray': Ray tasks")
    ] = "local",
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address (ray start --head); default a local Ray")
    ] = None,
    cpus_per_run: Annotated[int, typer.Option("--cpus-per-run", min=1, help="Ray: CPUs (and threads) per run")] = 2,
    gpus_per_run: Annotated[
        float | None,
        typer.Option("--gpus-per-run", min=0, help="Ray: GPUs per run (default 1 for runs that train on a GPU)"),
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option("--num-cpus", min=1, help="Ray without --address: CPUs of the local instance")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option("--dataset", help="dataset folder for every setting, instead of the study's")
    ] = None,
    allow_version_change: Annotated[
        bool,
        typer.Option(
            "--allow-version-change",
            help="continue runs last run under another alseg version or commit (recorded in OUT/study.json)",
        ),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="run only this strategy of the study (its folder name; repeatable)"),
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="write the report of the runs so far and run nothing")
    ] = False,
) -> None:
    """Run a study: every setting × strategy × seed, round 0 trained once per group, then the report."""
    from alseg.study.runner import report_runs, run_study

    if report_only:
        html = _guarded(report_runs, study, out, None if dataset is None else dataset.expanduser().resolve())
        err_console.print(f"wrote {html}", markup=False, highlight=False)
        return
    if executor == "local":
        from alseg.study.executors import InProcessExecutor

        if address is not None or num_cpus is not None or gpus_per_run is not None:
            _fail("--address, --num-cpus and --gpus-per-run go with --executor ray")

        ex: Any = InProcessExecutor()
    elif executor == "ray":
        from alseg.study.executors import RayExecutor

        ex = _guarded(
            RayExecutor, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, num_cpus=num_cpus
        )
    else:
        _fail(f"--executor {executor!r}: expected 'local' or 'ray'")

    def say(line: str) -> None:
        err_console.print(line, markup=False, highlight=False)

    try:
        _guarded(
            run_study,
            study,
            out,
            executor=ex,
            allow_version_change=allow_version_change,
            dataset=None if dataset is None else dataset.expanduser().resolve(),
            only=only,
            say=say,
        )
    except KeyboardInterrupt:
        say(f"stopped; run the same command again to resume {out}: finished runs and stages are kept")
        raise typer.Exit(130) from None


if __name__ == "__main__":
    app()
