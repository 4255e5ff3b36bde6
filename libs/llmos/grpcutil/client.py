"""Channels to other services of the platform, with trace context and credentials attached."""

from __future__ import annotations

import grpc

from llmos.grpcutil.interceptors import client_interceptors

# Large enough for a batch of embeddings or a document; matches the server's limit.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


# The transport security of this process's outgoing calls, set once at start (None: plaintext).
_transport_credentials: grpc.ChannelCredentials | None = None


def use_transport_credentials(credentials: grpc.ChannelCredentials | None) -> None:
    global _transport_credentials
    _transport_credentials = credentials


def bearer(api_key: str) -> str:
    return f"Bearer {api_key}"


def open_channel(addr: str, service_api_key: str = "") -> grpc.aio.Channel:
    """A channel to another service (TLS when configured); calls carry the caller's credentials
    or the service's own key."""
    interceptors = client_interceptors(bearer(service_api_key) if service_api_key else None)
    if _transport_credentials is not None:
        return grpc.aio.secure_channel(addr, _transport_credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS, interceptors=interceptors)
