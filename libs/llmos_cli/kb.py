"""Knowledge-base commands: `llmos ingest PATH...`, `llmos search "query"` and
`llmos eval retrieval --data DIR`, all through the running platform's public APIs.

The evaluation sends a BEIR-style corpus through IngestService into a throwaway tenant, waits
for `llmos.docs.indexed` on the bus, runs every query through RetrievalService.Search in each
mode and scores documents by their best chunk: nDCG@10 and recall@100 beside published figures.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from llmos.bus.follow import follow, last_sequence
from llmos.bus.subjects import DOCS_EVENTS, DOCS_FAILED, DOCS_INDEXED
from llmos.clients import IngestClient, RetrievalClient
from llmos.errors import LlmosError
from llmos.natsauth import connect_cli
from llmos.settings import PlatformSettings, load_settings
from llmos.v1 import common_pb2, events_pb2, ingest_pb2, retrieval_pb2
from llmos_cli.client import connect
from llmos_cli.output import (
    ProgressBar,
    ProgressBars,
    add_api_key_option,
    add_json_option,
    print_json,
    print_table,
    progress_bars,
)

T = TypeVar("T")
MIME_TYPES = {
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}
MODES = {
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
    "dense": retrieval_pb2.SEARCH_MODE_DENSE,
    "sparse": retrieval_pb2.SEARCH_MODE_SPARSE,
}
PRIORITIES = {
    "interactive": common_pb2.PRIORITY_INTERACTIVE,
    "standard": common_pb2.PRIORITY_STANDARD,
    "batch": common_pb2.PRIORITY_BATCH,
}
# Published SciFact nDCG@10 (BEIR test split), printed beside ours.
REFERENCE_NDCG10 = {"sparse": ("BM25 (BEIR)", 0.665), "dense": ("all-MiniLM-L6-v2", 0.65), "hybrid": ("Qdrant hybrid RRF", 0.718)}
RPC_TIMEOUT_S = 60.0


async def bounded(items: Sequence[T], concurrency: int, work: Callable[[T], Awaitable[object]]) -> list[object]:
    """Run `work` over `items` with at most `concurrency` in flight; results in input order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: T) -> object:
        async with gate:
            return await work(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def bus_position(settings: PlatformSettings) -> int:
    """The last sequence of the DOCS stream: events after it are ours to watch."""
    connection = await connect_cli(settings)
    try:
        return await last_sequence(connection.jetstream(), DOCS_INDEXED)
    finally:
        await connection.close()


@dataclass
class Outcome:
    indexed: set[str]
    failed: dict[str, str]


async def watch_documents(
    settings: PlatformSettings, tenant: str, document_ids: Iterable[str], after_seq: int, timeout_s: float, progress: ProgressBar | None
) -> Outcome:
    """Follow `docs.indexed` / `docs.failed` from `after_seq` until every document is settled."""
    pending = set(document_ids)
    outcome = Outcome(set(), {})
    if not pending:
        return outcome
    connection = await connect_cli(settings)
    try:
        async with asyncio.timeout(timeout_s):
            async for message in follow(connection.jetstream(), DOCS_EVENTS, after_seq):
                event: events_pb2.DocumentIndexed | events_pb2.DocumentFailed
                if message.subject == DOCS_INDEXED:
                    event = events_pb2.DocumentIndexed.FromString(message.data)
                elif message.subject == DOCS_FAILED:
                    event = events_pb2.DocumentFailed.FromString(message.data)
                else:
                    continue
                if event.tenant != tenant or event.document_id not in pending:
                    continue
                pending.discard(event.document_id)
                if isinstance(event, events_pb2.DocumentFailed):
                    outcome.failed[event.document_id] = event.reason
                else:
                    outcome.indexed.add(event.document_id)
                if progress:
                    progress.advance()
                if not pending:
                    break
    except TimeoutError:
        pass  # what is still pending is reported as not indexed in time
    finally:
        await connection.close()
    for document_id in pending:
        outcome.failed[document_id] = f"not indexed within {timeout_s:.0f} s"
    return outcome


# llmos ingest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileDocument:
    path: Path
    document_id: str
    mime_type: str


def collect_files(paths: Sequence[str]) -> list[FileDocument]:
    """Supported files under `paths`; ids are paths relative to the folder given, without suffix."""
    found: list[FileDocument] = []
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in MIME_TYPES)
            found += [FileDocument(p, p.relative_to(given).with_suffix("").as_posix(), MIME_TYPES[p.suffix.lower()]) for p in files]
        elif given.is_file():
            if given.suffix.lower() not in MIME_TYPES:
                raise RuntimeError(f"{given}: unsupported file type; accepted: {', '.join(sorted(MIME_TYPES))}")
            found.append(FileDocument(given, given.stem, MIME_TYPES[given.suffix.lower()]))
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    return found


def _title(document: FileDocument) -> str:
    if document.mime_type == "text/markdown":
        for line in document.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return document.path.stem.replace("-", " ").replace("_", " ").capitalize()


async def _ingest(args: argparse.Namespace, settings: PlatformSettings) -> int:
    documents = collect_files(args.paths)
    if not documents:
        print("no supported files found", file=sys.stderr)
        return 1
    start_seq = await bus_position(settings) if args.wait else 0
    async with connect(settings, IngestClient, args.api_key) as ingest:
        with progress_bars() as bars:
            rows, tenant = await _submit_and_watch(args, settings, ingest, documents, start_seq, bars)
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row[2]] = counts.get(row[2], 0) + 1
    ordered = sorted(rows.values())
    if args.json:
        print_json({
            "tenant": tenant,
            "documents": [{"file": file, "document_id": document_id, "stage": stage, "error": error}
                          for file, document_id, stage, error in ordered],
            "summary": dict(sorted(counts.items())),
        })
    else:
        print_table(["file", "document", "stage", "error"], ordered)
        print("summary: " + ", ".join(f"{count} {stage}" for stage, count in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


async def _submit_and_watch(
    args: argparse.Namespace, settings: PlatformSettings, ingest: IngestClient, documents: Sequence[FileDocument],
    start_seq: int, bars: ProgressBars,
) -> tuple[dict[str, list[str]], str]:
    """Submit every file (`concurrency` at once), then with `--wait` follow them until indexed or
    failed; a row per document (file, id, stage, error), and the tenant they went to."""
    rows: dict[str, list[str]] = {}
    tenant = args.tenant
    progress = bars.bar("submitted", len(documents))

    async def submit(document: FileDocument) -> None:
        try:
            response = await ingest.submit(
                ingest_pb2.SubmitDocumentRequest(
                    tenant=args.tenant, document_id=document.document_id, title=_title(document),
                    mime_type=document.mime_type, content=document.path.read_bytes(), source=str(document.path),
                    tags=args.tag, priority=PRIORITIES[args.priority],
                ),
                timeout_s=RPC_TIMEOUT_S,
            )
            stage = "unchanged" if response.unchanged else common_pb2.DocumentStage.Name(response.stage).removeprefix("DOCUMENT_STAGE_").lower()
            rows[document.document_id] = [str(document.path), document.document_id, stage, ""]
        except LlmosError as exc:  # this file is reported failed; the others go on
            rows[document.document_id] = [str(document.path), document.document_id, "failed", f"{type(exc).__name__}: {exc.message}"]
        progress.advance()

    await bounded(documents, args.concurrency, submit)
    waiting = [doc for doc, row in rows.items() if row[2] not in ("failed", "unchanged")]
    if args.wait and waiting:
        if not tenant:
            tenant = (await ingest.status(waiting[0], timeout_s=RPC_TIMEOUT_S)).tenant
        outcome = await watch_documents(settings, tenant, waiting, start_seq, args.timeout, bars.bar("indexed", len(waiting)))
        for document_id in outcome.indexed:
            rows[document_id][2] = "indexed"
        for document_id, reason in outcome.failed.items():
            rows[document_id][2:] = ["failed", reason]
    return rows, tenant


def cmd_ingest(args: argparse.Namespace) -> int:
    return asyncio.run(_ingest(args, load_settings(PlatformSettings)))


# llmos search ------------------------------------------------------------------------------


async def _search(args: argparse.Namespace, settings: PlatformSettings) -> int:
    async with connect(settings, RetrievalClient, args.api_key) as retrieval:
        hits = await retrieval.search(
            args.tenant, args.query, args.top_k, RPC_TIMEOUT_S, MODES[args.mode],
            search_filter=retrieval_pb2.SearchFilter(document_ids=args.document, tags=args.tag, sources=args.source),
        )
    if args.json:
        print_json({"query": args.query, "mode": args.mode, "results": [
            {"rank": rank, "score": hit.score, "document_id": hit.chunk.document_id, "chunk_id": hit.chunk.chunk_id,
             "title": hit.chunk.title, "source": hit.chunk.source, "tags": list(hit.chunk.tags),
             "start_offset": hit.chunk.start_offset, "end_offset": hit.chunk.end_offset, "text": hit.chunk.text}
            for rank, hit in enumerate(hits, start=1)
        ]})
        return 0
    rows = []
    for rank, hit in enumerate(hits, start=1):
        snippet = " ".join(hit.chunk.text.split())
        rows.append([str(rank), f"{hit.score:.4f}", hit.chunk.document_id, hit.chunk.title,
                     f"{hit.chunk.start_offset}-{hit.chunk.end_offset}", snippet[:80] + ("…" if len(snippet) > 80 else "")])
    if not rows:
        print("no results")
        return 0
    print_table(["#", "score", "document", "title", "chars", "text"], rows)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    return asyncio.run(_search(args, load_settings(PlatformSettings)))


# llmos docs list | delete ------------------------------------------------------------------

STAGES = {common_pb2.DocumentStage.Name(value).removeprefix("DOCUMENT_STAGE_").lower(): value
          for value in common_pb2.DocumentStage.values() if value}


async def _docs_list(args: argparse.Namespace, settings: PlatformSettings) -> int:
    async with connect(settings, IngestClient, args.api_key) as ingest:
        statuses = [status async for status in ingest.documents(
            tenant=args.tenant, stage=STAGES[args.status] if args.status else common_pb2.DOCUMENT_STAGE_UNSPECIFIED,
            include_deleted=args.deleted, timeout_s=RPC_TIMEOUT_S,
        )]
    rows = []
    for status in statuses:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(status.updated_at.seconds)) if status.HasField("updated_at") else ""
        rows.append([status.document_id, _stage_name(status.stage), str(status.chunk_count), updated, status.reason])
    if args.json:
        print_json({"documents": [
            {"document_id": status.document_id, "tenant": status.tenant, "status": _stage_name(status.stage),
             "chunk_count": status.chunk_count, "content_hash": status.content_hash,
             "updated_at": status.updated_at.ToJsonString() if status.HasField("updated_at") else None, "reason": status.reason}
            for status in statuses
        ]})
        return 0
    if not rows:
        print("no documents")
        return 0
    print_table(["document", "status", "chunks", "updated (UTC)", "reason"], rows)
    return 0


def _stage_name(stage: common_pb2.DocumentStage.ValueType) -> str:
    return common_pb2.DocumentStage.Name(stage).removeprefix("DOCUMENT_STAGE_").lower()


async def _docs_delete(args: argparse.Namespace, settings: PlatformSettings) -> int:
    async with connect(settings, IngestClient, args.api_key) as ingest:
        for document_id in args.documents:
            deleted = await ingest.delete(document_id, tenant=args.tenant, timeout_s=RPC_TIMEOUT_S)
            print(f"{document_id}: {'deleted' if deleted else 'was already deleted'}")
    return 0


def cmd_docs_list(args: argparse.Namespace) -> int:
    return asyncio.run(_docs_list(args, load_settings(PlatformSettings)))


def cmd_docs_delete(args: argparse.Namespace) -> int:
    return asyncio.run(_docs_delete(args, load_settings(PlatformSettings)))


# llmos eval retrieval ----------------------------------------------------------------------


def ndcg_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    """nDCG@k with graded gains (BEIR's definition: gain = relevance, log2 discount)."""
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    positives = {doc for doc, grade in relevant.items() if grade > 0}
    return len(positives & set(ranked[:k])) / len(positives) if positives else 0.0


def documents_by_best_chunk(hits: Iterable[retrieval_pb2.ScoredChunk]) -> list[str]:
    """Document ids in the order of their best-ranked chunk."""
    return list(dict.fromkeys(hit.chunk.document_id for hit in hits))


@dataclass(frozen=True)
class BeirData:
    corpus: list[dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(folder: Path) -> BeirData:
    for name in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: a BEIR folder has corpus.jsonl, queries.jsonl and qrels.tsv")
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    all_queries = {
        str(q["_id"]): q["text"]
        for q in map(json.loads, (folder / "queries.jsonl").read_text(encoding="utf-8").splitlines()) if q
    }
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qrels.tsv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return BeirData(corpus, queries, qrels)


async def _eval_retrieval(args: argparse.Namespace, settings: PlatformSettings) -> int:
    data = load_beir(Path(args.data))
    queries = dict(list(data.queries.items())[: args.max_queries or None])
    tenant = f"eval-{uuid.uuid4().hex[:8]}"
    print(f"{args.data}: {len(data.corpus)} documents, {len(queries)} queries; throwaway tenant {tenant}")
    start_seq = await bus_position(settings)
    started = time.perf_counter()
    async with connect(settings, IngestClient, args.api_key) as ingest, connect(settings, RetrievalClient, args.api_key) as retrieval:
        with progress_bars() as bars:
            submitted = bars.bar("submitted", len(data.corpus))
            watcher = asyncio.create_task(
                watch_documents(settings, tenant, [str(doc["_id"]) for doc in data.corpus], start_seq, args.timeout,
                                bars.bar("indexed", len(data.corpus)) if args.verbose else None)
            )

            async def submit(document: dict[str, str]) -> None:
                # BEIR's convention for dense and sparse models alike: title, then text.
                content = "\n\n".join(part for part in (document.get("title", ""), document.get("text", "")) if part)
                await ingest.submit(
                    ingest_pb2.SubmitDocumentRequest(
                        tenant=tenant, document_id=str(document["_id"]), title=document.get("title", ""),
                        content=content.encode("utf-8"), mime_type="text/plain", priority=common_pb2.PRIORITY_BATCH,
                    ),
                    timeout_s=RPC_TIMEOUT_S,
                )
                submitted.advance()

            try:
                await bounded(data.corpus, args.concurrency, submit)
                outcome = await watcher
                ingest_s = time.perf_counter() - started
                print(f"indexed {len(outcome.indexed)} of {len(data.corpus)} documents in {ingest_s:.0f} s "
                      f"({len(outcome.indexed) / ingest_s:.1f} documents/s); {len(outcome.failed)} failed")
                results: dict[str, dict[str, float]] = {}
                for mode in args.modes:
                    progress = bars.bar(mode, len(queries))

                    async def run_query(item: tuple[str, str], mode: str = mode, progress: ProgressBar = progress) -> tuple[str, list[str]]:
                        query_id, text = item
                        hits = await retrieval.search(tenant, text, args.top_chunks, RPC_TIMEOUT_S, MODES[mode])
                        progress.advance()
                        return query_id, documents_by_best_chunk(hits)

                    ranked = dict(await bounded(list(queries.items()), args.concurrency, run_query))  # type: ignore[arg-type]
                    results[mode] = {
                        "ndcg@10": sum(ndcg_at_k(ranked[q], data.qrels[q], 10) for q in queries) / len(queries),
                        "recall@100": sum(recall_at_k(ranked[q], data.qrels[q], 100) for q in queries) / len(queries),
                    }
            finally:
                if not args.keep:
                    await bounded(
                        data.corpus, args.concurrency,
                        lambda doc: _delete_quietly(ingest, tenant, str(doc["_id"])),
                    )
    rows = [
        [mode, f"{r['ndcg@10']:.3f}", f"{r['recall@100']:.3f}", REFERENCE_NDCG10[mode][0], f"{REFERENCE_NDCG10[mode][1]:.3f}"]
        for mode, r in results.items()
    ]
    print()
    print_table(["mode", "nDCG@10", "recall@100", "reference", "ref nDCG@10"], rows)
    print("references: BEIR SciFact test split; ours on the queries in --data (see its PROVENANCE.md)")
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"data": str(args.data), "documents": len(data.corpus), "queries": len(queries), "indexed": len(outcome.indexed),
             "ingest_seconds": ingest_s, "results": results, "references": REFERENCE_NDCG10}, indent=2))
    return 0


async def _delete_quietly(ingest: IngestClient, tenant: str, document_id: str) -> None:
    try:
        await ingest.delete(document_id, tenant=tenant)
    except LlmosError:
        pass  # a document that never made it in has nothing to delete


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    return asyncio.run(_eval_retrieval(args, load_settings(PlatformSettings)))


def register(commands: argparse._SubParsersAction, evals: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ingest = commands.add_parser("ingest", help="submit files or folders to the knowledge base")
    ingest.add_argument("paths", nargs="+", help=f"files or folders ({', '.join(sorted(MIME_TYPES))})")
    ingest.add_argument("--tenant", default="", help="administrators only: another tenant")
    ingest.add_argument("--tag", action="append", default=[], help="tag every document (repeatable)")
    ingest.add_argument("--priority", choices=sorted(PRIORITIES), default="standard")
    ingest.add_argument("--concurrency", type=int, default=4)
    ingest.add_argument("--no-wait", dest="wait", action="store_false", help="return once submitted, before indexing")
    ingest.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for indexing")
    add_api_key_option(add_json_option(ingest))
    ingest.set_defaults(run=cmd_ingest)

    search = commands.add_parser("search", help="search the knowledge base")
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--mode", choices=list(MODES), default="hybrid")
    search.add_argument("--tenant", default="")
    search.add_argument("--document", action="append", default=[], help="only these document ids (repeatable)")
    search.add_argument("--tag", action="append", default=[], help="only chunks with any of these tags (repeatable)")
    search.add_argument("--source", action="append", default=[], help="only these sources (repeatable)")
    add_api_key_option(add_json_option(search))
    search.set_defaults(run=cmd_search)

    docs = commands.add_parser("docs", help="the knowledge base's documents").add_subparsers(dest="docs_command", required=True)
    listing = docs.add_parser("list", help="every document with its status, in id order")
    listing.add_argument("--status", choices=list(STAGES), help="only documents in this status (default: all but deleted)")
    listing.add_argument("--deleted", action="store_true", help="list deleted documents too")
    listing.add_argument("--tenant", default="", help="administrators only: another tenant")
    add_api_key_option(add_json_option(listing))
    listing.set_defaults(run=cmd_docs_list)
    delete = docs.add_parser("delete", help="remove documents and their chunks")
    delete.add_argument("documents", nargs="+", help="document ids")
    delete.add_argument("--tenant", default="", help="administrators only: another tenant")
    add_api_key_option(delete)
    delete.set_defaults(run=cmd_docs_delete)

    retrieval = evals.add_parser("retrieval", help="nDCG@10 and recall@100 on a BEIR folder, through ingest and Search")
    retrieval.add_argument("--data", required=True, help="folder with corpus.jsonl, queries.jsonl, qrels.tsv")
    retrieval.add_argument("--modes", nargs="+", choices=list(MODES), default=["sparse", "dense", "hybrid"])
    retrieval.add_argument("--max-queries", type=int, default=0, help="0: every query with judgements")
    retrieval.add_argument("--top-chunks", type=int, default=300, help="chunks per Search (enough for 100 documents)")
    retrieval.add_argument("--concurrency", type=int, default=8)
    retrieval.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the corpus to be indexed")
    retrieval.add_argument("--keep", action="store_true", help="leave the throwaway tenant's documents in place")
    retrieval.add_argument("--output", default="", help="also write the figures to this JSON file")
    retrieval.add_argument("--verbose", action="store_true", help="show indexing progress")
    add_api_key_option(retrieval, "API key of an administrator (it names the throwaway tenant)")
    retrieval.set_defaults(run=cmd_eval_retrieval)
