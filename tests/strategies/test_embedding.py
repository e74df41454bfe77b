"""Core-Set starts from the annotated regions; BADGE starts from the largest gradient norm."""

from __future__ import annotations

import sys
from pathlib import Path

from alseg.strategies.registry import get_strategy

sys.path.insert(0, str(Path(__file__).parent))
from test_behaviour import syn as conformance


def test_coreset_starts_from_the_annotated_regions() -> None:
    regions = get_strategy("coreset").query(conformance.make_context(conformance.make_pool(), "coreset"))
    # every case has annotated boxes: the first centre is the candidate farthest from them, not a fallback
    assert [r.info["pick"] for r in regions] == ["farthest"] * len(regions)
    distances = [r.info["distance_to_centres"] for r in regions]
    assert distances == sorted(distances, reverse=True)  # greedy k-center: distances never grow


def test_badge_starts_from_the_largest_gradient_norm() -> None:
    regions = get_strategy("badge").query(conformance.make_context(conformance.make_pool(), "badge"))
    assert regions[0].info["pick"] == "max_norm"
    assert all(r.info["pick"] == "d2" for r in regions[1:])
