"""Ingest parsing bounded on hostile documents (issue 13, item 2): PDF page and text limits refuse
a decompression bomb without reading it through, and HTML extraction stays linear on any nesting
(the tag-stack scans were quadratic: 93 KB of nested tags took 7.5 s). The worker process that
runs extraction under a time limit is tested in test_ingest_worker.py."""

from __future__ import annotations

import pytest

from llmos.errors import InvalidArgument
from services.ingest.extract import ExtractionLimits, extract_text, html_text
from tests.pdf_helpers import many_page_pdf
from tests.timing_helpers import cpu_seconds, cpu_seconds_within

pytestmark = pytest.mark.security

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
