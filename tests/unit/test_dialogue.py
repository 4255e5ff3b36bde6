"""Dialogue logic in memory: slots, prompt budget, summaries, citations, intents, whole turns with fakes."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from llmos.audit import AuditLog
from llmos.auth import Principal
from llmos.crypto import AtRest
from llmos.deadline import Deadline
from llmos.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from llmos.intents import OUT_OF_SCOPE, IntentClassifier, Prediction, load_intents_file, train_intent_classifier
from llmos.ports import Versioned
from llmos.testing import MemoryBucket, MemoryPublisher
from llmos.v1 import dialogue_pb2, events_pb2
from services.dialogue.backends import Backends, Passage
from services.dialogue.answers import GroundingLimits
from llmos.settings import SettingsError
from services.dialogue.core import DialogueCore, DialogueLimits
from services.dialogue.replies import load_assistant
from services.dialogue.sessions import SessionStore, StoredSession
from services.dialogue.slots import MAX_PROOFS_PER_MESSAGE, Order, OrderBook, extract_order_number, extract_order_proofs
from llmos.text import split_sentences
from services.dialogue.summarize import Summarizer, clip_words, directed_centrality, select_sentences

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


class WordCounter:
    """Counts whitespace words as tokens."""

    async def count(self, texts: Sequence[str], timeout_s: float = 0.0) -> list[int]:
        return [len(text.split()) for text in texts]


class HashEmbedder:
    """Bag-of-words vectors: similar wording, similar vector (enough to test selection logic)."""

    async def embed(self, texts: Sequence[str], timeout_s: float = 0.0) -> np.ndarray:
        vectors = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                vectors[row, zlib.crc32(word.strip(".,?!").encode()) % 64] += 1.0  # not hash(): the same in every run
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-9)


class ScriptedGenerator:
    def __init__(self, answer: str, delay_s: float = 0.0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.calls: list[list[tuple[str, str]]] = []

    async def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncIterator[str]:
        self.calls.append(list(messages))
        if self.delay_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise DeadlineExceeded("inference: deadline exceeded")
        for word in self.answer.split(" ") if self.answer else ():
            yield word + " "


class FixedRetriever:
    def __init__(self, passages: list[Passage]) -> None:
        self.passages = passages
        self.searches = 0
        self.queries: list[str] = []

    async def search(self, tenant: str, query: str, top_k: int, timeout_s: float, vector: Sequence[float] = ()) -> list[Passage]:
        self.searches += 1
        self.queries.append(query)
        return self.passages[:top_k]

    async def document(self, tenant: str, document_id: str, timeout_s: float) -> tuple[str, str]:
        raise NotFound(document_id)


class KeywordClassifier:
    """Stands in for the trained classifier: intent by keyword."""

    RULES = (("order", "order_status"), ("hello", "greet"), ("human", "human_agent"), ("weather", OUT_OF_SCOPE))

    def predict(self, texts: Sequence[str], vectors: np.ndarray) -> list[Prediction]:
        out = []
        for text in texts:
            intent = next((name for word, name in self.RULES if word in text.lower()), "return_item")
            out.append(Prediction(intent, 0.9, intent))
        return out


RETURNS = Passage("returns", "Returns and refunds", "c1", "You can return any item within 30 days of delivery.", 0.7)
SHIPPING = Passage("shipping", "Shipping and delivery", "c2", "Standard delivery takes 2 to 4 working days.", 0.5)
# Thresholds for the hashed bag-of-words embedder of these tests, not the service's (MiniLM) ones.
GROUNDING = GroundingLimits(
    evidence_sentences=2, min_evidence_score=0.3, min_support=0.7, drafts=True, draft_max_tokens=64, spoken_sentences=2
)
LIMITS = DialogueLimits(
    max_message_chars=2000, context_tokens=512, recent_turns=2, top_k=4, call_timeout_s=10.0, summary_words=60,
    max_summary_source_chars=100_000, summary_max_generate_calls=8, grounding=GROUNDING, script_confidence=0.8, strong_evidence_margin=0.3,
)
ADMIN = Principal("tester", "acme", frozenset({"admin"}))
ASSISTANT = load_assistant(REPO / "demo" / "assistant.yaml")
DONT_KNOW, OUT_OF_SCOPE_REPLY = ASSISTANT.replies.dont_know, ASSISTANT.replies.out_of_scope


def make_core(generator: ScriptedGenerator, passages: list[Passage]) -> tuple[DialogueCore, MemoryPublisher, FixedRetriever]:
    bus = MemoryPublisher()
    retriever = FixedRetriever(passages)
    core = DialogueCore(
        bus,
        SessionStore(MemoryBucket(), idle_ttl_s=3600, at_rest=AtRest(None, "sessions")),
        AuditLog(bus, "dialogue"),
        KeywordClassifier(),  # type: ignore[arg-type]
        Backends(HashEmbedder(), retriever, generator, WordCounter()),
        OrderBook([Order("NW-204518", "acme", "Shipped", "handed to DHL on 2 June", "rain jacket", "ann@example.com", "SW1A 1AA")]),
        LIMITS,
        ASSISTANT,
    )
    return core, bus, retriever


async def turn(core: DialogueCore, message: str, session_id: str = "", deadline: Deadline | None = None) -> list[dialogue_pb2.ChatResponse]:
    request = dialogue_pb2.ChatRequest(session_id=session_id, message=message)
    return [response async for response in core.chat(ADMIN, "acme", request, deadline)]


def text_of(responses: list[dialogue_pb2.ChatResponse]) -> str:
    return "".join(response.delta for response in responses)


# --- slots ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expecting", "value"),
    [
        ("where is NW-204518?", False, "NW-204518"),
        ("order nw 204518 please", False, "NW-204518"),
        ("NW204518", False, "NW-204518"),
        ("204518", True, "NW-204518"),
        ("204518", False, None),
        ("call me at 0123456789", True, None),
    ],
)
def test_order_numbers_are_recognized_and_normalized(message: str, expecting: bool, value: str | None) -> None:
    assert extract_order_number(message, expecting).value == value


def test_a_malformed_order_number_is_explained() -> None:
    slot = extract_order_number("it is NW-12345", expecting=True)
    assert slot.value is None and "six digits" in slot.problem


# --- summaries ------------------------------------------------------------------------------


def test_sentences_split_on_punctuation_and_paragraphs() -> None:
    assert split_sentences("# Title\n\nOne two. Three four! Five?\n\nSix.") == ["Title", "One two.", "Three four!", "Five?", "Six."]


def test_selection_avoids_redundancy_and_keeps_the_budget() -> None:
    vectors = np.array([[1, 0, 0], [1, 0, 0], [0.8, 0.6, 0], [0, 0.6, 0.8]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chosen = select_sentences(vectors, [5, 5, 5, 5], target_words=10)
    assert len(chosen) == 2 and not {0, 1} <= set(chosen)
    assert chosen == sorted(chosen)


def test_the_sentence_that_later_ones_elaborate_is_chosen() -> None:
    # 2 and 3 restate 0 and are closest to each other: plain (undirected) centrality picks 2; links to
    # later sentences count for a sentence and links to earlier ones against it, so 0 is the centre.
    vectors = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0.3, 0, 0], [1, 0.3, 0.1, 0]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    centrality = directed_centrality(vectors @ vectors.T)
    assert int(np.argmax(centrality)) == 0 and centrality[3] == 0.0
    assert select_sentences(vectors, [5, 5, 5, 5], target_words=5) == [0]


def test_clip_prefers_a_sentence_end() -> None:
    assert clip_words("one two three four. five six seven", 5) == "one two three four."
    assert len(clip_words("a " * 50, 10).split()) == 10


async def test_long_text_is_summarized_map_reduce_within_target() -> None:
    generator = ScriptedGenerator("short part summary with a few words.")
    # Eight parts and their reduction: within the limit of Generate calls, so nothing is cut.
    summarizer = Summarizer(HashEmbedder(), generator, WordCounter(), context_tokens=300, min_support=0.8, max_generate_calls=9)
    text = " ".join(f"Sentence number {i} talks about topic {i % 7} at some length here." for i in range(120))
    summary = await summarizer.abstractive(text, 20, 5.0)
    assert summary.map_steps > 2 and len(generator.calls) == summary.map_steps
    assert len(summary.text.split()) <= 20
    short = await summarizer.abstractive("A short text. It fits.", 20, 5.0)
    assert short.map_steps == 1


async def test_an_abstractive_summary_keeps_supported_sentences_and_replaces_invented_ones() -> None:
    source = (
        "The Hamburg store has a repair desk for small repairs while you wait. "
        "Stores are open Monday to Saturday from 10:00 to 20:00. Click and collect orders wait ten days."
    )
    generator = ScriptedGenerator("The Hamburg store has a repair desk for small repairs. Stores host a Summit in Berlin on Sundays at 9:00. *")
    summarizer = Summarizer(HashEmbedder(), generator, WordCounter(), context_tokens=300, min_support=0.8)
    summary = await summarizer.abstractive(source, 60, 5.0)
    assert summary.model_sentences == 2 and summary.supported_sentences == 1
    assert summary.text.startswith("The Hamburg store has a repair desk for small repairs.")
    assert "Summit" not in summary.text and "Berlin" not in summary.text and "*" not in summary.text
    assert "Stores are open Monday to Saturday from 10:00 to 20:00." in summary.text  # the source it drew on


async def test_extractive_summary_honours_target_words() -> None:
    summarizer = Summarizer(HashEmbedder(), ScriptedGenerator(""), WordCounter(), context_tokens=300, min_support=0.8)
    text = " ".join(f"Fact {i} about returns and refunds is stated in this sentence." for i in range(30))
    summary = await summarizer.extractive(text, 25, 5.0)
    assert 0 < len(summary.text.split()) <= 25 and summary.map_steps == 1
    assert summary.text.endswith("sentence.")  # whole sentences
    short = await summarizer.extractive("It rained all day. The match was called off.", 20, 5.0)
    assert short.text == "It rained all day. The match was called off."  # short sentences when nothing longer fills it


# --- intents --------------------------------------------------------------------------------


def test_the_demo_intents_file_loads() -> None:
    data = load_intents_file(REPO / "demo" / "intents.yaml")
    assert {"order_status", "return_item", "human_agent"} <= set(data.intents)
    assert OUT_OF_SCOPE in data.labels and OUT_OF_SCOPE not in data.intents


def test_a_bad_intents_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "intents.yaml"
    path.write_text("intents:\n  only_one: [a, b, c, d, e]\n")
    with pytest.raises(InvalidArgument, match="at least two intents"):
        load_intents_file(path)


def test_classifier_calibrates_its_threshold_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    texts, labels, vectors = [], [], []
    for index, name in enumerate(["a", "b", "c", OUT_OF_SCOPE]):
        for example in range(40):
            texts.append(f"{name} example {example}")
            labels.append(name)
            vectors.append(centres[index] + rng.normal(scale=0.6, size=16))
    matrix = np.array(vectors, dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    classifier = train_intent_classifier(texts, labels, matrix, target_in_scope_accuracy=0.9)
    assert classifier.calibration.in_scope_accuracy >= 0.9
    assert classifier.intents == ["a", "b", "c"]
    classifier.save(tmp_path)
    loaded = IntentClassifier.load(tmp_path)
    predictions = loaded.predict(texts[:5], matrix[:5])
    assert [p.intent for p in predictions] == ["a"] * 5
    assert all(0.0 <= p.confidence <= 1.0 for p in predictions)
    assert {p.intent for p in loaded.predict(texts[:5], matrix[:5], threshold=1.01)} == {OUT_OF_SCOPE}


def test_a_held_out_set_sets_the_threshold_when_given() -> None:
    from llmos.intents import LabelledSet

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))

    def sample(count: int, noise: float) -> tuple[list[str], list[str], np.ndarray]:
        names = ["a", "b", OUT_OF_SCOPE]
        labels = [names[i % 3] for i in range(count)]
        vectors = np.array([centres[i % 3] + rng.normal(scale=noise, size=16) for i in range(count)], dtype=np.float32)
        return [f"message {i}" for i in range(count)], labels, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    texts, labels, vectors = sample(120, 0.5)
    held_texts, held_labels, held_vectors = sample(90, 1.2)  # new messages, less alike than the training ones
    classifier = train_intent_classifier(
        texts, labels, vectors, 0.9, threshold_set=LabelledSet(held_texts, held_labels, held_vectors)
    )
    calibration = classifier.calibration
    assert calibration.source == "held-out set of 90 examples" and calibration.in_scope_examples == 60
    predictions = classifier.predict(held_texts, held_vectors)
    in_scope = [(p.intent == label) for p, label in zip(predictions, held_labels) if label != OUT_OF_SCOPE]
    assert np.mean(in_scope) == pytest.approx(calibration.in_scope_accuracy) and calibration.in_scope_accuracy >= 0.9


def test_out_of_scope_evidence_is_the_nearest_example_of_the_predicted_intent() -> None:
    from llmos.intents import _nearest_of_intent

    examples = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    example_intents = np.array(["a", "b", "b"])
    messages = np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6]], dtype=np.float32)
    nearest = _nearest_of_intent(messages, np.array(["a", "b", "b"]), examples, example_intents)
    # The second message sits on an "a" example: as a "b" it is only as close as b's nearest example.
    assert nearest == pytest.approx([1.0, 0.6, 0.96])
    assert _nearest_of_intent(messages[:1], np.array(["c"]), examples, example_intents)[0] == -1.0


# --- whole turns ----------------------------------------------------------------------------

RETURN_QUESTION = "how many days do I have to return an item?"


def completed_events(bus: MemoryPublisher) -> list[events_pb2.DialogueTurnCompleted]:
    return [message for subject, message in bus.published if subject == "llmos.dialogue.turn.completed"]  # type: ignore[misc]


async def test_a_verified_draft_streams_with_a_citation_per_sentence_and_a_grounding_report() -> None:
    core, bus, _ = make_core(ScriptedGenerator("You can return any item within 30 days."), [RETURNS, SHIPPING])
    responses = await turn(core, RETURN_QUESTION)
    assert responses[0].intent.name == "return_item"
    assert text_of(responses) == "You can return any item within 30 days."
    assert [r.citation.document_id for r in responses if r.delta] == ["returns"]
    final = responses[-1]
    assert final.final and not final.handoff
    assert [c.document_id for c in final.citations] == ["returns"]
    assert final.latency.total_ms >= final.latency.first_token_ms > 0
    report = final.grounding
    assert report.path == dialogue_pb2.ANSWER_PATH_DRAFT and not report.draft_problems
    (sentence,) = report.sentences
    assert (sentence.document_id, sentence.chunk_id) == ("returns", "c1")
    assert RETURNS.text[sentence.start_offset:sentence.end_offset] == sentence.source_text
    (completed,) = completed_events(bus)
    assert completed.answered and completed.answer_path == "draft" and completed.draft_sentences == 1
    assert set(completed.stage_latency_ms) >= {"intent", "retrieval", "evidence", "generation", "total"}


async def test_a_draft_with_a_wrong_number_is_replaced_by_the_evidence() -> None:
    core, bus, _ = make_core(ScriptedGenerator("You can return any item within 14 days."), [RETURNS, SHIPPING])
    responses = await turn(core, RETURN_QUESTION)
    answer = text_of(responses)
    assert "30 days" in answer and "14" not in answer
    report = responses[-1].grounding
    assert report.path == dialogue_pb2.ANSWER_PATH_EVIDENCE
    assert any("14" in problem for problem in report.draft_problems)
    assert report.sentences[0].source_text == "You can return any item within 30 days of delivery."
    assert completed_events(bus)[0].evidence_sentences == len(report.sentences) >= 1


async def test_a_number_written_in_words_passes_the_verifier() -> None:
    core, _, _ = make_core(ScriptedGenerator("You can return any item within thirty days."), [RETURNS, SHIPPING])
    responses = await turn(core, RETURN_QUESTION)
    assert responses[-1].grounding.path == dialogue_pb2.ANSWER_PATH_DRAFT
    assert text_of(responses) == "You can return any item within thirty days."


async def test_the_model_sees_only_the_evidence_and_the_standalone_question() -> None:
    generator = ScriptedGenerator("You can return any item within 30 days.")
    core, _, retriever = make_core(generator, [RETURNS, SHIPPING])
    session_id = (await turn(core, RETURN_QUESTION))[0].session_id
    follow_up = await turn(core, "and what about socks?", session_id)
    standalone = follow_up[-1].grounding.standalone_question
    assert standalone.startswith("and what about socks?") and RETURN_QUESTION in standalone
    assert retriever.queries[-1] == standalone
    system, user = generator.calls[-1]
    assert user[0] == "user" and standalone in user[1] and RETURNS.text in user[1]
    assert "You can return any item within 30 days." not in system[1] + user[1].replace(RETURNS.text, "")
    session = await core.get_session(ADMIN, "acme", session_id)
    assert session.turns[-1].standalone_question == standalone


async def test_a_looping_answer_is_cut_at_its_first_repeat_and_stored_that_way() -> None:
    core, _, _ = make_core(ScriptedGenerator("You can return any item within 30 days. " * 5), [RETURNS, SHIPPING])
    responses = await turn(core, RETURN_QUESTION)
    assert text_of(responses).strip() == "You can return any item within 30 days."
    session = await core.get_session(ADMIN, "acme", responses[0].session_id)
    assert session.turns[-1].answer == "You can return any item within 30 days."


async def test_conflicting_passages_are_both_quoted_and_cited() -> None:
    eu = Passage("returns", "Returns and refunds", "c1", "Returns from outside the EU cost 6 EUR, taken from the refund.", 0.7)
    other = Passage("international", "International shipping", "c9", "Returns from outside the EU cost 10 EUR, taken from the refund.", 0.7)
    generator = ScriptedGenerator("should not be called")
    core, bus, _ = make_core(generator, [eu, other])
    responses = await turn(core, "how much do returns from outside the EU cost?")
    answer = text_of(responses)
    assert "differ" in answer and "6 EUR" in answer and "10 EUR" in answer
    assert {c.document_id for c in responses[-1].citations} == {"returns", "international"}
    assert responses[-1].grounding.conflict and generator.calls == []
    assert completed_events(bus)[0].conflict


async def test_low_evidence_says_the_help_centre_does_not_say_and_hands_off() -> None:
    weak = Passage("care", "Caring for your gear", "c3", "Wash fleece at 30 degrees on a wool cycle.", 0.1)
    generator = ScriptedGenerator("should not be called")
    core, bus, _ = make_core(generator, [weak])
    responses = await turn(core, "can I return a kayak bought elsewhere?")
    assert text_of(responses).startswith(DONT_KNOW)
    assert responses[-1].handoff and not responses[-1].citations
    assert responses[-1].grounding.path == dialogue_pb2.ANSWER_PATH_DECLINED
    assert generator.calls == []
    assert any(subject == "llmos.dialogue.handoff.requested" for subject, _ in bus.published)


async def test_out_of_scope_without_evidence_hands_off_citing_nothing() -> None:
    core, _, _ = make_core(ScriptedGenerator("x"), [RETURNS])
    responses = await turn(core, "what is the weather tomorrow?")
    assert responses[0].intent.name == OUT_OF_SCOPE and responses[-1].handoff and not responses[-1].citations
    assert text_of(responses).startswith(OUT_OF_SCOPE_REPLY)


async def test_an_information_question_reaches_the_knowledge_base_despite_its_intent() -> None:
    # "human" makes the stand-in classifier say human_agent, confidently; the articles answer it.
    phone = Passage("contact", "Contact", "c5", "The phone number of a human agent is +49 40 1234 5670.", 0.8)
    core, bus, _ = make_core(ScriptedGenerator(""), [phone])
    responses = await turn(core, "what is the phone number of a human agent?")
    assert "+49 40 1234 5670" in text_of(responses) and responses[-1].citations[0].document_id == "contact"
    assert not responses[-1].handoff


async def test_a_confident_order_status_runs_the_order_flow_even_with_strong_evidence() -> None:
    tracking = Passage("shipping", "Shipping", "c6", "Where is my order? Follow your order from the tracking link.", 0.9)
    core, _, _ = make_core(ScriptedGenerator(""), [tracking])
    responses = await turn(core, "where is my order?")
    assert "Which order" in text_of(responses)
    assert responses[-1].grounding.path == dialogue_pb2.ANSWER_PATH_SCRIPTED


def test_the_assistant_speaks_for_the_company_its_file_names(tmp_path: Path) -> None:
    other = tmp_path / "assistant.yaml"
    text = (REPO / "demo" / "assistant.yaml").read_text(encoding="utf-8").replace("Northwind Outfitters", "Contoso Bikes")
    other.write_text(text, encoding="utf-8")
    assistant = load_assistant(other)
    assert assistant.brand == "Contoso Bikes" and "Contoso Bikes assistant" in assistant.scripted("greet")
    other.write_text("brand: Contoso\nreplies: {greet: hi}\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="lacks replies.thanks, replies.goodbye"):
        load_assistant(other)


async def test_order_flow_asks_validates_and_remembers_the_number() -> None:
    core, _, _ = make_core(ScriptedGenerator("x"), [RETURNS])
    first = await turn(core, "where is my order?")
    session_id = first[0].session_id
    assert "Which order" in text_of(first)
    second = await turn(core, "it's NW-12", session_id)
    assert "six digits" in text_of(second)
    third = await turn(core, "204518", session_id)
    assert "NW-204518" in text_of(third) and "postcode" in text_of(third) and "Shipped" not in text_of(third)
    assert third[0].intent.slots["order_number"] == "NW-204518"
    fourth = await turn(core, "the postcode is sw1a 1aa", session_id)
    assert "NW-204518" in text_of(fourth) and "Shipped" in text_of(fourth)
    fifth = await turn(core, "and what's the status of my order now?", session_id)
    assert "Shipped" in text_of(fifth)  # remembered across turns
    unknown = await turn(core, "order NW-999999? it's ann@example.com", session_id)
    assert "can't find an order NW-999999" in text_of(unknown)


async def test_a_wrong_email_gets_the_reply_of_an_unknown_order() -> None:
    core, _, _ = make_core(ScriptedGenerator("x"), [RETURNS])
    replies = []
    for number, proof in (("NW-204518", "someone@example.com"), ("NW-123456", "someone@example.com"), ("NW-204518", "10115")):
        session_id = (await turn(core, f"where is {number}?"))[0].session_id
        replies.append(text_of(await turn(core, proof, session_id)).replace(number, "NW-#"))
    assert len(set(replies)) == 1 and "can't find" in replies[0]
    session_id = (await turn(core, "where is NW-204518? my e-mail is Ann@Example.com"))[0].session_id
    session = await core.get_session(ADMIN, "acme", session_id)
    assert "Shipped" in session.turns[-1].answer and "ann@example.com" not in str(dict(session.slots)).lower()


def test_order_proofs_are_found_and_bounded() -> None:
    assert extract_order_proofs("mail Jonas.Berg@Example.com, postcode SW1A 1AA") == ["jonas.berg@example.com", "sw1a1aa"]
    assert extract_order_proofs("order NW-777001 placed 777001") == []
    assert len(extract_order_proofs(" ".join(str(10000 + n) for n in range(300)))) == MAX_PROOFS_PER_MESSAGE


async def test_old_turns_fold_into_the_running_summary() -> None:
    core, _, _ = make_core(ScriptedGenerator("Returns are free within 30 days [1]."), [RETURNS])
    session_id = (await turn(core, "hello there"))[0].session_id
    for message in ("can I return boots?", "can I return a tent?", "can I return socks?"):
        await turn(core, message, session_id)
    session = await core.get_session(ADMIN, "acme", session_id)
    assert len(session.turns) == 4
    assert "hello there" in session.summary


async def test_bad_input_is_refused_with_the_field() -> None:
    core, _, _ = make_core(ScriptedGenerator("x"), [RETURNS])
    with pytest.raises(InvalidArgument, match="message"):
        await turn(core, "   ")
    with pytest.raises(InvalidArgument, match="over the limit"):
        await turn(core, "a" * 2001)
    with pytest.raises(NotFound):
        await turn(core, "hello", "no-such-session")


async def test_a_slow_generation_fails_within_the_deadline() -> None:
    core, _, _ = make_core(ScriptedGenerator("late", delay_s=30.0), [RETURNS])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded):
        await turn(core, "can I return boots?", deadline=Deadline.after(0.5))
    assert loop.time() - started < 2.0


# --- session store --------------------------------------------------------------------------


async def test_sessions_expire_when_idle_and_refuse_lost_updates() -> None:
    bucket = MemoryBucket()
    store = SessionStore(bucket, idle_ttl_s=60, at_rest=AtRest(None, "sessions"))
    stored = StoredSession(dialogue_pb2.Session(session_id="s1", tenant="acme"), 0)
    await store.put(stored)
    first, second = await store.get("acme", "s1"), await store.get("acme", "s1")
    first.session.summary = "one"
    await store.put(first)
    second.session.summary = "two"
    with pytest.raises(FailedPrecondition, match="changed by another request"):
        await store.put(second)
    with pytest.raises(NotFound):
        await store.get("globex", "s1")  # another tenant's session does not exist for it
    ((key, entry),) = bucket.entries.items()
    aged = dialogue_pb2.Session.FromString(entry.value)
    aged.updated_at.FromSeconds(aged.updated_at.seconds - 61)  # last touched 61 s ago
    bucket.entries[key] = Versioned(aged.SerializeToString(), entry.revision)
    with pytest.raises(NotFound, match="expired"):
        await store.get("acme", "s1")


async def test_a_silent_model_leaves_the_evidence_as_the_answer() -> None:
    core, _, _ = make_core(ScriptedGenerator(""), [RETURNS])
    responses = await turn(core, RETURN_QUESTION)
    assert text_of(responses) == 'Our article "Returns and refunds" says: You can return any item within 30 days of delivery.'
    final = responses[-1]
    assert final.grounding.path == dialogue_pb2.ANSWER_PATH_EVIDENCE and not final.handoff
    assert [c.document_id for c in final.citations] == ["returns"]


async def test_a_spoken_answer_quotes_without_framing() -> None:
    core, _, _ = make_core(ScriptedGenerator(""), [RETURNS])
    request = dialogue_pb2.ChatRequest(message=RETURN_QUESTION, spoken=True)
    responses = [response async for response in core.chat(ADMIN, "acme", request, None)]
    assert text_of(responses) == "You can return any item within 30 days of delivery."


async def test_a_session_is_its_users_and_an_operators_only() -> None:
    core, bus, _ = make_core(ScriptedGenerator("x"), [RETURNS])
    alice, mallory = Principal("alice", "acme", frozenset({"user"})), Principal("mallory", "acme", frozenset({"user"}))
    operator = Principal("olga", "acme", frozenset({"operator"}))
    request = dialogue_pb2.ChatRequest(message="hello")
    session_id = [r async for r in core.chat(alice, "acme", request, None)][0].session_id
    assert (await core.get_session(alice, "acme", session_id)).user_id == "alice"
    with pytest.raises(PermissionDenied, match="belongs to another user"):
        await core.get_session(mallory, "acme", session_id)
    with pytest.raises(PermissionDenied):
        await core.end_session(mallory, "acme", session_id)
    with pytest.raises(PermissionDenied):
        [r async for r in core.chat(mallory, "acme", dialogue_pb2.ChatRequest(session_id=session_id, message="hi"), None)]
    with pytest.raises(PermissionDenied, match="may act only as itself"):
        [r async for r in core.chat(mallory, "acme", dialogue_pb2.ChatRequest(message="hi", user_id="alice"), None)]
    audited = [event for subject, event in bus.published if subject.startswith("llmos.audit.")]
    assert any(isinstance(event, events_pb2.AuditEvent) and event.decision == events_pb2.AUDIT_DECISION_DENY for event in audited)
    # An operator acts for customers: a session started for alice is hers.
    for_alice = [r async for r in core.chat(operator, "acme", dialogue_pb2.ChatRequest(message="hello", user_id="alice"), None)]
    assert (await core.get_session(alice, "acme", for_alice[0].session_id)).user_id == "alice"
    assert (await core.end_session(operator, "acme", session_id)).ended
