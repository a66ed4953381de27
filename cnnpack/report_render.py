"""Rendering the report's blocks (headings, paragraphs, tables, images, code): Markdown with image links, and
self-contained HTML with the images inlined."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

from cnnpack.errors import ratio
from cnnpack.rundir import Run


@dataclass
class Block:
    kind: str  # h2 | p | table | img | code
    text: str = ""
    rows: list[list[str]] | None = None  # first row is the header
    path: str = ""  # img: relative to the run directory


class Literal(str):
    """Text shown as it is, none of its characters read as Markdown or HTML: a class or file name ("a|b" split its
    table row, "<img src=x onerror=...>" was a live tag in report.md, `tick` lost its backticks in report.html)."""


_MARKDOWN = re.compile(r"([\\`*_\[\]<>&|~])")  # (what CommonMark and GFM tables read as marks in a cell)


def _md(cell: str) -> str:
    """A table cell in Markdown: a Literal with every mark escaped; the report's own text with its `|` escaped."""
    return _MARKDOWN.sub(r"\\\1", cell) if isinstance(cell, Literal) else cell.replace("|", "\\|")


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {_md(Literal(title))}", ""]  # (the run folder's name is in it: "<img onerror=...>" was a live tag)
    for b in blocks:
        if b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "code":
            out += ["```", b.text, "```", ""]
        elif b.kind == "img":
            out += [f"![{b.text}]({b.path})", ""]
        elif b.kind == "table":
            head, *rows = b.rows
            out += ["| " + " | ".join(map(_md, head)) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(map(_md, r)) + " |" for r in rows] + [""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escapes text and renders the two Markdown marks the report uses: `code` and **bold** (a Literal: as it is)."""
    s = html.escape(text)
    if isinstance(text, Literal):
        return s
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def to_html(title: str, blocks: list[Block], run: Run) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:0.92em}"
             "td:first-child,th:first-child{text-align:left}pre{background:#f4f4f4;padding:1em;white-space:pre-wrap;overflow-wrap:anywhere}"
             ".wide{overflow-x:auto}"  # a table wider than the page scrolls inside it, not past its right edge
             "img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if b.kind == "h2":
            parts.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "code":
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "img":
            data = base64.b64encode(run.file(b.path).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'></p>")
        elif b.kind == "table":
            head, *rows = b.rows
            parts.append("<div class='wide'><table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                         + "</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def pct(x) -> str:
    """A fraction as a percentage, or a dash when not recorded."""
    return "–" if x is None else f"{100 * x:.2f}%"


def num(x, fmt: str = "{:.3g}") -> str:
    """A figure in its format, or a dash when not recorded."""
    return "–" if x is None else fmt.format(x)


def times(x) -> str:
    """A ratio (`errors.ratio`, 1.73× or 0.0048×), or a dash when not recorded."""
    return "–" if x is None else ratio(x, "×")
