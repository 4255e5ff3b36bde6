"""`llmos status`: health of each service, and each stream's messages and consumer lag."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse


from llmos.bus.subjects import STREAMS
from llmos.grpcutil.health_probe import check
from llmos.grpcutil.tls import caller_credentials
from llmos.natsauth import connect_cli
from llmos.settings import SERVICE_NAMES, PlatformSettings
from llmos.stack import port_open


async def _quiet(error: Exception) -> None:
    """Connection errors are reported once, below, not as a traceback."""


async def print_status(settings: PlatformSettings) -> int:
    healthy = True
    print(f"{'service':<10} {'address':<22} health")
    for name in SERVICE_NAMES:
        status = await asyncio.to_thread(check, settings.service_addr(name), "", 1.0, caller_credentials(settings))
        healthy &= status == "SERVING"
        print(f"{name:<10} {settings.service_addr(name):<22} {status}")
    url = urlparse(settings.nats_url)
    # nats-py keeps retrying a refused first connection, so look before connecting.
    if not port_open(url.hostname or "127.0.0.1", url.port or 4222):
        print(f"\nnats: unreachable at {settings.nats_url}")
        return 1
    connection = await asyncio.wait_for(connect_cli(settings, error_cb=_quiet), timeout=5)
    try:
        js = connection.jetstream()
        print(f"\n{'stream':<9} {'messages':>9}  consumer (pending / waiting for ack)")
        for spec in STREAMS:
            info = await js.stream_info(spec.name)
            consumers = await js.consumers_info(spec.name)
            lag = ", ".join(
                f"{consumer.name} {consumer.num_pending}/{consumer.num_ack_pending}" for consumer in consumers
            )
            print(f"{spec.name:<9} {info.state.messages:>9}  {lag or '-'}")
    finally:
        await connection.close()
    return 0 if healthy else 1
