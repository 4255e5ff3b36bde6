"""Typed calls of the tokenizer service."""

from __future__ import annotations

from collections.abc import Sequence

from llmos.clients.base import ServiceClient
from llmos.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc


class TokenizerClient(ServiceClient[tokenizer_pb2_grpc.TokenizerServiceStub]):
    service = "tokenizer"
    stub_type = tokenizer_pb2_grpc.TokenizerServiceStub

    async def count(self, texts: Sequence[str], timeout_s: float | None, model: str = "", add_special_tokens: bool = False) -> list[int]:
        """Tokens of each text, in order."""
        response = await self.count_response(texts, model=model, add_special_tokens=add_special_tokens, timeout_s=timeout_s)
        return list(response.counts)

    async def count_response(
        self, texts: Sequence[str], *, model: str = "", add_special_tokens: bool = False, timeout_s: float | None = None
    ) -> tokenizer_pb2.CountTokensResponse:
        """The count of each text and their total."""
        request = tokenizer_pb2.CountTokensRequest(texts=list(texts), model=model, add_special_tokens=add_special_tokens)
        return await self._unary(self._stub.CountTokens, request, timeout_s)

    async def tokenize(
        self, text: str, *, model: str = "", add_special_tokens: bool = False, timeout_s: float | None = None
    ) -> tokenizer_pb2.TokenizeResponse:
        """The token ids of `text`, their strings and their character spans."""
        request = tokenizer_pb2.TokenizeRequest(text=text, model=model, add_special_tokens=add_special_tokens)
        return await self._unary(self._stub.Tokenize, request, timeout_s)

    async def token_offsets(self, text: str, timeout_s: float | None) -> list[tuple[int, int]]:
        """The (start, end) character span of each token of `text`."""
        response = await self.tokenize(text, timeout_s=timeout_s)
        return [(offset.start, offset.end) for offset in response.offsets]

    async def detokenize(
        self, ids: Sequence[int], *, model: str = "", skip_special_tokens: bool = False, timeout_s: float | None = None
    ) -> str:
        request = tokenizer_pb2.DetokenizeRequest(ids=list(ids), model=model, skip_special_tokens=skip_special_tokens)
        return (await self._unary(self._stub.Detokenize, request, timeout_s)).text

    async def apply_chat_template(
        self, messages: Sequence[tuple[str, str]], *, model: str = "", add_generation_prompt: bool = True,
        timeout_s: float | None = None,
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        """The prompt the model reads for a chat of (role, content) messages, with its token ids."""
        request = tokenizer_pb2.ApplyChatTemplateRequest(
            messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in messages],
            model=model, add_generation_prompt=add_generation_prompt,
        )
        return await self._unary(self._stub.ApplyChatTemplate, request, timeout_s)
