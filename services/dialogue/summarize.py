"""Summaries: extractive (sentence selection over embeddings) and abstractive (the LLM), map-reduce.

Extractive: position-aware centrality after PacSum (Zheng & Lapata 2019). Sentences are embedded
(only those of at least MIN_SENTENCE_WORDS words when these can fill the summary); two sentences
are linked when their similarity is in the top part of the document's range. Writers state a point
first and elaborate it after, so a sentence gains from links to later sentences and loses from
links to earlier ones (it repeats them); a lead prior adds to that, since news and reports open
with their gist. Sentences are taken best first, skipping any that would exceed the word budget or
nearly repeat one already taken, and are shown in document order, so the summary ends at a
sentence end. On the 50 REALSumm documents (ROUGE F1 by rouge-score, stemming on; target = the
reference's word count): ROUGE-1/2/L 41.0/16.6/36.4 in 53 words, against lead-3's 39.9/15.7/36.0
in 82 words and plain centrality with maximal marginal relevance's 32.8/8.8/29.0.

Abstractive: the generation model writes the summary. A text longer than what fits in the context
next to the answer is cut at sentence boundaries into parts that fit (map), each part is summarized,
and the part summaries are summarized together (reduce), repeatedly if they still do not fit. One
summary makes at most `max_generate_calls` Generate calls (LLMOS_DIALOGUE_SUMMARY_MAX_GENERATE_CALLS),
so a huge document cannot take the generation model from every chat: when the parts would need
more, the text is first cut down to the sentences the extractive selection ranks highest that fit
(in document order), and a reduction that would not fit the calls left is made from what fits one.
Each sentence of the result is then checked against the whole source like a draft answer
(`grounding.ground_summary`): unsupported sentences are replaced by the source sentence they drew
on, or dropped, so a summary invents no "Summit in Hamburg".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmos.errors import InvalidArgument
from llmos.text import split_sentences
from services.dialogue.backends import Embedder, Generator, TokenCounter
from services.dialogue.grounding import ground_summary
from services.dialogue.repetition import stop_at_repetition

# Extractive selection, tuned on the 50 REALSumm documents of shared/data/realsumm (CNN/DailyMail,
# target length = the reference's word count) and nowhere else:
MIN_SENTENCE_WORDS = 10  # shorter ones (headings, bylines, "scroll down for video") only when the others fall short
LINK_THRESHOLD = 0.8  # β: similarities below min + β·(max − min) of the document link nothing
EARLIER_LINK_WEIGHT = 1.0  # links to earlier sentences count against (later ones count +1)
LEAD_PRIOR_WEIGHT = 3.0  # a sentence at relative position p gains this · (1 − p); centrality spans [0, 1]
REDUNDANCY_LIMIT = 0.8  # cosine above which a sentence repeats one already taken
# Tokens of instructions and chat template around the text to summarize.
PROMPT_OVERHEAD_TOKENS = 64
TOKENS_PER_WORD = 1.6
MIN_TARGET_WORDS = 10
MAX_TARGET_WORDS = 1000
DEFAULT_MAX_GENERATE_CALLS = 8
# Texts per call to the tokenizer and to the embedding model: those services' default limits per call
# (LLMOS_TOKENIZER_MAX_BATCH, LLMOS_INFERENCE_EMBED_MAX_REQUEST_TEXTS).
COUNT_BATCH_TEXTS = 1024
EMBED_BATCH_TEXTS = 256


def words(text: str) -> int:
    return len(text.split())


def directed_centrality(similarity: np.ndarray) -> np.ndarray:
    """PacSum's centrality in [0, 1]: links to later sentences minus links to earlier ones.

    Only links above the document's own threshold count, so a sentence is central when later text
    comes back to it closely, not when it shares the topic with everything.
    """
    count = len(similarity)
    if count < 2:
        return np.zeros(count)
    others = similarity[~np.eye(count, dtype=bool)]
    low, high = others.min(), others.max()
    links = np.maximum(similarity - (low + LINK_THRESHOLD * (high - low)), 0.0)
    centrality = np.triu(links, 1).sum(axis=1) - EARLIER_LINK_WEIGHT * np.tril(links, -1).sum(axis=1)
    spread = np.ptp(centrality)
    return (centrality - centrality.min()) / spread if spread > 0 else np.zeros(count)


def select_sentences(vectors: np.ndarray, lengths: Sequence[int], target_words: int) -> list[int]:
    """Indices of sentences to keep, in document order: early and central, not redundant, within the budget.

    When no sentence fits the budget, the best one alone (the caller clips it).
    """
    count = len(lengths)
    if count == 0:
        return []
    similarity = vectors @ vectors.T
    lead_prior = 1.0 - np.arange(count) / count
    ranked = np.argsort(-(directed_centrality(similarity) + LEAD_PRIOR_WEIGHT * lead_prior), kind="stable")
    chosen: list[int] = []
    used = 0
    for index in ranked:
        if used + lengths[index] > target_words:
            continue
        if chosen and similarity[index, chosen].max() > REDUNDANCY_LIMIT:
            continue
        chosen.append(int(index))
        used += lengths[index]
    return sorted(chosen) or [int(ranked[0])]


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
    model_sentences: int = 0  # abstractive: sentences the model wrote ...
    supported_sentences: int = 0  # ... and those the verifier passed


def pack(sentences: Sequence[str], counts: Sequence[int], budget: int) -> list[str]:
    """Consecutive sentences joined into parts of at most `budget` tokens (a longer sentence alone).

    Every part but the last holds more than `budget` minus the next sentence's tokens, so sentences of
    at most L tokens totalling T make at most 1 + T / (budget - L) parts.
    """
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


class Summarizer:
    def __init__(
        self, embedder: Embedder, generator: Generator, tokens: TokenCounter, context_tokens: int, min_support: float,
        max_generate_calls: int = DEFAULT_MAX_GENERATE_CALLS,
    ) -> None:
        if max_generate_calls < 1:
            raise ValueError("max_generate_calls must be at least 1")
        self._embedder = embedder
        self._generator = generator
        self._tokens = tokens
        self._context_tokens = context_tokens
        self._min_support = min_support
        self._max_generate_calls = max_generate_calls

    @staticmethod
    def check_target(target_words: int) -> None:
        if not MIN_TARGET_WORDS <= target_words <= MAX_TARGET_WORDS:
            raise InvalidArgument("target_words", f"must be between {MIN_TARGET_WORDS} and {MAX_TARGET_WORDS}, or 0 for the default")

    async def extractive(self, text: str, target_words: int, timeout_s: float) -> Summary:
        sentences = split_sentences(text)
        (source_tokens,) = await self._tokens.count([text], timeout_s)
        substantial = [sentence for sentence in sentences if words(sentence) >= MIN_SENTENCE_WORDS]
        kept = substantial if sum(map(words, substantial)) >= target_words else sentences
        vectors = await self._embed(kept, timeout_s)
        chosen = select_sentences(vectors, [words(sentence) for sentence in kept], target_words)
        summary = clip_words(" ".join(kept[index] for index in chosen), target_words)
        return Summary(summary, source_tokens, 1)

    async def abstractive(self, text: str, target_words: int, timeout_s: float) -> Summary:
        (source_tokens,) = await self._tokens.count([text], timeout_s)
        steps = [0]
        summary = await self._reduce(text, source_tokens, target_words, timeout_s, steps, self._max_generate_calls)
        grounded = ground_summary(summary, text, self._min_support)
        return Summary(clip_words(grounded.text, target_words), source_tokens, steps[0], grounded.model_sentences, grounded.supported)

    def _answer_tokens(self, target_words: int) -> int:
        return int(target_words * TOKENS_PER_WORD) + 16

    async def _reduce(
        self, text: str, tokens: int, target_words: int, timeout_s: float, steps: list[int], calls_left: int
    ) -> str:
        """A summary of `text` made with at most `calls_left` Generate calls (`steps` counts them)."""
        budget = self._context_tokens - self._answer_tokens(target_words) - PROMPT_OVERHEAD_TOKENS
        if tokens <= budget:
            steps[0] += 1
            return await self._generate(text, target_words, timeout_s)
        sentences, counts = await self._sentences(text, budget, timeout_s)
        if calls_left < 3:
            # No room for two parts and their reduction: the best of the text that fits one call.
            sentences, counts = await self._condense(sentences, counts, budget, budget, timeout_s)
            steps[0] += 1
            return await self._generate(" ".join(sentences), target_words, timeout_s)
        max_parts = calls_left - 1  # one call at least is left for the reduction
        parts = pack(sentences, counts, budget)
        if len(parts) > max_parts:
            # Sentences of at most `longest` tokens totalling max_parts * (budget - longest) pack into
            # at most max_parts parts (see `pack`).
            longest = max((count for count in counts if count <= budget // 2), default=budget // 2)
            sentences, counts = await self._condense(sentences, counts, max_parts * (budget - longest), longest, timeout_s)
            parts = pack(sentences, counts, budget)
        part_words = max(MIN_TARGET_WORDS, min(target_words, budget // (len(parts) * 2)))
        steps[0] += len(parts)
        partials = await asyncio.gather(*(self._generate(part, part_words, timeout_s) for part in parts))
        joined = "\n".join(partials)
        (joined_tokens,) = await self._tokens.count([joined], timeout_s)
        return await self._reduce(joined, joined_tokens, target_words, timeout_s, steps, calls_left - len(parts))

    async def _sentences(self, text: str, budget: int, timeout_s: float) -> tuple[list[str], list[int]]:
        """The sentences of `text` and their tokens; a sentence over half a call's budget (a table, a
        list without punctuation) is cut into runs of words."""
        words_per_piece = max(1, int(budget / 2 / TOKENS_PER_WORD / 2))
        sentences: list[str] = []
        for sentence in split_sentences(text):
            tokens = sentence.split()
            if len(tokens) * TOKENS_PER_WORD <= budget / 2:
                sentences.append(sentence)
            else:
                sentences.extend(" ".join(tokens[i:i + words_per_piece]) for i in range(0, len(tokens), words_per_piece))
        return sentences, await self._count(sentences, timeout_s)

    async def _condense(
        self, sentences: list[str], counts: list[int], token_limit: int, longest: int, timeout_s: float
    ) -> tuple[list[str], list[int]]:
        """The sentences of at most `longest` tokens the extractive selection ranks highest within
        `token_limit` tokens, in document order (when none is that short: the text's first words).
        A sentence said again (boilerplate, a repeated notice) is considered once."""
        first_seen: dict[str, int] = {}
        for index, (sentence, count) in enumerate(zip(sentences, counts, strict=True)):
            if count <= longest:
                first_seen.setdefault(sentence, index)
        candidates = list(first_seen.values())
        if not candidates:
            opening = clip_words(" ".join(sentences), max(1, int(longest / TOKENS_PER_WORD / 2)))
            return [opening], await self._count([opening], timeout_s)
        vectors = await self._embed([sentences[index] for index in candidates], timeout_s)
        chosen = select_sentences(vectors, [counts[index] for index in candidates], token_limit)
        kept = [candidates[index] for index in chosen]
        return [sentences[index] for index in kept], [counts[index] for index in kept]

    async def _count(self, texts: Sequence[str], timeout_s: float) -> list[int]:
        counts: list[int] = []
        for start in range(0, len(texts), COUNT_BATCH_TEXTS):
            counts.extend(await self._tokens.count(texts[start:start + COUNT_BATCH_TEXTS], timeout_s))
        return counts

    async def _embed(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        batches = [await self._embedder.embed(texts[start:start + EMBED_BATCH_TEXTS], timeout_s)
                   for start in range(0, len(texts), EMBED_BATCH_TEXTS)]
        return np.concatenate(batches) if batches else np.zeros((0, 0), dtype=np.float32)

    async def _generate(self, text: str, target_words: int, timeout_s: float) -> str:
        messages = [
            ("system", "You write short, factual summaries. Use only facts from the text."),
            ("user", f"Summarize this text in at most {target_words} words.\n\n{text}"),
        ]
        answer = stop_at_repetition(self._generator.stream(messages, self._answer_tokens(target_words), timeout_s))
        pieces = [piece async for piece in answer]
        return "".join(pieces).strip()
