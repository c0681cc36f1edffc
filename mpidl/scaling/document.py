"""A report as a small neutral structure, and its two renderings: Markdown and a self-contained HTML page.

report.py builds a study's sections once, as a Document of blocks (headings, paragraphs, tables,
lists, figures, files), and writes `markdown(doc)` and `html(doc, images)`. The blocks say what a
part is; how it looks is each renderer's: a paragraph's style is bold in Markdown and a CSS class
in HTML, definitions are a list in Markdown and a table in HTML, a figure is a link to its PNG in
Markdown and the PNG itself in HTML.

The HTML escapes every text a block holds, and loads nothing from elsewhere: figures and files
are embedded as data: URIs, the style sheet is inline, and there is no script.
"""
from __future__ import annotations

import base64
import html as _html
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union


@dataclass(frozen=True)
class Code:
    """Code within a paragraph's text."""

    text: str


Inline = Union[str, Code]


@dataclass
class Heading:
    level: int
    text: str
    id: str = ""


@dataclass
class Paragraph:
    """Text (or parts of text and Code). style: "" plain; "headline" and "note" stand out (bold in
    Markdown); "small", "machine" are quieter. An empty paragraph leaves an empty line."""

    text: Union[str, tuple[Inline, ...]]
    style: str = ""
    id: str = ""


@dataclass
class Table:
    """A table of text; without rows, the `empty` sentence instead (or nothing)."""

    head: list[str]
    body: list[list[str]]
    empty: str = ""


@dataclass
class KeyValues:
    pairs: list[tuple[str, str]]


@dataclass
class Definitions:
    """(name, formula, meaning) rows."""

    rows: list[tuple[str, str, str]]


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Notes:
    """Remarks that each stand out; without any, the `empty` sentence."""

    items: list[str]
    empty: str


@dataclass
class Preformatted:
    text: str


@dataclass
class Figure:
    """A PNG written beside the report under `name`. heading: where a format has no captions
    (Markdown), the caption heads the figure."""

    name: str
    caption: str
    id: str = ""
    heading: bool = True


@dataclass
class File:
    """A file beside the report; `text` is its content where the page may carry it."""

    name: str
    text: Optional[str] = None
    mime: str = "text/plain"


@dataclass
class Files:
    """The raw files; `shown` are also shown in full where the page carries them."""

    title: str
    files: list[File]
    shown: list[str] = field(default_factory=list)


@dataclass
class Columns:
    """Side by side where the format can; one after the other otherwise."""

    main: list
    side: list


@dataclass
class Box:
    """A section set apart (the first screen)."""

    id: str
    title: str
    blocks: list


@dataclass
class Document:
    title: str
    blocks: list


Block = Union[Heading, Paragraph, Table, KeyValues, Definitions, Bullets, Notes, Preformatted, Figure, Files,
              Columns, Box]

_STANDS_OUT = ("headline", "note")


# ---------------------------------------------------------------- Markdown

def markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    for block in doc.blocks:
        lines += _md(block)
    return "\n".join(lines)


def md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _md_inline(text: Union[str, tuple[Inline, ...]]) -> str:
    parts = (text,) if isinstance(text, str) else text
    return "".join(f"`{p.text}`" if isinstance(p, Code) else p for p in parts)


def _md(b: Block) -> list[str]:
    """A block's lines, an empty line after it."""
    if isinstance(b, Heading):
        return ["#" * b.level + " " + b.text, ""]
    if isinstance(b, Paragraph):
        text = _md_inline(b.text)
        return [f"**{text}**" if text and b.style in _STANDS_OUT else text, ""]
    if isinstance(b, Table):
        if b.body:
            return [md_table(b.head, b.body), ""]
        return [b.empty, ""] if b.empty else []
    if isinstance(b, KeyValues):
        return [f"- **{k}**: {v}" for k, v in b.pairs] + [""]
    if isinstance(b, Definitions):
        return [f"- **{n}**: `{f}` — {w}" for n, f, w in b.rows] + [""]
    if isinstance(b, Bullets):
        return [f"- {item}" for item in b.items] + [""]
    if isinstance(b, Notes):
        return [f"- {n}" for n in b.items] + [""] if b.items else [b.empty, ""]
    if isinstance(b, Preformatted):
        return ["```", b.text, "```", ""]
    if isinstance(b, Figure):
        return ([f"### {b.caption}", ""] if b.heading else []) + [f"![{b.caption}]({b.name})", ""]
    if isinstance(b, Files):
        return [f"{b.title}: " + ", ".join(f"[{f.name}]({f.name})" for f in b.files) + ".", ""]
    if isinstance(b, Columns):
        return [line for c in [*b.main, *b.side] for line in _md(c)]
    if isinstance(b, Box):
        return [f"## {b.title}", ""] + [line for c in b.blocks for line in _md(c)]
    raise TypeError(f"not a report block: {b!r}")


# ---------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.8em;overflow:auto;
font-size:12px}.note{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em;margin:.4em 0}
h1{font-size:22px;margin:.2em 0}.machine{margin:.2em 0;color:#555;font-size:13px}
#summary{border:1px solid #cfd8e3;background:#f7fafd;padding:.4em .9em;margin:.5em 0 1.5em}
.headline{font-size:15px;margin:.35em 0}.cols{display:flex;gap:1.2em;align-items:flex-start;flex-wrap:wrap}
#headline-plot{margin:.3em 0;flex:0 1 680px;min-width:0}#headline-plot img{width:100%;max-width:680px}
#headline-plot figcaption{font-size:12px;color:#555}.side{flex:1 1 300px;min-width:0;font-size:13px}
.side table{font-size:12px}.side td,.side th{padding:2px 5px}
.small{font-size:12px;color:#444}"""


def html(doc: Document, images: Mapping[str, bytes]) -> str:
    """The page, every figure's PNG (images: name -> bytes) embedded."""
    e = _html.escape
    h = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(doc.title)}</title>"
         f"<style>{CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]
    for block in doc.blocks:
        h += _html_block(block, images)
    h.append("</body></html>")
    return "\n".join(h)


def html_table(head: list[str], body: list[list[str]]) -> str:
    e = _html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _attrs(ident: str = "", cls: str = "") -> str:
    e = _html.escape
    return (f" id='{e(ident)}'" if ident else "") + (f" class='{e(cls)}'" if cls else "")


def _html_inline(text: Union[str, tuple[Inline, ...]]) -> str:
    parts = (text,) if isinstance(text, str) else text
    return "".join(f"<code>{_html.escape(p.text)}</code>" if isinstance(p, Code) else _html.escape(p) for p in parts)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _html_block(b: Block, images: Mapping[str, bytes]) -> list[str]:
    e = _html.escape
    if isinstance(b, Heading):
        return [f"<h{b.level}{_attrs(b.id)}>{e(b.text)}</h{b.level}>"]
    if isinstance(b, Paragraph):
        text = _html_inline(b.text)
        return [f"<p{_attrs(b.id, b.style)}>{text}</p>" if text else ""]
    if isinstance(b, Table):
        if b.body:
            return [html_table(b.head, b.body)]
        return [f"<p>{e(b.empty)}</p>"] if b.empty else []
    if isinstance(b, KeyValues):
        return ["<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in b.pairs) + "</table>"]
    if isinstance(b, Definitions):
        return [html_table(["", "formula", "meaning"], [list(r) for r in b.rows])]
    if isinstance(b, Bullets):
        return ["<ul>", *[f"<li>{e(item)}</li>" for item in b.items], "</ul>"]
    if isinstance(b, Notes):
        return [f"<p class='note'>{e(n)}</p>" for n in b.items] or [f"<p>{e(b.empty)}</p>"]
    if isinstance(b, Preformatted):
        return [f"<pre>{e(b.text)}</pre>"]
    if isinstance(b, Figure):
        return [f"<figure{_attrs(b.id)}><img alt=\"{e(b.caption)}\" src=\"{_data_uri(images[b.name], 'image/png')}\">"
                f"<figcaption>{e(b.caption)}</figcaption></figure>"]
    if isinstance(b, Files):
        links: list[str] = []
        for f in b.files:
            if f.text is not None:
                links += [" · "] if links else []
                links.append(f'<a download="{e(f.name)}" href="{_data_uri(f.text.encode(), f.mime)}">{e(f.name)}</a>')
        texts = {f.name: f.text or "" for f in b.files}
        return [f"<h2>{e(b.title)}</h2><p>", *links, "</p>",
                *[f"<details><summary>{e(name)}</summary><pre>{e(texts[name])}</pre></details>" for name in b.shown]]
    if isinstance(b, Columns):
        return ["<div class='cols'>", *[x for c in b.main for x in _html_block(c, images)], "<div class='side'>",
                *[x for c in b.side for x in _html_block(c, images)], "</div></div>"]
    if isinstance(b, Box):
        return [f"<section{_attrs(b.id)}>", *[x for c in b.blocks for x in _html_block(c, images)], "</section>"]
    raise TypeError(f"not a report block: {b!r}")
