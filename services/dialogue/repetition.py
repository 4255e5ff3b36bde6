"""Stops a streamed answer where the model starts repeating itself, or after enough sentences.

A small model under greedy decoding often loops: the same sentence or list item again and again until
the token limit. The guard sits between the generation stream and the client: text is released as it
arrives, except while the sentence being written could still turn out to be a repeat of an earlier one
(it is a prefix of one); a sentence that completes as a repeat is dropped and ends the answer. New
sentences are never delayed, so the time to first token does not change. An answer given a
sentence budget (a spoken one) ends once that many sentences are complete.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

# A sentence ends at . ! ? followed by white space, or at a line break.
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
# List markers ("1.", "2)", "-", "*", "•") and Markdown emphasis do not make two items different.
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*")
_DECORATION = re.compile(r"[*_`#]+")
_SPACE = re.compile(r"\s+")


def sentence_key(sentence: str) -> str:
    """What two sentences must share to count as the same: case, spacing, list markers and emphasis aside."""
    text = _LIST_MARKER.sub("", sentence)
    text = _DECORATION.sub("", text)
    return _SPACE.sub(" ", text).strip().lower()


class RepetitionGuard:
    """Feed it the deltas of one answer; it returns what may be shown and says when the answer looped."""

    def __init__(self, min_sentence_chars: int = 8, max_sentences: int | None = None) -> None:
        self._min_chars = min_sentence_chars
        self._max_sentences = max_sentences
        self._seen: set[str] = set()
        self._sentence = ""  # the sentence being written
        self._released = 0  # how much of it was already shown
        self.repeated = False
        self.complete = False  # the sentence budget is spent

    @property
    def ended(self) -> bool:
        return self.repeated or self.complete

    def feed(self, delta: str) -> str:
        """The part of the answer that can be shown now; empty once the answer has ended."""
        if self.ended:
            return ""
        self._sentence += delta
        shown: list[str] = []
        while match := _SENTENCE_END.search(self._sentence):
            complete, rest = self._sentence[: match.end()], self._sentence[match.end():]
            key = sentence_key(complete)
            if len(key) >= self._min_chars and key in self._seen:
                self.repeated = True
                return "".join(shown)
            if len(key) >= self._min_chars:
                self._seen.add(key)
            shown.append(complete[self._released:])
            self._sentence, self._released = rest, 0
            if self._max_sentences is not None and len(self._seen) >= self._max_sentences:
                self.complete = True
                return "".join(shown)
        if not self._could_repeat(sentence_key(self._sentence)):
            shown.append(self._sentence[self._released:])
            self._released = len(self._sentence)
        return "".join(shown)

    def flush(self) -> str:
        """What is still held back when the stream ends before the answer ended."""
        if self.ended:
            return ""
        held = self._sentence[self._released:]
        self._released = len(self._sentence)
        return held

    def _could_repeat(self, partial_key: str) -> bool:
        return bool(partial_key) and any(seen.startswith(partial_key) for seen in self._seen)


async def stop_at_repetition(deltas: AsyncGenerator[str, None], max_sentences: int | None = None) -> AsyncGenerator[str, None]:
    """The answer's deltas through a RepetitionGuard; a loop or a spent sentence budget ends the
    generation (its stream is closed, which cancels the call and frees the inference slot)."""
    guard = RepetitionGuard(max_sentences=max_sentences)
    try:
        async for delta in deltas:
            if visible := guard.feed(delta):
                yield visible
            if guard.ended:
                return
        if held := guard.flush():
            yield held
    finally:
        await deltas.aclose()
