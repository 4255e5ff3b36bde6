"""Text out of a submitted document: plain text and Markdown as they are, HTML without its
boilerplate, PDF from its text layer. Every failure is an InvalidArgument naming `content`.

A few kilobytes of PDF can expand to gigabytes of text (pages sharing one compressed content
stream), so PDF extraction stops at a page count and a text length (ExtractionLimits); pypdf's
own limits on each stream's decompression raise LimitReachedError, refused the same way.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from html.parser import HTMLParser

from pypdf import PdfReader
from pypdf.errors import LimitReachedError, PyPdfError

from llmos.errors import InvalidArgument

TEXT_TYPES = ("text/plain", "text/markdown")
HTML_TYPE = "text/html"
PDF_TYPE = "application/pdf"
SUPPORTED_MIME_TYPES = (*TEXT_TYPES, HTML_TYPE, PDF_TYPE)

# Elements that never hold the document's own text.
_DROPPED = frozenset({"script", "style", "noscript", "template", "svg", "canvas", "iframe", "head", "form", "button", "select"})
# Page furniture: navigation, banners, footers, sidebars.
_BOILERPLATE = frozenset({"nav", "header", "footer", "aside", "menu"})
_BOILERPLATE_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search", "menu"})
_BOILERPLATE_MARKERS = ("cookie", "navbar", "breadcrumb", "sidebar", "footer", "menu", "banner", "advert")
# Elements that hold the main content when a page marks it.
_MAIN = frozenset({"main", "article"})
# Blocks are separated by a blank line; line items by a line break.
_BLOCK = frozenset(
    {"p", "div", "section", "article", "main", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
     "pre", "figcaption", "hr", "title"}
)
_LINE = frozenset({"br", "li", "tr", "dd", "dt"})
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"})

logging.getLogger("pypdf").setLevel(logging.ERROR)  # warnings about odd files would flood the log


class _ContentParser(HTMLParser):
    """Collects text outside dropped and boilerplate elements, separately for <main>/<article>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, skipped, main)
        # Where each tag is open in the stack, innermost last: an end tag finds its element without
        # searching the stack (end tags matching nothing open made that quadratic in the nesting).
        self._depths: dict[str, list[int]] = {}
        self.all_text: list[str] = []
        self.main_text: list[str] = []

    def _skipping(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def _in_main(self) -> bool:
        return bool(self._stack) and self._stack[-1][2]

    def _emit(self, text: str) -> None:
        if self._skipping():
            return
        self.all_text.append(text)
        if self._in_main():
            self.main_text.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK or tag in _LINE:
            self._emit("\n")
        if tag in _VOID:
            return
        attributes = {name: (value or "").lower() for name, value in attrs}
        marker = f"{attributes.get('class', '')} {attributes.get('id', '')}"
        skipped = (
            self._skipping()
            or tag in _DROPPED
            or tag in _BOILERPLATE
            or attributes.get("role", "") in _BOILERPLATE_ROLES
            or "hidden" in attributes
            or any(word in marker for word in _BOILERPLATE_MARKERS)
        )
        self._depths.setdefault(tag, []).append(len(self._stack))
        self._stack.append((tag, skipped, self._in_main() or tag in _MAIN))

    def handle_endtag(self, tag: str) -> None:
        # Close up to the matching tag; tolerate unclosed children (<p>, <li>) as browsers do.
        depths = self._depths.get(tag)
        if depths:
            depth = depths[-1]
            for closed, _, _ in reversed(self._stack[depth:]):  # each element is closed once
                self._depths[closed].pop()
            del self._stack[depth:]
        if tag in _BLOCK:
            self._emit("\n")

    def handle_data(self, data: str) -> None:
        self._emit(data)


def html_text(html: str) -> str:
    """The readable text of a page: the <main>/<article> content when marked, without furniture."""
    parser = _ContentParser()
    parser.feed(html)
    parser.close()
    main = "".join(parser.main_text)
    return main if main.strip() else "".join(parser.all_text)


@dataclass(frozen=True)
class ExtractionLimits:
    """How much text a document may yield, whatever its size on the wire."""

    max_pdf_pages: int
    max_text_chars: int


def pdf_text(content: bytes, limits: ExtractionLimits) -> str:
    """The text layer of every page, pages separated by a blank line; refused, without reading
    on, once it has more pages or text than `limits` allow."""
    try:
        reader = PdfReader(io.BytesIO(content))
        if reader.is_encrypted:
            raise InvalidArgument("content", "the PDF is encrypted; submit an unencrypted copy")
        if len(reader.pages) > limits.max_pdf_pages:
            raise InvalidArgument(
                "content", f"the PDF has {len(reader.pages)} pages; at most {limits.max_pdf_pages} are accepted"
            )
        pages: list[str] = []
        length = 0
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            length += len(pages[-1]) + 2
            if length > limits.max_text_chars:
                raise InvalidArgument(
                    "content", f"the PDF's text is longer than {limits.max_text_chars} characters (a decompression bomb?)"
                )
        return "\n\n".join(pages)
    except InvalidArgument:
        raise
    except LimitReachedError as exc:
        raise InvalidArgument("content", f"the PDF expands past a decompression limit ({exc})") from None
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidArgument("content", f"not a readable PDF ({type(exc).__name__}: {exc})") from None


def _decode(content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument("content", f"not valid UTF-8 (byte {exc.start})") from None


def extract_text(mime_type: str, content: bytes, limits: ExtractionLimits) -> str:
    """The raw text of a document of `mime_type` (one of SUPPORTED_MIME_TYPES)."""
    if mime_type == PDF_TYPE:
        text = pdf_text(content, limits)
        if not text.strip():
            raise InvalidArgument("content", "the PDF has no text layer (a scan?); submit its text instead")
        return text
    text = _decode(content)
    return html_text(text) if mime_type == HTML_TYPE else text
