"""`llmos status`: health of each service's replicas, and each stream's messages and consumer lag.

A service's replicas are the addresses its setting lists (LLMOS_<SERVICE>_ADDR, `A,B`), joined by
those the stack running under LLMOS_HOME recorded for it when the setting names one of them: after
`llmos up --cluster` the one-machine settings (each service's first replica) show every replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from llmos.bus.subjects import STREAMS
from llmos.grpcutil.health_probe import check
from llmos.grpcutil.tls import caller_credentials
from llmos.natsauth import connect_cli
from llmos.settings import SERVICE_NAMES, PlatformSettings
from llmos.stack import StackProcess, port_open, read_stack
from llmos_cli.output import print_json, print_table


async def _quiet(error: Exception) -> None:
    """Connection errors are reported once, below, not as a traceback."""


def _recorded(running: Sequence[StackProcess], kind: str) -> list[str]:
    return [process.address for process in running if process.service == kind and process.address]


def replica_addresses(settings: PlatformSettings, running: Sequence[StackProcess]) -> dict[str, list[str]]:
    """Each service's replicas: its setting's list, and the running stack's replicas of it when
    the setting names one of them."""
    addresses = {}
    for name in SERVICE_NAMES:
        configured = [addr.strip() for addr in settings.service_addr(name).split(",")]
        recorded = _recorded(running, name)
        extra = [addr for addr in recorded if addr not in configured] if set(configured) & set(recorded) else []
        addresses[name] = configured + extra
    return addresses


def nats_urls(settings: PlatformSettings, running: Sequence[StackProcess]) -> list[str]:
    """LLMOS_NATS_URL, and the other nodes of the running cluster it is a node of."""
    recorded = _recorded(running, "nats")
    return [settings.nats_url, *(url for url in recorded if url != settings.nats_url)] if settings.nats_url in recorded else [settings.nats_url]


async def _streams(settings: PlatformSettings, url: str) -> list[dict[str, Any]]:
    """Each stream's message count and its consumers' lag, asked of the node at `url`."""
    connection = await asyncio.wait_for(connect_cli(settings.model_copy(update={"nats_url": url}), error_cb=_quiet), timeout=5)
    try:
        js = connection.jetstream()
        streams = []
        for spec in STREAMS:
            info = await js.stream_info(spec.name)
            consumers = await js.consumers_info(spec.name)
            streams.append({
                "name": spec.name,
                "messages": info.state.messages,
                "replicas": info.config.num_replicas or 1,
                "consumers": [
                    {"name": consumer.name, "pending": consumer.num_pending, "ack_pending": consumer.num_ack_pending}
                    for consumer in consumers
                ],
            })
        return streams
    finally:
        await connection.close()


def service_health(replicas: Sequence[dict[str, str]]) -> str:
    """One word for a service: SERVING when every replica serves, DEGRADED when some do, else
    what its first replica answered."""
    serving = sum(replica["health"] == "SERVING" for replica in replicas)
    if serving == len(replicas):
        return "SERVING"
    return "DEGRADED" if serving else replicas[0]["health"]


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    return port_open(parsed.hostname or "127.0.0.1", parsed.port or 4222)


async def platform_status(settings: PlatformSettings) -> dict[str, Any]:
    """Each service's replicas' health, whether NATS answers, and the streams when it does."""
    running = read_stack(settings)
    credentials = caller_credentials(settings)
    services = []
    for name, addresses in replica_addresses(settings, running).items():
        healths = await asyncio.gather(*(asyncio.to_thread(check, addr, "", 1.0, credentials) for addr in addresses))
        replicas = [{"address": addr, "health": health} for addr, health in zip(addresses, healths, strict=True)]
        services.append({"name": name, "address": ",".join(addresses), "health": service_health(replicas), "replicas": replicas})
    # nats-py keeps retrying a refused first connection, so look before connecting.
    nodes = [{"url": url, "reachable": _reachable(url)} for url in nats_urls(settings, running)]
    reachable = [node["url"] for node in nodes if node["reachable"]]
    nats: dict[str, Any] = {"url": settings.nats_url, "reachable": bool(reachable)}
    if len(nodes) > 1:
        nats["nodes"] = nodes
    every_replica = all(replica["health"] == "SERVING" for service in services for replica in service["replicas"])
    return {
        "healthy": len(reachable) == len(nodes) and every_replica,
        "services": services,
        "nats": nats,
        "streams": await _streams(settings, str(reachable[0])) if reachable else [],
    }


def service_rows(services: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per replica: the service named on its first."""
    return [
        [service["name"] if index == 0 else "", replica["address"], replica["health"]]
        for service in services
        for index, replica in enumerate(service["replicas"])
    ]


async def print_status(settings: PlatformSettings, as_json: bool = False) -> int:
    status = await platform_status(settings)
    if as_json:
        print_json(status)
        return 0 if status["healthy"] else 1
    print_table(["service", "address", "health"], service_rows(status["services"]))
    nodes = status["nats"].get("nodes", [status["nats"]])
    down = [node["url"] for node in nodes if not node["reachable"]]
    if down:
        print(f"nats: unreachable at {', '.join(down)}")
    if len(down) == len(nodes):
        return 1
    if len(nodes) > 1:
        print(f"nats: a cluster of {len(nodes)} nodes, {len(nodes) - len(down)} reachable")
    print_table(["stream", "messages", "replicas", "consumer (pending / waiting for ack)"], [
        [stream["name"], str(stream["messages"]), str(stream["replicas"]),
         ", ".join(f"{c['name']} {c['pending']}/{c['ack_pending']}" for c in stream["consumers"]) or "-"]
        for stream in status["streams"]
    ])
    return 0 if status["healthy"] else 1
