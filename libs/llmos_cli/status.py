"""`llmos status`: health of each service, and each stream's messages and consumer lag."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlparse

from llmos.bus.subjects import STREAMS
from llmos.grpcutil.health_probe import check
from llmos.grpcutil.tls import caller_credentials
from llmos.natsauth import connect_cli
from llmos.settings import SERVICE_NAMES, PlatformSettings
from llmos.stack import port_open
from llmos_cli.output import print_json, print_table


async def _quiet(error: Exception) -> None:
    """Connection errors are reported once, below, not as a traceback."""


async def _streams(settings: PlatformSettings) -> list[dict[str, Any]]:
    """Each stream's message count and its consumers' lag."""
    connection = await asyncio.wait_for(connect_cli(settings, error_cb=_quiet), timeout=5)
    try:
        js = connection.jetstream()
        streams = []
        for spec in STREAMS:
            info = await js.stream_info(spec.name)
            consumers = await js.consumers_info(spec.name)
            streams.append({
                "name": spec.name,
                "messages": info.state.messages,
                "consumers": [
                    {"name": consumer.name, "pending": consumer.num_pending, "ack_pending": consumer.num_ack_pending}
                    for consumer in consumers
                ],
            })
        return streams
    finally:
        await connection.close()


async def platform_status(settings: PlatformSettings) -> dict[str, Any]:
    """The services' health, whether NATS answers, and the streams when it does."""
    services = []
    for name in SERVICE_NAMES:
        health = await asyncio.to_thread(check, settings.service_addr(name), "", 1.0, caller_credentials(settings))
        services.append({"name": name, "address": settings.service_addr(name), "health": health})
    url = urlparse(settings.nats_url)
    # nats-py keeps retrying a refused first connection, so look before connecting.
    reachable = port_open(url.hostname or "127.0.0.1", url.port or 4222)
    return {
        "healthy": reachable and all(service["health"] == "SERVING" for service in services),
        "services": services,
        "nats": {"url": settings.nats_url, "reachable": reachable},
        "streams": await _streams(settings) if reachable else [],
    }


async def print_status(settings: PlatformSettings, as_json: bool = False) -> int:
    status = await platform_status(settings)
    if as_json:
        print_json(status)
        return 0 if status["healthy"] else 1
    print_table(["service", "address", "health"], [[s["name"], s["address"], s["health"]] for s in status["services"]])
    if not status["nats"]["reachable"]:
        print(f"nats: unreachable at {settings.nats_url}")
        return 1
    print_table(["stream", "messages", "consumer (pending / waiting for ack)"], [
        [stream["name"], str(stream["messages"]),
         ", ".join(f"{c['name']} {c['pending']}/{c['ack_pending']}" for c in stream["consumers"]) or "-"]
        for stream in status["streams"]
    ])
    return 0 if status["healthy"] else 1
