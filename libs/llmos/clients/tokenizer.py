"""Typed calls of the tokenizer service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from llmos.clients.base import Metadata, ServiceClient
from llmos.v1 import tokenizer_pb2, tokenizer_pb2_grpc


class TokenizerClient(ServiceClient):
    service = "tokenizer"

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata = ()) -> None:
        super().__init__(channel, metadata)
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)

    async def count(self, texts: Sequence[str], timeout_s: float | None) -> list[int]:
        """Tokens of each text, in order."""
        response = await self._unary(self._stub.CountTokens, tokenizer_pb2.CountTokensRequest(texts=list(texts)), timeout_s)
        return list(response.counts)

    async def token_offsets(self, text: str, timeout_s: float | None) -> list[tuple[int, int]]:
        """The (start, end) character span of each token of `text`."""
        response = await self._unary(self._stub.Tokenize, tokenizer_pb2.TokenizeRequest(text=text), timeout_s)
        return [(offset.start, offset.end) for offset in response.offsets]
