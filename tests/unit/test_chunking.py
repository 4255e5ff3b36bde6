from __future__ import annotations

import re

import pytest

from services.ingest.chunking import chunk_spans, normalize

pytestmark = pytest.mark.unit


def word_offsets(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words stand in for tokens."""
    return [(match.start(), match.end()) for match in re.finditer(r"\S+", text)]


def test_normalize_folds_compatibility_forms_and_whitespace() -> None:
    assert normalize("ﬁle\u00a0 name\r\n\r\n\r\n\r\nnext\t\tline  ") == "file name\n\nnext line"


def test_chunks_cover_the_text_with_the_requested_overlap() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    spans = chunk_spans(text, word_offsets(text), size=30, overlap=5)
    assert all(span.token_count <= 30 for span in spans)
    assert spans[0].start == 0 and spans[-1].end == len(text)
    for previous, following in zip(spans, spans[1:]):
        overlap_words = text[following.start:previous.end].split()
        assert len(overlap_words) == 5


def test_chunks_end_at_a_sentence_when_one_closes_in_the_second_half() -> None:
    text = ("one two three four five six seven eight. " * 4).strip()
    spans = chunk_spans(text, word_offsets(text), size=12, overlap=0)
    assert text[spans[0].start:spans[0].end].endswith("eight.")
    assert spans[0].token_count == 8


def test_a_short_text_is_one_chunk() -> None:
    spans = chunk_spans("just a few words", word_offsets("just a few words"), size=256, overlap=32)
    assert [(span.start, span.end, span.token_count) for span in spans] == [(0, 16, 4)]


def test_overlap_must_be_smaller_than_the_chunk() -> None:
    with pytest.raises(ValueError, match="overlap"):
        chunk_spans("a b", word_offsets("a b"), size=4, overlap=4)
