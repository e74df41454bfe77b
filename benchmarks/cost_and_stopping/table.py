"""The issue-13 table: per round, the share of queried voxels that needed correction, the strokes, the prediction
stability and the recommendation, against held-out Dice; read from finished (or running) experiments.

    python benchmarks/cost_and_stopping/table.py /work/runs/issue13/random_fg33 /work/runs/issue13/clasp_pe \
        --json benchmarks/results/cost_and_stopping.json

Prints a Markdown table (for the README) and writes the numbers with the commit that produced them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from alseg.loop.status import experiment_status


def rows_of(exp: Path) -> list[dict[str, Any]]:
    status = experiment_status(exp)
    out = []
    for row in status["rounds"]:
        added = row["n_regions_added"]
        voxels_added = row["annotated_voxels"] - (out[-1]["voxels_total"] if out else 0)
        measured = row["n_regions_measured"] - (out[-1]["measured_total"] if out else 0)
        complete = measured == added  # every region of the round measured (older runs: none)
        out.append(
            {
                "strategy": status["strategy"],
                "round": row["round"],
                "regions_added": added,
                "voxels_total": row["annotated_voxels"],
                "fg_total": row["annotated_fg_voxels"],
                "fg_added": row["annotated_fg_voxels"] - (out[-1]["fg_total"] if out else 0),
                "voxels_added": voxels_added,
                "measured_total": row["n_regions_measured"],
                "corrected_added": row["corrected_voxels_added"] if complete else None,
                "corrected_share": row["corrected_voxels_added"] / voxels_added if complete and voxels_added else None,
                "strokes_added": row["strokes_added"] if complete else None,
                "stability": row.get("stability"),
                "stop_set_entropy": row.get("stop_set_entropy"),
                "recommendation": row.get("recommendation"),
                "dice": row["dice_mean"],
                "dice_gain": row.get("dice_gain"),
                "fg_fraction": row["fg_fraction"],
            }
        )
    return out


def fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    table = [r for exp in args.experiments for r in rows_of(exp)]
    head = ["strategy", "round", "voxels queried", "fg voxels", "corrected (share)", "strokes", "stability"]
    head.append("recommendation")
    print("| " + " | ".join([*head, "held-out Dice"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for r in table:
        share = "—" if r["corrected_share"] is None else f"{r['corrected_added']} ({r['corrected_share']:.1%})"
        print(
            f"| {r['strategy']} | {r['round']} | {r['voxels_added']} | {r['fg_added']} | {share} | "
            f"{fmt(r['strokes_added'], 'd')} | "
            f"{fmt(r['stability'], '.3f')} | {r['recommendation'] or '—'} | {fmt(r['dice'], '.3f')} |"
        )
    if args.json is not None:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = {
            "command": "python " + " ".join([sys.argv[0], *map(str, argv or sys.argv[1:])]),
            "commit_read_at": commit,
            "experiments": [str(e) for e in args.experiments],
            "rows": table,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
