"""Reading a stream from a known position, for tools that wait on events (CLI, benchmarks, tests).

Services consume through durable consumers (llmos.bus.broker); a tool that only needs "every
`docs.indexed` after the moment I published" reads the stream directly instead: it creates no
consumer state on the server and cannot miss an event published before it started to read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from llmos.bus.subjects import stream_for

POLL_S = 0.05


async def last_sequence(js: JetStreamContext, subject: str) -> int:
    """The last sequence of `subject`'s stream: what is stored after it is new."""
    return int((await js.stream_info(stream_for(subject).name)).state.last_seq)


async def follow(js: JetStreamContext, subject: str, after_seq: int) -> AsyncIterator[RawStreamMsg]:
    """Every message on `subject` (wildcards allowed) stored after `after_seq`, in order, waiting
    for new ones without end; bound it with `asyncio.timeout`."""
    stream = stream_for(subject).name
    sequence = after_seq
    while True:
        try:
            message = await js.get_msg(stream, sequence + 1, subject=subject, next=True)
        except NotFoundError:
            await asyncio.sleep(POLL_S)
            continue
        sequence = message.seq
        yield message
