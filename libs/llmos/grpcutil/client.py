"""Channels to the platform's services, with trace context and credentials attached.

A service's channel to another (`service_channel`) signs every call with the calling service's
key for the principal it is acting for, addressed to the callee (`llmos.assertions`); the API key
its own caller presented stays with it. A tool's channel (`open_channel`) presents the tool's own
API key.
"""

from __future__ import annotations

import grpc

from llmos.assertions import ServiceKeys
from llmos.auth import current_principal
from llmos.grpcutil.interceptors import CallCredentials, client_interceptors
from llmos.settings import PlatformSettings

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


def _channel(addr: str, credentials: CallCredentials) -> grpc.aio.Channel:
    interceptors = client_interceptors(credentials)
    if _transport_credentials is not None:
        return grpc.aio.secure_channel(addr, _transport_credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS, interceptors=interceptors)


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
