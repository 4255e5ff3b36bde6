"""gRPC adapter of the dialogue core: the tenant always comes from the caller's credentials, and
the core checks the session's user against the caller (`llmos.users`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from llmos.auth import current_principal, effective_tenant
from llmos.deadline import Deadline
from llmos.grpcutil.streams import config_then_audio
from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc
from services.dialogue.core import DialogueCore
from services.dialogue.voice import VoiceTurns


class DialogueServicer(dialogue_pb2_grpc.DialogueServiceServicer):
    def __init__(self, core: DialogueCore, voice: VoiceTurns) -> None:
        self._core = core
        self._voice = voice

    async def Chat(
        self, request: dialogue_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        turn = self._core.chat(current_principal(), effective_tenant(request.tenant), request, Deadline.of(context), refusable=True)
        async with aclosing(turn) as responses:
            async for response in responses:
                yield response

    async def Converse(
        self, request_iterator: AsyncIterator[dialogue_pb2.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dialogue_pb2.ConverseResponse]:
        first, audio = await config_then_audio(request_iterator, dialogue_pb2.ConverseRequest, "config", "audio_content")
        tenant = effective_tenant(first.config.tenant)
        async for response in self._voice.converse(current_principal(), tenant, first.config, audio, Deadline.of(context)):
            yield response

    async def Summarize(
        self, request: dialogue_pb2.SummarizeRequest, context: grpc.aio.ServicerContext
    ) -> dialogue_pb2.SummarizeResponse:
        return await self._core.summarize(effective_tenant(request.tenant), request, Deadline.of(context))

    async def GetSession(
        self, request: dialogue_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> dialogue_pb2.Session:
        return await self._core.get_session(current_principal(), effective_tenant(request.tenant), request.session_id)

    async def EndSession(
        self, request: dialogue_pb2.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> dialogue_pb2.EndSessionResponse:
        return await self._core.end_session(current_principal(), effective_tenant(request.tenant), request.session_id)
