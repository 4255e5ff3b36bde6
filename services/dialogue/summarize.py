"""Summaries: extractive (sentence selection over embeddings) and abstractive (the LLM), map-reduce.

Extractive: every sentence is embedded; a sentence's centrality is its mean similarity to the
others (LexRank's degree centrality on a dense graph); sentences are picked greedily by maximal
marginal relevance, centrality minus similarity to what is already picked, so the summary does not
repeat itself; they are shown in document order, within the word budget.

Abstractive: the generation model writes the summary. A text longer than what fits in the context
next to the answer is cut at sentence boundaries into parts that fit (map), each part is summarized,
and the part summaries are summarized together (reduce), repeatedly if they still do not fit.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmos.errors import InvalidArgument
from services.dialogue.backends import Embedder, Generator, TokenCounter
from services.dialogue.repetition import stop_at_repetition

# Split after . ! ? (optionally closing quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")
REDUNDANCY_WEIGHT = 0.5
MIN_SENTENCE_WORDS = 4
# Tokens of instructions and chat template around the text to summarize.
PROMPT_OVERHEAD_TOKENS = 64
TOKENS_PER_WORD = 1.6
MIN_TARGET_WORDS = 10
MAX_TARGET_WORDS = 1000
MAX_MAP_DEPTH = 4


def split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n|\n(?=[#*-] )", text):
        paragraph = " ".join(paragraph.split()).lstrip("#*- ").strip()
        if paragraph:
            sentences.extend(part.strip() for part in _SENTENCE_END.split(paragraph) if part.strip())
    return sentences


def words(text: str) -> int:
    return len(text.split())


def mmr_select(vectors: np.ndarray, lengths: Sequence[int], target_words: int) -> list[int]:
    """Indices of sentences to keep, in document order: central, not redundant, within the budget."""
    count = len(lengths)
    if count == 0:
        return []
    similarity = vectors @ vectors.T
    centrality = (similarity.sum(axis=1) - 1.0) / max(count - 1, 1)
    chosen: list[int] = []
    used = 0
    candidates = set(range(count))
    while candidates:
        redundancy = similarity[:, chosen].max(axis=1) if chosen else np.zeros(count)
        score = centrality - REDUNDANCY_WEIGHT * redundancy
        best = max(candidates, key=lambda index: score[index])
        candidates.discard(best)
        if used + lengths[best] > target_words and chosen:
            continue
        chosen.append(best)
        used += lengths[best]
        if used >= target_words:
            break
    return sorted(chosen)


def clip_words(text: str, limit: int) -> str:
    """At most `limit` words, ending at a sentence end when one is in the last third."""
    tokens = text.split()
    if len(tokens) <= limit:
        return text.strip()
    clipped = " ".join(tokens[:limit])
    end = max(clipped.rfind(". "), clipped.rfind("! "), clipped.rfind("? "), clipped.rfind("."))
    return clipped[: end + 1] if end >= len(clipped) * 2 // 3 else clipped


@dataclass(frozen=True)
class Summary:
    text: str
    source_tokens: int
    map_steps: int


class Summarizer:
    def __init__(self, embedder: Embedder, generator: Generator, tokens: TokenCounter, context_tokens: int) -> None:
        self._embedder = embedder
        self._generator = generator
        self._tokens = tokens
        self._context_tokens = context_tokens

    @staticmethod
    def check_target(target_words: int) -> None:
        if not MIN_TARGET_WORDS <= target_words <= MAX_TARGET_WORDS:
            raise InvalidArgument("target_words", f"must be between {MIN_TARGET_WORDS} and {MAX_TARGET_WORDS}, or 0 for the default")

    async def extractive(self, text: str, target_words: int, timeout_s: float) -> Summary:
        sentences = split_sentences(text)
        (source_tokens,) = await self._tokens.count([text], timeout_s)
        kept = [sentence for sentence in sentences if words(sentence) >= MIN_SENTENCE_WORDS] or sentences
        vectors = await self._embedder.embed(kept, timeout_s)
        chosen = mmr_select(vectors, [words(sentence) for sentence in kept], target_words)
        summary = clip_words(" ".join(kept[index] for index in chosen), target_words)
        return Summary(summary, source_tokens, 1)

    async def abstractive(self, text: str, target_words: int, timeout_s: float) -> Summary:
        (source_tokens,) = await self._tokens.count([text], timeout_s)
        steps = [0]
        summary = await self._reduce(text, source_tokens, target_words, timeout_s, steps, depth=0)
        return Summary(clip_words(summary, target_words), source_tokens, steps[0])

    def _answer_tokens(self, target_words: int) -> int:
        return int(target_words * TOKENS_PER_WORD) + 16

    async def _reduce(self, text: str, tokens: int, target_words: int, timeout_s: float, steps: list[int], depth: int) -> str:
        budget = self._context_tokens - self._answer_tokens(target_words) - PROMPT_OVERHEAD_TOKENS
        if tokens <= budget or depth >= MAX_MAP_DEPTH:
            steps[0] += 1
            return await self._generate(text, target_words, timeout_s)
        parts = await self._parts(text, budget, timeout_s)
        part_words = max(MIN_TARGET_WORDS, min(target_words, budget // (len(parts) * 2)))
        steps[0] += len(parts)
        partials = await asyncio.gather(*(self._generate(part, part_words, timeout_s) for part in parts))
        joined = "\n".join(partials)
        (joined_tokens,) = await self._tokens.count([joined], timeout_s)
        return await self._reduce(joined, joined_tokens, target_words, timeout_s, steps, depth + 1)

    async def _parts(self, text: str, budget: int, timeout_s: float) -> list[str]:
        sentences = split_sentences(text)
        counts = await self._tokens.count(sentences, timeout_s)
        parts: list[str] = []
        current: list[str] = []
        used = 0
        for sentence, count in zip(sentences, counts, strict=True):
            if current and used + count > budget:
                parts.append(" ".join(current))
                current, used = [], 0
            current.append(sentence)
            used += count
        if current:
            parts.append(" ".join(current))
        return parts

    async def _generate(self, text: str, target_words: int, timeout_s: float) -> str:
        messages = [
            ("system", "You write short, factual summaries. Use only facts from the text."),
            ("user", f"Summarize this text in at most {target_words} words.\n\n{text}"),
        ]
        answer = stop_at_repetition(self._generator.stream(messages, self._answer_tokens(target_words), timeout_s))
        pieces = [piece async for piece in answer]
        return "".join(pieces).strip()
