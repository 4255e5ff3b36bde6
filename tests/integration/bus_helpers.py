"""Reading the bus directly from tests: the last message on a subject, with a deadline."""

from __future__ import annotations

import asyncio

import nats
from nats.js.errors import NotFoundError

from llmos.bus.follow import follow
from llmos.bus.follow import last_sequence as stream_last_sequence  # same name, here by URL
from llmos.bus.subjects import DOCS_INDEXED, stream_for
from llmos.v1 import events_pb2


async def last_message(nats_url: str, subject: str, timeout_s: float = 10.0, after_seq: int = 0):  # type: ignore[no-untyped-def]
    """The newest message on `subject` with a stream sequence above `after_seq`, waiting for it."""
    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                message = await js.get_last_msg(stream_for(subject).name, subject)
                if message.seq > after_seq:
                    return message
            except NotFoundError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no message on {subject} after sequence {after_seq} within {timeout_s} s")
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def last_sequence(nats_url: str, subject: str) -> int:
    """The position after which messages on `subject` are new (llmos.bus.follow.last_sequence)."""
    connection = await nats.connect(nats_url)
    try:
        return await stream_last_sequence(connection.jetstream(), subject)
    finally:
        await connection.close()


async def publish(nats_url: str, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
    connection = await nats.connect(nats_url)
    try:
        await connection.jetstream().publish(subject, payload, headers=headers)
    finally:
        await connection.close()


async def messages_after(nats_url: str, subject: str, after_seq: int) -> list[bytes]:
    """Payloads of every message on `subject` stored after stream sequence `after_seq`."""
    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        stream = stream_for(subject).name
        try:
            last = (await js.get_last_msg(stream, subject)).seq
        except NotFoundError:
            return []
        payloads = []
        for seq in range(after_seq + 1, last + 1):
            try:
                message = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            if message.subject == subject:
                payloads.append(message.data)
        return payloads
    finally:
        await connection.close()


async def indexed_events(url: str, after_seq: int, wanted: set[tuple[str, str]], timeout_s: float = 60.0) -> list[events_pb2.DocumentIndexed]:
    """Every `docs.indexed` event after `after_seq`, until each (tenant, document id) in `wanted` is seen.

    Other tests' documents may still be indexing on the shared stack: their events are in the list too."""
    connection = await nats.connect(url)
    events: list[events_pb2.DocumentIndexed] = []
    pending = set(wanted)
    try:
        async with asyncio.timeout(timeout_s):
            async for message in follow(connection.jetstream(), DOCS_INDEXED, after_seq):
                events.append(events_pb2.DocumentIndexed.FromString(message.data))
                pending.discard((events[-1].tenant, events[-1].document_id))
                if not pending:
                    break
    except TimeoutError:
        raise TimeoutError(f"not indexed within {timeout_s} s: {pending}") from None
    finally:
        await connection.close()
    return events
