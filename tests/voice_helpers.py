"""Fakes for tests of a voice conversation (DialogueService.Converse)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from llmos.v1 import speech_pb2


class InterimRecognizer:
    """The recognizer Converse streams the caller's audio to: an interim `transcript` for every chunk
    of audio; counts the chunks it was given."""

    def __init__(self, transcript: str = "uh") -> None:
        self.transcript = transcript
        self.chunks_read = 0

    async def recognize_stream(
        self, config: speech_pb2.StreamingRecognitionConfig, audio: AsyncIterator[bytes], timeout_s: float | None
    ) -> AsyncIterator[speech_pb2.SpeechRecognitionResult]:
        async for _ in audio:
            self.chunks_read += 1
            yield speech_pb2.SpeechRecognitionResult(
                alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript=self.transcript)], is_final=False
            )
