"""Shared helpers of the benchmark scripts: provenance and the one-JSON-line result convention."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULT_PATHS = (
    ":(exclude)benchmarks/results",
    ":(exclude,glob)benchmarks/studies/*/results/**",
    ":(exclude)benchmarks/studies/results",
    ":(exclude)benchmarks/studies/FINDINGS.md",
    ":(exclude)benchmarks/studies/TIMING.md",
)


def shared_hippocampus() -> Path | None:
    """The full Hippocampus dataset beside the checkout (``../shared``), if present."""
    for cand in (ROOT.parent / "shared" / "datasets" / "hippocampus", Path("/work/shared/datasets/hippocampus")):
        if (cand / "dataset.json").exists():
            return cand
    return None


def provenance() -> dict[str, Any]:
    """The command, the commit (``+dirty`` with the modified tracked files named), the date and the machine."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        # result files the benchmarks write themselves do not make the code that measured them dirty
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *RESULT_PATHS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        modified = [line[3:] for line in status.splitlines() if line.strip()]
    except OSError:
        commit, modified = "unknown", ["(git not found)"]
    out: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit + ("+dirty" if modified else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
    }
    if modified:
        out["modified_files"] = modified
    return out


def save_result(name: str, data: dict[str, Any]) -> None:
    """Save ``data`` (with provenance) under benchmarks/results/NAME.json and print it as the last line."""
    out = {**data, "provenance": provenance()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


def box_setting_config(dataset: Path, strategy: str, seed: int, rounds: int, query_size: int) -> Any:
    """The benchmarks' 3D setting: 20^3-style boxes (dataset default), ``cpu`` profile, on the CPU."""
    from alseg.config import ExperimentConfig

    return ExperimentConfig(
        dataset=dataset,
        strategy=strategy,
        seed=seed,
        rounds=rounds,
        query_size=query_size,
        unit="box",
        profile="cpu",
        device="cpu",
    )


def write_report(md_path: Path, lines: list[str], json_path: Path, data: dict[str, Any]) -> None:
    """A generated Markdown file and the JSON of the numbers in it."""
    md_path.write_text("\n".join(lines))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {md_path} and {json_path}")


def study_arguments(doc: str, name: str) -> Any:
    """The study scripts' command line: ``--study3d DIR [--study2d DIR] [--out NAME.md] [--json results/...]``."""
    import argparse

    here = ROOT / "benchmarks" / "studies"
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--study3d", type=Path, required=True)
    p.add_argument("--study2d", type=Path, default=None)
    p.add_argument("--out", type=Path, default=here / f"{name.upper()}.md")
    p.add_argument("--json", type=Path, default=here / "results" / f"{name}.json")
    return p.parse_args()
