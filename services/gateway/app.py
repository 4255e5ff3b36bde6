"""How the gateway is assembled and run: the bus (API keys, audit), a channel and typed client
per service, the core, the HTTP app on uvicorn; stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn

from llmos.bus.broker import Bus
from llmos.clients import AuditClient, DialogueClient, InferenceClient, IngestClient, RetrievalClient, SpeechClient
from llmos.grpcutil.client import service_channel, use_transport_credentials
from llmos.grpcutil.tls import caller_credentials
from llmos.keys import KeyAuthenticator, KeyStore, parse_static_keys
from llmos.secrets import refuse_published_values
from llmos.settings import SettingsError, load_settings, private_home
from llmos.telemetry import setup_logging, setup_telemetry
from services.gateway.auditing import SERVICE, GatewayAudit
from services.gateway.console import add_console
from services.gateway.core import Clients, GatewayCore
from services.gateway.http import create_app
from services.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)


async def serve(settings: GatewaySettings) -> None:
    bus = Bus(
        settings.nats_url, SERVICE, settings.max_deliveries, settings.nats_user, settings.nats_password,
        replicas=settings.jetstream_replicas,
    )
    await bus.start()
    authenticator = KeyAuthenticator(parse_static_keys(settings.api_keys), await KeyStore.open(bus.jetstream))
    # The command-line client's certificate when TLS is on: `llmos certs` makes one per gRPC service and one for clients.
    use_transport_credentials(caller_credentials(settings))
    # Each call acts for the request's caller: signed by the gateway for that principal (llmos.assertions).
    channels = {name: service_channel(settings, SERVICE, name) for name in ("inference", "dialogue", "speech", "retrieval", "ingest", "audit")}
    clients = Clients(
        InferenceClient(channels["inference"]),
        DialogueClient(channels["dialogue"]),
        SpeechClient(channels["speech"]),
        RetrievalClient(channels["retrieval"]),
        IngestClient(channels["ingest"]),
        AuditClient(channels["audit"]),
    )
    core = GatewayCore(
        clients, settings.gateway_assistant_model, settings.gateway_timeout_s, settings.gateway_models_ttl_s, settings.gateway_max_audio_s
    )
    audit = GatewayAudit(bus)
    app = create_app(settings, core, authenticator, audit)
    add_console(app, settings, audit)
    port = int(settings.gateway_addr.rpartition(":")[2])
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.bind_host, port=port, log_config=None, access_log=False, lifespan="off",
                       timeout_graceful_shutdown=int(settings.shutdown_grace_s))
    )
    logger.info("gateway serving on http://%s:%d", settings.bind_host, port)
    try:
        await server.serve()
    finally:
        for channel in channels.values():
            await channel.close()
        await bus.close()


def run_gateway() -> None:
    """Entry point of `python -m services.gateway`."""
    try:
        settings = load_settings(GatewaySettings)
        refuse_published_values(settings)
    except SettingsError as exc:
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        sys.exit(2)
    private_home(settings.home)
    setup_logging(SERVICE, settings.log_level)
    telemetry = setup_telemetry(SERVICE, settings)
    try:
        asyncio.run(serve(settings))
    except SettingsError as exc:
        # A missing or mismatched signing key of the gateway: one line, no traceback.
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        telemetry.shutdown()
