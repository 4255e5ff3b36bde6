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


def bearer(api_key: str) -> str:
    return f"Bearer {api_key}"


def open_channel(addr: str, service_api_key: str = "") -> grpc.aio.Channel:
    """An insecure channel to `addr`; calls carry the caller's credentials or the service's key."""
    return grpc.aio.insecure_channel(
        addr,
        options=CHANNEL_OPTIONS,
        interceptors=client_interceptors(bearer(service_api_key) if service_api_key else None),
    )
