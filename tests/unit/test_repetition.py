"""The guard that ends an answer where the model starts looping."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

import pytest

from services.dialogue.repetition import RepetitionGuard, sentence_key, stop_at_repetition

pytestmark = pytest.mark.unit


def shown(deltas: list[str]) -> tuple[str, bool]:
    guard = RepetitionGuard()
    text = "".join(guard.feed(delta) for delta in deltas) + guard.flush()
    return text, guard.repeated


def test_a_repeated_sentence_ends_the_answer_without_showing_the_repeat() -> None:
    loop = "The standard delivery time is 2 to 4 days.\n\n" * 6
    text, repeated = shown([loop[i:i + 3] for i in range(0, len(loop), 3)])
    assert repeated
    assert text.strip() == "The standard delivery time is 2 to 4 days."


def test_numbered_items_that_repeat_count_as_repeats() -> None:
    answer = "Here is how:\n1. You can choose any country.\n2. You can choose any country.\n3. Never shown."
    text, repeated = shown(re.findall(r"\S+\s*", answer))
    assert repeated
    assert text.rstrip().endswith("1. You can choose any country.\n2.")
    assert "Never shown" not in text


def test_an_answer_without_loops_passes_through_unchanged_and_at_once() -> None:
    answer = "You can return items within 30 days. The refund takes 5 days. You can return it by post."
    guard = RepetitionGuard()
    released = [guard.feed(word + " ") for word in answer.split(" ")]
    assert not guard.repeated
    assert "".join(released) + guard.flush() == answer + " "
    # Nothing new is held back: "You can return it by post." starts like an earlier sentence but only
    # its shared start ("You can return ") waits until it diverges.
    assert released[0] == "You "


def test_a_sentence_that_only_starts_like_an_earlier_one_is_released_when_it_diverges() -> None:
    guard = RepetitionGuard()
    guard.feed("Delivery takes two days. ")
    assert guard.feed("Delivery takes") == ""
    assert guard.feed(" longer abroad.") == "Delivery takes longer abroad."


def test_short_fragments_are_not_mistaken_for_loops() -> None:
    text, repeated = shown(["Yes. ", "Yes. ", "It works."])
    assert not repeated and text == "Yes. Yes. It works."


def test_sentence_keys_ignore_case_spacing_markers_and_emphasis() -> None:
    assert sentence_key("  2)  **Invoice**:  ") == sentence_key("* invoice:") == "invoice:"


async def test_a_looping_stream_is_closed_so_generation_stops() -> None:
    produced: list[str] = []
    closed = False

    async def endless() -> AsyncGenerator[str, None]:
        nonlocal closed
        try:
            while True:
                produced.append("I am sorry. ")
                yield "I am sorry. "
        finally:
            closed = True

    text = "".join([piece async for piece in stop_at_repetition(endless())])
    assert text == "I am sorry. "
    assert closed and len(produced) == 2


async def test_a_spoken_answer_ends_after_its_sentence_budget() -> None:
    closed = False

    async def talkative() -> AsyncGenerator[str, None]:
        nonlocal closed
        try:
            for sentence in ("Gift cards are valid for three years. ", "You can use them online. ", "Or in any store. "):
                yield sentence
        finally:
            closed = True

    text = "".join([piece async for piece in stop_at_repetition(talkative(), max_sentences=2)])
    assert text == "Gift cards are valid for three years. You can use them online."
    assert closed
    unlimited = "".join([piece async for piece in stop_at_repetition(talkative())])
    assert unlimited.endswith("Or in any store. ")
