"""gRPC adapter of the tokenizer core."""

from __future__ import annotations

import grpc

from llmos.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.core import TokenizerCore


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, core: TokenizerCore) -> None:
        self._core = core

    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizeResponse:
        encoding = self._core.tokenize(request.text, request.model, request.add_special_tokens)
        return tokenizer_pb2.TokenizeResponse(
            ids=encoding.ids,
            tokens=encoding.tokens,
            offsets=[tokenizer_pb2.TokenOffset(start=start, end=end) for start, end in encoding.offsets],
        )

    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DetokenizeResponse:
        text = self._core.detokenize(list(request.ids), request.model, request.skip_special_tokens)
        return tokenizer_pb2.DetokenizeResponse(text=text)

    async def CountTokens(
        self, request: tokenizer_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.CountTokensResponse:
        counts = self._core.count_tokens(list(request.texts), request.model, request.add_special_tokens)
        return tokenizer_pb2.CountTokensResponse(counts=counts, total=sum(counts))

    async def ApplyChatTemplate(
        self, request: tokenizer_pb2.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        messages = [{"role": message.role, "content": message.content} for message in request.messages]
        templated = self._core.apply_chat_template(messages, request.model, request.add_generation_prompt)
        return tokenizer_pb2.ApplyChatTemplateResponse(
            prompt=templated.prompt, ids=templated.ids, token_count=len(templated.ids)
        )
