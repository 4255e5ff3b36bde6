"""`llmos demo`: start the embedded stack, walk through the main flows, stop it.

Each step calls the public APIs exactly as a user would: gRPC with an API key, then the trace
of the document submission read back from the local span file.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

from llmos.clients import AuditClient, DialogueClient, IngestClient, TokenizerClient
from llmos.settings import PlatformSettings
from llmos.stack import Stack
from llmos.telemetry import SPAN_FILE, read_spans
from llmos.tracetree import render_tree, trace_spans
from llmos.v1 import common_pb2, ingest_pb2
from llmos_cli.browser import console_screenshot, missing_browser
from llmos_cli.client import api_key, connect
from llmos_cli.dialogue import demo_tour
from llmos_cli.speech import print_voice_turn, voice_turn

DEMO_KB = Path(__file__).resolve().parents[2] / "demo" / "kb"
DEMO_QUESTION = DEMO_KB.parent / "voice" / "gift-card-question.wav"
CONSOLE_QUESTION = "Can I return sale items?"
HTTP_QUESTION = "How long is a gift card valid?"


async def _wait_until_indexed(ingest: IngestClient, document_ids: list[str], timeout_s: float = 300.0) -> None:
    """Answers cite what is searchable: wait until every article is embedded and indexed."""
    started = time.monotonic()
    statuses = await ingest.wait_until_settled(document_ids, within_s=timeout_s)
    pending = [document_id for document_id, status in statuses.items() if status.stage != common_pb2.DOCUMENT_STAGE_INDEXED]
    state = f"still not indexed: {', '.join(sorted(pending))}" if pending else "all indexed"
    print(f"  {state} after {time.monotonic() - started:.1f} s")


async def _tour(settings: PlatformSettings) -> None:
    async with connect(settings, TokenizerClient) as tokenizer:
        print("\n== tokenizer: the model's own chat template and token counts")
        templated = await tokenizer.apply_chat_template([("user", "Where is my order NW-204518?")])
        print(templated.prompt.rstrip())
        print(f"-> {templated.token_count} tokens")

    async with connect(settings, IngestClient) as ingest:
        print(f"\n== ingest: the Northwind help centre ({DEMO_KB})")
        for article in sorted(DEMO_KB.glob("*.md")):
            response = await ingest.submit(
                ingest_pb2.SubmitDocumentRequest(
                    document_id=article.stem,
                    title=article.read_text().splitlines()[0].lstrip("# "),
                    mime_type="text/markdown",
                    content=article.read_bytes(),
                    source=f"demo/kb/{article.name}",
                ),
            )
            status = await ingest.status(article.stem)
            stage = common_pb2.DocumentStage.Name(status.stage).removeprefix("DOCUMENT_STAGE_").lower()
            note = "unchanged since last run" if response.unchanged else f"{status.chunk_count} chunks"
            print(f"  {article.stem:<14} {stage:<8} {note}  sha256 {response.content_hash[:12]}")
        await _wait_until_indexed(ingest, [article.stem for article in DEMO_KB.glob("*.md")])

    await demo_tour(settings, api_key(settings))
    await _voice_turn(settings)
    await asyncio.to_thread(_openai_style_call, settings)
    await asyncio.sleep(1.0)  # audit events and spans arrive asynchronously
    async with connect(settings, AuditClient) as audit:
        print("\n== audit: who did what, chained by HMAC-SHA256")
        async for record in audit.query(limit=5):
            event = record.event
            print(f"  #{record.sequence:<3} {event.principal:<8} {event.action:<14} {event.resource:<20} {record.hash[:12]}")
        verdict = await audit.verify()
        print(f"  chain intact: {verdict.intact} ({verdict.records_checked} records)")

    spans = read_spans(settings.telemetry_dir / SPAN_FILE)
    submissions = [span for span in spans if span["name"] == "llmos.v1.IngestService/SubmitDocument"]
    if submissions:
        latest = max(submissions, key=lambda span: span["start_ns"])
        print(f"\n== trace of the last submission ({latest['trace_id']}; `llmos trace --last`)")
        print("\n".join(render_tree(trace_spans(spans, latest["trace_id"]))))
    await _console_screenshot(settings)


async def _voice_turn(settings: PlatformSettings) -> None:
    """A spoken question, streamed in real time as from a microphone; the answer comes back spoken."""
    print(f"\n== voice: a spoken question to DialogueService.Converse ({DEMO_QUESTION.name}, streamed in real time)")
    async with connect(settings, DialogueClient) as dialogue:
        turn = await voice_turn(dialogue, DEMO_QUESTION.read_bytes())
    print_voice_turn(turn)
    answer = settings.home / "demo-answer.wav"
    if turn.sample_rate:
        answer.write_bytes(turn.wav())
        print(f"answer audio: {turn.audio_s:.1f} s -> {answer}")


def _openai_style_call(settings: PlatformSettings) -> None:
    """The assistant over the gateway's OpenAI-compatible API, as any OpenAI client calls it."""
    url = f"http://{settings.gateway_addr}/v1/chat/completions"
    print(f"\n== HTTP gateway: POST {url} (model llmos-assistant)")
    body = {"model": "llmos-assistant", "messages": [{"role": "user", "content": HTTP_QUESTION}]}
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {api_key(settings)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        completion = json.load(response)
    print(f"user> {HTTP_QUESTION}")
    print(f"assistant> {completion['choices'][0]['message']['content']}")
    for citation in completion.get("citations", []):
        print(f"  cites {citation['title']!r} ({citation['document_id']})")


async def _console_screenshot(settings: PlatformSettings) -> None:
    """The web console in a headless browser: signed in, a question answered, the page saved."""
    url = f"http://{settings.gateway_addr}/"
    print(f"\n== web console ({url}): a headless-browser screenshot")
    if reason := missing_browser():
        print(f"  skipped: {reason}")
        return
    path = settings.home / "console.png"
    try:
        await asyncio.to_thread(console_screenshot, url, api_key(settings), CONSOLE_QUESTION, path)
    except RuntimeError as exc:
        print(f"  no screenshot: {exc}")
        return
    print(f"  signed in, asked {CONSOLE_QUESTION!r} -> {path}")


def run_demo(settings: PlatformSettings) -> int:
    stack = Stack(settings)
    print("starting the embedded stack …")
    elapsed = stack.start()
    print(f"the seven services and the gateway SERVING after {elapsed:.1f} s")
    try:
        asyncio.run(_tour(settings))
        time.sleep(0.6)  # let the last spans flush before the trace is read again by a user
    finally:
        print("\nstopping the stack")
        stack.stop()
    return 0
