"""The demo experiment: a small real run on the Hippocampus subset bundled with the package."""

from __future__ import annotations

from alseg.config import ExperimentConfig
from alseg.data.dataset import demo_dataset_path


def demo_config(strategy: str = "random_fg33", rounds: int = 3, seed: int = 0) -> ExperimentConfig:
    """Config of the demo: 40 bundled cases (30 pool, 10 held out), 20^3 boxes, 15 per round.

    Each round trains with the ``cpu`` profile's schedule, calibrated on 2 CPU cores by
    ``benchmarks/cpu_profile.py`` (warm-started from the previous round); the whole demo stays under 15 minutes.
    15 boxes a round: boxes placed at random leave gaps where no further 20^3 box fits, so the 30 pool cases
    hold only 54 to 59 of them (5 seeds of ``random_fg33``), fewer than the 60 of three rounds of 20.
    """
    return ExperimentConfig(
        dataset=demo_dataset_path(),
        strategy=strategy,
        seed=seed,
        rounds=rounds,
        query_size=15,
        unit="box",
        profile="cpu",
        device="cpu",
    )
