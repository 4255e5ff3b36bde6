"""`llmos demo`: start the embedded stack, walk through the main flows, stop it.

Each step calls the public APIs exactly as a user would: gRPC with an API key, then the trace
of the document submission read back from the local span file.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from llmos.settings import PlatformSettings
from llmos.stack import Stack
from llmos.telemetry import SPAN_FILE, read_spans
from llmos.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    dialogue_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from llmos_cli.client import Metadata, api_key, channel, metadata
from llmos_cli.dialogue import demo_tour
from llmos_cli.speech import print_voice_turn, voice_turn
from llmos_cli.tracetree import render_tree, trace_spans

DEMO_KB = Path(__file__).resolve().parents[2] / "demo" / "kb"
DEMO_QUESTION = DEMO_KB.parent / "voice" / "gift-card-question.wav"


async def _wait_until_indexed(
    ingest: ingest_pb2_grpc.IngestServiceStub, document_ids: list[str], md: Metadata, timeout_s: float = 300.0
) -> None:
    """Answers cite what is searchable: wait until every article is embedded and indexed."""
    started = time.monotonic()
    pending = set(document_ids)
    while pending and time.monotonic() - started < timeout_s:
        for document_id in sorted(pending):
            status = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id=document_id), metadata=md)
            if status.stage == common_pb2.DOCUMENT_STAGE_INDEXED:
                pending.discard(document_id)
        await asyncio.sleep(0.5)
    state = f"still not indexed: {', '.join(sorted(pending))}" if pending else "all indexed"
    print(f"  {state} after {time.monotonic() - started:.1f} s")


async def _tour(settings: PlatformSettings) -> None:
    md = metadata(settings)
    async with channel(settings, "tokenizer") as tokenizer_channel:
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(tokenizer_channel)
        print("\n== tokenizer: the model's own chat template and token counts")
        templated = await tokenizer.ApplyChatTemplate(
            tokenizer_pb2.ApplyChatTemplateRequest(
                messages=[common_pb2.ChatMessage(role="user", content="Where is my order NW-204518?")],
                add_generation_prompt=True,
            ),
            metadata=md,
        )
        print(templated.prompt.rstrip())
        print(f"-> {templated.token_count} tokens")

    async with channel(settings, "ingest") as ingest_channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        print(f"\n== ingest: the Northwind help centre ({DEMO_KB})")
        for article in sorted(DEMO_KB.glob("*.md")):
            response = await ingest.SubmitDocument(
                ingest_pb2.SubmitDocumentRequest(
                    document_id=article.stem,
                    title=article.read_text().splitlines()[0].lstrip("# "),
                    mime_type="text/markdown",
                    content=article.read_bytes(),
                    source=f"demo/kb/{article.name}",
                ),
                metadata=md,
            )
            status = await ingest.GetDocumentStatus(
                ingest_pb2.GetDocumentStatusRequest(document_id=article.stem), metadata=md
            )
            stage = common_pb2.DocumentStage.Name(status.stage).removeprefix("DOCUMENT_STAGE_").lower()
            note = "unchanged since last run" if response.unchanged else f"{status.chunk_count} chunks"
            print(f"  {article.stem:<14} {stage:<8} {note}  sha256 {response.content_hash[:12]}")
        await _wait_until_indexed(ingest, [article.stem for article in DEMO_KB.glob("*.md")], md)

    await demo_tour(settings, api_key(settings))
    await _voice_turn(settings, md)
    await asyncio.sleep(1.0)  # audit events and spans arrive asynchronously
    async with channel(settings, "audit") as audit_channel:
        audit = audit_pb2_grpc.AuditServiceStub(audit_channel)
        print("\n== audit: who did what, chained by SHA-256")
        async for record in audit.Query(audit_pb2.QueryAuditRequest(page=common_pb2.PageRequest(page_size=5)), metadata=md):
            event = record.event
            print(f"  #{record.sequence:<3} {event.principal:<8} {event.action:<14} {event.resource:<20} {record.hash[:12]}")
        verdict = await audit.Verify(audit_pb2.VerifyAuditRequest(), metadata=md)
        print(f"  chain intact: {verdict.intact} ({verdict.records_checked} records)")

    spans = read_spans(settings.telemetry_dir / SPAN_FILE)
    submissions = [span for span in spans if span["name"] == "llmos.v1.IngestService/SubmitDocument"]
    if submissions:
        latest = max(submissions, key=lambda span: span["start_ns"])
        print(f"\n== trace of the last submission ({latest['trace_id']}; `llmos trace --last`)")
        print("\n".join(render_tree(trace_spans(spans, latest["trace_id"]))))


async def _voice_turn(settings: PlatformSettings, md: Metadata) -> None:
    """A spoken question, streamed in real time as from a microphone; the answer comes back spoken."""
    print(f"\n== voice: a spoken question to DialogueService.Converse ({DEMO_QUESTION.name}, streamed in real time)")
    async with channel(settings, "dialogue") as dialogue_channel:
        turn = await voice_turn(dialogue_pb2_grpc.DialogueServiceStub(dialogue_channel), md, DEMO_QUESTION.read_bytes())
    print_voice_turn(turn)
    answer = settings.home / "demo-answer.wav"
    if turn.sample_rate:
        answer.write_bytes(turn.wav())
        print(f"answer audio: {turn.audio_s:.1f} s -> {answer}")


def run_demo(settings: PlatformSettings) -> int:
    stack = Stack(settings)
    print("starting the embedded stack …")
    elapsed = stack.start()
    print(f"seven services SERVING after {elapsed:.1f} s")
    try:
        asyncio.run(_tour(settings))
        time.sleep(0.6)  # let the last spans flush before the trace is read again by a user
    finally:
        print("\nstopping the stack")
        stack.stop()
    return 0
