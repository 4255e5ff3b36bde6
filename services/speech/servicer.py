"""gRPC adapter of the speech core."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmos.auth import current_principal, effective_tenant
from llmos.grpcutil.streams import config_then_audio
from llmos.v1 import speech_pb2, speech_pb2_grpc
from services.speech.core import SpeechCore


class SpeechServicer(speech_pb2_grpc.SpeechServiceServicer):
    def __init__(self, core: SpeechCore) -> None:
        self._core = core

    async def Recognize(
        self, request: speech_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> speech_pb2.RecognizeResponse:
        return await self._core.recognize(current_principal(), effective_tenant(request.config.tenant), request)

    async def StreamingRecognize(
        self, requests: AsyncIterator[speech_pb2.StreamingRecognizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        first, audio = await config_then_audio(requests, speech_pb2.StreamingRecognizeRequest, "streaming_config", "audio_content")
        config = first.streaming_config
        tenant = effective_tenant(config.config.tenant)
        async for response in self._core.streaming_recognize(current_principal(), tenant, config, audio):
            yield response

    async def Synthesize(
        self, request: speech_pb2.SynthesizeSpeechRequest, context: grpc.aio.ServicerContext
    ) -> speech_pb2.SynthesizeSpeechResponse:
        return await self._core.synthesize(current_principal(), effective_tenant(request.tenant), request)

    async def SynthesizeStream(
        self, request: speech_pb2.SynthesizeSpeechRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[speech_pb2.SynthesizeSpeechResponse]:
        async for response in self._core.synthesize_stream(current_principal(), effective_tenant(request.tenant), request):
            yield response

    async def ListVoices(
        self, request: speech_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> speech_pb2.ListVoicesResponse:
        return self._core.voices(request.language_code)
