"""The report's HTML pieces: escaped text, an embedded PNG figure, a note, a number, a table.

Shared by the sections of :mod:`alseg.report.html` and the modules that render a section of their own.

>>> num(0.5), num(float("nan")), note("a < b")
('0.500', '–', '<p class="note">a &lt; b</p>')
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

__all__ = ["escape", "img", "note", "num", "table"]


def escape(text: object) -> str:
    """``text`` as HTML text (quotes escaped too)."""
    return html.escape(str(text), quote=True)


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` as a base64 data URL (the form ``write_figures`` finds)."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def note(text: str) -> str:
    """A highlighted paragraph of plain text."""
    return f'<p class="note">{escape(text)}</p>'


def num(v: float | None, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; "–" for None, NaN and infinity."""
    return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, row_classes: Sequence[str] = ()) -> str:
    """HTML table; cells are already-escaped HTML; the first ``left`` columns are left-aligned."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if k < len(row_classes) and row_classes[k] else ""
        cells = "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
