"""Client streams that open with a configuration and then carry audio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llmos.errors import InvalidArgument
from llmos.grpcutil.streams import config_then_audio
from llmos.v1 import speech_pb2

pytestmark = pytest.mark.unit

Request = speech_pb2.StreamingRecognizeRequest
CONFIG = Request(streaming_config=speech_pb2.StreamingRecognitionConfig(interim_results=True))


async def stream(*requests: speech_pb2.StreamingRecognizeRequest) -> AsyncIterator[speech_pb2.StreamingRecognizeRequest]:
    for request in requests:
        yield request


async def split(*requests: speech_pb2.StreamingRecognizeRequest) -> tuple[Request, list[bytes]]:
    first, audio = await config_then_audio(stream(*requests), Request, "streaming_config", "audio_content")
    return first, [chunk async for chunk in audio]


async def test_the_configuration_comes_first_and_the_audio_follows_in_order() -> None:
    first, audio = await split(CONFIG, Request(audio_content=b"ab"), Request(audio_content=b"cd"))
    assert first.streaming_config.interim_results
    assert audio == [b"ab", b"cd"]


@pytest.mark.parametrize("requests", [(), (Request(audio_content=b"ab"),)], ids=["empty", "audio first"])
async def test_a_stream_without_a_leading_configuration_is_refused(requests: tuple[Request, ...]) -> None:
    with pytest.raises(InvalidArgument, match="streaming_config.*StreamingRecognitionConfig"):
        await split(*requests)


async def test_a_second_configuration_is_refused_while_the_audio_is_read() -> None:
    with pytest.raises(InvalidArgument, match="only the first message"):
        await split(CONFIG, Request(audio_content=b"ab"), CONFIG)
