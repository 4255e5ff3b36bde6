"""Typed calls of the dialogue service: text and voice turns, summaries, sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from llmos.clients.base import ServiceClient
from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc


class DialogueClient(ServiceClient[dialogue_pb2_grpc.DialogueServiceStub]):
    service = "dialogue"
    stub_type = dialogue_pb2_grpc.DialogueServiceStub

    async def chat(self, request: dialogue_pb2.ChatRequest, timeout_s: float | None) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        """One turn: its intent, answer deltas, then the final message with citations."""
        async for response in self._stream(self._stub.Chat, request, timeout_s):
            yield response

    async def converse(
        self, config: dialogue_pb2.ConverseConfig, audio: AsyncIterator[bytes], timeout_s: float | None
    ) -> AsyncIterator[dialogue_pb2.ConverseResponse]:
        """Voice turns over `audio` as it arrives (the encoding `config.recognition` names):
        transcripts, answer text and audio, completed turns and barge-ins, as they happen."""

        async def requests() -> AsyncIterator[dialogue_pb2.ConverseRequest]:
            yield dialogue_pb2.ConverseRequest(config=config)
            async for chunk in audio:
                yield dialogue_pb2.ConverseRequest(audio_content=chunk)

        async for response in self._stream(self._stub.Converse, requests(), timeout_s):
            yield response

    async def summarize(
        self, request: dialogue_pb2.SummarizeRequest, *, timeout_s: float | None = None
    ) -> dialogue_pb2.SummarizeResponse:
        """A summary of `request.text` or of the indexed document `request.document_id`."""
        return await self._unary(self._stub.Summarize, request, timeout_s)

    async def session(self, session_id: str, *, tenant: str = "", timeout_s: float | None = None) -> dialogue_pb2.Session:
        """The session's turns, running summary and slots."""
        request = dialogue_pb2.GetSessionRequest(session_id=session_id, tenant=tenant)
        return await self._unary(self._stub.GetSession, request, timeout_s)

    async def end_session(self, session_id: str, *, tenant: str = "", timeout_s: float | None = None) -> bool:
        """Forget the session; whether it existed to be ended."""
        request = dialogue_pb2.EndSessionRequest(session_id=session_id, tenant=tenant)
        return (await self._unary(self._stub.EndSession, request, timeout_s)).ended
