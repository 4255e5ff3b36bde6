"""Files and traces (issue 13, item 12).

- LLMOS_HOME is the service user's alone: a real service creates it 0700 and everything it writes
  there (store, spans, metrics) 0600 in 0700 folders, whatever umask it was started with; the
  stack's logs and process file are 0600 too.
- A span's status message and a logged traceback pass the PII redactor like every other field.
- `llmos certs` keeps the CA's private key out of the folder services read, and each certificate
  may do only what its role needs: `client` cannot serve, only the CA signs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from llmos.grpcutil.tls import CLIENT_NAME, TlsFiles, make_certificates
from llmos.redaction import RedactingSpanExporter
from llmos.stack import StackProcess, _spawn, stop_pids, wait_until_serving, write_stack
from llmos.telemetry import JsonlSpanExporter, read_spans
from tests.conftest import NatsServer, _settings_from, platform_environment

pytestmark = pytest.mark.security

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"


def modes(root: Path) -> tuple[set[int], set[int], int]:
    """File modes, folder modes (the root included) and how many files, under `root`."""
    files = [path for path in root.rglob("*") if path.is_file() and not path.is_symlink()]
    folders = [root, *(path for path in root.rglob("*") if path.is_dir() and not path.is_symlink())]
    return {path.stat().st_mode & 0o777 for path in files}, {path.stat().st_mode & 0o777 for path in folders}, len(files)


def test_a_service_keeps_its_home_private(nats_server: NatsServer, tmp_path: Path) -> None:
    """The audit service (a SQLite store, spans, metrics) started from a shell with umask 022 in a
    home that does not exist yet, and in one that exists world-readable."""
    for home in (tmp_path / "fresh" / "home", tmp_path / "existing"):
        if home.name == "existing":
            home.mkdir(mode=0o755)
            home.chmod(0o755)
        env = platform_environment(nats_server, home)
        settings = _settings_from(env)
        log = tmp_path / f"{home.name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.audit"], cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.umask(0o022),
            )
        try:
            wait_until_serving(settings, {"audit": process}, timeout_s=60)
        finally:
            stop_pids([process.pid], timeout_s=15)
        file_modes, folder_modes, count = modes(home)
        assert count >= 2, f"{home}: the service wrote nothing to check; log: {log.read_text()[-2000:]}"
        assert file_modes == {0o600}, f"{home}: file modes {sorted(map(oct, file_modes))}"
        assert folder_modes == {0o700}, f"{home}: folder modes {sorted(map(oct, folder_modes))}"


def test_the_stack_writes_its_logs_and_process_file_private(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        process = _spawn(["true"], tmp_path / "logs" / "nats.log", {"PATH": os.environ["PATH"]})
        process.wait(timeout=10)
        settings = _settings_from(platform_environment(NatsServer("nats://127.0.0.1:4222", 8222, tmp_path), tmp_path))
        write_stack(settings, [StackProcess("nats", process.pid, "nats.log")])
    finally:
        os.umask(previous)
    assert (tmp_path / "logs" / "nats.log").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "run" / "stack.json").stat().st_mode & 0o777 == 0o600


def test_a_span_status_message_is_redacted(tmp_path: Path) -> None:
    path = tmp_path / "telemetry" / "spans.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(JsonlSpanExporter(path))))
    with provider.get_tracer("test").start_as_current_span("lookup", record_exception=False, set_status_on_exception=False) as span:
        span.set_status(Status(StatusCode.ERROR, f"no order for {EMAIL}, card {CARD}"))
    provider.shutdown()
    [record] = read_spans(path)
    assert record["status"] == "ERROR" and record["status_message"].startswith("no order for ")
    assert EMAIL not in record["status_message"] and CARD not in record["status_message"]
    assert EMAIL not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_logged_traceback_is_redacted() -> None:
    """A service's logging as run_service sets it up; an exception whose message (and source
    line) carry personal data, logged with its traceback."""
    program = textwrap.dedent(f"""
        import logging
        from llmos.telemetry import setup_logging
        setup_logging("audit", "INFO")
        try:
            raise ValueError("no customer {EMAIL} with card {CARD}")
        except ValueError:
            logging.getLogger("llmos.test").exception("lookup failed for %s", "{EMAIL}")
        logging.getLogger("llmos.test").warning("where am I", stack_info=True)
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert "Traceback (most recent call last)" in result.stderr and "ValueError: no customer" in result.stderr
    assert "Stack (most recent call last)" in result.stderr
    assert EMAIL not in result.stderr and CARD not in result.stderr, result.stderr


def test_the_ca_key_is_kept_apart_and_reused(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    ca_folder = make_certificates(certs, ("ingest", CLIENT_NAME))
    assert ca_folder.resolve() != certs.resolve()
    assert not [path for path in certs.iterdir() if b"PRIVATE KEY" in path.read_bytes() and path.name.startswith("ca")]
    assert sorted(path.name for path in certs.iterdir()) == ["ca.pem", "client-key.pem", "client.pem", "ingest-key.pem", "ingest.pem"]
    assert (ca_folder / "ca-key.pem").stat().st_mode & 0o777 == 0o600 and ca_folder.stat().st_mode & 0o777 == 0o700
    first_ca = (certs / "ca.pem").read_bytes()
    make_certificates(certs, ("ingest",))  # renewing a certificate keeps the CA services trust
    assert (certs / "ca.pem").read_bytes() == first_ca


def certificate(files: TlsFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.cert.read_bytes())


def test_each_certificate_may_do_only_what_its_role_needs(tmp_path: Path) -> None:
    make_certificates(tmp_path / "certs", ("ingest", CLIENT_NAME))
    service, client = certificate(TlsFiles(tmp_path / "certs", "ingest")), certificate(TlsFiles(tmp_path / "certs", CLIENT_NAME))
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.pem").read_bytes())
    usages = {
        name: set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        for name, cert in (("service", service), ("client", client))
    }
    assert usages == {
        "service": {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
        "client": {ExtendedKeyUsageOID.CLIENT_AUTH},
    }
    for leaf in (service, client):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert key_usage.critical and key_usage.value.digital_signature and not key_usage.value.key_cert_sign
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


async def _serve_and_check(files: TlsFiles, ca: bytes) -> str:
    """Serve health with `files`' certificate; what a client trusting `ca` gets."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(files.key.read_bytes(), files.cert.read_bytes())]))
    await server.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as error:
                return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    finally:
        await server.stop(None)


async def test_the_client_certificate_cannot_serve(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_certificates(certs, ("ingest", CLIENT_NAME))
    ca = (certs / "ca.pem").read_bytes()
    assert await _serve_and_check(TlsFiles(certs, "ingest"), ca) == "SERVING"
    assert await _serve_and_check(TlsFiles(certs, CLIENT_NAME), ca) == "UNAVAILABLE"
