"""The dialogue logic, shared by the gRPC API (and later voice turns): sessions, intents, slots,
grounded answers with citations, hand-offs and summaries.

One turn: a follow-up is rewritten to stand alone, the message is classified (intent + slots),
the knowledge base is searched and the evidence for the question selected → a grounded answer
(`answers.AnswerComposer`: the model's verified draft, or the evidence itself, each sentence
cited), a scripted reply (greetings, the order-status flow), or an honest "the help centre does
not say" with a hand-off. The session is saved in the KV bucket and
`llmos.dialogue.turn.completed` carries the latency of each stage and the answer's path.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from llmos.audit import DENY, AuditLog
from llmos.auth import Principal
from llmos.bus.subjects import DIALOGUE_HANDOFF_REQUESTED, DIALOGUE_TURN_COMPLETED
from llmos.deadline import Deadline, timeout_within
from llmos.errors import InvalidArgument, PermissionDenied
from llmos.intents import OUT_OF_SCOPE, IntentClassifier
from llmos.ports import Publisher
from llmos.users import acting_user, check_owner
from llmos.v1 import dialogue_pb2, events_pb2
from services.dialogue.admission import TurnAdmission
from services.dialogue.answers import Answer, AnswerComposer, AnswerSentence, GroundingLimits
from services.dialogue.backends import Backends, Passage
from services.dialogue.grounding import Question, standalone
from services.dialogue.intent_batch import CoalescingClassifier
from services.dialogue.replies import SMALL_TALK, Assistant
from services.dialogue.sessions import SessionStore, StoredSession
from services.dialogue.slots import ORDER_NUMBER, ORDER_PROOF, OrderBook, extract_order_number, extract_order_proofs
from services.dialogue.summarize import Summarizer

AWAITING = "awaiting"  # session slot naming the slot the assistant just asked for
FOLDED_TURNS = "folded_turns"  # session slot: how many of the oldest turns the running summary covers
OPENED_ORDER = "opened_order"  # session slot: the order number this conversation gave the proof of
INTERNAL_SLOTS = frozenset({AWAITING, FOLDED_TURNS, OPENED_ORDER})
MAX_ID_CHARS = 128
SUMMARY_FOLD_WORDS = 80
SEARCH_CACHE_ENTRIES = 512

# Intents with a scripted reply, which a confident intent takes unless the evidence is strong; a
# transactional one takes it even then: "where is my order?" needs the order, not the tracking article.
SCRIPTED_INTENTS = frozenset({*SMALL_TALK, "order_status", "human_agent"})
TRANSACTIONAL_INTENTS = frozenset({"order_status"})


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass(frozen=True)
class DialogueLimits:
    max_message_chars: int
    context_tokens: int
    recent_turns: int
    top_k: int
    call_timeout_s: float
    summary_words: int
    max_summary_source_chars: int
    summary_max_generate_calls: int
    grounding: GroundingLimits
    script_confidence: float  # an intent this confident runs its script ...
    strong_evidence_margin: float  # ... unless the evidence scores this much above the minimum
    max_turn_wait_s: float | None = None  # longest expected wait behind the turns in flight (None: deadlines only)


@dataclass
class TurnTimer:
    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)
    mark: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        current = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (current - self.mark) * 1000
        self.mark = current
        trace.get_current_span().add_event(stage)  # a voice turn's span times its stages by these

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
    """What the turn answers, and why a person should take over when one should."""

    answer: Answer
    handoff_reason: str = ""


class DialogueCore:
    def __init__(
        self,
        bus: Publisher,
        sessions: SessionStore,
        audit: AuditLog,
        classifier: IntentClassifier,
        backends: Backends,
        orders: OrderBook,
        limits: DialogueLimits,
        assistant: Assistant,
    ) -> None:
        self._bus = bus
        self._sessions = sessions
        self._audit = audit
        self._classifier = CoalescingClassifier(classifier)
        self._backends = backends
        self._orders = orders
        self._limits = limits
        self._assistant = assistant
        self._replies = assistant.replies
        self._summarizer = Summarizer(
            backends.embedder, backends.summary_generator or backends.generator, backends.tokens, limits.context_tokens,
            limits.grounding.min_support, limits.summary_max_generate_calls,
        )
        self._composer = AnswerComposer(
            backends.embedder, backends.generator, limits.grounding, assistant.brand, sentence_timeout_s=limits.call_timeout_s
        )
        self.search_cache = SearchCache(SEARCH_CACHE_ENTRIES)
        self.admission = TurnAdmission(limits.max_turn_wait_s)

    def _timeout(self, deadline: Deadline | None) -> float:
        return timeout_within(deadline, self._limits.call_timeout_s)

    # --- sessions -------------------------------------------------------------------------

    async def _owned(self, principal: Principal, tenant: str, session_id: str) -> StoredSession:
        """The session, when `principal` is its user or may act for other users (audited if not)."""
        stored = await self._sessions.get(tenant, session_id)
        try:
            check_owner(principal, stored.session.user_id, f"session {session_id!r}")
        except PermissionDenied as denied:
            await self._audit.record(principal, tenant, "dialogue/session", f"session/{session_id}", DENY, denied.message)
            raise
        return stored

    async def _open(self, principal: Principal, tenant: str, request: dialogue_pb2.ChatRequest) -> StoredSession:
        if len(request.session_id) > MAX_ID_CHARS:
            raise InvalidArgument("session_id", f"longer than {MAX_ID_CHARS} characters")
        if len(request.user_id) > MAX_ID_CHARS:
            raise InvalidArgument("user_id", f"longer than {MAX_ID_CHARS} characters")
        # The session's user is the caller; only operators and administrators start one for another.
        user_id = acting_user(principal, request.user_id)
        if request.session_id:
            stored = await self._owned(principal, tenant, request.session_id)
            if request.user_id and request.user_id != stored.session.user_id:
                raise InvalidArgument("user_id", f"session {request.session_id!r} is another user's; leave user_id empty to go on with it")
            return stored
        session = dialogue_pb2.Session(session_id=uuid.uuid4().hex, tenant=tenant, user_id=user_id, created_at=now())
        return StoredSession(session, 0)

    async def get_session(self, principal: Principal, tenant: str, session_id: str) -> dialogue_pb2.Session:
        if not session_id:
            raise InvalidArgument("session_id", "is required")
        return (await self._owned(principal, tenant, session_id)).session

    async def end_session(self, principal: Principal, tenant: str, session_id: str) -> dialogue_pb2.EndSessionResponse:
        if not session_id:
            raise InvalidArgument("session_id", "is required")
        await self._owned(principal, tenant, session_id)
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
        self, principal: Principal, tenant: str, request: dialogue_pb2.ChatRequest, deadline: Deadline | None,
        refusable: bool = False,
    ) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        """One turn. `refusable`: refused at once (RESOURCE_EXHAUSTED) when the turns in flight would
        make it wait too long or finish past its deadline (the Chat RPC; a voice turn is always taken)."""
        message = self._validate(request.message)
        with self.admission.turn(deadline, refusable):
            # Turns that arrive together each meet admission before any of them starts its work,
            # so a refused one hears it at once, not after the first steps of all the others.
            await asyncio.sleep(0)
            async with aclosing(self._turn(principal, tenant, request, message, deadline)) as responses:
                async for response in responses:
                    yield response

    async def _turn(
        self, principal: Principal, tenant: str, request: dialogue_pb2.ChatRequest, message: str, deadline: Deadline | None
    ) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        stored = await self._open(principal, tenant, request)
        session = stored.session
        timer = TurnTimer()
        question = standalone(message, _last_question(session))
        texts = [message] if question.text == message else [message, question.text]
        vectors = await self._backends.embedder.embed(texts, self._timeout(deadline))
        prediction = await self._classifier.predict(message, vectors[0])
        timer.lap("intent")
        intent = dialogue_pb2.Intent(name=prediction.intent, confidence=prediction.confidence)
        reply = await self._reply(tenant, session, message, question, vectors[-1], intent, timer, deadline, request.spoken)
        intent.slots.update({key: value for key, value in session.slots.items() if key not in INTERNAL_SLOTS})

        first_token_ms = 0.0
        for index, sentence in enumerate(reply.answer.sentences):
            response = dialogue_pb2.ChatResponse(session_id=session.session_id, delta=sentence.text if index == 0 else f" {sentence.text}")
            if sentence.citation is not None:
                response.citation.CopyFrom(sentence.citation)
            if index == 0:
                response.intent.CopyFrom(intent)
                first_token_ms = timer.since_start_ms()
            yield response
        total_ms = timer.since_start_ms()
        latency = dialogue_pb2.TurnLatency(
            intent_ms=timer.stages.get("intent", 0.0),
            retrieval_ms=timer.stages.get("retrieval", 0.0),
            first_token_ms=first_token_ms,
            total_ms=total_ms,
            evidence_ms=timer.stages.get("evidence", 0.0),
            verify_ms=reply.answer.verify_ms,
        )
        # Saved and announced before the last message, so a client that stops reading then loses nothing.
        turn = dialogue_pb2.Turn(
            user_message=message, answer=reply.answer.text, intent=intent, citations=reply.answer.citations(),
            time=now(), standalone_question=question.text,
        )
        await self._finish(principal, stored, turn, reply, {**timer.stages, "total": total_ms}, deadline)
        yield dialogue_pb2.ChatResponse(
            session_id=session.session_id, citations=turn.citations, handoff=bool(reply.handoff_reason), final=True,
            latency=latency, grounding=reply.answer.report,
        )

    async def _reply(
        self, tenant: str, session: dialogue_pb2.Session, message: str, question: Question, vector: np.ndarray,
        intent: dialogue_pb2.Intent, timer: TurnTimer, deadline: Deadline | None, spoken: bool,
    ) -> Reply:
        """Knowledge before scripts: a question the help centre answers is answered from it, even
        when an intent fires; a script takes over when its intent is confident and the evidence is
        not strong (a transactional intent: whenever it is confident), or when there is no evidence.
        Out of scope needs both the intent and no strong evidence."""
        awaiting = session.slots.get(AWAITING)
        extracted = extract_order_number(message, awaiting == ORDER_NUMBER)
        if extracted.value:
            session.slots[ORDER_NUMBER] = extracted.value
        proofs = extract_order_proofs(message) if extracted.value or awaiting == ORDER_PROOF else []
        if extracted.value or (awaiting == ORDER_NUMBER and extracted.problem) or proofs:
            intent.name = "order_status"
            return scripted(self._order_status(tenant, session, extracted.problem, proofs))
        passages = self.search_cache.get(tenant, question.text)
        if passages is None:
            passages = await self._backends.retriever.search(
                tenant, question.text, self._limits.top_k, self._timeout(deadline), vector.tolist()
            )
            self.search_cache.put(tenant, question.text, passages)
        timer.lap("retrieval")
        evidence = await self._composer.evidence(question, vector, passages, spoken, self._timeout(deadline))
        timer.lap("evidence")
        strong = bool(evidence) and evidence[0].score >= self._limits.grounding.min_evidence_score + self._limits.strong_evidence_margin
        confident = intent.confidence >= self._limits.script_confidence
        if intent.name in SCRIPTED_INTENTS and confident and (not strong or intent.name in TRANSACTIONAL_INTENTS):
            return self._script(tenant, session, intent)
        if evidence and (intent.name != OUT_OF_SCOPE or strong):
            answer = await self._composer.compose(question.text, evidence, spoken, self._timeout(deadline))
            timer.lap("generation")
            return Reply(answer)
        if intent.name == OUT_OF_SCOPE:
            return declined(f"{self._replies.out_of_scope} {self._replies.handoff_offer}", "out-of-scope request")
        if intent.name in SCRIPTED_INTENTS:
            return self._script(tenant, session, intent)
        return declined(f"{self._replies.dont_know} {self._replies.handoff_offer}", "the help centre does not answer this")

    def _script(self, tenant: str, session: dialogue_pb2.Session, intent: dialogue_pb2.Intent) -> Reply:
        if intent.name == "order_status":
            return scripted(self._order_status(tenant, session, "", []))
        if intent.name == "human_agent":
            return scripted(self._replies.human, "the customer asked for a person")
        return scripted(self._assistant.scripted(intent.name))

    async def _fold(self, session: dialogue_pb2.Session, count: int, deadline: Deadline | None) -> None:
        """Fold the `count` oldest unfolded turns into the session's running summary (extractive)."""
        start = _folded_turns(session)
        leaving = session.turns[start:start + count]
        text = " ".join(f"Customer: {turn.user_message} Assistant: {turn.answer}" for turn in leaving)
        summary = await self._summarizer.extractive(f"{session.summary} {text}".strip(), SUMMARY_FOLD_WORDS, self._timeout(deadline))
        session.summary = summary.text
        session.slots[FOLDED_TURNS] = str(start + len(leaving))

    def _order_status(self, tenant: str, session: dialogue_pb2.Session, problem: str, proofs: list[str]) -> str:
        """The order flow: the number, then the order's e-mail or postcode, then its status.

        An unknown number and a wrong e-mail or postcode get the same reply, and the proof is
        asked for before anything is looked up, so no reply tells which order numbers exist.
        """
        if problem:
            session.slots[AWAITING] = ORDER_NUMBER
            return f"Sorry, {problem}. Which order do you mean?"
        number = session.slots.get(ORDER_NUMBER)
        if not number:
            session.slots[AWAITING] = ORDER_NUMBER
            return self._replies.ask_order
        if session.slots.get(OPENED_ORDER) == number:
            order = self._orders.reopen(tenant, number)
        elif not proofs:
            session.slots[AWAITING] = ORDER_PROOF
            return f"To look up order {number}, please send the e-mail address or the postcode the order was placed with."
        else:
            order = self._orders.open(tenant, number, proofs)
        if order is None:
            del session.slots[ORDER_NUMBER]
            session.slots.pop(OPENED_ORDER, None)
            session.slots[AWAITING] = ORDER_NUMBER
            return (
                f"I can't find an order {number} with those details. Please check the order number (NW- and six digits) "
                "and send it again, then the e-mail address or postcode of the order."
            )
        session.slots[OPENED_ORDER] = number
        session.slots.pop(AWAITING, None)
        return f"Your order {order.number} ({order.items}) is {order.status}: {order.detail}."

    async def _finish(
        self, principal: Principal, stored: StoredSession, turn: dialogue_pb2.Turn, reply: Reply, stages: dict[str, float],
        deadline: Deadline | None,
    ) -> None:
        session = stored.session
        session.turns.append(turn)
        # Turns that left the recent window live on in the running summary.
        leaving = len(session.turns) - _folded_turns(session) - self._limits.recent_turns
        if leaving > 0:
            await self._fold(session, leaving, deadline)
        await self._sessions.put(stored)
        turn_index = len(session.turns) - 1
        report = reply.answer.report
        drafted = len(report.sentences) if report.path == dialogue_pb2.ANSWER_PATH_DRAFT else 0
        await self._bus.publish(
            DIALOGUE_TURN_COMPLETED,
            events_pb2.DialogueTurnCompleted(
                session_id=session.session_id,
                tenant=session.tenant,
                turn_index=turn_index,
                intent=turn.intent.name,
                answered=not reply.handoff_reason,
                cited_document_ids=[citation.document_id for citation in turn.citations],
                stage_latency_ms=stages,
                completed_at=now(),
                answer_path=dialogue_pb2.AnswerPath.Name(report.path).removeprefix("ANSWER_PATH_").lower(),
                draft_sentences=drafted,
                evidence_sentences=len(report.sentences) - drafted,
                conflict=report.conflict,
            ),
            msg_id=f"{session.tenant}/{session.session_id}/{turn_index}",
        )
        if reply.handoff_reason:
            await self._bus.publish(
                DIALOGUE_HANDOFF_REQUESTED,
                events_pb2.DialogueHandoffRequested(
                    session_id=session.session_id,
                    tenant=session.tenant,
                    reason=reply.handoff_reason,
                    last_user_message=turn.user_message,
                    requested_at=now(),
                ),
                msg_id=f"{session.tenant}/{session.session_id}/{turn_index}/handoff",
            )
        await self._audit.record(principal, session.tenant, "dialogue/chat", f"session/{session.session_id}")

    # --- summaries ------------------------------------------------------------------------

    async def summarize(
        self, tenant: str, request: dialogue_pb2.SummarizeRequest, deadline: Deadline | None
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
            summary=summary.text, mode=mode, source_tokens=summary.source_tokens, map_steps=summary.map_steps,
            model_sentences=summary.model_sentences, supported_sentences=summary.supported_sentences,
        )


def _folded_turns(session: dialogue_pb2.Session) -> int:
    return int(session.slots.get(FOLDED_TURNS, "0"))


def _last_question(session: dialogue_pb2.Session) -> str:
    """The previous turn's question, as it stood alone: the topic of an elliptic follow-up."""
    if not session.turns:
        return ""
    last = session.turns[-1]
    return last.standalone_question or last.user_message


def scripted(text: str, handoff_reason: str = "") -> Reply:
    return Reply(Answer([AnswerSentence(text)], dialogue_pb2.GroundingReport(path=dialogue_pb2.ANSWER_PATH_SCRIPTED)), handoff_reason)


def declined(text: str, handoff_reason: str) -> Reply:
    return Reply(Answer([AnswerSentence(text)], dialogue_pb2.GroundingReport(path=dialogue_pb2.ANSWER_PATH_DECLINED)), handoff_reason)
