"""Grounded answers in memory: facts and their normalization, the draft verifier, evidence
selection, follow-up rewriting, conflicts, and how `llmos eval answers` matches facts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmos.facts import content_words, facts, normalize
from llmos_cli.answers import contains, facts_found, load_cases
from services.dialogue.backends import Passage
from services.dialogue.grounding import (
    AnswerType,
    Evidence,
    EvidenceWeights,
    answer_type,
    asked_words,
    candidates,
    conflicting,
    select_evidence,
    standalone,
    verify,
)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]

GIFT_CARDS = Passage(
    "giftcards", "Gift cards", "g1",
    "# Gift cards\n\nNorthwind gift cards are sold from 10 to 500 EUR, as a printed card sent by post.\n"
    "They are valid for three years from purchase and can be used in every **Northwind** store.\n\n"
    "You can use up to three gift cards on one order.",
    0.7,
)
CONTACT = Passage(
    "contact", "Contacting customer service", "c1",
    "By phone, call +49 40 1234 5670, Monday to Friday from 9:00 to 18:00. We reply to e-mails within one working day.",
    0.6,
)


def evidence_of(passage: Passage, index: int = 0, answer_facts: frozenset[str] = frozenset()) -> Evidence:
    candidate = candidates([passage])[index]
    return Evidence(candidate.text, candidate.passage, candidate.start, candidate.end, 1.0, True, answer_facts)


# --- facts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [("three years", "3 years"), ("€14", "14 EUR"), ("14 euros", "EUR 14"), ("**Account settings**", "account settings")],
)
def test_two_ways_of_writing_a_fact_normalize_alike(first: str, second: str) -> None:
    assert normalize(first) == normalize(second)


def test_facts_are_numbers_times_contacts_and_names() -> None:
    found = facts("Call +49 40 1234 5670 from 9:00; it costs 4.90 EUR in Hamburg. Write to help@shop.example.")
    assert found == {"tel:494012345670", "9:00", "4.9", "hamburg", "help@shop.example"}
    assert facts("valid for three years") == facts("valid for 3 years") == {"3"}


# --- the verifier ---------------------------------------------------------------------------


def test_a_draft_with_a_wrong_number_fails() -> None:
    verdict = verify("Gift cards are valid for five years.", [evidence_of(GIFT_CARDS, 1, frozenset({"3"}))], min_support=0.5)
    assert not verdict.passed
    assert "5 is not in the evidence" in verdict.problems


def test_a_number_in_words_passes_and_each_sentence_is_traced_to_its_source() -> None:
    evidence = [evidence_of(GIFT_CARDS, 1, frozenset({"3"}))]
    verdict = verify("Our gift cards are valid for 3 years from purchase [1].", evidence, min_support=0.5)
    assert verdict.passed, verdict.problems
    (checked,) = verdict.sentences
    assert checked.evidence is evidence[0] and checked.support >= 0.5
    assert GIFT_CARDS.text[checked.evidence.start:checked.evidence.end].startswith("Northwind gift cards")


def test_a_draft_that_drops_the_fact_asked_for_or_adds_a_name_fails() -> None:
    evidence = [evidence_of(CONTACT, answer_facts=frozenset({"tel:494012345670"}))]
    dropped = verify("You can call us on weekdays.", evidence, min_support=0.3)
    assert any(problem.startswith("leaves out") for problem in dropped.problems)
    named = verify(
        "Call +49 40 1234 5670 in Berlin, Monday to Friday from 9:00 to 18:00.", evidence, min_support=0.3
    )
    assert "berlin is not in the evidence" in named.problems


def test_an_unsupported_sentence_fails_even_without_facts() -> None:
    evidence = [evidence_of(GIFT_CARDS, 1)]
    verdict = verify(
        "Northwind gift cards are valid for three years from purchase. Shipping is always express.", evidence, min_support=0.6
    )
    assert not verdict.passed
    assert any("not supported" in problem and "express" in problem for problem in verdict.problems)


# --- evidence -------------------------------------------------------------------------------


def test_candidates_skip_headings_join_back_references_and_keep_offsets() -> None:
    found = candidates([GIFT_CARDS])
    assert [candidate.text.split()[0] for candidate in found] == ["Northwind", "Northwind", "You"]
    joined = found[1]
    assert joined.text.startswith("Northwind gift cards are sold") and "valid for three years" in joined.text
    assert "**" not in joined.text  # shown as read; the offsets still address the Markdown source
    assert GIFT_CARDS.text[joined.start:joined.end].endswith("every **Northwind** store.")


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ("How long is a gift card valid?", AnswerType.DURATION),
        ("What's the latest time I can still ring your hotline?", AnswerType.DURATION),
        ("What does express delivery cost?", AnswerType.AMOUNT),
        ("What is your phone number?", AnswerType.CONTACT),
        ("Can I tumble dry merino?", AnswerType.POLICY),
    ],
)
def test_the_kind_of_fact_a_question_asks_for(question: str, kind: AnswerType) -> None:
    assert answer_type(question) is kind


def test_misspelt_words_meet_their_passage_words_and_foreign_subjects_count_as_unknown() -> None:
    vocabulary = content_words("Returns of an order are free. Change the delivery address under account settings.")
    asked, unknown = asked_words("were can i chnage the adress?", vocabulary)
    assert asked == content_words("change address") and unknown == 0.0
    asked, unknown = asked_words("How do I reset my router?", vocabulary)
    assert "order" not in asked and unknown == 1.0  # "router" is not a misspelt "order"


def test_the_sentence_with_the_kind_of_fact_asked_for_is_chosen_and_a_second_covers_the_rest() -> None:
    found = candidates([GIFT_CARDS, CONTACT])
    vectors = np.eye(len(found), dtype=np.float32)
    neutral = np.full(len(found), 1 / np.sqrt(len(found)), dtype=np.float32)
    chosen = select_evidence("How long is a gift card valid?", neutral, found, vectors, limit=1)
    assert "valid for three years" in chosen[0].text and chosen[0].typed and chosen[0].answer_facts == {"3"}
    two_part = select_evidence(
        "How long is a gift card valid, and what is your phone number?", neutral, found, vectors, limit=2,
        weights=EvidenceWeights(keep_margin=0.5),
    )
    assert {item.passage.document_id for item in two_part} == {"giftcards", "contact"}


def test_two_articles_stating_different_values_are_a_conflict() -> None:
    eu = Passage("returns", "Returns", "r1", "Returns from outside the EU cost 6 EUR, taken from the refund.", 0.7)
    other = Passage("international", "International", "i1", "Returns from outside the EU cost 10 EUR, taken from the refund.", 0.7)
    agree = Passage("faq", "FAQ", "f1", "Returns from outside the EU cost 6 EUR, taken from the refund.", 0.7)
    first, second, same = (evidence_of(passage) for passage in (eu, other, agree))
    assert conflicting([first, second]) == (first, second)
    assert conflicting([first, same]) is None
    cancelled = Passage("orders", "Orders", "o1", "The payment is released or refunded to the original payment method within three working days.", 0.7)
    returned = Passage("returns", "Returns", "r2", "Refunds go back to the original payment method within five working days after the warehouse receives the parcel.", 0.7)
    assert conflicting([evidence_of(cancelled), evidence_of(returned)]) is None  # two different refunds


def test_an_elliptic_follow_up_is_joined_to_the_question_before_it() -> None:
    previous = "How long do I have to return something?"
    follow_up = standalone("and what about gift cards?", previous)
    assert follow_up.text == f"and what about gift cards? {previous}" and follow_up.kind is AnswerType.DURATION
    priced = standalone("how much does that cost?", "Do you ship to Norway?")
    assert "Norway" in priced.text and priced.kind is AnswerType.AMOUNT
    bare = standalone("what do I need to bring?", "Can I pick up my online order in a store?")
    assert bare.text.endswith("in a store?")
    whole = standalone("Can I pay with Klarna in instalments?", previous)
    assert whole.text == "Can I pay with Klarna in instalments?"
    assert standalone("thanks", previous).text == "thanks"


# --- evaluation -----------------------------------------------------------------------------


def test_fact_matching_is_normalized_and_whole_word() -> None:
    assert contains("They are valid for three years.", "3 years")
    assert contains("It costs €14.", "14 EUR")
    assert not contains("within 300 days", "30 days")
    assert facts_found("30 days, then store credit", [["30 days"], ["gift card", "store credit"]]) == [True, True]


def test_the_development_question_file_loads_in_its_documented_format() -> None:
    cases = load_cases(REPO / "demo" / "questions.yaml")
    assert len(cases) >= 150
    assert any(case.turns for case in cases) and any(case.decline for case in cases) and any(case.out_of_domain for case in cases)
    assert all(case.facts for case in cases if not (case.decline or case.out_of_domain))


def test_a_malformed_question_file_is_refused_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "questions.yaml"
    path.write_text("in_domain:\n  - question: 'Where?'\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"in_domain\[0\] needs a source article, facts, or `expect: decline`"):
        load_cases(path)
