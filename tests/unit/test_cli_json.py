"""`llmos … --json` prints one JSON document with the fields a program needs, and the API key
option is spelled `--api-key` on every command that calls the platform.

The commands run in this process against fake services on a real gRPC server."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.settings import SERVICE_NAMES
from llmos.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    events_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from llmos_cli.main import build_parser, main

pytestmark = pytest.mark.unit

KEY = "cli-test-key"
CHUNK = common_pb2.Chunk(
    chunk_id="returns#0", document_id="returns", title="Returns", source="kb/returns.md", tags=["policy"],
    text="Boots may be returned within thirty days.", start_offset=0, end_offset=41,
)


def caller(context: grpc.ServicerContext) -> str:
    return dict(context.invocation_metadata()).get("authorization", "")


class Retrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    def Search(self, request: retrieval_pb2.SearchRequest, context: grpc.ServicerContext) -> retrieval_pb2.SearchResponse:
        assert caller(context) == f"Bearer {KEY}"
        return retrieval_pb2.SearchResponse(hits=[retrieval_pb2.ScoredChunk(chunk=CHUNK, score=0.75)][: request.top_k])


class Ingest(ingest_pb2_grpc.IngestServiceServicer):
    def SubmitDocument(self, request: ingest_pb2.SubmitDocumentRequest, context: grpc.ServicerContext) -> ingest_pb2.SubmitDocumentResponse:
        if request.document_id == "refused":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "content: empty")
        return ingest_pb2.SubmitDocumentResponse(document_id=request.document_id, stage=common_pb2.DOCUMENT_STAGE_RECEIVED)

    def ListDocuments(self, request: ingest_pb2.ListDocumentsRequest, context: grpc.ServicerContext) -> ingest_pb2.ListDocumentsResponse:
        updated = Timestamp(seconds=1_790_000_000)
        return ingest_pb2.ListDocumentsResponse(documents=[
            ingest_pb2.DocumentStatus(document_id="care", tenant="acme", stage=common_pb2.DOCUMENT_STAGE_INDEXED,
                                      chunk_count=4, content_hash="abc", updated_at=updated),
            ingest_pb2.DocumentStatus(document_id="scan", tenant="acme", stage=common_pb2.DOCUMENT_STAGE_FAILED,
                                      reason="no text in the PDF", updated_at=updated),
        ])


class Audit(audit_pb2_grpc.AuditServiceServicer):
    def Query(self, request: audit_pb2.QueryAuditRequest, context: grpc.ServicerContext) -> Iterator[audit_pb2.AuditRecord]:
        if request.page.page_token:
            return
        for sequence, decision in ((1, events_pb2.AUDIT_DECISION_ALLOW), (2, events_pb2.AUDIT_DECISION_DENY)):
            yield audit_pb2.AuditRecord(sequence=sequence, event=events_pb2.AuditEvent(
                event_id=f"e{sequence}", time=Timestamp(seconds=1_790_000_000 + sequence), principal="alice", tenant="acme",
                service="ingest", action=request.action or "llmos.v1.IngestService/SubmitDocument", resource="document/care",
                decision=decision, reason="" if sequence == 1 else "role 'user' may not delete", trace_id="ab" * 16,
            ))


@pytest.fixture
def platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ingest, retrieval and audit answering on one port; the CLI configured to call them."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(Retrieval(), server)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(Ingest(), server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(Audit(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    for name in ("retrieval", "ingest", "audit"):
        monkeypatch.setenv(f"LLMOS_{name.upper()}_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("LLMOS_API_KEY", "")
    yield
    server.stop(None)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, expected_code: int = 0) -> dict[str, object]:
    assert main([*argv, "--json"]) == expected_code
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout is one document


def test_search(platform: None, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(capsys, "search", "boots", "--api-key", KEY)
    assert document["query"] == "boots" and document["mode"] == "hybrid"
    (hit,) = document["results"]
    assert hit == {
        "rank": 1, "score": 0.75, "document_id": "returns", "chunk_id": "returns#0", "title": "Returns", "source": "kb/returns.md",
        "tags": ["policy"], "start_offset": 0, "end_offset": 41, "text": "Boots may be returned within thirty days.",
    }


def test_ingest(platform: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "care.md").write_text("# Care\n\nWax the boots.\n")
    (tmp_path / "refused.txt").write_text("")
    document = run_json(capsys, "ingest", str(tmp_path), "--no-wait", "--api-key", KEY, expected_code=1)
    assert document["documents"] == [
        {"file": str(tmp_path / "care.md"), "document_id": "care", "stage": "received", "error": ""},
        {"file": str(tmp_path / "refused.txt"), "document_id": "refused", "stage": "failed", "error": "InvalidArgument: ingest: content: empty"},
    ]
    assert document["summary"] == {"failed": 1, "received": 1}


def test_docs_list(platform: None, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(capsys, "docs", "list", "--api-key", KEY)
    care, scan = document["documents"]
    assert care == {"document_id": "care", "tenant": "acme", "status": "indexed", "chunk_count": 4, "content_hash": "abc",
                    "updated_at": "2026-09-21T14:13:20Z", "reason": ""}
    assert scan["status"] == "failed" and scan["reason"] == "no text in the PDF"


def test_audit_query(platform: None, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(capsys, "audit", "query", "--action", "llmos.v1.IngestService/DeleteDocument", "--api-key", KEY)
    allowed, denied = document["records"]
    assert allowed == {
        "sequence": 1, "time": "2026-09-21T14:13:21Z", "tenant": "acme", "principal": "alice", "service": "ingest",
        "action": "llmos.v1.IngestService/DeleteDocument", "resource": "document/care", "decision": "allow", "reason": "",
        "trace_id": "ab" * 16, "event_id": "e1",
    }
    assert denied["decision"] == "deny" and denied["reason"] == "role 'user' may not delete"


def test_status_of_a_platform_that_is_not_running(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in SERVICE_NAMES:
        monkeypatch.setenv(f"LLMOS_{name.upper()}_ADDR", "127.0.0.1:1")
    monkeypatch.setenv("LLMOS_NATS_URL", "nats://127.0.0.1:1")
    document = run_json(capsys, "status", expected_code=1)
    assert document["healthy"] is False
    assert [service["name"] for service in document["services"]] == list(SERVICE_NAMES)
    assert all(service["health"].startswith("UNREACHABLE") and service["address"] == "127.0.0.1:1" for service in document["services"])
    assert document["nats"] == {"url": "nats://127.0.0.1:1", "reachable": False} and document["streams"] == []


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:  # noqa: SLF001 - argparse exposes subparsers no other way
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, child in action.choices.items():
                yield from subcommands(child, (*path, name))


def test_one_spelling_of_the_key_option_and_json_where_promised() -> None:
    commands = dict(subcommands(build_parser()))
    options = {path: {flag for action in parser._actions for flag in action.option_strings} for path, parser in commands.items()}  # noqa: SLF001
    assert not [path for path, flags in options.items() if "--key" in flags]
    with_key = {path for path, flags in options.items() if "--api-key" in flags}
    assert {("search",), ("ingest",), ("docs", "list"), ("docs", "delete"), ("audit", "query"), ("chat",), ("ask",)} <= with_key
    for path in (("status",), ("search",), ("ingest",), ("docs", "list"), ("keys", "list"), ("audit", "query")):
        assert "--json" in options[path], path
