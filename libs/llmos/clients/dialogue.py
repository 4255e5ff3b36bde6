"""Typed calls of the dialogue service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmos.clients.base import Metadata, ServiceClient
from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc


class DialogueClient(ServiceClient):
    service = "dialogue"

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata = ()) -> None:
        super().__init__(channel, metadata)
        self._stub = dialogue_pb2_grpc.DialogueServiceStub(channel)

    async def chat(self, request: dialogue_pb2.ChatRequest, timeout_s: float | None) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        """One turn: its intent, answer deltas, then the final message with citations."""
        async for response in self._stream(self._stub.Chat, request, timeout_s):
            yield response
