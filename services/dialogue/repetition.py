"""Stops a streamed answer where the model starts repeating itself.

A small model under greedy decoding often loops: the same sentence or list item again and again until
the token limit. The guard sits between the generation stream and the client: text is released as it
arrives, except while the sentence being written could still turn out to be a repeat of an earlier one
(it is a prefix of one); a sentence that completes as a repeat is dropped and ends the answer. New
sentences are never delayed, so the time to first token does not change.
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

    def __init__(self, min_sentence_chars: int = 8) -> None:
        self._min_chars = min_sentence_chars
        self._seen: set[str] = set()
        self._sentence = ""  # the sentence being written
        self._released = 0  # how much of it was already shown
        self.repeated = False

    def feed(self, delta: str) -> str:
        """The part of the answer that can be shown now; empty once `repeated` is set."""
        if self.repeated:
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
        if not self._could_repeat(sentence_key(self._sentence)):
            shown.append(self._sentence[self._released:])
            self._released = len(self._sentence)
        return "".join(shown)

    def flush(self) -> str:
        """What is still held back when the stream ends without completing a repeat."""
        if self.repeated:
            return ""
        held = self._sentence[self._released:]
        self._released = len(self._sentence)
        return held

    def _could_repeat(self, partial_key: str) -> bool:
        return bool(partial_key) and any(seen.startswith(partial_key) for seen in self._seen)


async def stop_at_repetition(deltas: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """The answer's deltas through a RepetitionGuard; a loop ends the generation (its stream is closed,
    which cancels the call and frees the inference slot)."""
    guard = RepetitionGuard()
    try:
        async for delta in deltas:
            if visible := guard.feed(delta):
                yield visible
            if guard.repeated:
                return
        if held := guard.flush():
            yield held
    finally:
        await deltas.aclose()
