"""The HTML report and the ``alseg report`` / ``alseg compare`` commands on fake-backend experiments."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from report_helpers import RUNNING, STRATEGIES, copy_without_metrics, report_experiments
from typer.testing import CliRunner

from alseg.cli import app
from alseg.report.html import SECTIONS, build_report

IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def exps(_synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return report_experiments(_synthetic_template, tmp_path_factory)


def _sections(page: str) -> dict[str, str]:
    """Section id -> its HTML."""
    out = {}
    for sid, _ in SECTIONS:
        m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
        assert m is not None, f"section {sid} missing"
        out[sid] = m.group(1)
    return out


def check_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", page)
    assert "http://" not in page and "https://" not in page


def test_report_has_every_section_and_image(exps: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    cmp = build_report([exps["root"]], out, csv_dir=tmp_path / "csv", figures_dir=tmp_path / "figures")
    page = out.read_text(encoding="utf-8")
    check_self_contained(page)
    sections = _sections(page)
    for sid, heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in sections[sid]
    images = IMG_RE.findall(page)
    for _, data in images:
        assert base64.b64decode(data).startswith(PNG_MAGIC)
    # learning curves + per-round metrics, cost, Dice against each cost axis, PPM, one gallery per strategy (3)
    assert len(IMG_RE.findall(sections["learning-curves"])) == 2
    assert len(IMG_RE.findall(sections["annotation-cost"])) == 1
    assert len(IMG_RE.findall(sections["cost-axes"])) == 1
    assert len(IMG_RE.findall(sections["ppm"])) == 1
    assert len(IMG_RE.findall(sections["queried-regions"])) == len(STRATEGIES) + 1
    assert len(images) == 2 + 1 + 1 + 1 + len(STRATEGIES) + 1
    # the summary names every strategy, the baseline and the reference; the running run is flagged
    summary = sections["summary-table"]
    for strategy in [*STRATEGIES, RUNNING]:
        assert f"<h3>{strategy}</h3>" in sections["queried-regions"]
        assert strategy in summary
    assert "random (baseline)" in summary and "full data (reference)" in summary
    assert "1 running" in summary and "running / stopped" in sections["experiments"]
    assert "needs at least two settings" in sections["rankings"]
    # CSV tables and figure files come along
    assert (tmp_path / "csv" / "summary.csv").is_file()
    figures = sorted((tmp_path / "figures").glob("*.png"))
    assert len(figures) == len(images) and figures[0].read_bytes().startswith(PNG_MAGIC)
    assert cmp.baseline == "random"


def test_report_of_a_single_seed_and_no_reference(exps: dict[str, Any], tmp_path: Path) -> None:
    runs = exps["runs"]
    out = tmp_path / "r.html"
    build_report([runs[("random", 0)], runs[("random_fg33", 0)]], out)
    page = out.read_text(encoding="utf-8")
    sections = _sections(page)
    assert "no paired t-test is possible" in sections["ppm"]
    assert not IMG_RE.findall(sections["ppm"])
    assert "no full-data reference" in sections["learning-curves"]
    assert "no full-data reference" in sections["summary-table"]


def test_report_before_any_evaluation(exps: dict[str, Any], tmp_path: Path) -> None:
    """An experiment that has not evaluated a round yet: the report still builds and says so."""
    copy = copy_without_metrics(exps["runs"][("random", 1)], tmp_path / "fresh")
    out = tmp_path / "r.html"
    build_report([copy], out)
    page = out.read_text(encoding="utf-8")
    sections = _sections(page)
    assert "no evaluated rounds yet" in sections["learning-curves"]
    assert "no evaluated rounds yet" in sections["summary-table"]
    check_self_contained(page)


def test_report_with_explicit_reference_and_missing_dataset(exps: dict[str, Any], tmp_path: Path) -> None:
    """--full-data marks a reference; a dataset that moved away only drops the gallery, with a note."""
    runs = exps["runs"]
    moved = tmp_path / "moved"
    shutil.copytree(runs[("random", 0)], moved)
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(re.sub(r"(?m)^dataset: .*$", f"dataset: {tmp_path / 'gone'}", cfg))
    out = tmp_path / "r.html"
    cmp = build_report([moved, runs[("random_fg33", 0)]], out, full_data=[exps["full_data"]])
    assert len(cmp.results.references) == 1
    page = out.read_text(encoding="utf-8")
    sections = _sections(page)
    assert "cannot be read" in sections["queried-regions"]


def test_cli_report_and_compare(exps: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.html"
    dirs = [str(p) for p in exps["runs"].values()] + [str(exps["running"])]
    result = runner.invoke(
        app, ["report", *dirs, "-o", str(out), "--csv", str(tmp_path / "csv"), "--full-data", str(exps["full_data"])]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "csv" / "ppm.csv").is_file()

    result = runner.invoke(app, ["compare", str(exps["root"]), "--baseline", "random_fg33"])
    assert result.exit_code == 0, result.output
    for word in ("random_fg33 (baseline)", "random", RUNNING, "AUBC", "Final Dice", "FG-Eff", "full data"):
        assert word in result.output

    result = runner.invoke(app, ["compare", str(exps["root"]), "--baseline", "nope"])
    assert result.exit_code == 1 and "not among the strategies" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing"), "-o", str(out)])
    assert result.exit_code == 1 and "does not exist" in result.output
