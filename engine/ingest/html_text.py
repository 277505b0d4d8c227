"""HTML (and EPUB's XHTML) to readable text with the standard library's html.parser.

Headings become Markdown "#" lines, list items "- " or "1. " lines, <pre> keeps its spacing, other
runs of whitespace collapse to one space, blocks are separated by blank lines. Scripts, styles and
other non-content elements are dropped. Nothing in the input is fetched or executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

# Elements whose content is never prose.
_DROPPED_ELEMENTS = frozenset({"script", "style", "noscript", "template", "svg", "math", "iframe", "object"})
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_BLOCK_ELEMENTS = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "aside",
        "header",
        "footer",
        "nav",
        "main",
        "blockquote",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "table",
        "thead",
        "tbody",
        "tfoot",
        "tr",
        "figure",
        "figcaption",
        "address",
        "hr",
        "body",
        "html",
        "li",
        "pre",
        "caption",
        "details",
        "summary",
        "form",
        "fieldset",
        *_HEADINGS,
    }
)
_WHITESPACE_RUN = re.compile(r"[ \t\n\r\f\v]+")


@dataclass(frozen=True)
class HtmlText:
    text: str
    # The <title> element's text, "" when there is none.
    title: str
    # The first heading's text, "" when there is none: a better chapter name than most titles.
    first_heading: str


def html_to_text(html: str) -> str:
    """Readable text of an HTML document, or "" when it has none."""
    return parse_html(html).text


def parse_html(html: str) -> HtmlText:
    """Readable text of an HTML document with its title and first heading."""
    parser = _ReadableTextParser()
    parser.feed(html)
    parser.close()
    return parser.result()


@dataclass
class _Block:
    text: str
    is_list_item: bool


class _ReadableTextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._blocks: list[_Block] = []
        self._pieces: list[str] = []
        self._dropped_depth = 0
        self._pre_depth = 0
        self._prefix = ""
        self._first_heading = ""
        self._heading_open = False
        # One entry per open list: None for <ul>, the next number for <ol>.
        self._lists: list[int | None] = []
        self._title: list[str] = []
        self._in_title = False
        # <head> is dropped too, but HTML lets its end tag be left out: <body> also ends it.
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in ("head", "body"):
            self._in_head = tag == "head"
        if tag in _DROPPED_ELEMENTS:
            self._dropped_depth += 1
        elif self._dropped_depth:
            return
        elif tag in ("br", "hr"):
            self._pieces.append("\n")
        elif tag in _BLOCK_ELEMENTS:
            self._start_block(tag, attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # A self-closed element (<br/>, or an XHTML <div/>) opens nothing.
        if not self._dropped_depth and tag in ("br", "hr"):
            self._pieces.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag == "head":
            self._in_head = False
        if tag in _DROPPED_ELEMENTS:
            self._dropped_depth = max(0, self._dropped_depth - 1)
            return
        if self._dropped_depth or tag not in _BLOCK_ELEMENTS:
            return
        self._end_block()
        if tag in ("ul", "ol") and self._lists:
            self._lists.pop()
        elif tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)
        elif tag == "li" or tag in _HEADINGS:
            self._prefix = ""
            self._heading_open = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)
        if self._dropped_depth or self._in_head:
            return
        self._pieces.append(data if self._pre_depth else _WHITESPACE_RUN.sub(" ", data))

    def result(self) -> HtmlText:
        self._end_block()
        parts = []
        for index, block in enumerate(self._blocks):
            if index:
                follows_list_item = block.is_list_item and self._blocks[index - 1].is_list_item
                parts.append("\n" if follows_list_item else "\n\n")
            parts.append(block.text)
        title = _WHITESPACE_RUN.sub(" ", "".join(self._title)).strip()
        return HtmlText(text="".join(parts), title=title, first_heading=self._first_heading)

    def _start_block(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._end_block()
        if tag == "ul":
            self._lists.append(None)
        elif tag == "ol":
            self._lists.append(_ordered_list_start(attrs))
        elif tag == "li":
            self._prefix = self._next_list_marker()
        elif tag in _HEADINGS:
            self._prefix = "#" * _HEADINGS[tag] + " "
            self._heading_open = True
        elif tag == "pre":
            self._pre_depth += 1

    def _next_list_marker(self) -> str:
        indent = "  " * max(0, len(self._lists) - 1)
        if not self._lists or self._lists[-1] is None:
            return f"{indent}- "
        number = self._lists[-1]
        self._lists[-1] = number + 1
        return f"{indent}{number}. "

    def _end_block(self) -> None:
        raw = "".join(self._pieces)
        self._pieces = []
        if self._pre_depth:
            # Inside <pre> spacing is content; only the blank lines around it go.
            text = raw.strip("\n")
        else:
            text = "\n".join(line.strip() for line in raw.split("\n")).strip()
        if not text.strip():
            # An empty block (e.g. the <p> that opens an <li>) keeps the pending "- " or "#".
            return
        if self._heading_open and not self._first_heading:
            self._first_heading = text
        is_list_item = bool(self._prefix.strip()) and not self._heading_open
        self._blocks.append(_Block(self._prefix + text, is_list_item=is_list_item))
        # The marker belongs to the first block of the item or heading only.
        self._prefix = " " * len(self._prefix) if self._prefix and not self._heading_open else ""


def _ordered_list_start(attrs: list[tuple[str, str | None]]) -> int:
    for name, value in attrs:
        if name == "start" and value is not None:
            try:
                return int(value.strip())
            except ValueError:
                break
    return 1
