"""The paper settings in ``examples/papers/``: each loads, names a registered strategy with valid parameters (as
``alseg strategies --json`` lists them), gives that strategy the samples it needs, lists its differences from
the paper, and creates an experiment (on the synthetic dataset, shrunk to fit it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alseg.cli import app
from alseg.config import load_config
from alseg.loop.create import create_experiment

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "papers"
PAPER_SETTINGS = {
    "nnactive_clasp_pe_hippocampus.yaml": ("clasp_pe", "box", "ensemble", 5),
    "foellmer_usim_hippocampus_2d.yaml": ("usim_f", "slice", "mc_dropout", 10),
    "gaillochet_stochastic_batches_prostate.yaml": ("stochastic_batches", "slice", "softmax", 1),
}


@pytest.fixture(scope="module")
def registered() -> dict[str, dict]:
    result = CliRunner().invoke(app, ["strategies", "--json"])
    assert result.exit_code == 0, result.output
    return {s["key"]: s for s in json.loads(result.stdout)}


def test_every_paper_has_its_example() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(PAPER_SETTINGS)


@pytest.mark.parametrize("name", sorted(PAPER_SETTINGS))
def test_paper_example_is_a_valid_setting(name: str, registered: dict[str, dict]) -> None:
    path = EXAMPLES / name
    cfg = load_config(path)
    strategy, unit, source, k = PAPER_SETTINGS[name]
    assert (cfg.strategy, cfg.unit, cfg.uncertainty.source, cfg.uncertainty.n_samples) == (strategy, unit, source, k)
    entry = registered[cfg.strategy]
    assert set(cfg.strategy_params) <= set(entry["params"]), "a parameter the strategy does not have"
    needs = entry["needs"]
    assert cfg.uncertainty.n_samples >= needs["min_samples"]
    assert not needs["ground_truth"]
    text = path.read_text()
    assert "Remaining differences" in text and "alseg run examples/papers/" + name in text


@pytest.mark.parametrize("name", sorted(PAPER_SETTINGS))
def test_paper_example_creates_an_experiment(name: str, synthetic_dataset: Path, tmp_path: Path) -> None:
    """The example's own settings, on the small synthetic dataset: only the sizes shrink to fit it."""
    cfg = load_config(EXAMPLES / name)
    small = cfg.model_copy(
        update={"dataset": synthetic_dataset, "query_size": 2, "starting_budget": 6, "rounds": 2}
        | ({"region_size": [8, 8, 8]} if cfg.unit == "box" else {})
    )
    stored = create_experiment(small, tmp_path / "exp")
    assert stored.strategy == cfg.strategy and stored.strategy_params == cfg.strategy_params
    assert stored.schedule == cfg.schedule and stored.uncertainty == cfg.uncertainty
