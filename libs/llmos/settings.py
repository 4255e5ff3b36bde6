"""Typed settings from the environment.

Every setting is an environment variable named `LLMOS_<FIELD>`; the repository's `.env` is the
map of ports and addresses and is read when present in the working directory. Environment
variables win over `.env`. Missing or malformed settings stop the process at start with one line
per problem, naming the variable to set.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TypeVar

from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_NAMES: tuple[str, ...] = (
    "ingest",
    "tokenizer",
    "inference",
    "retrieval",
    "speech",
    "dialogue",
    "audit",
)
# The HTTP gateway: a process of the platform like the gRPC services above (bus user, audit,
# `llmos up`), serving HTTP on LLMOS_GATEWAY_ADDR instead of gRPC.
GATEWAY = "gateway"
ENV_PREFIX = "LLMOS_"
# nats-server refuses more replicas of a stream than this.
MAX_JETSTREAM_REPLICAS = 5


class ExecutionProvider(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class SettingsError(RuntimeError):
    """Raised when the environment does not describe a runnable configuration."""


def _check_addr(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def _check_replica_addrs(value: str) -> str:
    """HOST:PORT, or the replicas of a service as IPv4:PORT,IPv4:PORT,… (a client balances its
    calls over them, llmos.grpcutil.client); replicas behind one name are one HOST:PORT (DNS)."""
    addrs = value.split(",")
    for addr in addrs:
        _check_addr(addr)
        if len(addrs) > 1 and not _is_ipv4(addr.rpartition(":")[0]):
            raise ValueError(f"a list of replicas takes IPv4:PORT entries (gRPC's ipv4: target), got {addr!r}")
    return value


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(part.isdigit() and int(part) < 256 for part in parts)


class PlatformSettings(BaseSettings):
    """Settings every process of the platform shares."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    home: Path = Path(".llmos")
    nats_url: str
    nats_monitor_port: int = 8222
    # NATS user of this process; empty when the server has no authorization configured.
    nats_user: str = ""
    nats_password: str = ""
    bind_host: str = "127.0.0.1"
    # The port this process serves gRPC on when its service's address lists several replicas
    # (each replica its own); 0: the port of LLMOS_<SERVICE>_ADDR.
    listen_port: int = 0
    ingest_addr: str
    tokenizer_addr: str
    inference_addr: str
    retrieval_addr: str
    speech_addr: str
    dialogue_addr: str
    audit_addr: str
    # The HTTP gateway (services/gateway): OpenAI-compatible API, REST and the web console.
    gateway_addr: str = "127.0.0.1:8080"
    # Prometheus text of each process's metrics (GET /metrics) on HOST:PORT; empty: not served.
    ingest_metrics_addr: str = ""
    tokenizer_metrics_addr: str = ""
    inference_metrics_addr: str = ""
    retrieval_metrics_addr: str = ""
    speech_metrics_addr: str = ""
    dialogue_metrics_addr: str = ""
    audit_metrics_addr: str = ""
    gateway_metrics_addr: str = ""
    qdrant_url: str = ""
    # Also read from OTEL_EXPORTER_OTLP_ENDPOINT when empty (llmos.telemetry.otlp_endpoint).
    otlp_endpoint: str = ""
    log_level: str = "INFO"
    execution_provider: ExecutionProvider = ExecutionProvider.AUTO
    api_keys: str = ""
    # The key command-line tools present (`llmos audit`, `llmos search`, …).
    api_key: str = ""
    # Ed25519 keys services sign their calls to each other with (llmos.assertions), `service:key,…`;
    # a service uses its own entry, so give each only its own (`llmos keys service-keys`).
    service_signing_keys: str = ""
    # The public key of every service that calls others, `service:key,…` (not secret).
    service_public_keys: str = ""
    # Keys sealing data at rest (AES-GCM), `key_id:base64key,...`; the first one seals.
    encryption_keys: str = ""
    # Without encryption keys, services refuse to store session state and document text unless
    # this accepts plaintext (a throwaway setup); they warn at start when it does.
    plaintext_at_rest: bool = False
    # Key nats-server encrypts JetStream data with under `llmos up` (documents waiting in INGEST,
    # chunk text in CHUNKS, KV buckets). Changing or losing it makes the stored streams unreadable.
    jetstream_key: str = ""
    # gRPC over TLS when set: a folder made by `llmos certs` (ca.pem, <service>.pem, …).
    tls_dir: Path | None = None
    # With TLS, also require client certificates signed by the CA (mutual TLS).
    tls_mutual: bool = False
    # Development mode: published development secrets (.env's keys) are accepted, and `llmos up`
    # warns; outside it a service refuses them (llmos.secrets).
    dev: bool = False
    # A bus message that fails this many times goes to the dead-letter subject.
    max_deliveries: int = 3
    # Copies JetStream keeps of each stream and KV bucket: 1 on one nats-server, 3 (or 5) in a
    # cluster, where a stream survives the loss of a minority of its servers. At most the number
    # of servers; `llmos streams` brings existing streams and buckets to it.
    jetstream_replicas: PositiveInt = 1
    # How long a service waits for in-flight work when asked to stop.
    shutdown_grace_s: float = 5.0
    # Limits of every gRPC server (llmos.grpcutil.quotas): calls served at once; calls and client
    # streams (Converse, StreamingRecognize) one principal may have in flight; a client stream's
    # longest life; the back-off a refusal asks for (grpc-retry-pushback-ms).
    max_concurrent_rpcs: PositiveInt = 256
    principal_max_calls: PositiveInt = 64
    principal_max_streams: PositiveInt = 4
    max_stream_s: PositiveFloat = 900.0
    quota_retry_after_s: NonNegativeFloat = 1.0

    @field_validator(*(f"{name}_addr" for name in SERVICE_NAMES))
    @classmethod
    def _valid_service_addr(cls, value: str) -> str:
        return _check_replica_addrs(value)

    @field_validator("gateway_addr")
    @classmethod
    def _valid_addr(cls, value: str) -> str:
        return _check_addr(value)

    @field_validator("listen_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 <= value < 65536:
            raise ValueError("expected a port, 1 to 65535 (0: the port of the service's address)")
        return value

    @field_validator(*(f"{name}_metrics_addr" for name in (*SERVICE_NAMES, GATEWAY)))
    @classmethod
    def _valid_metrics_addr(cls, value: str) -> str:
        return _check_addr(value) if value else value

    @field_validator("jetstream_replicas")
    @classmethod
    def _jetstream_replicas(cls, value: int) -> int:
        if value > MAX_JETSTREAM_REPLICAS:
            raise ValueError(f"JetStream keeps at most {MAX_JETSTREAM_REPLICAS} replicas of a stream")
        return value

    @field_validator("max_deliveries")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    def service_addr(self, service: str) -> str:
        """The HOST:PORT clients dial to reach `service`."""
        if service not in SERVICE_NAMES:
            raise KeyError(f"unknown service {service!r}; known: {', '.join(SERVICE_NAMES)}")
        return str(getattr(self, f"{service}_addr"))

    def listen_addr(self, service: str) -> str:
        """The address `service` binds: its port (LLMOS_LISTEN_PORT when set) on `bind_host`."""
        addrs = self.service_addr(service).split(",")
        if not self.listen_port and len(addrs) > 1:
            raise SettingsError(
                f"LLMOS_{service.upper()}_ADDR lists {len(addrs)} replicas: set LLMOS_LISTEN_PORT to this replica's port"
            )
        port = self.listen_port or addrs[0].rpartition(":")[2]
        return f"{self.bind_host}:{port}"

    def metrics_listen_addr(self, process: str) -> str:
        """The address `process` (a service or the gateway) serves Prometheus metrics on: its
        metrics port on `bind_host`; empty when LLMOS_<PROCESS>_METRICS_ADDR is not set."""
        addr = str(getattr(self, f"{process}_metrics_addr", ""))
        return f"{self.bind_host}:{addr.rpartition(':')[2]}" if addr else ""

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def telemetry_dir(self) -> Path:
        return self.home / "telemetry"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"


SettingsT = TypeVar("SettingsT", bound=PlatformSettings)


def private_home(home: Path) -> Path:
    """Keep LLMOS_HOME to this user: the folder 0700 (tightened when it exists), and from now on
    every file this process or its children (nats-server) create 0600 and every folder 0700, so
    stores, logs, spans and databases written by libraries are private too."""
    os.umask(0o077)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if home.stat().st_mode & 0o077:
        home.chmod(0o700)
    return home


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Read `cls` from the environment, or fail with a message naming each variable to fix."""
    try:
        return cls()  # type: ignore[call-arg]  # fields come from the environment
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            variable = ENV_PREFIX + field.upper()
            reason = "is required but not set" if error["type"] == "missing" else error["msg"]
            problems.append(f"  {variable} {reason}")
        raise SettingsError(
            "invalid configuration (set these in the environment or in .env):\n"
            + "\n".join(problems)
        ) from None
