"""Encryption at rest: dialogue session state in the JetStream KV and chunk text in the Qdrant
index are stored sealed (AES-GCM with a key id per record); JetStream itself encrypts the
messages waiting in streams (submitted documents) when `llmos up` has a key. A plaintext control written the same
way proves each disk check can see stored data, so the sealed check can fail."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from llmos.bus.broker import declare_buckets
from llmos.bus.kv import NatsBucket
from llmos.crypto import AtRest, Sealer, new_key_entry
from llmos.errors import FailedPrecondition
from llmos.ports import tenant_key
from llmos.settings import PlatformSettings, SettingsError
from llmos.stack import nats_command, port_open
from llmos.v1 import dialogue_pb2, retrieval_pb2
from services.dialogue.sessions import SESSIONS_BUCKET, SessionStore, StoredSession
from services.retrieval.core import RetrievalCore
from services.retrieval.index import ChunkFilter, EdgeIndex, IndexedChunk, SealedTextIndex
from services.retrieval.sparse import Bm25Encoder
from tests.conftest import NatsServer, free_port
from tests.unit.test_retrieval_core import DIMENSIONS, LIMITS, WordEmbedder, embedded, memory_profiles

pytestmark = pytest.mark.security

OLD_KEY = new_key_entry("2025")
NEW_KEY = new_key_entry("2026")


def at_rest(*entries: str) -> AtRest:
    return AtRest(Sealer.from_spec(",".join(entries)), "test store") if entries else AtRest(None, "test store")


def files_containing(folder: Path, needle: bytes) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and needle in path.read_bytes()]


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


# -- chunk text in the index -----------------------------------------------------------------


def indexed(tenant: str, document_id: str, text: str) -> list[IndexedChunk]:
    return [
        IndexedChunk(item.chunk, "v1", 1.0, list(item.vector), Bm25Encoder(256.0).document(item.chunk.text))
        for item in embedded(tenant, document_id, [text]).chunks
    ]


def open_core(folder: Path, sealing: AtRest) -> RetrievalCore:
    index = SealedTextIndex(EdgeIndex(folder, DIMENSIONS, 256.0), sealing)
    return RetrievalCore(index, Bm25Encoder(256.0), WordEmbedder(), memory_profiles(), DIMENSIONS, LIMITS)


async def test_chunk_text_is_sealed_on_disk_and_search_still_finds_it(tmp_path: Path) -> None:
    marker = f"zebracorn{uuid.uuid4().hex[:8]}"
    text = f"The {marker} refund policy allows returns within thirty days."
    for name, sealing in (("plain", at_rest()), ("sealed", at_rest(NEW_KEY))):
        core = open_core(tmp_path / name, sealing)
        await core.index_embedded(embedded("acme", "policy", [text, "Shipping takes four days."]))
        for mode in (retrieval_pb2.SEARCH_MODE_DENSE, retrieval_pb2.SEARCH_MODE_SPARSE, retrieval_pb2.SEARCH_MODE_HYBRID):
            response = await core.search("acme", retrieval_pb2.SearchRequest(query=f"{marker} refund policy", mode=mode))
            assert response.hits[0].chunk.text == text
        document = await core.get_document("acme", retrieval_pb2.GetDocumentRequest(document_id="policy"))
        assert document.chunks[0].text == text
        core.close()
    assert files_containing(tmp_path / "plain", marker.encode()), "the control must show chunk text on disk"
    assert not files_containing(tmp_path / "sealed", marker.encode())


def test_rotation_old_chunks_open_new_chunks_use_the_new_key(tmp_path: Path) -> None:
    engine = EdgeIndex(tmp_path / "edge", DIMENSIONS, 256.0)
    SealedTextIndex(engine, at_rest(OLD_KEY)).upsert(indexed("acme", "before", "text of before"))
    rotated = SealedTextIndex(engine, at_rest(NEW_KEY, OLD_KEY))
    rotated.upsert(indexed("acme", "after", "text of after"))
    opened = {hit.chunk.document_id: hit.chunk.text for hit in rotated.chunks(ChunkFilter("acme"))}
    assert opened == {"before": "text of before", "after": "text of after"}
    raw = {hit.chunk.document_id: base64.b64decode(hit.chunk.text) for hit in engine.chunks(ChunkFilter("acme"))}
    assert Sealer.key_id_of(raw["before"]) == "2025" and Sealer.key_id_of(raw["after"]) == "2026"
    retired = SealedTextIndex(engine, at_rest(NEW_KEY))
    with pytest.raises(FailedPrecondition, match="key '2025'.*not configured"):
        retired.chunks(ChunkFilter("acme", document_ids=("before",)))
    assert [hit.chunk.text for hit in retired.chunks(ChunkFilter("acme", document_ids=("after",)))] == ["text of after"]
    engine.close()


def test_sealed_text_moved_to_another_tenant_does_not_open(tmp_path: Path) -> None:
    engine = EdgeIndex(tmp_path / "edge", DIMENSIONS, 256.0)
    sealed = SealedTextIndex(engine, at_rest(NEW_KEY))
    sealed.upsert(indexed("acme", "doc", "acme secret"))
    (stolen,) = engine.chunks(ChunkFilter("acme"), with_vectors=True)
    stolen.chunk.tenant = "globex"  # the ciphertext copied as is into a globex point
    engine.upsert([IndexedChunk(stolen.chunk, "v1", 1.0, stolen.vector or [], Bm25Encoder(256.0).document("x"))])
    with pytest.raises(FailedPrecondition, match="fails authentication: it was altered, or copied"):
        sealed.chunks(ChunkFilter("globex"))
    engine.close()


# -- dialogue session state in the KV --------------------------------------------------------


async def test_session_state_is_sealed_in_the_kv_and_on_disk(nats_server: NatsServer) -> None:
    connection = await nats.connect(nats_server.url)
    try:
        await declare_buckets(connection.jetstream())  # as the services declare it
        bucket = await connection.jetstream().key_value(SESSIONS_BUCKET)
        sessions = NatsBucket(SESSIONS_BUCKET, lambda: connection.jetstream().key_value(SESSIONS_BUCKET))
        marker = f"order NW-{uuid.uuid4().int % 10**8:08d} for quokka{uuid.uuid4().hex[:6]}"
        control = f"control quokka{uuid.uuid4().hex[:6]}"
        plain = SessionStore(sessions, 600, at_rest())
        await plain.put(StoredSession(dialogue_pb2.Session(session_id=f"plain-{uuid.uuid4()}", tenant="acme", summary=control), 0))
        sealing = SessionStore(sessions, 600, at_rest(OLD_KEY))
        session_id = f"s-{uuid.uuid4()}"
        await sealing.put(StoredSession(dialogue_pb2.Session(session_id=session_id, tenant="acme", summary=marker), 0))

        assert (await sealing.get("acme", session_id)).session.summary == marker
        raw = (await bucket.get(tenant_key("acme", session_id))).value or b""
        assert marker.encode() not in raw and Sealer.key_id_of(raw) == "2025"
        assert await eventually(lambda: bool(files_containing(nats_server.store, control.encode()))), "control on disk"
        assert not files_containing(nats_server.store, marker.encode())

        # Rotation: a new key first; the old entry opens, and its next write uses the new key.
        rotated = SessionStore(sessions, 600, at_rest(NEW_KEY, OLD_KEY))
        stored = await rotated.get("acme", session_id)
        assert stored.session.summary == marker
        await rotated.put(stored)
        raw = (await bucket.get(tenant_key("acme", session_id))).value or b""
        assert Sealer.key_id_of(raw) == "2026"

        # A record under a key that is no longer configured fails with a clear error.
        old_only = SessionStore(sessions, 600, at_rest(OLD_KEY))
        with pytest.raises(FailedPrecondition, match="key '2026', which is not configured"):
            await old_only.get("acme", session_id)
        # And encrypted state is never read as plaintext by a store without keys.
        with pytest.raises(FailedPrecondition, match="encrypted"):
            await plain.get("acme", session_id)
    finally:
        await connection.close()


# -- without keys ----------------------------------------------------------------------------


def test_without_keys_a_store_refuses_plaintext_unless_settings_allow_it(caplog: pytest.LogCaptureFixture) -> None:
    base = {"nats_url": "nats://127.0.0.1:1", **{f"{s}_addr": "127.0.0.1:1" for s in ("ingest", "tokenizer", "inference", "retrieval", "speech", "dialogue", "audit")}}
    with pytest.raises(SettingsError, match="LLMOS_ENCRYPTION_KEYS.*LLMOS_PLAINTEXT_AT_REST"):
        AtRest.from_settings(PlatformSettings(**base, encryption_keys="", _env_file=None), "dialogue session state")
    allowed = AtRest.from_settings(PlatformSettings(**base, encryption_keys="", plaintext_at_rest=True, _env_file=None), "sessions")
    assert allowed.key_id == "" and "PLAINTEXT" in caplog.text
    sealed = AtRest.from_settings(PlatformSettings(**base, encryption_keys=NEW_KEY, _env_file=None), "sessions")
    assert sealed.key_id == "2026"


# -- messages waiting in JetStream (llmos up) ------------------------------------------------


async def test_llmos_up_encrypts_jetstream_when_a_key_is_set(tmp_path: Path) -> None:
    marker = f"raw document body {uuid.uuid4().hex}"
    for name, key in (("plain", ""), ("encrypted", "a-jetstream-key-of-at-least-32-bytes!")):
        port = free_port()
        process = subprocess.Popen(
            nats_command(tmp_path / name / "jetstream", "127.0.0.1", port, free_port(), jetstream_key=key),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            assert await eventually(lambda: port_open("127.0.0.1", port) or process.poll() is not None)
            connection = await nats.connect(f"nats://127.0.0.1:{port}")
            js = connection.jetstream()
            await js.add_stream(name="INGEST", subjects=["llmos.ingest.>"])
            await js.publish("llmos.ingest.requested", marker.encode())
            await connection.close()
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert files_containing(tmp_path / "plain", marker.encode()), "the control must show the document on disk"
    assert not files_containing(tmp_path / "encrypted", marker.encode())
