"""Channels to the platform's services, with trace context and credentials attached.

A service's channel to another (`service_channel`) signs every call with the calling service's
key for the principal it is acting for, addressed to the callee (`llmos.assertions`); the API key
its own caller presented stays with it. A tool's channel (`open_channel`) presents the tool's own
API key.
"""

from __future__ import annotations

import json

import grpc

from llmos.assertions import ServiceKeys
from llmos.auth import current_principal
from llmos.grpcutil.interceptors import CallCredentials, client_interceptors
from llmos.settings import PlatformSettings

# Large enough for a batch of embeddings or a document; matches the server's limit.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# Calls that change nothing, or nothing a second time, so gRPC may send them again to another
# replica when one was UNAVAILABLE before answering. Not SubmitDocument, DeleteDocument, Chat,
# Converse, Summarize, EndSession (a turn or a deletion must not happen twice) nor client streams.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "llmos.v1.TokenizerService": (),  # every method
    "llmos.v1.InferenceService": (),
    "llmos.v1.RetrievalService": (),
    "llmos.v1.AuditService": (),
    "llmos.v1.IngestService": ("GetDocumentStatus", "ListDocuments"),
    "llmos.v1.DialogueService": ("GetSession",),
    "llmos.v1.SpeechService": ("Recognize", "Synthesize", "SynthesizeStream", "ListVoices"),
}
# Every channel balances its calls over all the addresses its target resolves to (the replicas
# listed in LLMOS_<SERVICE>_ADDR, or a name's DNS records) instead of gRPC's default pick_first,
# and retries an idempotent call on UNAVAILABLE, which a replica gone away answers. A call
# whose response has begun (a stream that sent tokens) is never retried: it ends UNAVAILABLE.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                {"service": service, **({"method": method} if method else {})}
                for service, methods in IDEMPOTENT_METHODS.items()
                for method in (methods or ("",))
            ],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
# A replica that went away (a restart, a crash) is dialled again after a back-off that grows
# 1.6x per refused attempt up to this: gRPC's default (120 s, reached after a minute down) left
# a replica that was back unused for tens of seconds, and a rolling restart then stopped the
# other replica while the clients still knew no ready one (issue 16, item 3).
RECONNECT_BACKOFF_MS = (100, 1000)  # first, longest
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
)


# The transport security of this process's outgoing calls, set once at start (None: plaintext).
_transport_credentials: grpc.ChannelCredentials | None = None


def use_transport_credentials(credentials: grpc.ChannelCredentials | None) -> None:
    global _transport_credentials
    _transport_credentials = credentials


def bearer(api_key: str) -> str:
    return f"Bearer {api_key}"


def channel_target(addr: str) -> str:
    """The gRPC target of an address setting: HOST:PORT as is, a list of replicas
    `IPv4:PORT,IPv4:PORT` as one `ipv4:` target gRPC balances over (llmos.settings)."""
    return f"ipv4:{addr}" if "," in addr else addr


def _channel(addr: str, credentials: CallCredentials) -> grpc.aio.Channel:
    interceptors = client_interceptors(credentials)
    target = channel_target(addr)
    if _transport_credentials is not None:
        return grpc.aio.secure_channel(target, _transport_credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)


def open_channel(addr: str, api_key: str = "") -> grpc.aio.Channel:
    """A tool's channel (TLS when configured): its calls present `api_key` when given."""
    authorization = bearer(api_key) if api_key else None
    return _channel(addr, lambda: authorization)


def service_channel(settings: PlatformSettings, caller: str, callee: str) -> grpc.aio.Channel:
    """`caller`'s channel to the service `callee` (TLS when configured). Each call carries an
    assertion signed by `caller` for the principal being served (or the bus event's tenant),
    valid for `callee` only and for seconds; a call made for no principal fails with
    Unauthenticated before it is sent. A missing or mismatched key stops the service at start."""
    signer = ServiceKeys.from_settings(settings).signer(caller)
    return _channel(settings.service_addr(callee), lambda: signer.authorization(current_principal(), callee))
