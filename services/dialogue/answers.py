"""One grounded answer: evidence selected from the passages, phrased by the model or quoted, checked.

`AnswerComposer.evidence` picks the source sentences for a question (`grounding.select_evidence`);
`AnswerComposer.compose` asks the model to phrase them, verifies the draft, and returns the
answer's sentences with their citations and the grounding report. A draft that fails the
verifier is never sent: the evidence is, briefly framed. Chat and spoken answers (Converse) use
the same composer; a spoken answer is shorter and unframed.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llmos.errors import DeadlineExceeded
from llmos.text import sentence_spans
from llmos.v1 import dialogue_pb2
from services.dialogue.backends import Embedder, Generator, Passage
from services.dialogue.grounding import (
    Candidate,
    Evidence,
    EvidenceWeights,
    Question,
    candidates,
    conflicting,
    select_evidence,
    verify,
)
from services.dialogue.prompt import draft_messages
from services.dialogue.repetition import stop_at_repetition

SENTENCE_VECTOR_ENTRIES = 8192


@dataclass(frozen=True)
class GroundingLimits:
    evidence_sentences: int  # at most this many source sentences answer a question
    min_evidence_score: float  # under this, the help centre does not answer the question
    min_support: float  # share of a draft sentence's content words an evidence sentence must hold
    drafts: bool  # let the model phrase the evidence (verified), or always quote it
    draft_max_tokens: int
    spoken_sentences: int  # a spoken answer holds at most this many sentences


@dataclass(frozen=True)
class AnswerSentence:
    text: str  # as streamed, framing included
    grounded: dialogue_pb2.GroundedSentence | None = None  # None for framing-only text
    source: Passage | None = None

    @property
    def citation(self) -> dialogue_pb2.Citation | None:
        if self.source is None:
            return None
        return dialogue_pb2.Citation(
            document_id=self.source.document_id, title=self.source.title, chunk_id=self.source.chunk_id, score=self.source.score
        )


@dataclass
class Answer:
    sentences: list[AnswerSentence]
    report: dialogue_pb2.GroundingReport
    verify_ms: float = 0.0

    @property
    def text(self) -> str:
        return " ".join(sentence.text for sentence in self.sentences)

    def citations(self) -> list[dialogue_pb2.Citation]:
        """One citation per document, in the order the answer first cites it."""
        cited: dict[str, dialogue_pb2.Citation] = {}
        for sentence in self.sentences:
            citation = sentence.citation
            if citation is not None and citation.document_id not in cited:
                cited[citation.document_id] = citation
        return list(cited.values())


class SentenceVectors:
    """Embeddings of source sentences, remembered: the knowledge base repeats across questions.

    Concurrent turns share the embedding of a sentence already on its way: a burst of questions
    about the same articles embeds each of their sentences once, not once per turn. That call has
    its own limit (`fill_timeout_s`), not the deadline of the turn that started it: a turn whose
    deadline passes first fails, the sentences are still remembered, and the next turns find them
    (bound to short deadlines, a burst of cold turns would fail again and again, none of them
    ever filling the cache).
    """

    def __init__(self, embedder: Embedder, fill_timeout_s: float, entries: int = SENTENCE_VECTOR_ENTRIES) -> None:
        self._embedder = embedder
        self._fill_timeout_s = fill_timeout_s
        self._entries = entries
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._embedding: dict[str, asyncio.Task[dict[str, np.ndarray]]] = {}

    async def of(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        wanted = list(dict.fromkeys(texts))
        found = {text: self._vectors[text] for text in wanted if text in self._vectors}
        for text in found:
            self._vectors.move_to_end(text)
        missing = [text for text in wanted if text not in found and text not in self._embedding]
        if missing:
            task = asyncio.ensure_future(self._embed(missing, self._fill_timeout_s))
            self._embedding.update(dict.fromkeys(missing, task))
        # Shielded: a turn that goes away does not cancel the sentences other turns wait for.
        calls = {self._embedding[text] for text in wanted if text not in found}
        try:
            embedded = await asyncio.wait_for(asyncio.gather(*(asyncio.shield(call) for call in calls)), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded("inference: the source sentences were not embedded within the request's deadline") from None
        for vectors in embedded:
            found.update(vectors)
        while len(self._vectors) > self._entries:
            self._vectors.popitem(last=False)
        return np.array([found[text] for text in texts], dtype=np.float32)

    async def _embed(self, texts: list[str], timeout_s: float) -> dict[str, np.ndarray]:
        try:
            embedded = dict(zip(texts, await self._embedder.embed(texts, timeout_s), strict=True))
        finally:
            for text in texts:
                del self._embedding[text]
        self._vectors.update(embedded)
        return embedded


def grounded(text: str, shown: str, evidence: Evidence, support: float) -> AnswerSentence:
    """An answer sentence (`shown` as streamed, `text` the claim itself) backed by `evidence`."""
    report = dialogue_pb2.GroundedSentence(
        text=text,
        document_id=evidence.passage.document_id,
        chunk_id=evidence.passage.chunk_id,
        start_offset=evidence.start,
        end_offset=evidence.end,
        source_text=evidence.text,
        support=support,
    )
    return AnswerSentence(shown, report, evidence.passage)


@dataclass
class AnswerComposer:
    embedder: Embedder
    generator: Generator
    limits: GroundingLimits
    brand: str
    weights: EvidenceWeights = field(default_factory=EvidenceWeights)
    # Limit of the embedding call of source sentences that turns share (not one turn's deadline).
    sentence_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self._sentence_vectors = SentenceVectors(self.embedder, self.sentence_timeout_s)

    async def evidence(
        self, question: Question, question_vector: np.ndarray, passages: Sequence[Passage], spoken: bool, timeout_s: float
    ) -> list[Evidence]:
        """The best source sentences for `question`; empty when none answers it well enough."""
        found: list[Candidate] = candidates(passages)
        if not found:
            return []
        vectors = await self._sentence_vectors.of([candidate.text for candidate in found], timeout_s)
        limit = min(self.limits.evidence_sentences, self.limits.spoken_sentences) if spoken else self.limits.evidence_sentences
        chosen = select_evidence(question.text, question_vector, found, vectors, limit, self.weights, question.kind)
        if not chosen or chosen[0].score < self.limits.min_evidence_score:
            return []
        if spoken:  # a caller hears at most `spoken_sentences` sentences; a joined piece of evidence is two
            kept, sentences = [], 0
            for item in chosen:
                sentences += len(sentence_spans(item.text))
                if kept and sentences > self.limits.spoken_sentences:
                    break
                kept.append(item)
            chosen = kept
        return chosen

    async def compose(self, question: str, evidence: Sequence[Evidence], spoken: bool, timeout_s: float) -> Answer:
        report = dialogue_pb2.GroundingReport(standalone_question=question)
        pair = conflicting(evidence)
        if pair is not None:
            report.conflict = True
            report.path = dialogue_pb2.ANSWER_PATH_EVIDENCE
            return Answer(reported(self._quoted(list(pair), spoken, conflict=True), report), report)
        if self.limits.drafts:
            pieces = stop_at_repetition(
                self.generator.stream(draft_messages(self.brand, question, [item.text for item in evidence], spoken),
                                      self.limits.draft_max_tokens, timeout_s),
                self.limits.spoken_sentences if spoken else None,
            )
            draft = "".join([piece async for piece in pieces])
            started = time.perf_counter()
            verdict = verify(draft, evidence, self.limits.min_support, [self.brand])
            verify_ms = (time.perf_counter() - started) * 1000
            if verdict.passed:
                report.path = dialogue_pb2.ANSWER_PATH_DRAFT
                sentences = [grounded(checked.text, checked.text, checked.evidence, checked.support) for checked in verdict.sentences]
                return Answer(reported(sentences, report), report, verify_ms)
            report.draft_problems.extend(verdict.problems)
        else:
            verify_ms = 0.0
        report.path = dialogue_pb2.ANSWER_PATH_EVIDENCE
        return Answer(reported(self._quoted(list(evidence), spoken, conflict=False), report), report, verify_ms)

    def _quoted(self, evidence: list[Evidence], spoken: bool, conflict: bool) -> list[AnswerSentence]:
        """The evidence itself: each sentence cited, framed by the article it comes from (unless spoken)."""
        sentences: list[AnswerSentence] = []
        if conflict:
            sentences.append(AnswerSentence("Our help-centre articles differ on this."))
        # Grouped by article (the best one first), so each article is named once.
        order = {document: rank for rank, document in reversed(list(enumerate(item.passage.document_id for item in evidence)))}
        evidence = sorted(evidence, key=lambda item: order[item.passage.document_id])
        previous_document = ""
        for item in evidence:
            frame = ""
            if not spoken and item.passage.document_id != previous_document:
                frame = f'Our article "{item.passage.title}" says: '
            previous_document = item.passage.document_id
            sentences.append(grounded(item.text, frame + item.text, item, 1.0))
        return sentences


def reported(sentences: list[AnswerSentence], report: dialogue_pb2.GroundingReport) -> list[AnswerSentence]:
    """`sentences`, their grounding added to `report`."""
    report.sentences.extend(sentence.grounded for sentence in sentences if sentence.grounded is not None)
    return sentences
