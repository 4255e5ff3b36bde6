"""The audit trail of a cluster test (issue 16, item 3), checked through the platform's own
verification: the audit service's Verify RPC (AuditClient.verify, what `llmos audit verify` calls).

`AuditTrail.begin` takes the chain's signed checkpoint and the AUDIT stream's position before the
test acts; `check` then holds the trail to three things:

- intact and gap-free: Verify walks the whole chain (a missing sequence number, a record that
  does not follow its predecessor or whose keyed hash does not match is reported) and checks it
  against the service's latest checkpoint and against the one taken at the start, so records
  stored before the faults are still there unchanged and every record since is covered;
- nothing published was lost: every audit event the test's tenant published on the AUDIT stream
  since the start (read back from the stream, which keeps them) is a record of the log;
- the test's own actions are in it: each (action, resource) the test expects has a record.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import nats
from nats.js.errors import NotFoundError

from llmos.bus.subjects import AUDIT_ALL, stream_for
from llmos.clients import AuditClient
from llmos.grpcutil.client import open_channel
from llmos.v1 import audit_pb2, events_pb2
from tests.cluster_stack import ClusterStack
from tests.conftest import TEST_API_KEY

AUDIT_STREAM = stream_for(AUDIT_ALL).name
CALL_TIMEOUT_S = 30.0
# The audit service stores events as it pulls them (batches of 64): seconds behind at most, and
# the events published while it restarted wait in the stream for it.
CATCH_UP_S = 60.0


@dataclass(frozen=True)
class AuditFigures:
    records_before: int
    records_after: int
    published: int  # the tenant's audit events on the stream since the start
    expected: int  # the test's own actions looked for
    repeated: int  # expected actions with more than one record

    def __str__(self) -> str:
        return (
            f"audit chain intact, {self.records_before} -> {self.records_after} records, sequences contiguous; "
            f"{self.published} events published since the start all stored; {self.expected} of the test's actions "
            f"found ({self.repeated} recorded more than once)"
        )


async def verify(stack: ClusterStack, checkpoint: audit_pb2.AuditCheckpoint | None = None) -> audit_pb2.VerifyAuditResponse:
    channel = open_channel(stack.addr("audit"), TEST_API_KEY)
    try:
        return await AuditClient(channel).verify(checkpoint=checkpoint, timeout_s=CALL_TIMEOUT_S)
    finally:
        await channel.close()


def assert_intact(verification: audit_pb2.VerifyAuditResponse) -> None:
    """Intact, and gap-free: every record from 1 to the checkpoint's count was walked."""
    assert verification.intact, (verification.first_broken_sequence, verification.reason)
    assert verification.records_checked == verification.checkpoint.records, verification


@dataclass
class AuditTrail:
    stack: ClusterStack
    tenant: str
    start: audit_pb2.VerifyAuditResponse
    stream_seq: int  # the AUDIT stream's last sequence at the start

    @classmethod
    async def begin(cls, stack: ClusterStack, tenant: str) -> AuditTrail:
        start = await verify(stack)
        assert_intact(start)
        connection = await nats.connect(stack.nats.urls, **stack.admin_connect_options())
        try:
            stream_seq = (await connection.jetstream().stream_info(AUDIT_STREAM)).state.last_seq
        finally:
            await connection.close()
        return cls(stack, tenant, start, stream_seq)

    async def published(self) -> dict[str, tuple[str, str]]:
        """The tenant's audit events the AUDIT stream received since the start: id -> (action, resource)."""
        connection = await nats.connect(self.stack.nats.urls, **self.stack.admin_connect_options())
        events: dict[str, tuple[str, str]] = {}
        try:
            js = connection.jetstream(timeout=5)
            last = (await js.stream_info(AUDIT_STREAM)).state.last_seq
            for seq in range(self.stream_seq + 1, last + 1):
                try:
                    message = await js.get_msg(AUDIT_STREAM, seq)
                except NotFoundError:
                    continue
                event = events_pb2.AuditEvent.FromString(message.data)
                if event.tenant == self.tenant:
                    events[event.event_id] = (event.action, event.resource)
        finally:
            await connection.close()
        return events

    async def records(self) -> list[audit_pb2.AuditRecord]:
        """The tenant's records stored after the start, oldest first."""
        channel = open_channel(self.stack.addr("audit"), TEST_API_KEY)
        try:
            client = AuditClient(channel)
            return [
                record
                async for record in client.query(
                    tenant=self.tenant, after_sequence=self.start.records_checked, timeout_s=CALL_TIMEOUT_S
                )
            ]
        finally:
            await channel.close()

    async def check(self, expected: Collection[tuple[str, str]]) -> AuditFigures:
        """Assert the trail holds everything published since the start and each of `expected`
        (action, resource), and that the chain verifies against the start's checkpoint."""
        published = await self.published()
        deadline = time.monotonic() + CATCH_UP_S
        while True:
            records = await self.records()
            stored = {record.event.event_id for record in records}
            missing = set(published) - stored
            if not missing:
                break
            assert time.monotonic() < deadline, (
                f"{len(missing)} of {len(published)} audit events published since the start not stored after "
                f"{CATCH_UP_S:.0f} s, e.g. {sorted(published[event_id] for event_id in missing)[:5]}"
            )
            await asyncio.sleep(0.5)

        final = await verify(self.stack, self.start.checkpoint)
        assert_intact(final)
        sequences = [record.sequence for record in records]
        assert sequences == sorted(set(sequences)) and all(
            self.start.records_checked < sequence <= final.records_checked for sequence in sequences
        ), sequences
        per_action = Counter((record.event.action, record.event.resource) for record in records)
        absent = [action for action in expected if not per_action[action]]
        assert not absent, f"{len(absent)} of the test's {len(expected)} actions have no audit record, e.g. {absent[:5]}"
        return AuditFigures(
            self.start.records_checked, final.records_checked, len(published), len(expected),
            sum(1 for action in expected if per_action[action] > 1),
        )
