"""Text extraction: HTML without page furniture, the PDF text layer, and what is refused."""

from __future__ import annotations

import pytest

from llmos.errors import InvalidArgument
from services.ingest.chunking import normalize
from services.ingest.extract import ExtractionLimits, extract_text, html_text
from tests.pdf_helpers import many_page_pdf, minimal_pdf
from tests.timing_helpers import cpu_seconds, cpu_seconds_within

pytestmark = pytest.mark.unit

LIMITS = ExtractionLimits(max_pdf_pages=2000, max_text_chars=16 * 1024 * 1024)

PAGE = """<!doctype html><html><head><title>Help</title><style>p{color:red}</style>
<script>track()</script></head><body>
<header><a href="/">Home</a> | <a href="/help">Help</a></header>
<nav class="menu"><ul><li>Orders</li><li>Returns</li></ul></nav>
<main><h1>Returns</h1><p>Returns are free within 30&nbsp;days.</p>
<div class="cookie-banner">We use cookies. Accept?</div>
<ul><li>Pack the item</li><li>Print the label</li></ul></main>
<aside>Related: shipping</aside><footer>&copy; 2024 Acme</footer></body></html>"""


def test_html_keeps_the_main_content_only() -> None:
    text = normalize(html_text(PAGE))
    assert text == "Returns\n\nReturns are free within 30 days.\n\nPack the item\nPrint the label"


def test_html_without_a_main_element_drops_furniture_and_scripts() -> None:
    text = normalize(html_text("<body><div id='sidebar'>Links</div><p>Only <b>this</b> text<script>x()</script>.</p></body>"))
    assert text == "Only this text."


def test_pdf_text_layer() -> None:
    pdf = minimal_pdf(["Returns are free within 30 days.", "Refunds take five days."])
    assert normalize(extract_text("application/pdf", pdf, LIMITS)) == "Returns are free within 30 days.\nRefunds take five days."


LINES = [f"Returns are free within thirty days of delivery number {line}" for line in range(400)]  # 23 kB of text


def test_a_pdf_with_more_pages_than_the_limit_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="the PDF has 11 pages; at most 10") as error:
        extract_text("application/pdf", many_page_pdf(LINES[:1], 11), ExtractionLimits(max_pdf_pages=10, max_text_chars=10**6))
    assert error.value.field == "content"


def test_a_pdf_bomb_is_refused_once_its_text_passes_the_limit_without_reading_on() -> None:
    """300 pages sharing one compressed stream: 32 kB that extract to 7 MB of text."""
    limits = ExtractionLimits(max_pdf_pages=10_000, max_text_chars=100_000)
    one_page = cpu_seconds(lambda: extract_text("application/pdf", many_page_pdf(LINES, 1), limits))
    bomb = many_page_pdf(LINES, 300)

    def refuse() -> None:
        with pytest.raises(InvalidArgument, match="longer than 100000 characters") as error:
            extract_text("application/pdf", bomb, limits)
        assert error.value.field == "content"

    cpu_seconds_within(refuse, 50 * one_page)


@pytest.mark.parametrize(
    ("mime_type", "content", "message"),
    [
        ("application/pdf", b"%PDF-1.4 this is not really a pdf", "not a readable PDF"),
        ("application/pdf", minimal_pdf([]), "no text layer"),
        ("text/html", b"<p>\xff\xfe</p>", "not valid UTF-8"),
    ],
)
def test_unreadable_documents_are_invalid_argument(mime_type: str, content: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as error:
        extract_text(mime_type, content, LIMITS)
    assert error.value.field == "content"


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<nav><ul><li>Menu</nav><p>Kept</p>", "Kept"),  # an end tag closes the children left open
        ("<div><nav><div><div>Menu</nav>Kept</div>", "Kept"),
        ("<main><p>One</span> two</main><p>Outside</p>", "One two"),  # one that matches nothing closes nothing
    ],
)
def test_end_tags_close_up_to_their_element(html: str, expected: str) -> None:
    assert normalize(html_text(html)) == expected


# -- linear time on hostile nesting --------------------------------------------------------------

DEPTH = 50_000
# Deep nesting, closed properly or by end tags that match nothing open (each of which made the
# extractor search the whole stack of open elements), inside kept, skipped and main-content elements.
NESTED_PAGES = {
    "divs closed": "<div>" * DEPTH + "x" + "</div>" * DEPTH,
    "divs, stray end tags": "<div>" * DEPTH + "x" + "</p>" * DEPTH,
    "unclosed paragraphs": "<p>x" * DEPTH + "</div>" * DEPTH,
    "unclosed list items": "<ul>" + "<li>x" * DEPTH + "</ol>" * DEPTH,
    "skipped navs, stray end tags": "<nav>" * DEPTH + "x" + "</span>" * DEPTH,
    "skipped scripts": "<script>" * DEPTH + "x" + "</script>" * DEPTH,
    "main content, stray end tags": "<main><article>" * DEPTH + "x" + "</section>" * DEPTH,
}
# Nested pages have no more tags than a flat page of the same size, so a linear extractor takes
# about as long on them; the ratio leaves room for noise. A quadratic one needs a minute or more.
RATIO_TO_FLAT = 5


@pytest.mark.parametrize("name", NESTED_PAGES)
def test_deeply_nested_html_extracts_in_linear_time(name: str) -> None:
    page = NESTED_PAGES[name]
    flat = ("<div>x</div>" * (len(page) // 12 + 1))[: len(page)]
    baseline = cpu_seconds(lambda: html_text(flat), repeat=1)
    took = cpu_seconds_within(lambda: html_text(page), RATIO_TO_FLAT * baseline)
    print(f"\n{name}: {len(page) / 1e6:.1f} MB, flat {baseline:.3f} s, nested {took:.3f} s ({took / baseline:.1f}x)")
