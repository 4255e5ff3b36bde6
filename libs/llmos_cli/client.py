"""How command-line tools call the services: which API key, a channel that follows TLS, and the
service's typed client (`llmos.clients`) over it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from llmos.clients import Metadata, ServiceClient
from llmos.grpcutil.client import CHANNEL_OPTIONS, bearer, channel_target
from llmos.grpcutil.tls import caller_credentials
from llmos.settings import PlatformSettings

Client = TypeVar("Client", bound=ServiceClient)


def api_key(settings: PlatformSettings, explicit: str = "") -> str:
    """`--api-key`, else LLMOS_API_KEY, else the first administrator key of the local configuration."""
    if explicit or settings.api_key:
        return explicit or settings.api_key
    for entry in settings.api_keys.split(","):
        key, _, identity = entry.strip().partition("=")
        if "admin" in identity.rpartition(":")[2].split("|"):
            return key
    raise RuntimeError("no API key: pass --api-key or set LLMOS_API_KEY (issue one with `llmos keys create`)")


def metadata(settings: PlatformSettings, explicit_key: str = "") -> Metadata:
    return (("authorization", bearer(api_key(settings, explicit_key))),)


def channel(settings: PlatformSettings, service: str) -> grpc.aio.Channel:
    """A channel to `service` as configured: TLS with the `client` certificate when LLMOS_TLS_DIR is set."""
    credentials = caller_credentials(settings)
    addr = channel_target(settings.service_addr(service))  # a list of replicas: balanced over them
    if credentials is not None:
        return grpc.aio.secure_channel(addr, credentials, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)


@asynccontextmanager
async def connect(settings: PlatformSettings, client: type[Client], key: str = "") -> AsyncIterator[Client]:
    """The client of one service, calling with `key` (see `api_key`), its channel closed on leaving."""
    credentials = metadata(settings, key)
    async with channel(settings, client.service) as service_channel:
        yield client(service_channel, credentials)
