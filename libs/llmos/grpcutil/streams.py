"""Client streams that open with one configuration message and then carry audio (Riva's shape)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from google.protobuf.message import Message

from llmos.errors import InvalidArgument

RequestT = TypeVar("RequestT", bound=Message)


async def config_then_audio(
    requests: AsyncIterator[RequestT], request_type: type[RequestT], config_field: str, audio_field: str
) -> tuple[RequestT, AsyncIterator[bytes]]:
    """The first request, which must set `config_field` (one field of a oneof with `audio_field`), and
    the audio bytes of the rest.

    A stream that does not open with the configuration, or repeats it later, is INVALID_ARGUMENT naming
    the field and its message type; the later case surfaces while the audio is read.
    """
    field = request_type.DESCRIPTOR.fields_by_name[config_field]
    oneof = field.containing_oneof.name
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof(oneof) != config_field:
        raise InvalidArgument(
            config_field, f"the first message must carry the {field.message_type.name}, and only it; audio follows"
        )

    async def audio() -> AsyncIterator[bytes]:
        async for request in requests:
            if request.WhichOneof(oneof) != audio_field:
                raise InvalidArgument(config_field, "only the first message may carry the configuration")
            yield getattr(request, audio_field)

    return first, audio()
