from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.v1 import events_pb2
from services.audit.core import AuditQuery, AuditStore

pytestmark = pytest.mark.unit


def event(tenant: str = "acme", action: str = "ingest/submit", seconds: int = 1) -> events_pb2.AuditEvent:
    return events_pb2.AuditEvent(
        event_id=uuid.uuid4().hex, time=Timestamp(seconds=seconds), principal="alice", tenant=tenant,
        service="ingest", action=action, resource="document/1", decision=events_pb2.AUDIT_DECISION_ALLOW,
    )


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    store = AuditStore(tmp_path / "audit.sqlite3")
    for second in range(1, 6):
        store.append(event(seconds=second))
    return store


def raw(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "audit.sqlite3", isolation_level=None)


def test_an_untouched_chain_verifies(store: AuditStore) -> None:
    result = store.verify()
    assert result.intact and result.records_checked == 5


def test_redelivered_event_is_stored_once(store: AuditStore) -> None:
    again = event(seconds=9)
    first, second = store.append(again), store.append(again)
    assert first.sequence == second.sequence == 6
    assert store.verify().records_checked == 6


def test_query_is_confined_to_a_tenant_and_pages(store: AuditStore) -> None:
    store.append(event(tenant="globex", seconds=7))
    page = store.query(AuditQuery(tenant="acme", limit=2))
    assert [record.sequence for record in page] == [1, 2]
    following = store.query(AuditQuery(tenant="acme", after_sequence=2, limit=10))
    assert [record.sequence for record in following] == [3, 4, 5]
    assert [record.event.tenant for record in store.query(AuditQuery(tenant="globex"))] == ["globex"]
    assert [r.sequence for r in store.query(AuditQuery(tenant="acme", start_ns=2_000_000_000, end_ns=4_000_000_000))] == [2, 3]


def test_an_edited_record_is_detected(store: AuditStore, tmp_path: Path) -> None:
    tampered = event(seconds=3)
    tampered.principal = "mallory"
    raw(tmp_path).execute("UPDATE audit_records SET event = ?, principal = 'mallory' WHERE sequence = 3",
                          (tampered.SerializeToString(),))
    result = store.verify()
    assert not result.intact and result.first_broken_sequence == 3 and "edited" in result.reason


def test_an_edited_index_column_is_detected(store: AuditStore, tmp_path: Path) -> None:
    raw(tmp_path).execute("UPDATE audit_records SET tenant = 'globex' WHERE sequence = 2")
    result = store.verify()
    assert not result.intact and result.first_broken_sequence == 2


def test_a_deleted_record_is_detected(store: AuditStore, tmp_path: Path) -> None:
    raw(tmp_path).execute("DELETE FROM audit_records WHERE sequence = 4")
    result = store.verify()
    assert not result.intact and result.first_broken_sequence == 5 and "missing" in result.reason


def test_deleting_the_last_record_and_renumbering_is_detected(store: AuditStore, tmp_path: Path) -> None:
    connection = raw(tmp_path)
    connection.execute("DELETE FROM audit_records WHERE sequence = 2")
    connection.execute("UPDATE audit_records SET sequence = sequence - 1 WHERE sequence > 2")
    result = store.verify()
    assert not result.intact and result.first_broken_sequence == 2


def test_reordered_records_are_detected(store: AuditStore, tmp_path: Path) -> None:
    connection = raw(tmp_path)
    connection.execute("UPDATE audit_records SET sequence = 100 WHERE sequence = 2")
    connection.execute("UPDATE audit_records SET sequence = 2 WHERE sequence = 3")
    connection.execute("UPDATE audit_records SET sequence = 3 WHERE sequence = 100")
    result = store.verify()
    assert not result.intact and result.first_broken_sequence == 2
