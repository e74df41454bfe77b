"""What an experiment has done so far, read from its database only (works while it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alseg.config import load_config
from alseg.loop.runner import CONFIG_FILE, DB_FILE, ExperimentError
from alseg.loop.state import ExperimentState


def experiment_status(exp_dir: Path) -> dict[str, Any]:
    """Per round: regions, annotation cost, Dice (foreground mean and per class), stages done.

    With the human oracle also ``annotation``: the round waiting for labels and every region's state
    (done and by which file, waiting, or closed unlabelled).
    """
    exp_dir = Path(exp_dir)
    if not (exp_dir / CONFIG_FILE).exists() or not (exp_dir / DB_FILE).exists():
        raise ExperimentError(f"{exp_dir} is not an alseg experiment (no {CONFIG_FILE} / {DB_FILE})")
    cfg = load_config(exp_dir / CONFIG_FILE)
    state = ExperimentState(exp_dir / DB_FILE)
    try:
        metrics = state.metrics()
        stages = state.stages()
        regions = state.regions()
        annotation = None
        if cfg.oracle == "human":
            from alseg.oracle.files import annotation_rows, waiting_round

            annotation = {"waiting_round": waiting_round(state), "regions": annotation_rows(state)}
    finally:
        state.close()
    rounds_seen = sorted({s["round"] for s in stages} | set(metrics))
    rows = []
    for r in rounds_seen:
        upto = [g for g in regions if g.round <= r and g.status == "annotated"]
        fg = [sum(v for v in (g.fg_voxels or {}).values()) for g in upto]
        m = metrics.get(r, {})
        cost = m.get("cost", {})
        rows.append(
            {
                "round": r,
                "n_regions": len(upto),
                "n_regions_added": sum(1 for g in regions if g.round == r),
                "annotated_voxels": sum(g.n_voxels for g in upto),
                "annotated_fg_voxels": sum(fg),
                "fg_fraction": cost.get("fg_fraction"),
                "dice_mean": m.get("dice_mean"),
                "dice_per_class": m.get("dice_per_class", {}),
                "dice2d_mean": m.get("dice2d_mean"),
                "hd95_mean": m.get("hd95_mean"),
                "stages_done": [s["stage"] for s in stages if s["round"] == r and s["status"] == "done"],
                "seconds": {s["stage"]: s["seconds"] for s in stages if s["round"] == r},
            }
        )
    return {
        "experiment": str(exp_dir),
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "uncertainty": {"source": cfg.uncertainty.source, "n_samples": cfg.uncertainty.n_samples},
        "oracle": cfg.oracle,
        "rounds_planned": cfg.rounds,
        "complete": bool(rows) and len(rows) == cfg.rounds and "evaluate" in rows[-1]["stages_done"],
        "rounds": rows,
        **({"annotation": annotation} if annotation is not None else {}),
    }
