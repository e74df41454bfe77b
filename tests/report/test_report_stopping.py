"""The report's "When to stop" section: one table per active-learning run with its per-round stopping signals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from report_helpers import ROUNDS, RUNNING, SEEDS, STRATEGIES, report_experiments

from alseg.config import load_config
from alseg.evaluation.stopping import CONTINUE, STOP
from alseg.report.html import build_report
from alseg.report.stopping import experiment_stopping


def _section(page: str) -> str:
    m = re.search(r'<section id="when-to-stop">(.*?)</section>', page, re.S)
    assert m is not None, "section when-to-stop missing"
    return m.group(1)


def test_report_has_a_stopping_table_per_run(
    _synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    exps = report_experiments(_synthetic_template, tmp_path_factory)
    out = tmp_path / "report.html"
    build_report([exps["root"]], out)
    section = _section(out.read_text(encoding="utf-8"))
    assert "<h2>When to stop</h2>" in section
    titles = re.findall(r"<h3>(.*?)</h3>", section)
    assert len(titles) == len(STRATEGIES) * len(SEEDS) + 1  # the full-data reference has none
    assert not any("full data" in t for t in titles)
    tables = re.findall(r"<table>(.*?)</table>", section, re.S)
    assert len(tables) == len(titles)
    rows_per_table = [len(re.findall(r"<tr><td>", t)) for t in tables]
    assert sorted(rows_per_table) == [2] + [ROUNDS] * (len(titles) - 1)  # the running run has evaluated 2 rounds
    assert "first round: no earlier prediction to compare with" in section
    assert "95% budget of the fitted curve" in section

    # the table shows what alseg.loop.stopping computes from the run's files
    run = exps["runs"][(STRATEGIES[0], SEEDS[0])]
    rows, summary = experiment_stopping(run, load_config(run / "config.yaml"))
    assert sorted(rows) == list(range(ROUNDS))
    assert rows[0]["stability"] is None
    for r in range(1, ROUNDS):
        assert 0.0 <= rows[r]["stability"] <= 1.0
        assert f"<td>{rows[r]['stability']:.3f}</td>" in section
        assert rows[r]["recommendation"] in (STOP, CONTINUE)
    assert summary["stop_set_size"] == 6  # the default 20 is more than the pool: all 6 pool cases
    running = exps["running"]
    assert RUNNING in running.name
