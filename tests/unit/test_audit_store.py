from __future__ import annotations

import hashlib
import sqlite3
import uuid
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.crypto import new_key_entry
from llmos.settings import SettingsError
from llmos.v1 import events_pb2
from services.audit.chain import ChainKeys
from services.audit.core import AuditQuery, AuditStore

pytestmark = pytest.mark.unit


def event(tenant: str = "acme", action: str = "ingest/submit", seconds: int = 1) -> events_pb2.AuditEvent:
    return events_pb2.AuditEvent(
        event_id=uuid.uuid4().hex, time=Timestamp(seconds=seconds), principal="alice", tenant=tenant,
        service="ingest", action=action, resource="document/1", decision=events_pb2.AUDIT_DECISION_ALLOW,
    )


KEYS = ChainKeys.from_spec(new_key_entry("k1"))


def open_store(tmp_path: Path, keys: ChainKeys = KEYS) -> AuditStore:
    return AuditStore(tmp_path / "audit.sqlite3", keys, tmp_path / "checkpoint.json")


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    store = open_store(tmp_path)
    for second in range(1, 6):
        store.append(event(seconds=second), "ingest")
    return store


def raw(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "audit.sqlite3", isolation_level=None)


def test_an_untouched_chain_verifies(store: AuditStore) -> None:
    result = store.verify()
    assert result.intact and result.records_checked == 5


def test_redelivered_event_is_stored_once(store: AuditStore) -> None:
    again = event(seconds=9)
    first, second = store.append(again, "ingest"), store.append(again, "ingest")
    assert first.sequence == second.sequence == 6
    assert store.verify().records_checked == 6


def test_query_is_confined_to_a_tenant_and_pages(store: AuditStore) -> None:
    store.append(event(tenant="globex", seconds=7), "ingest")
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


def test_records_carry_the_signing_key_and_rotation_keeps_old_records_verifiable(store: AuditStore, tmp_path: Path) -> None:
    assert {record.key_id for record in store.query(AuditQuery(tenant="acme"))} == {"k1"}
    store.close()
    rotated = open_store(tmp_path, ChainKeys({"k2": b"\x02" * 32, **KEYS.keys}))  # the new key first
    rotated.append(event(seconds=8), "ingest")
    assert [record.key_id for record in rotated.query(AuditQuery(tenant="acme"))] == ["k1"] * 5 + ["k2"]
    result = rotated.verify()
    assert result.intact and result.records_checked == 6 and result.checkpoint.key_id == "k2"
    rotated.close()
    without_old_key = open_store(tmp_path, ChainKeys({"k2": b"\x02" * 32}))
    result = without_old_key.verify()
    assert not result.intact and result.first_broken_sequence == 1 and "'k1'" in result.reason


def test_the_checkpoint_moves_with_every_record_and_survives_a_restart(store: AuditStore, tmp_path: Path) -> None:
    assert (store.checkpoint.records, store.checkpoint.head) == (5, store.query(AuditQuery(tenant="acme"))[-1].hash)
    store.close()
    reopened = open_store(tmp_path)
    assert reopened.checkpoint == store.checkpoint
    assert reopened.verify().intact


def test_a_record_stored_before_its_checkpoint_was_written_is_taken_up_at_start(store: AuditStore, tmp_path: Path) -> None:
    saved = (tmp_path / "checkpoint.json").read_text()
    store.append(event(seconds=6), "ingest")
    store.close()
    (tmp_path / "checkpoint.json").write_text(saved)  # as if the service stopped before writing it
    reopened = open_store(tmp_path)
    assert reopened.checkpoint.records == 6 and reopened.verify().intact


def test_a_log_from_before_the_chain_was_keyed_is_kept_and_continued(tmp_path: Path) -> None:
    legacy = raw(tmp_path)
    legacy.executescript(
        "CREATE TABLE audit_records (sequence INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, time_ns INTEGER NOT NULL,"
        " tenant TEXT NOT NULL, principal TEXT NOT NULL, action TEXT NOT NULL, event BLOB NOT NULL,"
        " previous_hash TEXT NOT NULL, hash TEXT NOT NULL)"
    )
    previous = "0" * 64
    for sequence in (1, 2):
        old = event(seconds=sequence)
        payload = old.SerializeToString(deterministic=True)
        digest = hashlib.sha256(previous.encode() + payload).hexdigest()
        legacy.execute("INSERT INTO audit_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (sequence, old.event_id, old.time.ToNanoseconds(), "acme", "alice", old.action, payload, previous, digest))
        previous = digest
    legacy.close()
    store = open_store(tmp_path)
    assert store.checkpoint.records == 2
    store.append(event(seconds=3), "ingest")
    assert [record.key_id for record in store.query(AuditQuery(tenant="acme"))] == ["", "", "k1"]
    assert store.verify().intact


def test_a_tampered_checkpoint_file_stops_the_service(store: AuditStore, tmp_path: Path) -> None:
    store.close()
    path = tmp_path / "checkpoint.json"
    path.write_text(path.read_text().replace('"records": "5"', '"records": "3"'))
    with pytest.raises(SettingsError, match="MAC does not verify"):
        open_store(tmp_path)


def test_a_retired_key_cannot_sign_after_a_newer_one(store: AuditStore, tmp_path: Path) -> None:
    """Whoever holds a leaked old key can make records that verify under it, but not after the
    first record of the key that replaced it."""
    store.close()
    newer = {"k2": b"\x02" * 32}
    rotated = open_store(tmp_path, ChainKeys({**newer, **KEYS.keys}))
    rotated.append(event(seconds=6), "ingest")
    rotated.close()
    old_key_first = open_store(tmp_path, ChainKeys({**KEYS.keys, **newer}))
    old_key_first.append(event(seconds=7), "ingest")
    result = old_key_first.verify()
    assert not result.intact and result.first_broken_sequence == 7 and "after a later key took over" in result.reason
