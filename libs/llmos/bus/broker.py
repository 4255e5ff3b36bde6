"""The bus of one service: a FastStream NatsBroker with the platform's conventions.

- Streams and KV buckets (llmos.bus.subjects) are declared at start, idempotently, with the
  configured number of replicas (LLMOS_JETSTREAM_REPLICAS: 3 in a cluster).
- Publishing encodes protobuf, sets `Nats-Msg-Id` for JetStream de-duplication and carries the
  W3C trace context of its PRODUCER span in headers.
- Handlers are durable pull consumers shared by every replica of a service (the durable name is
  the service's), each message processed in a CONSUMER span that continues the publisher's trace.
  Spans and metrics (`messaging.process.duration`, `messaging.client.operation.duration`, in
  seconds) follow the OpenTelemetry messaging semantic conventions.
  A payload that does not parse, or a handler error that retrying cannot fix (InvalidArgument),
  goes straight to `llmos.dlq.<subject>`; a dependency UNAVAILABLE is waited for within the
  delivery (llmos.bus.outage); any other failure is retried with back-off until
  `max_deliveries`, then dead-lettered. The consumer always goes on.
- Replies (pull deliveries, KV reads, publish acknowledgements) arrive under the user's own inbox
  prefix, the only inboxes its NATS user may subscribe to (llmos.natsauth).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic

from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, NatsUserPassword, PullSub
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as AckPolicyJS
from nats.js.api import ConsumerConfig, KeyValueConfig, StreamConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_CONSUMER_GROUP_NAME,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    MessagingOperationTypeValues,
)
from opentelemetry.semconv._incubating.metrics.messaging_metrics import (
    MESSAGING_CLIENT_OPERATION_DURATION,
    MESSAGING_PROCESS_DURATION,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanKind, Status, StatusCode

from llmos.audit import DENY, audit_event
from llmos.bus.codec import (
    CONTENT_TYPE,
    CONTENT_TYPE_HEADER,
    MESSAGE_TYPE_HEADER,
    MSG_ID_HEADER,
    MessageT,
    content_id,
    decode,
    encode,
)
from llmos.bus.kv import NatsBucket
from llmos.bus.outage import LEADERLESS_ERRORS, retry_through, while_leaderless
from llmos.bus.subjects import (
    BUCKETS,
    INTERACTIVE_LANE,
    STREAMS,
    audit_subject,
    dead_letter_subject,
    durable_name,
    stream_for,
)
from llmos.errors import InvalidArgument, Unavailable
from llmos.natsauth import inbox_prefix
from llmos.telemetry import extract_context, inject_context, seconds_histogram
from llmos.v1 import common_pb2, events_pb2

logger = logging.getLogger(__name__)
# The conventions list no value for NATS; this is the name NATS instrumentations use.
MESSAGING_SYSTEM_NATS = "nats"

Handler = Callable[[MessageT], Awaitable[None]]
# A handler given the subject a message arrived on as well. NATS permissions say who may publish
# on a subject, so on a wildcard subscription the subject names the writer; the payload only claims to.
SubjectHandler = Callable[[str, MessageT], Awaitable[None]]
# Redelivery back-off after a failure: the n-th retry waits RETRY_DELAYS_S[n-1] (last one repeats).
RETRY_DELAYS_S = (0.5, 2.0, 5.0)
ACK_WAIT_S = 60.0


@dataclass(frozen=True)
class Subscription(Generic[MessageT]):
    subject: str
    message_type: type[MessageT]
    handler: Handler[MessageT] | None = None
    batch_size: int = 1
    # Messages handled at once; above 1 a handler can gather work from several messages.
    max_workers: int = 1
    # A second durable consumer on the same subject (e.g. "interactive"): its own position in
    # the stream, so its messages never wait behind another lane's backlog.
    lane: str = ""
    # Instead of `handler`: one that is also given the subject each message arrived on.
    subject_handler: SubjectHandler[MessageT] | None = None

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.subject_handler is None):
            raise TypeError(f"subscription to {self.subject}: give exactly one of handler and subject_handler")

    async def deliver(self, subject: str, message: MessageT) -> None:
        if self.handler is not None:
            await self.handler(message)
        elif self.subject_handler is not None:
            await self.subject_handler(subject, message)


# The interactive lane pulls many messages at once: it skips a bulk burst in few round trips.
INTERACTIVE_PULL = 32
INTERACTIVE_WORKERS = 4


def priority_lanes(
    subject: str,
    message_type: type[MessageT],
    handler: Handler[MessageT] | None = None,
    bulk_workers: int = 1,
    bulk_batch_size: int = 1,
    replica: str = "",
    subject_handler: SubjectHandler[MessageT] | None = None,
) -> list[Subscription[MessageT]]:
    """Two durable consumers over one subject, split by the message's `priority` field.

    The interactive lane handles only PRIORITY_INTERACTIVE messages, the bulk lane everything
    else; each acknowledges the other's messages unread, so a live update never waits behind a
    bulk backlog. `replica` names a replica that keeps its own position (its own index). Give
    `handler`, or `subject_handler` to be told the subject each message arrived on.
    """
    if (handler is None) == (subject_handler is None):
        raise TypeError(f"priority lanes of {subject}: give exactly one of handler and subject_handler")

    def lane(name: str) -> str:
        return "-".join(part for part in (replica, name) if part)

    async def deliver(arrived_on: str, message: MessageT) -> None:
        if subject_handler is not None:
            await subject_handler(arrived_on, message)
        elif handler is not None:
            await handler(message)

    async def on_interactive(arrived_on: str, message: MessageT) -> None:
        if message.priority == common_pb2.PRIORITY_INTERACTIVE:  # type: ignore[attr-defined]
            await deliver(arrived_on, message)

    async def on_bulk(arrived_on: str, message: MessageT) -> None:
        if message.priority != common_pb2.PRIORITY_INTERACTIVE:  # type: ignore[attr-defined]
            await deliver(arrived_on, message)

    return [
        Subscription(subject, message_type, subject_handler=on_bulk, batch_size=bulk_batch_size, max_workers=bulk_workers,
                     lane=lane("")),
        Subscription(subject, message_type, subject_handler=on_interactive, batch_size=INTERACTIVE_PULL,
                     max_workers=INTERACTIVE_WORKERS, lane=lane(INTERACTIVE_LANE)),
    ]


def _messaging_attributes(operation: MessagingOperationTypeValues, subject: str, service: str) -> dict[str, str]:
    """The semantic-convention attributes of one bus operation on `subject` by `service`."""
    return {
        MESSAGING_SYSTEM: MESSAGING_SYSTEM_NATS,
        MESSAGING_OPERATION_TYPE: operation.value,
        MESSAGING_OPERATION_NAME: operation.value,
        MESSAGING_DESTINATION_NAME: subject,
        "llmos.service": service,
    }


class Bus:
    """Publishing, consuming and key-value state on NATS JetStream for one service."""

    def __init__(
        self, nats_url: str, service: str, max_deliveries: int, user: str = "", password: str = "", replicas: int = 1
    ) -> None:
        self.service = service
        self.max_deliveries = max_deliveries
        # Replicas of the streams and buckets this service creates when they are missing.
        self.replicas = replicas
        # Without a user (a development server) the default inbox prefix serves.
        self._inbox_prefix = inbox_prefix(user) if user else "_INBOX"
        self.broker = NatsBroker(
            nats_url,
            security=NatsUserPassword(user, password) if user else None,
            inbox_prefix=self._inbox_prefix,
            logger=logging.getLogger(f"llmos.bus.{service}"),
        )
        self._tracer = trace.get_tracer("llmos.bus")
        meter = metrics.get_meter("llmos.bus")
        self._duration = seconds_histogram(
            meter, MESSAGING_PROCESS_DURATION, "time to handle one bus message, by subject and outcome"
        )
        self._publish_duration = seconds_histogram(
            meter,
            MESSAGING_CLIENT_OPERATION_DURATION,
            "time to publish one message until the stream acknowledged it, by subject",
        )
        self._buckets: dict[str, KeyValue] = {}

    def durable_name(self, subject: str, lane: str = "") -> str:
        """The consumer shared by every replica of this service for `subject` (and `lane`)."""
        return durable_name(self.service, subject, lane)

    def consumer_config(self, subject: str, lane: str = "") -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable_name(subject, lane),
            filter_subject=subject,
            ack_policy=AckPolicyJS.EXPLICIT,
            max_deliver=self.max_deliveries + 1,  # one spare: the last failure is ours to dead-letter
            ack_wait=ACK_WAIT_S,
        )

    @property
    def jetstream(self) -> JetStreamContext:
        return self.broker.connection.jetstream()

    async def reserve(self, subject: str) -> None:
        """Declare this service's durable consumer for `subject` without consuming yet.

        Used where the handler is not built yet: messages wait in the stream (visible as lag in
        `llmos status`) instead of being lost or failing.
        """
        await self.jetstream.add_consumer(stream_for(subject).name, self.consumer_config(subject))

    def subscribe(self, subscription: Subscription[Any]) -> None:
        """Register a handler before `start`; it consumes from the subject's stream."""
        spec = stream_for(subscription.subject)
        durable = self.durable_name(subscription.subject, subscription.lane)
        process = self._processor(subscription)

        async def on_message(body: bytes, msg: NatsMessage) -> None:
            await process(msg)

        self.broker.subscriber(
            subscription.subject,
            stream=JStream(spec.name, declare=False),
            durable=durable,
            pull_sub=PullSub(batch_size=subscription.batch_size, timeout=1.0),
            # Pull subscriptions take their own prefix (FastStream's default is _INBOX.).
            inbox_prefix=f"{self._inbox_prefix}.".encode(),
            max_workers=subscription.max_workers,
            ack_policy=AckPolicy.MANUAL,
            config=self.consumer_config(subscription.subject, subscription.lane),
        )(on_message)

    async def start(self) -> None:
        await self.broker.connect()
        await declare_streams(self.jetstream, replicas=self.replicas)
        await self.broker.start()

    async def close(self) -> None:
        await self.broker.stop()

    async def publish(self, subject: str, message: Message, msg_id: str | None = None) -> None:
        """Publish to JetStream and wait for the stream's acknowledgement.

        `msg_id` (default: a hash of the content) lets JetStream drop a duplicate publish.
        """
        headers = {
            CONTENT_TYPE_HEADER: CONTENT_TYPE,
            MESSAGE_TYPE_HEADER: message.DESCRIPTOR.full_name,
            MSG_ID_HEADER: msg_id or content_id(message),
        }
        attributes = _messaging_attributes(MessagingOperationTypeValues.SEND, subject, self.service)
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            f"send {subject}", kind=SpanKind.PRODUCER, attributes={**attributes, MESSAGING_MESSAGE_ID: headers[MSG_ID_HEADER]}
        ):
            inject_context(headers)
            try:
                data = encode(message)
                await while_leaderless(
                    lambda: self.broker.publish(data, subject, headers=headers, stream=stream_for(subject).name),
                    f"publish to {subject}",
                )
            except Exception as exc:
                attributes[ERROR_TYPE] = type(exc).__name__
                raise
            finally:
                self._publish_duration.record(time.perf_counter() - started, attributes)

    async def key_value(self, bucket: str) -> KeyValue:
        if bucket not in self._buckets:
            self._buckets[bucket] = await self.jetstream.key_value(bucket)
        return self._buckets[bucket]

    def bucket(self, name: str) -> NatsBucket:
        """A KV bucket for `llmos.ports.VersionedStore`; usable while building, opened on first use."""
        return NatsBucket(name, lambda: self.key_value(name))

    def _processor(self, subscription: Subscription[Any]) -> Callable[[NatsMessage], Awaitable[None]]:
        durable = self.durable_name(subscription.subject, subscription.lane)

        async def process(msg: NatsMessage) -> None:
            raw = msg.raw_message
            deliveries = raw.metadata.num_delivered if raw.metadata else 1
            headers = dict(raw.headers or {})
            span = self._tracer.start_span(
                f"process {subscription.subject}",
                context=extract_context(headers),
                kind=SpanKind.CONSUMER,
                attributes={
                    **_messaging_attributes(MessagingOperationTypeValues.PROCESS, raw.subject, self.service),
                    MESSAGING_CONSUMER_GROUP_NAME: durable,
                    "llmos.bus.delivery_count": deliveries,
                },
            )
            started = time.perf_counter()
            outcome, error_type = "ack", ""
            with trace.use_span(span, end_on_exit=True):
                try:
                    message = decode(subscription.message_type, raw.data)
                    await retry_through(
                        lambda: subscription.deliver(raw.subject, message),
                        f"handling {raw.subject}",
                        transient=(Unavailable, *LEADERLESS_ERRORS),
                        waiting=raw.in_progress,
                    )
                except InvalidArgument as exc:
                    span.set_status(Status(StatusCode.ERROR, exc.message))
                    outcome, error_type = "dead-letter", type(exc).__name__
                    await self._dead_letter(subscription.message_type, raw.subject, raw.data, headers, exc.message, deliveries)
                    await msg.ack()
                except Exception as exc:  # noqa: BLE001 - any failure is retried, then dead-lettered
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    error_type = type(exc).__name__
                    if deliveries >= self.max_deliveries:
                        outcome = "dead-letter"
                        logger.exception("giving up on %s after %d deliveries", raw.subject, deliveries)
                        await self._dead_letter(subscription.message_type, raw.subject, raw.data, headers, repr(exc), deliveries)
                        await msg.ack()
                    else:
                        outcome = "retry"
                        logger.warning("retrying %s (delivery %d): %r", raw.subject, deliveries, exc)
                        delay = RETRY_DELAYS_S[min(deliveries, len(RETRY_DELAYS_S)) - 1]
                        await msg.nack(delay=delay)
                else:
                    await msg.ack()
                finally:
                    attributes = {
                        **_messaging_attributes(MessagingOperationTypeValues.PROCESS, subscription.subject, self.service),
                        "llmos.bus.outcome": outcome,
                    }
                    if error_type:
                        attributes[ERROR_TYPE] = error_type
                    self._duration.record(time.perf_counter() - started, attributes)

        return process

    async def _dead_letter(
        self,
        message_type: type[Message],
        subject: str,
        payload: bytes,
        headers: Mapping[str, str],
        error: str,
        deliveries: int,
    ) -> None:
        """Move a message to `llmos.dlq.<subject>` with its error, and audit that it was dropped."""
        failed_at = Timestamp()
        failed_at.GetCurrentTime()
        letter = events_pb2.DeadLetter(
            subject=subject,
            payload=payload,
            error=error,
            deliveries=deliveries,
            service=self.service,
            failed_at=failed_at,
            headers=dict(headers),
        )
        logger.error("dead-lettered a message from %s: %s", subject, error)
        await self.publish(dead_letter_subject(subject), letter)
        tenant = _tenant_of(message_type, payload)
        event = audit_event(self.service, f"bus:{subject}", tenant, "bus/dead-letter", f"subject/{subject}", DENY, error)
        await self.publish(audit_subject(self.service), event, msg_id=event.event_id)


def _tenant_of(message_type: type[Message], payload: bytes) -> str:
    """The tenant a payload names, if it parses and its type has a tenant field."""
    if "tenant" not in message_type.DESCRIPTOR.fields_by_name:
        return ""
    try:
        return str(getattr(message_type.FromString(payload), "tenant"))
    except DecodeError:
        return ""


async def declare_streams(js: JetStreamContext, update: bool = False, replicas: int = 1) -> None:
    """Create every stream and KV bucket the platform uses that is missing, each kept on
    `replicas` servers.

    An existing stream whose configuration differs from this version's (its replicas included)
    is updated only with `update` (the admin user, at `llmos up` and `llmos streams`); services
    are not allowed to (llmos.natsauth) and log the difference instead. JetStream moves a stream
    to a new replica count in place: followers are added (or removed) and catch up from the leader.
    """
    for spec in STREAMS:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            description=spec.description,
            max_age=float(spec.max_age_s),
            max_msg_size=spec.max_msg_size,
            max_bytes=spec.max_bytes,
            duplicate_window=120.0,
            num_replicas=replicas,
        )
        try:
            current = (await js.stream_info(spec.name)).config
        except NotFoundError:
            await js.add_stream(config)
            continue
        if _declared_fields(current) == _declared_fields(config):
            continue
        if update:
            await js.update_stream(config)
        else:
            logger.warning(
                "stream %s differs from this version's configuration (replicas %s, configured %d); "
                "`llmos streams` (as admin) updates it",
                spec.name, current.num_replicas, replicas,
            )
    await declare_buckets(js, update, replicas)


def _declared_fields(config: StreamConfig) -> tuple[object, ...]:
    """What declare_streams sets; the server fills in the rest."""
    return (
        sorted(config.subjects or ()),
        config.max_age,
        config.description,
        config.duplicate_window,
        config.max_msg_size,
        config.max_bytes,
        config.num_replicas,
    )


async def declare_buckets(js: JetStreamContext, update: bool = False, replicas: int = 1) -> None:
    """Create the missing KV buckets, each kept on `replicas` servers. Reads go through direct
    gets by key, which the services' NATS grants allow on `api_keys` without reading it by
    sequence (llmos.natsauth); `update` (the admin) turns them on for buckets made before and
    brings each bucket to `replicas`."""
    for bucket in BUCKETS:
        try:
            info = await js.stream_info(f"KV_{bucket.name}")
        except NotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket.name,
                    description=bucket.description,
                    ttl=float(bucket.ttl_s) or None,
                    direct=True,
                    replicas=replicas,
                )
            )
            continue
        if info.config.allow_direct and info.config.num_replicas == replicas:
            continue
        if update:
            info.config.allow_direct = True
            info.config.num_replicas = replicas
            await js.update_stream(info.config)
        else:
            logger.warning(
                "bucket %s predates direct reads or has %s replicas (configured %d); `llmos streams` (as admin) updates it",
                bucket.name, info.config.num_replicas, replicas,
            )

