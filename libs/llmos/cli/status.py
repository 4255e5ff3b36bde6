"""`llmos status`: health of each service, and each stream's messages and consumer lag."""

from __future__ import annotations

import asyncio

import nats
from nats.errors import NoServersError

from llmos.bus.subjects import STREAMS
from llmos.grpcutil.health_probe import check
from llmos.settings import SERVICE_NAMES, PlatformSettings


async def print_status(settings: PlatformSettings) -> int:
    healthy = True
    print(f"{'service':<10} {'address':<22} health")
    for name in SERVICE_NAMES:
        status = await asyncio.to_thread(check, settings.service_addr(name), "", 1.0)
        healthy &= status == "SERVING"
        print(f"{name:<10} {settings.service_addr(name):<22} {status}")
    try:
        connection = await nats.connect(settings.nats_url, connect_timeout=2, max_reconnect_attempts=0)
    except (NoServersError, OSError):
        print(f"\nnats: unreachable at {settings.nats_url}")
        return 1
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
