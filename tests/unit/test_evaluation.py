"""The evaluation metrics against values worked out by hand, not against another implementation."""

from __future__ import annotations

import pytest

from llmos.evaluation import WordErrors, rouge, word_errors

pytestmark = pytest.mark.unit


def test_rouge_stems_and_counts_unigrams_and_bigrams() -> None:
    # Tokens after lowercasing and Porter stemming: the cat were run / the cat run.
    # ROUGE-1: 3 shared of 4 and 3 -> F1 = 2 * 3/4 * 1 / (3/4 + 1) = 6/7.
    # ROUGE-2: (the, cat) shared, of 3 and 2 bigrams -> F1 = 2 * 1/3 * 1/2 / (1/3 + 1/2) = 2/5.
    scores = rouge(["The cats were running."], ["the cat runs"])
    assert scores.rouge1 == pytest.approx(6 / 7)
    assert scores.rouge2 == pytest.approx(2 / 5)


def test_rouge_l_is_summary_level() -> None:
    # Reference sentence "a c e" against the union of its LCS with each candidate sentence:
    # {e} from "d e", {a, c} from "a b c" -> 3 hits of 5 candidate and 3 reference tokens: F1 = 3/4.
    # A plain LCS over the whole text would find only "a c" (F1 = 1/2): the order of sentences does not count.
    assert rouge(["d e.", "a b c."], ["a c e."]).rougeL == pytest.approx(3 / 4)
    assert rouge(["nothing shared here."], ["a c e."]).rouge1 == 0.0


def test_word_errors_break_down_into_substitutions_deletions_insertions() -> None:
    # "well" inserted, sat -> sit, the second "the" deleted: 3 errors of 6 reference words; no alignment costs less.
    errors = word_errors("the cat sat on the mat".split(), "well the cat sit on mat".split())
    assert (errors.substitutions, errors.deletions, errors.insertions) == (1, 1, 1)
    assert errors.wer == pytest.approx(3 / 6)
    assert word_errors(["a", "b"], []) == WordErrors(deletions=2, reference_words=2)


def test_word_errors_add_up_over_a_corpus() -> None:
    total = word_errors(["a", "b"], ["a"]) + word_errors(["c"], ["c", "d"])
    assert total == WordErrors(0, 1, 1, 3) and total.wer == pytest.approx(2 / 3)
