"""The `llmos` command reports a platform error as a message with what to do, and fails."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from llmos.v1 import retrieval_pb2, retrieval_pb2_grpc
from llmos_cli.main import main

pytestmark = pytest.mark.unit


class Refusing(retrieval_pb2_grpc.RetrievalServiceServicer):
    def Search(self, request: retrieval_pb2.SearchRequest, context: grpc.ServicerContext) -> retrieval_pb2.SearchResponse:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "role 'user' may not search tenant 'globex'")


@pytest.fixture
def refusing_retrieval() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_a_refused_call_names_the_service_and_what_to_do(
    refusing_retrieval: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMOS_RETRIEVAL_ADDR", refusing_retrieval)
    monkeypatch.setenv("LLMOS_API_KEY", "user-key")
    assert main(["search", "boots", "--tenant", "globex"]) == 1
    err = capsys.readouterr().err
    assert "llmos: retrieval: role 'user' may not search tenant 'globex'" in err
    assert "use a key whose role may" in err
    assert "Traceback" not in err


def test_a_service_that_is_not_running_says_how_to_start_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMOS_RETRIEVAL_ADDR", "127.0.0.1:1")
    monkeypatch.setenv("LLMOS_API_KEY", "any-key")
    assert main(["search", "boots"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmos: retrieval: ") and "llmos up --detach" in err
