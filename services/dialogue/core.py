"""The dialogue logic, shared by the gRPC API (and later voice turns): sessions, intents, slots,
grounded answers with citations, hand-offs and summaries.

One turn: classify the message (intent + slots) → act on it: a scripted reply (greetings, the
order-status flow), an honest "I don't know" with a hand-off, or a retrieval-augmented answer
streamed from the generation model with the documents it was given as citations. The session is
saved in the KV bucket and `llmos.dialogue.turn.completed` carries the latency of each stage.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from llmos.audit import AuditLog
from llmos.auth import Principal
from llmos.bus.broker import Bus
from llmos.bus.subjects import DIALOGUE_HANDOFF_REQUESTED, DIALOGUE_TURN_COMPLETED
from llmos.errors import InvalidArgument
from llmos.intents import OUT_OF_SCOPE, IntentClassifier
from llmos.v1 import dialogue_pb2, events_pb2
from services.dialogue.backends import Backends, Passage, remaining
from services.dialogue.prompt import BuiltPrompt, PastTurn, build_prompt
from services.dialogue.repetition import stop_at_repetition
from services.dialogue.sessions import SessionStore, StoredSession
from services.dialogue.slots import ORDER_NUMBER, OrderBook, extract_order_number
from services.dialogue.summarize import Summarizer

AWAITING = "awaiting"  # session slot naming the slot the assistant just asked for
FOLDED_TURNS = "folded_turns"  # session slot: how many of the oldest turns the running summary covers
INTERNAL_SLOTS = frozenset({AWAITING, FOLDED_TURNS})
MAX_ID_CHARS = 128
SUMMARY_FOLD_WORDS = 80
SEARCH_CACHE_ENTRIES = 512

SCRIPTED = {
    "greet": "Hello! I'm the Northwind Outfitters assistant. Ask me about orders, returns, delivery, sizes or anything else in our help centre.",
    "thanks": "You're welcome! Is there anything else I can help you with?",
    "goodbye": "Thank you for contacting Northwind Outfitters. Goodbye!",
}
HANDOFF_OFFER = "Would you like me to connect you with a member of our customer-service team?"
DONT_KNOW = "I'm sorry, I don't know the answer to that from our help centre."
OUT_OF_SCOPE_REPLY = "I'm sorry, I can only help with questions about Northwind Outfitters: orders, products, delivery, returns and your account."
HUMAN_REPLY = "Of course. I'm handing this conversation over to a member of our customer-service team; they will see what you have written so far."
ASK_ORDER = "Which order is it about? Order numbers look like NW-204518; you find yours in the confirmation e-mail."
_MODEL_DOES_NOT_KNOW = re.compile(r"\b(don'?t|do not) know\b|\bno information\b", re.IGNORECASE)
_CITATION_MARK = re.compile(r"\[(\d{1,2})\]")


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass(frozen=True)
class DialogueLimits:
    max_message_chars: int
    context_tokens: int
    answer_max_tokens: int
    spoken_answer_sentences: int
    recent_turns: int
    top_k: int
    min_retrieval_score: float
    call_timeout_s: float
    summary_words: int
    max_summary_source_chars: int


@dataclass
class TurnTimer:
    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)
    mark: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        current = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (current - self.mark) * 1000
        self.mark = current

    def since_start_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class SearchCache:
    """Recent search results per tenant; a tenant's entries go when its knowledge base changes."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._results: OrderedDict[tuple[str, str], list[Passage]] = OrderedDict()

    def get(self, tenant: str, query: str) -> list[Passage] | None:
        key = (tenant, " ".join(query.lower().split()))
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        return None

    def put(self, tenant: str, query: str, passages: list[Passage]) -> None:
        self._results[(tenant, " ".join(query.lower().split()))] = passages
        while len(self._results) > self._entries:
            self._results.popitem(last=False)

    def invalidate(self, tenant: str) -> None:
        for key in [key for key in self._results if key[0] == tenant]:
            del self._results[key]


@dataclass
class Reply:
    """What the turn decided, before streaming: scripted text, or passages to answer from."""

    intent: dialogue_pb2.Intent
    text: str = ""
    passages: list[Passage] = field(default_factory=list)
    handoff_reason: str = ""


class DialogueCore:
    def __init__(
        self,
        bus: Bus,
        sessions: SessionStore,
        audit: AuditLog,
        classifier: IntentClassifier,
        backends: Backends,
        orders: OrderBook,
        limits: DialogueLimits,
    ) -> None:
        self._bus = bus
        self._sessions = sessions
        self._audit = audit
        self._classifier = classifier
        self._backends = backends
        self._orders = orders
        self._limits = limits
        self._summarizer = Summarizer(backends.embedder, backends.generator, backends.tokens, limits.context_tokens)
        self.search_cache = SearchCache(SEARCH_CACHE_ENTRIES)

    def _timeout(self, deadline: float | None) -> float:
        return remaining(deadline, self._limits.call_timeout_s)

    # --- sessions -------------------------------------------------------------------------

    async def _open(self, tenant: str, request: dialogue_pb2.ChatRequest) -> StoredSession:
        if len(request.session_id) > MAX_ID_CHARS:
            raise InvalidArgument("session_id", f"longer than {MAX_ID_CHARS} characters")
        if request.session_id:
            return await self._sessions.get(tenant, request.session_id)
        session = dialogue_pb2.Session(session_id=uuid.uuid4().hex, tenant=tenant, user_id=request.user_id, created_at=now())
        return StoredSession(session, 0)

    async def get_session(self, tenant: str, session_id: str) -> dialogue_pb2.Session:
        if not session_id:
            raise InvalidArgument("session_id", "is required")
        return (await self._sessions.get(tenant, session_id)).session

    async def end_session(self, principal: Principal, tenant: str, session_id: str) -> dialogue_pb2.EndSessionResponse:
        if not session_id:
            raise InvalidArgument("session_id", "is required")
        await self._sessions.delete(tenant, session_id)
        await self._audit.record(principal, tenant, "dialogue/end-session", f"session/{session_id}")
        return dialogue_pb2.EndSessionResponse(session_id=session_id, ended=True)

    # --- one turn -------------------------------------------------------------------------

    def _validate(self, message: str) -> str:
        text = message.strip()
        if not text:
            raise InvalidArgument("message", "is empty; send the customer's question")
        if len(text) > self._limits.max_message_chars:
            raise InvalidArgument("message", f"{len(text)} characters is over the limit of {self._limits.max_message_chars}")
        return text

    async def chat(
        self, principal: Principal, tenant: str, request: dialogue_pb2.ChatRequest, deadline: float | None
    ) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        message = self._validate(request.message)
        stored = await self._open(tenant, request)
        session = stored.session
        timer = TurnTimer()

        vector = await self._backends.embedder.embed([message], self._timeout(deadline))
        prediction = self._classifier.predict([message], vector)[0]
        timer.lap("intent")
        intent = dialogue_pb2.Intent(name=prediction.intent, confidence=prediction.confidence)
        reply = await self._decide(tenant, session, message, intent, timer, deadline)
        intent.slots.update({key: value for key, value in session.slots.items() if key not in INTERNAL_SLOTS})

        first = dialogue_pb2.ChatResponse(session_id=session.session_id, intent=intent)
        answer_parts: list[str] = []
        citations: list[dialogue_pb2.Citation] = []
        first_token_ms = 0.0
        if reply.passages:
            prompt = await self._prompt_within_budget(session, message, reply.passages, deadline, request.spoken)
            timer.lap("prompt")
            stream = stop_at_repetition(
                self._backends.generator.stream(prompt.messages, self._limits.answer_max_tokens, self._timeout(deadline)),
                self._limits.spoken_answer_sentences if request.spoken else None,
            )
            async for delta in stream:
                if not answer_parts:
                    first_token_ms = timer.since_start_ms()
                    first.delta = delta
                    yield first
                else:
                    yield dialogue_pb2.ChatResponse(session_id=session.session_id, delta=delta)
                answer_parts.append(delta)
            timer.lap("generation")
            answer = "".join(answer_parts).strip()
            if not answer or _MODEL_DOES_NOT_KNOW.search(answer):
                reply.handoff_reason = "the model found no answer in the retrieved passages"
                tail = f"\n\n{HANDOFF_OFFER}" if answer else f"{DONT_KNOW} {HANDOFF_OFFER}"
            else:
                citations = cite(answer, prompt.passages, self._limits.min_retrieval_score)
                tail = ""
            if tail:
                answer = (answer + tail).strip()
                if answer_parts:
                    yield dialogue_pb2.ChatResponse(session_id=session.session_id, delta=tail)
                else:
                    first_token_ms = timer.since_start_ms()
                    first.delta = answer
                    yield first
        else:
            answer = reply.text
            first_token_ms = timer.since_start_ms()
            first.delta = answer
            yield first
        total_ms = timer.since_start_ms()
        latency = dialogue_pb2.TurnLatency(
            intent_ms=timer.stages.get("intent", 0.0),
            retrieval_ms=timer.stages.get("retrieval", 0.0),
            first_token_ms=first_token_ms,
            total_ms=total_ms,
        )
        # Saved and announced before the last message, so a client that stops reading then loses nothing.
        await self._finish(principal, stored, message, answer, intent, citations, reply.handoff_reason, timer, total_ms, deadline)
        yield dialogue_pb2.ChatResponse(
            session_id=session.session_id, citations=citations, handoff=bool(reply.handoff_reason), final=True, latency=latency
        )

    async def _decide(
        self, tenant: str, session: dialogue_pb2.Session, message: str, intent: dialogue_pb2.Intent, timer: TurnTimer,
        deadline: float | None,
    ) -> Reply:
        expecting = session.slots.get(AWAITING) == ORDER_NUMBER
        extracted = extract_order_number(message, expecting)
        if extracted.value:
            session.slots[ORDER_NUMBER] = extracted.value
        if intent.name == "order_status" or (expecting and (extracted.value or extracted.problem)):
            intent.name = "order_status"
            return Reply(intent, self._order_status(tenant, session, extracted.problem))
        if intent.name in SCRIPTED:
            return Reply(intent, SCRIPTED[intent.name])
        if intent.name == "human_agent":
            return Reply(intent, HUMAN_REPLY, handoff_reason="the customer asked for a person")
        if intent.name == OUT_OF_SCOPE:
            return Reply(intent, f"{OUT_OF_SCOPE_REPLY} {HANDOFF_OFFER}", handoff_reason="out-of-scope request")
        passages = self.search_cache.get(tenant, message)
        if passages is None:
            passages = await self._backends.retriever.search(tenant, message, self._limits.top_k, self._timeout(deadline))
            self.search_cache.put(tenant, message, passages)
        timer.lap("retrieval")
        if not passages or max(passage.score for passage in passages) < self._limits.min_retrieval_score:
            return Reply(intent, f"{DONT_KNOW} {HANDOFF_OFFER}", handoff_reason="low retrieval confidence")
        return Reply(intent, passages=passages)

    async def _prompt_within_budget(
        self, session: dialogue_pb2.Session, message: str, passages: list[Passage], deadline: float | None, spoken: bool
    ) -> BuiltPrompt:
        """The turn's prompt; recent turns that do not fit are folded into the running summary first,
        so a tight budget shortens what the model sees of the past but never silently loses it."""
        while True:
            prompt = await build_prompt(
                self._backends.tokens,
                self._limits.context_tokens - self._limits.answer_max_tokens,
                message,
                passages,
                session.summary,
                [PastTurn(turn.user_message, turn.answer) for turn in session.turns[_folded_turns(session):]],
                self._timeout(deadline),
                spoken,
            )
            if not prompt.dropped_turns:
                return prompt
            # Each round folds at least one turn, so this ends when every past turn is in the summary.
            await self._fold(session, prompt.dropped_turns, deadline)

    async def _fold(self, session: dialogue_pb2.Session, count: int, deadline: float | None) -> None:
        """Fold the `count` oldest unfolded turns into the session's running summary (extractive)."""
        start = _folded_turns(session)
        leaving = session.turns[start:start + count]
        text = " ".join(f"Customer: {turn.user_message} Assistant: {turn.answer}" for turn in leaving)
        summary = await self._summarizer.extractive(f"{session.summary} {text}".strip(), SUMMARY_FOLD_WORDS, self._timeout(deadline))
        session.summary = summary.text
        session.slots[FOLDED_TURNS] = str(start + len(leaving))

    def _order_status(self, tenant: str, session: dialogue_pb2.Session, problem: str) -> str:
        if problem:
            session.slots[AWAITING] = ORDER_NUMBER
            return f"Sorry, {problem}. Which order do you mean?"
        number = session.slots.get(ORDER_NUMBER)
        if not number:
            session.slots[AWAITING] = ORDER_NUMBER
            return ASK_ORDER
        order = self._orders.find(tenant, number)
        if order is None:
            del session.slots[ORDER_NUMBER]
            session.slots[AWAITING] = ORDER_NUMBER
            return f"I can't find order {number} in your account. Please check the number (NW- and six digits) and send it again."
        session.slots.pop(AWAITING, None)
        return f"Your order {order.number} ({order.items}) is {order.status}: {order.detail}."

    async def _finish(
        self,
        principal: Principal,
        stored: StoredSession,
        message: str,
        answer: str,
        intent: dialogue_pb2.Intent,
        citations: list[dialogue_pb2.Citation],
        handoff_reason: str,
        timer: TurnTimer,
        total_ms: float,
        deadline: float | None,
    ) -> None:
        session = stored.session
        session.turns.append(
            dialogue_pb2.Turn(user_message=message, answer=answer, intent=intent, citations=citations, time=now())
        )
        # Turns that left the recent window live on in the running summary.
        leaving = len(session.turns) - _folded_turns(session) - self._limits.recent_turns
        if leaving > 0:
            await self._fold(session, leaving, deadline)
        await self._sessions.put(stored)
        stages = {**timer.stages, "total": total_ms}
        await self._bus.publish(
            DIALOGUE_TURN_COMPLETED,
            events_pb2.DialogueTurnCompleted(
                session_id=session.session_id,
                tenant=session.tenant,
                turn_index=len(session.turns) - 1,
                intent=intent.name,
                answered=not handoff_reason,
                cited_document_ids=[citation.document_id for citation in citations],
                stage_latency_ms=stages,
                completed_at=now(),
            ),
            msg_id=f"{session.tenant}/{session.session_id}/{len(session.turns) - 1}",
        )
        if handoff_reason:
            await self._bus.publish(
                DIALOGUE_HANDOFF_REQUESTED,
                events_pb2.DialogueHandoffRequested(
                    session_id=session.session_id,
                    tenant=session.tenant,
                    reason=handoff_reason,
                    last_user_message=message,
                    requested_at=now(),
                ),
                msg_id=f"{session.tenant}/{session.session_id}/{len(session.turns) - 1}/handoff",
            )
        await self._audit.record(principal, session.tenant, "dialogue/chat", f"session/{session.session_id}")

    # --- summaries ------------------------------------------------------------------------

    async def summarize(
        self, tenant: str, request: dialogue_pb2.SummarizeRequest, deadline: float | None
    ) -> dialogue_pb2.SummarizeResponse:
        target = request.target_words or self._limits.summary_words
        Summarizer.check_target(target)
        source = request.WhichOneof("source")
        if source == "document_id":
            if not request.document_id:
                raise InvalidArgument("document_id", "is empty")
            _, text = await self._backends.retriever.document(tenant, request.document_id, self._timeout(deadline))
        elif source == "text":
            text = request.text
        else:
            raise InvalidArgument("source", "give either text or document_id")
        if not text.strip():
            raise InvalidArgument(source, "has no text to summarize")
        if len(text) > self._limits.max_summary_source_chars:
            raise InvalidArgument(source, f"{len(text)} characters is over the limit of {self._limits.max_summary_source_chars}")
        mode = request.mode or dialogue_pb2.SUMMARY_MODE_EXTRACTIVE
        if mode == dialogue_pb2.SUMMARY_MODE_ABSTRACTIVE:
            summary = await self._summarizer.abstractive(text, target, self._timeout(deadline))
        else:
            summary = await self._summarizer.extractive(text, target, self._timeout(deadline))
        return dialogue_pb2.SummarizeResponse(
            summary=summary.text, mode=mode, source_tokens=summary.source_tokens, map_steps=summary.map_steps
        )


def _folded_turns(session: dialogue_pb2.Session) -> int:
    return int(session.slots.get(FOLDED_TURNS, "0"))


def cite(answer: str, passages: list[Passage], min_score: float) -> list[dialogue_pb2.Citation]:
    """The documents behind an answer: the passages it marks ([n]), else the confident ones it was given.

    Only passages that were in the prompt are ever cited, one citation per document.
    """
    marked = [int(number) - 1 for number in _CITATION_MARK.findall(answer)]
    chosen = [passages[index] for index in marked if 0 <= index < len(passages)]
    if not chosen:
        chosen = [passage for passage in passages if passage.score >= min_score]
    seen: set[str] = set()
    citations = []
    for passage in chosen:
        if passage.document_id not in seen:
            seen.add(passage.document_id)
            citations.append(
                dialogue_pb2.Citation(document_id=passage.document_id, title=passage.title, chunk_id=passage.chunk_id, score=passage.score)
            )
    return citations

