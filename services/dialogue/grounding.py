"""Answers that say only what the knowledge base says: evidence selection and the draft verifier.

A 135M model cannot restate facts reliably, so correctness comes from here, not from the model:

- **Evidence.** The retrieved passages are cut into sentences (with their offsets in the chunk)
  and each sentence is scored against the question: the cosine of their embeddings, the share
  of the question's content words it contains, and whether it holds the kind of fact the
  question asks for (how long → a duration, how much → an amount, ...). The best one to three
  sentences are the evidence; a sentence that opens with a pronoun brings the sentence before it.
- **Facts.** Numbers (digits or words: "three years" is "3 years"), amounts, times, e-mail
  addresses, phone numbers and proper names, normalized so that "€14" and "14 EUR" compare equal.
- **Verification.** A model draft passes only when every fact in it occurs in the evidence, it
  keeps the facts of the best evidence sentence, and each of its sentences is supported by an
  evidence sentence (enough of its content words occur there). A draft that fails is not sent:
  the evidence is, by construction correct.
- **Conflicts.** Two evidence sentences from different articles about the same thing with
  different facts are a conflict: both are quoted and cited.

Everything here is pure and synchronous: the caller embeds and generates.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache

import numpy as np

from llmos.facts import STOP_WORDS, content_words, facts, normalize, support
from llmos.text import plain, sentence_spans
from services.dialogue.backends import Passage

_PRONOUN_START = re.compile(r"^(?:they|it|this|these|that|those|its|their|then|there|such|both)\b", re.IGNORECASE)
_CITATION_MARK = re.compile(r"\s*\[\d{1,2}\]")
_SENTENCE_END = re.compile(r"[.!?:)\"']$")
# Two sentences say the same thing when this share of all their words (facts aside) is common to both
# ("refunded within three working days" after a cancellation and "within five" after a return are not).
SAME_TOPIC = 0.7
TYPO_SIMILARITY = 0.75  # difflib ratio at which a question word is taken for a passage word
MAX_UNCOUNTED_WORD_CHARS = 3  # shorter words ("u", "wat") neither match nor count as unknown
# Source sentences whose words and facts are remembered: the knowledge base's sentences come back
# turn after turn, and reading them again (regular expressions, number words) was most of a
# turn's CPU, spent on the event loop every concurrent turn shares.
SENTENCE_FEATURE_ENTRIES = 16384


@dataclass(frozen=True)
class SentenceFeatures:
    normalized: str
    words: frozenset[str]  # content words
    facts: frozenset[str]


@lru_cache(maxsize=SENTENCE_FEATURE_ENTRIES)
def features(text: str) -> SentenceFeatures:
    """The normalized text, content words and facts of a source sentence (computed once per text)."""
    return SentenceFeatures(normalize(text), frozenset(content_words(text)), frozenset(facts(text)))


class AnswerType(StrEnum):
    """The kind of fact a question asks for."""

    DURATION = "duration"
    AMOUNT = "amount"
    COUNT = "count"
    CONTACT = "contact"
    PLACE = "place"
    POLICY = "policy"
    ANY = "any"


_QUESTION_TYPES: tuple[tuple[AnswerType, re.Pattern[str]], ...] = (
    (AnswerType.DURATION, re.compile(r"\b(what time|latest|earliest|opening hours|how long)\b")),
    (AnswerType.CONTACT, re.compile(r"\b(phone|call|ring|hotline|e-?mail address|contact|reach)\b")),
    (AnswerType.AMOUNT, re.compile(r"\bhow much\b|\b(cost|costs|price|fee|fees|charge|charged|expensive|cheap|maximum|minimum|amount|spend)\b")),
    (AnswerType.DURATION, re.compile(
        r"\bhow (long|soon|quickly|fast|late|early)\b|\bwhen\b|\bwhat time\b|\b(until|deadline|expire|expires|valid|hours|open|days?|weeks?|months?|years?)\b"
    )),
    (AnswerType.COUNT, re.compile(r"\bhow many\b")),
    (AnswerType.PLACE, re.compile(r"\bwhere\b|\bwhich (store|page|city|country|countries|address)\b")),
    (AnswerType.POLICY, re.compile(r"^(can|could|do|does|is|are|will|may|should|am|would)\b|\b(allowed|possible)\b")),
)
_FACT_PATTERNS: dict[AnswerType, re.Pattern[str]] = {
    AnswerType.DURATION: re.compile(
        r"\b\d+(?:[.,]\d+)?\s*(?:to \d+\s*)?(?:working |business |calendar )?(?:minute|hour|day|week|month|year)s?\b|\b\d{1,2}:\d{2}\b|"
        r"\b(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|sundays|next working day|same day|at once|immediately)\b",
        re.IGNORECASE,
    ),
    AnswerType.AMOUNT: re.compile(r"\d+(?:[.,]\d+)?\s*(?:eur\b|%|points?\b)|\bfree\b", re.IGNORECASE),
    AnswerType.COUNT: re.compile(r"\b\d+\b"),
    AnswerType.CONTACT: re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\+\d[\d ]{6,}\d"),
    AnswerType.PLACE: re.compile(r"\*\*[^*]+\*\*|\b(?:in|at|under|from|to) [A-Z]"),
    AnswerType.POLICY: re.compile(r"\b(?:can|cannot|can't|must|free|not|never|only|possible|available|always)\b", re.IGNORECASE),
}


def answer_type(question: str) -> AnswerType:
    lowered = question.lower().strip()
    for kind, pattern in _QUESTION_TYPES:
        if pattern.search(lowered):
            return kind
    return AnswerType.ANY


_FOLLOW_UP_START = re.compile(
    r"^(and|or|but|also|what about|how about|what if|same for|same with|then)\b", re.IGNORECASE
)
_REFERRING = re.compile(r"\b(it|that|this|they|them|those|these|there|one|ones)\b", re.IGNORECASE)
_QUESTION = re.compile(r"\?\s*$|^(what|which|where|when|how|who|why)\b", re.IGNORECASE)
FOLLOW_UP_CONTENT_WORDS = 3


@dataclass(frozen=True)
class Question:
    text: str  # stands alone: what retrieval and evidence selection see
    kind: AnswerType  # the kind of fact it asks for


def standalone(message: str, previous_question: str) -> Question:
    """`message` made to stand alone: an elliptic follow-up ("what about gift cards?", "how much is
    that?") is joined to the question before it, which supplies its topic (and, when the follow-up
    does not say, the kind of fact asked for)."""
    words = len(content_words(message))
    elliptic = bool(previous_question) and (
        bool(_FOLLOW_UP_START.match(message.strip()))
        or (bool(_REFERRING.search(message)) and words <= FOLLOW_UP_CONTENT_WORDS)
        or (bool(_QUESTION.search(message)) and words <= 1)  # "what do I need to bring?"
    )
    if not elliptic:
        return Question(message, answer_type(message))
    kind = answer_type(message)
    return Question(f"{message} {previous_question}", answer_type(previous_question) if kind is AnswerType.ANY else kind)


@dataclass(frozen=True)
class Evidence:
    """A source sentence (or a sentence with the one it refers back to) chosen to answer from."""

    text: str  # as a person reads it (Markdown marks removed)
    passage: Passage
    start: int  # offsets of the sentence in the passage (chunk) text
    end: int
    score: float
    typed: bool  # holds the kind of fact the question asks for
    answer_facts: frozenset[str] = frozenset()  # the facts of that kind in it: an answer must keep them

    @property
    def facts(self) -> frozenset[str]:
        return features(self.text).facts


@dataclass(frozen=True)
class Candidate:
    text: str
    passage: Passage
    start: int
    end: int


@dataclass(frozen=True)
class EvidenceWeights:
    """How a sentence's score is made beside its cosine to the question; chosen on the development
    question set (`llmos eval answers`, demo/questions.yaml). Whether a sentence holds the kind of
    fact asked for did not help ranking there: it decides what a draft must keep, and conflicts."""

    lexical: float = 0.2  # IDF-weighted share of the question's content words in the sentence
    passage: float = 0.3  # the passage's own cosine to the question
    unknown: float = 1.2  # share of the question's content words the passages never use
    keep_margin: float = 0.4  # a further sentence is kept when it scores within this of the best
    redundancy: float = 0.6  # ... and shares less than this of its content words with one kept


def candidates(passages: Sequence[Passage], min_words: int = 4) -> list[Candidate]:
    """Every sentence of the passages worth answering from, with its offsets in the chunk text.

    A sentence that refers back ("They are valid for three years") is joined to the one before it,
    so it still says what it is about; headings (no closing punctuation) and fragments are left out.
    """
    found: list[Candidate] = []
    seen: set[str] = set()
    for passage in passages:
        spans = sentence_spans(passage.text)
        for index, span in enumerate(spans):
            if len(span.text.split()) < min_words or not _SENTENCE_END.search(span.text):
                continue
            start = span.start
            text = span.text
            if _PRONOUN_START.match(text) and index > 0 and len(spans[index - 1].text.split()) >= min_words:
                start = spans[index - 1].start
                text = f"{spans[index - 1].text} {text}"
            key = " ".join(text.lower().split())
            if key in seen:  # overlapping chunks repeat sentences
                continue
            seen.add(key)
            found.append(Candidate(plain(text), passage, start, span.end))
    return found


def _closest(word: str, vocabulary: Iterable[str]) -> str | None:
    """The vocabulary word `word` is a misspelling of: close in spelling, same first letter
    (a spelling slip rarely hits it, and "router" is not "order")."""
    same_start = [other for other in vocabulary if other[:1] == word[:1]]
    close = difflib.get_close_matches(word, same_start, n=1, cutoff=TYPO_SIMILARITY)
    return close[0] if close else None


def asked_words(question: str, vocabulary: set[str]) -> tuple[set[str], float]:
    """The question's content words as the passages spell them (a misspelt word is matched to its
    closest passage word), and the share of them the passages never use: a question about a
    router or a flight shares its function words with the help centre, not its subject."""
    mapped: set[str] = set()
    counted = unknown = 0
    for word in content_words(question):
        if word in vocabulary:
            mapped.add(word)
        elif len(word) <= MAX_UNCOUNTED_WORD_CHARS:
            continue
        elif close := _closest(word, vocabulary):
            mapped.add(close)
        elif _closest(word, STOP_WORDS):
            continue  # a misspelt function word ("somthing")
        else:
            unknown += 1
        counted += 1
    return mapped, unknown / counted if counted else 0.0


@lru_cache(maxsize=SENTENCE_FEATURE_ENTRIES)
def _answer_facts(text: str, kind: AnswerType) -> frozenset[str]:
    """The facts of `text` of the kind asked for ("3" of "valid for three years" for how long)."""
    if kind in (AnswerType.ANY, AnswerType.POLICY, AnswerType.PLACE):
        return frozenset()
    return frozenset().union(*(facts(match.group()) for match in _FACT_PATTERNS[kind].finditer(features(text).normalized)))


def select_evidence(
    question: str,
    question_vector: np.ndarray,
    found: Sequence[Candidate],
    vectors: np.ndarray,
    limit: int,
    weights: EvidenceWeights = EvidenceWeights(),
    kind: AnswerType | None = None,
) -> list[Evidence]:
    """The best one to `limit` sentences for `question` (asking for `kind` of fact), best first.

    Further sentences are chosen for the question words the ones before left uncovered (the second
    half of a two-part question), and kept while they score within a margin of the best.
    """
    if not found:
        return []
    kind = kind or answer_type(question)
    words = [features(candidate.text).words for candidate in found]
    vocabulary = set().union(*words) | set().union(*(content_words(candidate.passage.title) for candidate in found))
    asked, unknown = asked_words(question, vocabulary)
    cosine = vectors @ question_vector
    answer_facts = [_answer_facts(candidate.text, kind) for candidate in found]
    typed = [kind is not AnswerType.ANY and bool(_FACT_PATTERNS[kind].search(features(c.text).normalized)) for c in found]
    base = [
        float(similarity) + weights.passage * candidate.passage.score - weights.unknown * unknown
        for candidate, similarity in zip(found, cosine, strict=True)
    ]

    # Rare words say more: "Norway" picks its sentence better than "delivery" does.
    weight = {word: math.log(1 + len(found) / (1 + sum(word in sentence for sentence in words))) for word in asked}
    total = sum(weight.values())

    def scored(index: int, uncovered: set[str]) -> Evidence:
        lexical = sum(weight[word] for word in uncovered & words[index]) / total if total else 0.0
        candidate = found[index]
        return Evidence(candidate.text, candidate.passage, candidate.start, candidate.end,
                        base[index] + weights.lexical * lexical, typed[index], answer_facts[index])

    best_index = max(range(len(found)), key=lambda index: scored(index, asked).score)
    chosen = [scored(best_index, asked)]
    picked = [best_index]
    covered = set(words[best_index])
    while len(chosen) < limit:
        # A near-repeat is left out, unless another article states other facts in it: a conflict to show.
        options = [
            index for index in range(len(found))
            if index not in picked and all(
                support(words[index], words[kept]) < weights.redundancy or _disagree(found[index], found[kept]) for kept in picked
            )
        ]
        if not options:
            break
        uncovered = asked - covered

        def rescored(index: int) -> Evidence:
            # A sentence that contradicts one kept answers the same words: it is scored on all of them.
            conflict = any(_disagree(found[index], found[kept]) for kept in picked)
            return scored(index, asked if conflict else uncovered)

        following = max(options, key=lambda index: rescored(index).score)
        evidence = rescored(following)
        if evidence.score < chosen[0].score - weights.keep_margin:
            break
        chosen.append(evidence)
        picked.append(following)
        covered |= words[following]
    return chosen


def _disagree(first: Candidate | Evidence, second: Candidate | Evidence) -> bool:
    """Two articles stating different facts (none in common) in sentences about the same thing."""
    if first.passage.document_id == second.passage.document_id:
        return False
    first_features, second_features = features(first.text), features(second.text)
    first_facts, second_facts = first_features.facts, second_features.facts
    if not first_facts or not second_facts or first_facts & second_facts:
        return False
    first_words, second_words = first_features.words - first_facts, second_features.words - second_facts
    return len(first_words & second_words) >= SAME_TOPIC * max(1, len(first_words | second_words))


def conflicting(evidence: Sequence[Evidence]) -> tuple[Evidence, Evidence] | None:
    """Two evidence sentences that give the fact asked for differently, from different articles."""
    for index, first in enumerate(evidence):
        for second in evidence[index + 1:]:
            if first.typed and second.typed and _disagree(first, second):
                return first, second
    return None


@dataclass(frozen=True)
class CheckedSentence:
    text: str
    evidence: Evidence
    support: float


@dataclass
class Verdict:
    sentences: list[CheckedSentence] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.sentences) and not self.problems


def clean_draft(draft: str) -> str:
    return " ".join(_CITATION_MARK.sub("", plain(draft)).split())


def verify(draft: str, evidence: Sequence[Evidence], min_support: float, allowed_names: Iterable[str] = ()) -> Verdict:
    """Check a model draft against the evidence it was given.

    Every fact of the draft must occur in the evidence, the facts of the kind asked for in the best
    evidence sentence must all be in the draft (an answer that drops the figure asked for is no
    answer), and every draft sentence must have `min_support` of its content words in one evidence
    sentence, which holds all of that draft sentence's facts.
    """
    verdict = Verdict()
    text = clean_draft(draft)
    if not text or not evidence:
        verdict.problems.append("the draft is empty")
        return verdict
    # A fact is known when the evidence states it: as a fact, or as a word (a name in lower-case text).
    known = set().union(*(item.facts | content_words(item.text) for item in evidence)) | {name.lower() for name in allowed_names}
    said = facts(text)
    verdict.problems.extend(f"{fact.removeprefix('tel:')} is not in the evidence" for fact in sorted(said - known))
    verdict.problems.extend(f"leaves out {fact.removeprefix('tel:')}" for fact in sorted(evidence[0].answer_facts - said))
    sources = [content_words(item.text) for item in evidence]
    allowed = {name.lower() for name in allowed_names}
    for sentence in (span.text for span in sentence_spans(text)):
        words = content_words(sentence)
        scores = [support(words, source) for source in sources]
        best = int(np.argmax(scores))
        if scores[best] < min_support:
            verdict.problems.append(f"not supported by the evidence: {sentence!r}")
        # Facts of two evidence sentences in one draft sentence make a claim neither makes.
        elsewhere = (facts(sentence) & known) - evidence[best].facts - sources[best] - allowed
        verdict.problems.extend(f"{fact.removeprefix('tel:')} is not in the sentence it restates" for fact in sorted(elsewhere))
        verdict.sentences.append(CheckedSentence(sentence, evidence[best], scores[best]))
    return verdict


@dataclass(frozen=True)
class GroundedSummary:
    text: str
    model_sentences: int  # sentences the model wrote
    supported: int  # of them, those the verifier passed


SUMMARY_SOURCES_PER_SENTENCE = 3  # source sentences a summary sentence is checked against


def ground_summary(summary: str, source: str, min_support: float) -> GroundedSummary:
    """A model's summary with each sentence checked like a draft answer, against the source sentences
    that share most of its words: a supported sentence stays, an unsupported one is replaced by the
    source sentence it drew most from (once), or dropped when it drew on none."""
    document = Passage("", "", "", source, 0.0)
    spans = sentence_spans(source)
    words = [content_words(span.text) for span in spans]
    written = [span.text for span in sentence_spans(clean_draft(summary)) if content_words(span.text)]  # no stray marks
    kept: list[str] = []
    quoted: set[int] = set()
    supported = 0
    for sentence in written:
        claim = content_words(sentence)
        ranked = sorted(range(len(spans)), key=lambda index: -support(claim, words[index]))[:SUMMARY_SOURCES_PER_SENTENCE]
        evidence = [Evidence(plain(spans[index].text), document, spans[index].start, spans[index].end, 0.0, False) for index in ranked]
        if evidence and verify(sentence, evidence, min_support).passed:
            supported += 1
            kept.append(sentence)
        elif ranked and ranked[0] not in quoted and support(claim, words[ranked[0]]) > 0:
            quoted.add(ranked[0])
            kept.append(evidence[0].text)
    return GroundedSummary(" ".join(kept), len(written), supported)
