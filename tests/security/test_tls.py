"""gRPC over mutual TLS with certificates from `llmos certs`: plaintext and certificate-less
callers are refused; services call each other over TLS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmos.grpcutil.tls import TlsFiles, caller_credentials
from llmos.stack import stop_pids, wait_until_serving
from llmos.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import NatsServer, _settings_from, platform_environment
from tests.grpc_helpers import ADMIN

pytestmark = pytest.mark.security

SERVICES = ("ingest", "tokenizer", "audit")


@pytest.fixture(scope="module")
def tls_services(nats_server: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("tls-home")
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    certs = home / "certs"
    subprocess.run([sys.executable, "-m", "llmos_cli.main", "certs", "--out", str(certs)], check=True, capture_output=True)
    env = platform_environment(nats_server, home) | {"LLMOS_TLS_DIR": str(certs), "LLMOS_TLS_MUTUAL": "true"}
    settings = _settings_from(env)
    (home / "logs").mkdir()
    processes = {
        name: subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=home, env=env,
                               stdout=(home / "logs" / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
        for name in SERVICES
    }
    try:
        wait_until_serving(settings, processes, timeout_s=120)
        assert caller_credentials(settings) is not None
        yield env
    finally:
        stop_pids([process.pid for process in processes.values()], timeout_s=15)


async def submit(channel: grpc.aio.Channel) -> ingest_pb2.SubmitDocumentResponse:
    return await ingest_pb2_grpc.IngestServiceStub(channel).SubmitDocument(
        ingest_pb2.SubmitDocumentRequest(document_id="over-tls", content=b"Sent over mutual TLS."), metadata=ADMIN, timeout=10
    )


async def test_a_client_with_a_certificate_is_served_and_services_talk_tls(tls_services: dict[str, str]) -> None:
    files = TlsFiles(Path(tls_services["LLMOS_TLS_DIR"]), "client")
    ca, cert, key = files.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    async with grpc.aio.secure_channel(tls_services["LLMOS_INGEST_ADDR"], credentials) as channel:
        response = await submit(channel)  # ingest asks the tokenizer for tokens, over mutual TLS
    assert response.content_hash


async def test_plaintext_and_certificate_less_callers_are_refused(tls_services: dict[str, str]) -> None:
    async with grpc.aio.insecure_channel(tls_services["LLMOS_INGEST_ADDR"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await submit(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    ca = (Path(tls_services["LLMOS_TLS_DIR"]) / "ca.pem").read_bytes()
    async with grpc.aio.secure_channel(tls_services["LLMOS_INGEST_ADDR"], grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await submit(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
