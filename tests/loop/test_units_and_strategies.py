"""Every annotation unit and every registered strategy runs through the loop (fake backend, synthetic data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alseg.data.regions import Box
from alseg.loop.drivers import run_experiment
from alseg.store.layout import DB_FILE
from alseg.store.state import ExperimentState
from alseg.strategies.registry import STRATEGIES
from conftest import SYN_SHAPE, RecordingFactory, make_config


def _regions(exp: Path) -> list:
    state = ExperimentState(exp / DB_FILE)
    try:
        return state.regions()
    finally:
        state.close()


@pytest.mark.parametrize(
    ("unit", "extra", "expected_size"),
    [
        ("slice", {"slice_axis": 0}, (1, *SYN_SHAPE[1:])),
        ("slice", {"slice_axis": 2}, (*SYN_SHAPE[:2], 1)),
        ("case", {"query_size": 1, "starting_budget": 2}, SYN_SHAPE),
    ],
)
def test_units(_synthetic_template: Path, tmp_path: Path, unit: str, extra: dict, expected_size: tuple) -> None:
    cfg = make_config(_synthetic_template, unit=unit, region_size=None, strategy="entropy", **extra)
    exp = run_experiment(cfg, tmp_path / "exp", RecordingFactory())
    regions = _regions(exp)
    assert regions and all(r.region.box.size == expected_size for r in regions)
    by_case: dict[str, list[Box]] = {}
    for r in regions:
        for other in by_case.get(r.region.case_id, []):
            assert not other.overlaps(r.region.box)
        by_case.setdefault(r.region.case_id, []).append(r.region.box)


NEEDS_SAMPLES = {key for key, cls in STRATEGIES.items() if cls().needs.min_samples > 1}


@pytest.mark.parametrize("key", sorted(STRATEGIES))
def test_every_strategy_runs_in_the_loop(_synthetic_template: Path, tmp_path: Path, key: str) -> None:
    extra = {"uncertainty": {"source": "mc_dropout", "n_samples": 3}} if key in NEEDS_SAMPLES else {}
    cfg = make_config(_synthetic_template, strategy=key, rounds=2, **extra)
    exp = run_experiment(cfg, tmp_path / "exp", RecordingFactory())
    regions = _regions(exp)
    assert len(regions) == 2 * cfg.query_size
    assert {r.round for r in regions} == {0, 1}
    assert all(r.status == "annotated" for r in regions)


@pytest.mark.parametrize(("key", "query_k"), [("bald", 3), ("entropy", 3), ("coreset", 1), ("badge", 1)])
def test_query_predicts_the_samples_the_strategy_reads(
    _synthetic_template: Path, tmp_path: Path, key: str, query_k: int
) -> None:
    """Under MC dropout (K = 3) the query predicts K samples for the strategies that read them, one deterministic
    prediction for Core-Set (features only) and BADGE (the network's own prediction); evaluation predicts 1."""
    factory = RecordingFactory()
    cfg = make_config(_synthetic_template, strategy=key, rounds=2, uncertainty={"source": "mc_dropout", "n_samples": 3})
    run_experiment(cfg, tmp_path / "exp", factory)
    ks = [k for b in factory.backends for k in b.predict_samples]
    assert query_k in ks and set(ks) <= {1, query_k}
    assert ks.count(query_k) >= 1 and (query_k == 1 or ks.count(query_k) == 1)
