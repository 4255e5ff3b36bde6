"""Replication as configuration (issue 16, item 1): LLMOS_JETSTREAM_REPLICAS and the Qdrant
collection layout are typed settings that fail fast, and reach what they configure (the real
three-node cluster is tests/integration/test_replication.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js.api import StreamConfig
from qdrant_client.http.exceptions import UnexpectedResponse

from llmos.bus.broker import declare_streams
from llmos.bus.subjects import BUCKETS, STREAMS
from llmos.settings import PlatformSettings, SettingsError, load_settings
from services.retrieval import index as index_module
from services.retrieval.index import ClientIndex, CollectionLayout
from services.retrieval.settings import RetrievalSettings
from tests.unit.test_audit_limits import JetStream

pytestmark = pytest.mark.unit


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """The repository's .env addresses, nothing else of this machine's LLMOS_ variables."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    for name in ("LLMOS_JETSTREAM_REPLICAS", "LLMOS_QDRANT_SHARD_NUMBER", "LLMOS_QDRANT_REPLICATION_FACTOR",
                 "LLMOS_QDRANT_WRITE_CONSISTENCY_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    return monkeypatch


def test_one_replica_by_default_and_three_in_a_cluster(environment: pytest.MonkeyPatch) -> None:
    assert load_settings(PlatformSettings).jetstream_replicas == 1
    environment.setenv("LLMOS_JETSTREAM_REPLICAS", "3")
    assert load_settings(PlatformSettings).jetstream_replicas == 3


@pytest.mark.parametrize(("value", "reason"), [("0", "greater than 0"), ("6", "at most 5 replicas"), ("three", "integer")])
def test_a_replica_count_jetstream_cannot_keep_stops_the_process(
    environment: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    environment.setenv("LLMOS_JETSTREAM_REPLICAS", value)
    with pytest.raises(SettingsError, match=rf"LLMOS_JETSTREAM_REPLICAS .*{reason}"):
        load_settings(PlatformSettings)


def test_qdrant_layout_from_settings(environment: pytest.MonkeyPatch) -> None:
    assert load_settings(RetrievalSettings).qdrant_layout == CollectionLayout(1, 1, 1)
    environment.setenv("LLMOS_QDRANT_SHARD_NUMBER", "6")
    environment.setenv("LLMOS_QDRANT_REPLICATION_FACTOR", "3")
    environment.setenv("LLMOS_QDRANT_WRITE_CONSISTENCY_FACTOR", "2")
    assert load_settings(RetrievalSettings).qdrant_layout == CollectionLayout(6, 3, 2)


def test_writes_needing_more_replicas_than_kept_are_refused(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("LLMOS_QDRANT_REPLICATION_FACTOR", "2")
    environment.setenv("LLMOS_QDRANT_WRITE_CONSISTENCY_FACTOR", "3")
    with pytest.raises(SettingsError, match="cannot exceed LLMOS_QDRANT_REPLICATION_FACTOR"):
        load_settings(RetrievalSettings)


class RecordingQdrant:
    """Stands in for a Qdrant server's client: records the collection it is asked to create."""

    created: dict[str, Any] = {}

    def __init__(self, **options: Any) -> None:
        self.options = options

    def collection_exists(self, name: str) -> bool:
        return False

    def create_collection(self, name: str, **config: Any) -> None:
        RecordingQdrant.created = config

    def create_payload_index(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_a_server_collection_is_created_with_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    import qdrant_client

    monkeypatch.setattr(qdrant_client, "QdrantClient", RecordingQdrant)
    ClientIndex("chunks", 8, url="http://qdrant:6333", layout=CollectionLayout(6, 3, 2))
    created = RecordingQdrant.created
    assert (created["shard_number"], created["replication_factor"], created["write_consistency_factor"]) == (6, 3, 2)
    assert index_module.DENSE in created["vectors_config"]


async def test_streams_and_buckets_are_declared_at_the_configured_replicas() -> None:
    js = JetStream({})
    await declare_streams(js, replicas=3)  # type: ignore[arg-type]
    names = [spec.name for spec in STREAMS] + [f"KV_{bucket.name}" for bucket in BUCKETS]
    assert {name: js.streams[name].num_replicas for name in names} == dict.fromkeys(names, 3)


async def test_only_the_admin_moves_existing_streams_to_new_replicas() -> None:
    js = JetStream({})
    await declare_streams(js)  # type: ignore[arg-type]  # one server
    await declare_streams(js, replicas=3)  # type: ignore[arg-type]  # a service: leaves them, logs
    assert js.updated == []
    await declare_streams(js, update=True, replicas=3)  # type: ignore[arg-type]  # `llmos streams`
    names = [spec.name for spec in STREAMS] + [f"KV_{bucket.name}" for bucket in BUCKETS]
    assert sorted(js.updated) == sorted(names)
    assert all(isinstance(js.streams[name], StreamConfig) and js.streams[name].num_replicas == 3 for name in names)
    assert all(js.streams[f"KV_{bucket.name}"].allow_direct for bucket in BUCKETS)


class RacedQdrant(RecordingQdrant):
    """A server on which another replica creates the collection between the check and the call."""

    exists_after_race = True
    indexed: list[str] = []

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.checks = 0

    def collection_exists(self, name: str) -> bool:
        self.checks += 1
        return self.checks > 1 and self.exists_after_race

    def create_collection(self, name: str, **config: Any) -> None:
        raise UnexpectedResponse(409, "Conflict", b"collection already exists", httpx.Headers())

    def create_payload_index(self, collection: str, field: str, *args: Any) -> None:
        RacedQdrant.indexed.append(field)


def test_a_replica_that_loses_the_race_to_create_the_collection_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import qdrant_client

    monkeypatch.setattr(qdrant_client, "QdrantClient", RacedQdrant)
    RacedQdrant.indexed = []
    ClientIndex("chunks", 8, url="http://qdrant:6333")
    assert "tenant" in RacedQdrant.indexed
    monkeypatch.setattr(RacedQdrant, "exists_after_race", False)
    with pytest.raises(UnexpectedResponse):  # a refusal that is not the race is not hidden
        ClientIndex("chunks", 8, url="http://qdrant:6333")
