"""gRPC adapter of the inference core."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmos.auth import effective_tenant
from llmos.deadline import Deadline
from llmos.v1 import inference_pb2, inference_pb2_grpc
from services.inference.core import InferenceCore
from services.inference.scheduler import FinishReason, StreamEvent

FINISH_REASONS = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
}


def _response(event: StreamEvent) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(delta=event.delta, token_ids=event.token_ids)
    if event.finish is not None:
        response.finish_reason = FINISH_REASONS[event.finish]
    if event.usage is not None:
        response.usage.CopyFrom(
            inference_pb2.GenerationUsage(
                prompt_tokens=event.usage.prompt_tokens,
                generated_tokens=event.usage.generated_tokens,
                queue_ms=event.usage.queue_ms,
                time_to_first_token_ms=event.usage.time_to_first_token_ms,
                tokens_per_second=event.usage.tokens_per_second,
            )
        )
    return response


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        tenant = effective_tenant(request.tenant)
        # A client that goes away cancels this generator, which frees its decode slot.
        async for event in self._core.generate(request, tenant, Deadline.of(context)):
            yield _response(event)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        effective_tenant(request.tenant)  # refuses a tenant the caller may not act for
        result = await self._core.embed(request.model, list(request.texts), request.priority)
        return inference_pb2.EmbedResponse(
            model=result.model,
            dimensions=int(result.vectors.shape[1]),
            embeddings=[inference_pb2.Embedding(values=vector.tolist()) for vector in result.vectors],
            prompt_tokens=result.prompt_tokens,
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=self._core.list_models())
