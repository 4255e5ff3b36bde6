"""Typed calls of the speech service: recognition and synthesis, whole or streaming, and voices."""

from __future__ import annotations

from collections.abc import AsyncIterator

from llmos.clients.base import ServiceClient
from llmos.v1 import speech_pb2, speech_pb2_grpc


class SpeechClient(ServiceClient[speech_pb2_grpc.SpeechServiceStub]):
    service = "speech"
    stub_type = speech_pb2_grpc.SpeechServiceStub

    async def recognize(
        self, config: speech_pb2.RecognitionConfig, audio: bytes, *, timeout_s: float | None = None
    ) -> list[speech_pb2.SpeechRecognitionResult]:
        """The transcript of a whole recording, one result per spoken segment."""
        request = speech_pb2.RecognizeRequest(config=config, audio=audio)
        return list((await self._unary(self._stub.Recognize, request, timeout_s)).results)

    async def recognize_stream(
        self, config: speech_pb2.StreamingRecognitionConfig, audio: AsyncIterator[bytes], timeout_s: float | None
    ) -> AsyncIterator[speech_pb2.SpeechRecognitionResult]:
        """Interim and final transcripts of `audio` as it arrives."""

        async def requests() -> AsyncIterator[speech_pb2.StreamingRecognizeRequest]:
            yield speech_pb2.StreamingRecognizeRequest(streaming_config=config)
            async for chunk in audio:
                yield speech_pb2.StreamingRecognizeRequest(audio_content=chunk)

        async for response in self._stream(self._stub.StreamingRecognize, requests(), timeout_s):
            for result in response.results:
                yield result

    async def synthesize(
        self, request: speech_pb2.SynthesizeSpeechRequest, *, timeout_s: float | None = None
    ) -> speech_pb2.SynthesizeSpeechResponse:
        """The audio of `request.text`, whole."""
        return await self._unary(self._stub.Synthesize, request, timeout_s)

    async def synthesize_stream(
        self, request: speech_pb2.SynthesizeSpeechRequest, timeout_s: float | None
    ) -> AsyncIterator[speech_pb2.SynthesizeSpeechResponse]:
        """The audio of `request.text`, sentence by sentence."""
        async for response in self._stream(self._stub.SynthesizeStream, request, timeout_s):
            yield response

    async def voices(self, *, language_code: str = "", timeout_s: float | None = None) -> list[speech_pb2.Voice]:
        """The voices the service speaks with (`language_code` empty: all)."""
        request = speech_pb2.ListVoicesRequest(language_code=language_code)
        return list((await self._unary(self._stub.ListVoices, request, timeout_s)).voices)


def transcript(results: list[speech_pb2.SpeechRecognitionResult]) -> str:
    """The best alternative of each result, joined."""
    return " ".join(result.alternatives[0].transcript for result in results if result.alternatives)
