"""Evaluation metrics from the reference implementations, so our figures compare with published ones.

ROUGE: Google's `rouge-score`, the re-implementation of ROUGE-1.5.5 that summarization papers
report: F1, lowercase alphanumeric tokens, Porter stemming on. ROUGE-L is the summary-level
variant (`rougeLsum`, what ROUGE-1.5.5 reports for multi-sentence summaries): each reference
sentence is matched against the union of its longest common subsequences with every candidate
sentence, so the order in which the candidate states facts does not cost it.

WER: `jiwer`, with the substitutions, deletions and insertions behind the rate, so a table can say
whether a recognizer drops words or makes them up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import jiwer
from rouge_score import rouge_scorer


@dataclass(frozen=True)
class Rouge:
    """ROUGE F1 scores in [0, 1]."""

    rouge1: float
    rouge2: float
    rougeL: float  # summary-level (rougeLsum)


@cache
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)


def rouge(candidate: Sequence[str], reference: Sequence[str]) -> Rouge:
    """ROUGE of a candidate summary against one reference, each given as its sentences (for ROUGE-L)."""
    scores = _scorer().score("\n".join(reference), "\n".join(candidate))
    return Rouge(scores["rouge1"].fmeasure, scores["rouge2"].fmeasure, scores["rougeLsum"].fmeasure)


@dataclass(frozen=True)
class WordErrors:
    """The word alignment of a hypothesis with its reference; add them up for a corpus rate."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        return self.errors / max(1, self.reference_words)

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(
            self.substitutions + other.substitutions, self.deletions + other.deletions,
            self.insertions + other.insertions, self.reference_words + other.reference_words,
        )


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> WordErrors:
    """Minimum edit alignment of two word sequences (already normalized by the caller)."""
    aligned = jiwer.process_words(" ".join(reference), " ".join(hypothesis))
    return WordErrors(aligned.substitutions, aligned.deletions, aligned.insertions, len(reference))
