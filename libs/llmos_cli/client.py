"""How command-line tools call the services: which API key, and a channel that follows TLS."""

from __future__ import annotations

import grpc

from llmos.grpcutil.client import CHANNEL_OPTIONS, bearer
from llmos.grpcutil.tls import caller_credentials
from llmos.settings import PlatformSettings

Metadata = tuple[tuple[str, str], ...]


def api_key(settings: PlatformSettings, explicit: str = "") -> str:
    """`--key`, else LLMOS_API_KEY, else the first administrator key of the local configuration."""
    if explicit or settings.api_key:
        return explicit or settings.api_key
    for entry in settings.api_keys.split(","):
        key, _, identity = entry.strip().partition("=")
        if "admin" in identity.rpartition(":")[2].split("|"):
            return key
    raise RuntimeError("no API key: pass --key or set LLMOS_API_KEY (issue one with `llmos keys create`)")


def metadata(settings: PlatformSettings, explicit_key: str = "") -> Metadata:
    return (("authorization", bearer(api_key(settings, explicit_key))),)


def channel(settings: PlatformSettings, service: str) -> grpc.aio.Channel:
    """A channel to `service` as configured: TLS with the `client` certificate when LLMOS_TLS_DIR is set."""
    credentials = caller_credentials(settings)
    addr = settings.service_addr(service)
    if credentials is not None:
        return grpc.aio.secure_channel(addr, credentials, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
