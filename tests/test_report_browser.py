"""The report in a real headless Chromium: it renders every section and image, with no console errors.

Skipped when no ``chromium`` (Debian) or ``chromium-browser`` is on PATH; ``.ci/run`` installs it when root.
"""

from __future__ import annotations

import html as html_module
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "report"))

from report_helpers import STRATEGIES, report_experiments

from alseg.report.html import SECTIONS, build_report

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); the browser test needs one"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--mute-audio"]
# a console message as Chromium logs it with --enable-logging=stderr, e.g. (Chromium 120+)
# [392:392:1122/135028.052552:INFO:CONSOLE:1] "boom", source: file:///tmp/bad.html (1)  or, older, CONSOLE(1)]
CONSOLE_RE = re.compile(r'CONSOLE[:(]\d+\)?\] "(.*?)", source: (\S*)')
PAGE_ERROR_RE = re.compile(r"(Uncaught|Failed to load resource|net::ERR_|Refused to|Not allowed to load)")


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const rows = Array.from(document.images).map((i) => [
    i.closest("section") ? i.closest("section").id : "", i.alt, i.complete, i.naturalWidth, i.naturalHeight,
    i.getBoundingClientRect().width,
  ]);
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(rows);
  document.body.appendChild(out);
});
</script>"""


def _loaded_images(report: Path, tmp: Path) -> list[list]:
    """``[section id, alt, complete, natural width, natural height, displayed width]`` per image, as Chromium
    loaded them (a copy of the report with :data:`IMAGE_CHECK` before ``</body>``)."""
    page = report.read_text(encoding="utf-8")
    assert "</body>" in page
    checked = tmp / "report_checked.html"
    checked.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = _chromium(["--virtual-time-budget=10000", "--dump-dom", checked.resolve().as_uri()], tmp)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout, re.S)
    assert found is not None, "the image check did not run"
    return json.loads(html_module.unescape(found.group(1)))


def test_report_renders_in_chromium(
    _synthetic_template: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    exps = report_experiments(_synthetic_template, tmp_path_factory)
    report = tmp_path / "report.html"
    build_report([exps["root"]], report)
    url = report.resolve().as_uri()

    # the DOM after rendering: every section heading and every embedded image
    dom = _chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for sid, heading in SECTIONS:
        assert re.search(rf'<section id="{sid}">\s*<h2>{re.escape(heading)}</h2>', html), f"{heading} not rendered"
    n_images = len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', html))
    assert n_images == 2 + 1 + 1 + 1 + len(STRATEGIES) + 1
    console = CONSOLE_RE.findall(dom.stderr)
    assert not console, f"console messages: {console}"
    page_errors = [line for line in dom.stderr.splitlines() if PAGE_ERROR_RE.search(line)]
    assert not page_errors, page_errors

    # every image decoded and laid out, the cost-axis figure among them: a copy of the page with a script that lists
    # each image's section, decoded size and displayed width once the page has loaded (the report has no script)
    images = _loaded_images(report, tmp_path)
    assert len(images) == n_images
    not_loaded = [(sec, alt) for sec, alt, complete, width, height, shown in images if not (complete and width > 0)]
    assert not not_loaded, not_loaded
    assert all(shown > 0 for *_, shown in images), images
    axes = [(alt, width, height) for sec, alt, _, width, height, _ in images if sec == "cost-axes"]
    assert len(axes) == 1 and axes[0][0].startswith("cost axes: ") and axes[0][1] > 400 and axes[0][2] > 300
    assert re.search(r'<section id="annotators">\s*<h2>Annotators</h2>', html)

    # the screenshot: a tall page that is mostly not blank
    shot = tmp_path / "report.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1400,6000", url], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 6000)
        grey = im.convert("L").resize((140, 600))
        pixels = np.asarray(grey)
    distinct = len(np.unique(pixels))
    non_background = float(np.mean(pixels < 235))
    assert distinct > 50 and non_background > 0.1, (distinct, non_background)
    assert shot.stat().st_size > 100_000
