"""Written text cut into sentences, with where each one stands in the source.

One splitter for every service that reads documents: summaries pick sentences, answers cite them
by character offsets, and evaluations cut lead sentences. Paragraph breaks, Markdown headings and
list items end a sentence; so does `.`, `!` or `?` (after any closing quotes or brackets) followed
by whitespace, so "4.90 EUR" stays whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BREAK = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)|\n\s*\n|\n(?=\s*(?:#|[*-] ))")
_LEADING_MARKS = re.compile(r"^(?:#+\s*|[*-]\s+)")
_EMPHASIS = re.compile(r"\*\*|__|`")
@dataclass(frozen=True)
class Sentence:
    text: str  # whitespace collapsed, leading heading/list marks removed
    start: int  # character offsets of the sentence in the source text: source[start:end]
    end: int


def sentence_spans(text: str) -> list[Sentence]:
    sentences: list[Sentence] = []
    position = 0
    for match in [*_BREAK.finditer(text), None]:
        end = match.start() if match else len(text)
        piece = text[position:end]
        stripped = piece.strip()
        if stripped:
            start = position + piece.index(stripped)
            marks = _LEADING_MARKS.match(stripped)
            if marks:
                start += marks.end()
                stripped = stripped[marks.end():]
            clean = " ".join(stripped.split())
            if clean:
                sentences.append(Sentence(clean, start, start + len(stripped)))
        position = match.end() if match else len(text)
    return sentences


def split_sentences(text: str) -> list[str]:
    return [sentence.text for sentence in sentence_spans(text)]


def plain(text: str) -> str:
    """Text without Markdown emphasis marks, as a person reads it."""
    return _EMPHASIS.sub("", text)
