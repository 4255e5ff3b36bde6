"""Text cut into the pieces a voice speaks one at a time, whole or as it streams in.

Speech synthesis sends one audio chunk per piece, so the first piece sets the time to first
audio: it ends at the first clause boundary (comma, semicolon, colon) once it has a few words,
later pieces are whole sentences. Marks that are written, not spoken (citation numbers such as
`[2]`, markdown emphasis and headings) are dropped.
"""

from __future__ import annotations

import re

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n{2,}")
_CLAUSE_BREAK = re.compile(r"(?<=[,;:])\s+")
_UNSPOKEN = re.compile(r"\s*\[\d{1,3}\]|[*_`#]+")
# A first clause shorter than this is not worth its own chunk ("Yes, ..." is spoken with the rest).
MIN_CLAUSE_WORDS = 3


def speakable(text: str) -> str:
    return " ".join(_UNSPOKEN.sub("", text).split())


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, marks removed."""
    chunker = UtteranceChunker(first_clause=False)
    return chunker.feed(text) + chunker.flush()


def split_for_speech(text: str) -> list[str]:
    """Sentences of `text`, the first one cut at its first clause: the pieces of a spoken stream."""
    chunker = UtteranceChunker()
    return chunker.feed(text) + chunker.flush()


class UtteranceChunker:
    """Streamed text (answer deltas) in, speakable pieces out as soon as each is complete.

    A sentence is complete when whitespace follows its final punctuation, so "3.5" or "e.g."
    mid-delta does not end one early.
    """

    def __init__(self, first_clause: bool = True) -> None:
        self._pending = ""
        self._first = first_clause

    def feed(self, delta: str) -> list[str]:
        self._pending += delta
        pieces: list[str] = []
        while True:
            cut = self._next_cut()
            if cut is None:
                return pieces
            piece = speakable(self._pending[:cut])
            self._pending = self._pending[cut:]
            if piece:
                pieces.append(piece)
                self._first = False

    def flush(self) -> list[str]:
        """The rest, at the end of the text."""
        piece = speakable(self._pending)
        self._pending = ""
        return [piece] if piece else []

    def _next_cut(self) -> int | None:
        sentence = _SENTENCE_BREAK.search(self._pending)
        if self._first:
            for clause in _CLAUSE_BREAK.finditer(self._pending):
                if sentence is not None and clause.start() >= sentence.start():
                    break
                if len(self._pending[:clause.start()].split()) >= MIN_CLAUSE_WORDS:
                    return clause.end()
        return sentence.end() if sentence is not None else None
