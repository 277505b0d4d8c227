"""HTML to readable text with html.parser."""

from __future__ import annotations

from kimi_desk.engine.ingest import html_to_text
from kimi_desk.engine.ingest.html_text import parse_html


def test_headings_paragraphs_lists_and_pre_blocks_are_kept_scripts_and_styles_dropped():
    html = """<!DOCTYPE html>
    <html><head><title>Page  title</title><style>body { color: red }</style>
    <script>var hidden = "script text";</script></head>
    <body>
      <h1>Main   heading</h1>
      <p>First paragraph
         wraps over lines &amp; has entities&#33;</p>
      <script>document.write("more script")</script>
      <h3>Sub heading</h3>
      <ul><li>apple</li><li><p>banana</p></li></ul>
      <ol start="4"><li>four</li><li>five<ul><li>nested</li></ul></li></ol>
      <pre>def f(x):
    return x  # spacing kept</pre>
      <p>line<br>break<br/>again</p>
      <noscript>enable javascript</noscript>
      <div>last <b>bold</b> words</div>
    </body></html>"""
    assert html_to_text(html) == (
        "# Main heading\n\n"
        "First paragraph wraps over lines & has entities!\n\n"
        "### Sub heading\n\n"
        "- apple\n"
        "- banana\n"
        "4. four\n"
        "5. five\n"
        "  - nested\n\n"
        "def f(x):\n    return x  # spacing kept\n\n"
        "line\nbreak\nagain\n\n"
        "last bold words"
    )


def test_head_without_its_end_tag_ends_at_body():
    assert html_to_text("<html><head><title>T</title><body><p>Body text</p>") == "Body text"


def test_title_and_first_heading_are_reported():
    parsed = parse_html("<title>Book title</title><p>intro</p><h2>Chapter  Two</h2><h1>later</h1>")
    assert (parsed.title, parsed.first_heading) == ("Book title", "Chapter Two")


def test_document_without_text_gives_empty_string():
    assert html_to_text("<html><body><img src='x.png'><script>x()</script></body></html>") == ""
