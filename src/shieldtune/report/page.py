"""A page of sections rendered twice: Markdown (images as files) and HTML (images embedded).

A section is a title and a list of blocks (paragraph, table, image, preformatted text). The
HTML is one self-contained file: images are PNGs embedded as base64 ``data:`` URIs and the
style sheet is inline, so it opens anywhere without the folder beside it. The Markdown refers
to the same PNGs written under ``report_files/``.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shieldtune.report.tables import html_table, markdown_table

__all__ = ["Paragraph", "Table", "Image", "Pre", "Section", "render_markdown", "render_html"]

IMAGES_DIR = "report_files"


@dataclass(frozen=True)
class Paragraph:
    """Plain text (escaped in HTML)."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table; the ``numeric`` columns (indexes) are right-aligned in HTML."""

    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    numeric: Sequence[int] = ()


@dataclass(frozen=True)
class Image:
    """A PNG figure: ``name`` is its file name under ``report_files/``."""

    name: str
    png: bytes
    alt: str


@dataclass(frozen=True)
class Pre:
    """Preformatted text (a config, a command)."""

    text: str


Block = Paragraph | Table | Image | Pre


@dataclass
class Section:
    """A titled part of the page."""

    title: str
    blocks: list[Block] = field(default_factory=list)


def render_markdown(title: str, sections: Sequence[Section], folder: Path) -> str:
    """The page as Markdown; writes each image under ``folder/report_files/``."""
    images = folder / IMAGES_DIR
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Paragraph):
                out += [b.text, ""]
            elif isinstance(b, Table):
                out += [markdown_table(b.headers, b.rows), ""]
            elif isinstance(b, Image):
                images.mkdir(parents=True, exist_ok=True)
                (images / b.name).write_bytes(b.png)
                out += [f"![{b.alt}]({IMAGES_DIR}/{b.name})", ""]
            else:
                out += ["```", b.text.rstrip("\n"), "```", ""]
    return "\n".join(out)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #1a1a1a;
       line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; border-bottom: 2px solid #333; padding-bottom: 4px; }
h2 { font-size: 20px; margin-top: 32px; border-bottom: 1px solid #bbb; padding-bottom: 2px; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 13.5px; }
th, td { border: 1px solid #c8c8c8; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
tr:nth-child(even) td { background: #f8f9fb; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; border: 1px solid #ddd; margin: 6px 0 14px; }
pre { background: #f4f4f4; border: 1px solid #ddd; padding: 8px 10px; font-size: 12.5px;
      white-space: pre-wrap; word-break: break-word; }
p { margin: 8px 0; }
code { background: #f0f0f0; padding: 0 3px; font-size: 13px; }
"""


def _inline_code(escaped: str) -> str:
    """Markdown's `code` spans as <code> (on already escaped text)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The page as one self-contained HTML document (images embedded as base64 PNG)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Paragraph):
                body.append(f"<p>{_inline_code(html.escape(b.text))}</p>")
            elif isinstance(b, Table):
                body.append(html_table(b.headers, b.rows, b.numeric))
            elif isinstance(b, Image):
                data = base64.b64encode(b.png).decode("ascii")
                body.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
            else:
                body.append(f"<pre>{html.escape(b.text)}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
