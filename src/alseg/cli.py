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
    from alseg.loop.runner import ExperimentError
    from alseg.loop.state import ExperimentLockedError

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
) -> None:
    """Run or resume an experiment to its last round."""
    from alseg.config import load_config
    from alseg.loop.runner import run_experiment

    cfg = _guarded(load_config, config)
    _guarded(run_experiment, cfg, out)
    _print_status(out, as_json=False)


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
    table = Table(title=f"{exp_dir} ({data['strategy']}, seed {data['seed']})")
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="experiment directory")] = Path("demo_exp"),
    strategy: Annotated[str, typer.Option(help="query strategy")] = "random_fg33",
    rounds: Annotated[int, typer.Option(help="training rounds including the starting one")] = 3,
    seed: Annotated[int, typer.Option(help="experiment seed")] = 0,
) -> None:
    """Run a small real experiment on the bundled Hippocampus subset (CPU, a few minutes)."""
    from alseg.demo import demo_config
    from alseg.loop.runner import run_experiment

    cfg = _guarded(demo_config, strategy=strategy, rounds=rounds, seed=seed)
    _guarded(run_experiment, cfg, out)
    _print_status(out, as_json=False)


@app.command()
def strategies(
    as_json: Annotated[bool, typer.Option("--json", help="print the keys as a JSON list")] = False,
) -> None:
    """List the registered query strategies."""
    from alseg.strategies.registry import list_strategies

    items = list_strategies()
    if as_json:
        sys.stdout.write(json.dumps([k for k, _ in items]) + "\n")
        return
    table = Table(title="query strategies")
    table.add_column("key")
    table.add_column("description")
    for key, desc in items:
        table.add_row(key, desc)
    Console().print(table)


if __name__ == "__main__":
    app()
