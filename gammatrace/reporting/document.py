"""One document structure, two renderers: Markdown (``summary.md``) and HTML (``report.html``).

The report's content is built once as a list of blocks; each renderer only decides how a
block looks. Text is plain (no inline markup), so nothing written for one format can
leak markup into the other: the Markdown renderer escapes what CommonMark would
interpret, the HTML renderer escapes what HTML would.
Numbers become cell text through one formatter, :func:`fmt`.

Example:
    >>> doc = [Heading("Runs"), Table(["run", "loss"], [["relu", "0.25"]])]
    >>> print(to_markdown(doc))
    # Runs
    <BLANKLINE>
    | run | loss |
    |---|---|
    | relu | 0.25 |
    <BLANKLINE>
    >>> "<td>relu</td>" in to_html(doc, title="t")
    True
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MISSING = "—"  # a table cell whose number is absent or undefined


def fmt(x: Any, digits: int = 4) -> str:
    """A table cell: ``digits`` significant digits, yes/no for flags, — for absent/NaN.

    Example:
        >>> fmt(0.0123456), fmt(True), fmt(None), fmt(float("nan")), fmt(12)
        ('0.01235', 'yes', '—', '—', '12')
    """
    if x is None:
        return MISSING
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}g}" if math.isfinite(x) else MISSING
    return str(x)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 1


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    """A figure written next to the report: ``png`` (and ``pdf``) are file names in ``out``."""

    png: str
    caption: str
    pdf: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Details:
    """Blocks folded under a one-line ``summary``: ``<details>`` in HTML, closed until the
    reader opens it. ``summary.md`` does not fold: there the summary is a heading of
    ``level`` and the blocks follow it, so the file reads straight through as text."""

    summary: str
    blocks: list[Block]
    level: int = 2


Block = Heading | Text | Bullets | Table | Figure | Details


def fold(blocks: list[Block], summary: str | None = None) -> Details:
    """``blocks`` folded: a section that starts with its heading becomes a :class:`Details`
    whose summary is that heading (or ``summary``).

    Example:
        >>> d = fold([Heading("Runs", 2), Text("one row per run")])
        >>> d.summary, d.blocks, d.level
        ('Runs', [Text(text='one row per run')], 2)
        >>> print(to_markdown([d]))
        ## Runs
        <BLANKLINE>
        one row per run
        <BLANKLINE>
        >>> print(to_html([d], title="t").split("<body>")[1].split("</body>")[0].strip())
        <details><summary>Runs</summary>
        <p>one row per run</p>
        </details>
    """
    if blocks and isinstance(blocks[0], Heading):
        return Details(summary or blocks[0].text, list(blocks[1:]), blocks[0].level)
    return Details(summary or "Details", list(blocks))


# ----------------------------------------------------------------------------- Markdown
def md_escape(text: str) -> str:
    r"""Escape what CommonMark would read as markup, leaving readable notation alone.

    An underscore between two word characters (``γ_k``, ``θ_T``) cannot start emphasis
    in CommonMark, so it stays unescaped and the source reads like the rendering.

    Example:
        >>> print(md_escape("γ_k > 0 | *a* _b_ [x] <y>"))
        γ_k > 0 \| \*a\* \_b\_ \[x\] \<y>
    """
    out = []
    for i, ch in enumerate(text):
        if ch == "_":
            prev = text[i - 1] if i else " "
            nxt = text[i + 1] if i + 1 < len(text) else " "
            if prev.isalnum() and nxt.isalnum():
                out.append(ch)
                continue
        if ch in "\\`*_[]<|":
            out.append("\\")
        out.append(ch)
    escaped = "".join(out)
    # A paragraph starting with '#' would become a heading.
    return "\\" + escaped if escaped.startswith("#") else escaped


def md_unescape(text: str) -> str:
    """Inverse of :func:`md_escape` (what a Markdown reader shows).

    Example:
        >>> md_unescape(md_escape("a|b_ *c*"))
        'a|b_ *c*'
    """
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def to_markdown(blocks: list[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown (figures as relative image links)."""
    parts: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + md_escape(b.text))
        elif isinstance(b, Text):
            parts.append(md_escape(b.text))
        elif isinstance(b, Bullets):
            parts.append("\n".join("- " + md_escape(item) for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(md_escape(h) for h in b.header) + " |",
                     "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in b.rows]
            parts.append("\n".join(lines))
        elif isinstance(b, Figure):
            lines = [f"![{md_escape(b.caption)}]({b.png})", "", md_escape(b.caption)]
            if b.pdf:
                lines[-1] += f" ([PDF]({b.pdf}))"
            lines += ["", *("- " + md_escape(n) for n in b.notes)] if b.notes else []
            parts.append("\n".join(lines))
        elif isinstance(b, Details):  # not folded in Markdown: its summary is the section's heading
            parts.append(to_markdown([Heading(b.summary, b.level), *b.blocks]).rstrip())
        else:  # pragma: no cover - a new block type must get a renderer
            raise TypeError(f"no Markdown renderer for {type(b).__name__}")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9rem; color: #444; }
details { margin: 0.75rem 0; border-left: 3px solid #ddd; padding-left: 0.75rem; }
summary { cursor: pointer; font-weight: 600; }
"""


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def to_html(blocks: list[Block], title: str, base: str | Path = ".") -> str:
    """Render blocks as one self-contained HTML page; figures are embedded as base64 PNG.

    ``base`` is the folder the figures' file names are relative to.
    """
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + _html_body(blocks, Path(base)) + "\n</body>\n</html>\n")


def _html_body(blocks: list[Block], base: Path) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            level = min(max(b.level, 1), 6)
            body.append(f"<h{level}>{_h(b.text)}</h{level}>")
        elif isinstance(b, Text):
            body.append(f"<p>{_h(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>\n" + "\n".join(f"<li>{_h(i)}</li>" for i in b.items) + "\n</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_h(h)}</th>" for h in b.header)
            rows = "\n".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
        elif isinstance(b, Figure):
            data = base64.b64encode((base / b.png).read_bytes()).decode("ascii")
            notes = "".join(f"<br>{_h(n)}" for n in b.notes)
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_h(b.caption)}">'
                        f"<figcaption>{_h(b.caption)}{notes}</figcaption></figure>")
        elif isinstance(b, Details):
            body.append(f"<details><summary>{_h(b.summary)}</summary>\n{_html_body(b.blocks, base)}\n</details>")
        else:  # pragma: no cover
            raise TypeError(f"no HTML renderer for {type(b).__name__}")
    return "\n".join(body)
