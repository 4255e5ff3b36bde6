"""Text extraction: HTML without page furniture, the PDF text layer, and what is refused."""

from __future__ import annotations

import pytest

from llmos.errors import InvalidArgument
from services.ingest.chunking import normalize
from services.ingest.extract import ExtractionLimits, extract_text, html_text
from tests.pdf_helpers import minimal_pdf

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
