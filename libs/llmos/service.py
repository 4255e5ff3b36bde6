"""The life of one service process: settings, telemetry, bus, gRPC server, health, shutdown.

A service describes itself with a `ServiceDefinition`; `run_service` does the rest in the same
order everywhere: read settings (failing fast), set up telemetry, build the service's core and
its transports, connect to NATS and declare streams, start gRPC, report SERVING once ready, and
on SIGTERM or SIGINT report NOT_SERVING, drain gRPC and the bus, and flush telemetry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmos.assertions import ServiceKeys
from llmos.bus.broker import Bus, Subscription
from llmos.bus.subjects import audit_subject
from llmos.grpcutil.client import MAX_MESSAGE_BYTES, use_transport_credentials
from llmos.grpcutil.interceptors import ServerInterceptor
from llmos.grpcutil.quotas import QuotaLimits, quota_interceptors
from llmos.grpcutil.tls import TlsFiles, caller_credentials, server_credentials
from llmos.keys import KeyAuthenticator, KeyStore, parse_static_keys
from llmos.secrets import refuse_published_values
from llmos.settings import PlatformSettings, SettingsError, SettingsT, load_settings, private_home
from llmos.telemetry import setup_logging, setup_telemetry
from llmos.v1 import events_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcBinding:
    """A servicer and the generated function that registers it, e.g. `add_XServicer_to_server`."""

    full_name: str  # e.g. "llmos.v1.TokenizerService", for health and reflection
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]

    @classmethod
    def of(cls, module: Any, service_name: str, servicer: Any, add_to_server: Callable[[Any, grpc.aio.Server], None]) -> GrpcBinding:
        """Bind `servicer` as `service_name` of a generated `*_pb2` module."""
        return cls(module.DESCRIPTOR.services_by_name[service_name].full_name, servicer, add_to_server)


@dataclass
class ServiceParts:
    """What a service's factory builds: its gRPC servicers, bus handlers and clean-up."""

    grpc: Sequence[GrpcBinding]
    subscriptions: Sequence[Subscription[Any]] = ()
    # Subjects whose durable consumer is declared but not consumed yet (handler not built).
    reserved_subjects: Sequence[str] = ()
    close: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class ServiceDefinition(Generic[SettingsT]):
    name: str
    settings_type: type[SettingsT]
    # Builds the core (loading models, opening stores) and its transports. It may publish
    # through the bus once the service runs, but must not use it while building.
    build: Callable[[SettingsT, Bus], Awaitable[ServiceParts]]


class ServiceProcess(Generic[SettingsT]):
    """A running service; `start` and `stop` are separate so tests can run one in-process."""

    def __init__(self, definition: ServiceDefinition[SettingsT], settings: SettingsT) -> None:
        self.definition = definition
        self.settings = settings
        self.bus = Bus(
            settings.nats_url, definition.name, settings.max_deliveries, settings.nats_user, settings.nats_password,
            replicas=settings.jetstream_replicas,
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.parts: ServiceParts | None = None
        self.port = 0

    async def start(self) -> None:
        name = self.definition.name
        # Before the service builds its clients, so that they dial over TLS when configured.
        use_transport_credentials(caller_credentials(self.settings, name))
        self.parts = await self.definition.build(self.settings, self.bus)
        for subscription in self.parts.subscriptions:
            self.bus.subscribe(subscription)
        await self.bus.start()
        for subject in self.parts.reserved_subjects:
            await self.bus.reserve(subject)
        authenticator = KeyAuthenticator(
            parse_static_keys(self.settings.api_keys),
            await KeyStore.open(self.bus.jetstream),
            ServiceKeys.from_settings(self.settings).verifier(name),
        )
        limits = QuotaLimits.from_settings(self.settings)
        server_limit, principal_quotas = quota_interceptors(limits)
        self.server = grpc.aio.server(
            interceptors=[server_limit, ServerInterceptor(name, authenticator, self._publish_audit_event), principal_quotas],
            options=(
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ),
            maximum_concurrent_rpcs=limits.grpc_maximum_concurrent_rpcs,
        )
        for binding in self.parts.grpc:
            binding.add_to_server(binding.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names = [binding.full_name for binding in self.parts.grpc]
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        listen = self.settings.listen_addr(name)
        if self.settings.tls_dir:
            files = TlsFiles(self.settings.tls_dir, name)
            self.port = self.server.add_secure_port(listen, server_credentials(files, self.settings.tls_mutual))
        else:
            self.port = self.server.add_insecure_port(listen)
        if not self.port:
            raise RuntimeError(f"{name}: cannot listen on {self.settings.listen_addr(name)}")
        await self.server.start()
        # Ready: models loaded, bus connected, server listening.
        for service_name in ("", *service_names):
            await self.health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("%s serving on %s", name, self.settings.listen_addr(name))

    async def _publish_audit_event(self, event: events_pb2.AuditEvent) -> None:
        await self.bus.publish(audit_subject(self.definition.name), event, msg_id=event.event_id)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_s)
        await self.bus.close()
        if self.parts is not None and self.parts.close is not None:
            await self.parts.close()


async def _serve(definition: ServiceDefinition[SettingsT], settings: SettingsT) -> None:
    process = ServiceProcess(definition, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await process.start()
    await stop.wait()
    logger.info("%s stopping", definition.name)
    await process.stop()


def run_service(definition: ServiceDefinition[SettingsT]) -> None:
    """Entry point of `python -m services.<name>`."""
    try:
        settings = load_settings(definition.settings_type)
        refuse_published_values(settings)
    except SettingsError as exc:
        print(f"{definition.name}: {exc}", file=sys.stderr)
        sys.exit(2)
    private_home(settings.home)
    setup_logging(definition.name, settings.log_level)
    telemetry = setup_telemetry(definition.name, settings)
    try:
        asyncio.run(_serve(definition, settings))
    except SettingsError as exc:
        # Raised while the parts are built (e.g. no encryption keys for data at rest): one line, no traceback.
        print(f"{definition.name}: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        telemetry.shutdown()
