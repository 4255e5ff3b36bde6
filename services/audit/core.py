"""The audit log: append-only records in SQLite (WAL), each chained to the previous by SHA-256.

A record's hash covers the previous record's hash and the record's own protobuf bytes, so
editing, deleting or reordering any record breaks the chain from that point, which `verify`
reports. The columns beside the bytes exist only for filtering and are checked against them.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from llmos.bus.codec import encode
from llmos.errors import InvalidArgument
from llmos.redaction import redact
from llmos.v1 import events_pb2

GENESIS_HASH = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    sequence INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    time_ns INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    principal TEXT NOT NULL,
    action TEXT NOT NULL,
    event BLOB NOT NULL,
    previous_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_tenant_time ON audit_records (tenant, time_ns);
"""


def chain_hash(previous_hash: str, event_bytes: bytes) -> str:
    return hashlib.sha256(previous_hash.encode("ascii") + event_bytes).hexdigest()


@dataclass(frozen=True)
class StoredRecord:
    sequence: int
    event: events_pb2.AuditEvent
    previous_hash: str
    hash: str


@dataclass(frozen=True)
class AuditQuery:
    tenant: str
    principal: str = ""
    action: str = ""
    start_ns: int = 0
    end_ns: int = 0  # 0: no upper bound
    after_sequence: int = 0
    limit: int = 100


@dataclass(frozen=True)
class Verification:
    intact: bool
    records_checked: int
    first_broken_sequence: int = 0
    reason: str = ""


class AuditStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def append(self, event: events_pb2.AuditEvent) -> StoredRecord:
        """Append `event`; a redelivered event (same id) is stored once and returned as stored.

        Free text is redacted again here: events reach the bus from any publisher.
        """
        if not event.event_id:
            raise InvalidArgument("event_id", "an audit event needs an id")
        event.resource, event.reason = redact(event.resource), redact(event.reason)
        payload = encode(event)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            existing = self._db.execute(
                "SELECT sequence, event, previous_hash, hash FROM audit_records WHERE event_id = ?", (event.event_id,)
            ).fetchone()
            if existing:
                self._db.execute("COMMIT")
                return _record(existing)
            last = self._db.execute("SELECT sequence, hash FROM audit_records ORDER BY sequence DESC LIMIT 1").fetchone()
            sequence, previous = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
            digest = chain_hash(previous, payload)
            self._db.execute(
                "INSERT INTO audit_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sequence, event.event_id, event.time.ToNanoseconds(), event.tenant, event.principal,
                 event.action, payload, previous, digest),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return StoredRecord(sequence, event, previous, digest)

    def query(self, query: AuditQuery) -> list[StoredRecord]:
        clauses, params = ["tenant = ?", "sequence > ?"], [query.tenant, query.after_sequence]
        for column, value in (("principal", query.principal), ("action", query.action)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.start_ns:
            clauses.append("time_ns >= ?")
            params.append(query.start_ns)
        if query.end_ns:
            clauses.append("time_ns < ?")
            params.append(query.end_ns)
        rows = self._db.execute(
            "SELECT sequence, event, previous_hash, hash FROM audit_records WHERE "
            + " AND ".join(clauses) + " ORDER BY sequence LIMIT ?",
            (*params, query.limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def verify(self) -> Verification:
        """Walk the chain from the first record; report the first one that does not fit."""
        checked = 0
        for problem_sequence, reason in self._walk():
            if problem_sequence:
                return Verification(False, checked, problem_sequence, reason)
            checked += 1
        return Verification(True, checked)

    def _walk(self) -> Iterator[tuple[int, str]]:
        """Yields (0, "") per good record, or (sequence, reason) at the first broken one."""
        expected_previous, expected_sequence = GENESIS_HASH, 1
        rows = self._db.execute(
            "SELECT sequence, event_id, tenant, principal, action, time_ns, event, previous_hash, hash "
            "FROM audit_records ORDER BY sequence"
        )
        for sequence, event_id, tenant, principal, action, time_ns, payload, previous, digest in rows:
            if sequence != expected_sequence:
                yield sequence, f"record {expected_sequence} is missing"
                return
            if previous != expected_previous:
                yield sequence, "does not follow the previous record (reordered or a record removed)"
                return
            if chain_hash(previous, payload) != digest:
                yield sequence, "content does not match its hash (edited)"
                return
            try:
                event = events_pb2.AuditEvent.FromString(payload)
            except DecodeError:
                yield sequence, "content is not a valid audit event"
                return
            if (event.event_id, event.tenant, event.principal, event.action, event.time.ToNanoseconds()) != (
                event_id, tenant, principal, action, time_ns
            ):
                yield sequence, "indexed columns differ from the hashed content (edited)"
                return
            yield 0, ""
            expected_previous, expected_sequence = digest, sequence + 1


def _record(row: tuple[int, bytes, str, str]) -> StoredRecord:
    sequence, payload, previous, digest = row
    return StoredRecord(sequence, events_pb2.AuditEvent.FromString(payload), previous, digest)
