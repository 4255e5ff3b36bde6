"""Text normalization and token-sized chunking, independent of any transport."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_SENTENCE_END = re.compile(r"[.!?]['\")\]]?$")


def normalize(text: str) -> str:
    """NFKC, one kind of line break, runs of spaces collapsed, at most one blank line."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _ends_sentence(text: str, token_start: int, token_end: int) -> bool:
    return bool(_SENTENCE_END.search(text[token_start:token_end].rstrip())) or text[token_end:token_end + 1] == "\n"


@dataclass(frozen=True)
class Span:
    start: int  # character offsets into the normalized text
    end: int
    token_count: int


def chunk_spans(text: str, token_offsets: Sequence[tuple[int, int]], size: int, overlap: int) -> list[Span]:
    """Windows of at most `size` tokens overlapping by `overlap`, cut after a sentence when possible.

    A window ends at the last token that closes a sentence in its second half; failing that, at
    `size` tokens. The next window starts `overlap` tokens before the cut.
    """
    if not 0 <= overlap < size:
        raise ValueError(f"overlap ({overlap}) must be at least 0 and below the chunk size ({size})")
    spans: list[Span] = []
    start = 0
    total = len(token_offsets)
    while start < total:
        end = min(start + size, total)
        if end < total:
            for candidate in range(end, start + size // 2, -1):
                if _ends_sentence(text, *token_offsets[candidate - 1]):
                    end = candidate
                    break
        spans.append(Span(token_offsets[start][0], token_offsets[end - 1][1], end - start))
        if end == total:
            break
        start = max(end - overlap, start + 1)
    return spans
