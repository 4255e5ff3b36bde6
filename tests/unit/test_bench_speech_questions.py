"""The spoken questions the speech benchmark reports on are not in the text the domain language
model is built from: a sentence the model has seen whole would be recognized from memory, not
from the domain's statistics, and the round trip would flatter the recognizer (issue 15, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.speech.domain import intent_examples, spoken_sentences

REPO = Path(__file__).resolve().parents[2]
QUESTION_SETS = ("demo_questions.txt", "dev_questions.txt")


def questions(name: str) -> list[str]:
    text = (REPO / "bench" / "speech" / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def domain_sentences() -> dict[str, str]:
    """Each sentence of the intent examples and the knowledge-base articles, as the domain model
    reads it (spoken form), mapped to where it comes from."""
    sources = {"demo/intents.yaml": "\n".join(intent_examples(REPO / "demo" / "intents.yaml"))}
    sources |= {f"demo/kb/{path.name}": path.read_text(encoding="utf-8") for path in sorted((REPO / "demo" / "kb").glob("*.md"))}
    return {sentence: source for source, text in sources.items() for sentence in spoken_sentences(text)}


def shared_sentences(asked: list[str], seen: dict[str, str]) -> list[str]:
    return [f"{question!r} (in {seen[sentence]})" for question in asked for sentence in spoken_sentences(question) if sentence in seen]


@pytest.mark.parametrize("name", QUESTION_SETS)
def test_question_set_shares_no_sentence_with_the_domain_model_text(name: str) -> None:
    asked = questions(name)
    assert len(asked) >= 40
    assert shared_sentences(asked, domain_sentences()) == []


def test_the_check_finds_a_copied_intent_example() -> None:
    """The comparison is on spoken sentences: case and punctuation do not hide a copy."""
    seen = domain_sentences()
    copied = intent_examples(REPO / "demo" / "intents.yaml")[-1]
    assert shared_sentences([copied.upper() + "!"], seen) != []


def test_the_settings_set_and_the_report_set_are_disjoint() -> None:
    """Settings chosen on dev_questions.txt; figures reported on demo_questions.txt."""
    report = {sentence for question in questions("demo_questions.txt") for sentence in spoken_sentences(question)}
    dev = {sentence for question in questions("dev_questions.txt") for sentence in spoken_sentences(question)}
    assert report & dev == set()
