"""The audit log: append-only records in SQLite (WAL), each chained to the previous by a keyed hash.

A record's hash is an HMAC-SHA256 (services/audit/chain.py) under a key the database does not
hold, over the previous record's hash and the record's own protobuf bytes, so editing, deleting
or reordering any record breaks the chain from that point, and recomputing the hashes after an
edit needs the key. The columns beside the bytes exist only for filtering and are checked
against them.

The end of the log is anchored by a checkpoint (records, head hash), MACed and kept outside the
database. It moves with every append and `verify` checks the log against it, so records removed
at the tail are reported too; it is written to its file at most every `checkpoint_interval_s`
(a rename costs milliseconds on some filesystems) and when the store closes. A checkpoint only
moves forward: an append that does not extend the checkpointed head (the log was cut or
rewritten behind the service's back) leaves it where it was, as evidence. The store is the log's
one writer.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from llmos.audit import bounded, bounded_redacted
from llmos.bus.codec import encode
from llmos.errors import InvalidArgument
from llmos.settings import SettingsError
from llmos.v1 import audit_pb2, events_pb2
from services.audit.chain import GENESIS_HASH, UNKEYED, ChainKeys

logger = logging.getLogger(__name__)

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
    hash TEXT NOT NULL,
    key_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_by_tenant_time ON audit_records (tenant, time_ns);
"""
_COLUMNS = "sequence, event_id, time_ns, tenant, principal, action, event, previous_hash, hash, key_id"
# Longest service name a payload's claim is quoted with when it differs from the subject's.
_CLAIM_CHARS = 64


@dataclass(frozen=True)
class StoredRecord:
    sequence: int
    event: events_pb2.AuditEvent
    previous_hash: str
    hash: str
    key_id: str


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
    checkpoint: audit_pb2.AuditCheckpoint  # the service's latest, which the log was checked against
    first_broken_sequence: int = 0
    reason: str = ""


class CheckpointFile:
    """The latest checkpoint, as JSON in a file of its own (replaced atomically, mode 0600)."""

    def __init__(self, path: Path, keys: ChainKeys) -> None:
        self.path = path
        self._keys = keys

    def load(self) -> audit_pb2.AuditCheckpoint | None:
        """The checkpoint on file, None when there is none; one that does not verify stops the service."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        checkpoint = audit_pb2.AuditCheckpoint()
        try:
            json_format.Parse(text, checkpoint)
        except json_format.ParseError:
            raise SettingsError(f"audit checkpoint {self.path} is not a checkpoint: {_RESET_HINT}") from None
        problem = self._keys.checkpoint_problem(checkpoint)
        if problem:
            raise SettingsError(f"audit checkpoint {self.path} cannot be trusted: {problem}. {_RESET_HINT}")
        return checkpoint

    def save(self, checkpoint: audit_pb2.AuditCheckpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write(json_format.MessageToJson(checkpoint, indent=None) + "\n")
        partial.replace(self.path)


_RESET_HINT = (
    "restore the file, or configure the key that signed it; to start a new checkpoint from the log "
    "as it is now, remove the file (records removed before then can no longer be detected)"
)


class AuditStore:
    def __init__(self, path: Path, keys: ChainKeys, checkpoint_path: Path, checkpoint_interval_s: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._keys = keys
        self._checkpoint_interval_s = checkpoint_interval_s
        self._saved_at = time.monotonic()
        self._unsaved = False
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(audit_records)")}
        if "key_id" not in columns:  # a log from before the chain was keyed: its records stay unkeyed
            self._db.execute("ALTER TABLE audit_records ADD COLUMN key_id TEXT NOT NULL DEFAULT ''")
        self._checkpoints = CheckpointFile(checkpoint_path, keys)
        saved = self._checkpoints.load()
        self._checkpoint = self._caught_up(saved) if saved else self._first_checkpoint()

    def close(self) -> None:
        self.save_checkpoint()
        self._db.close()

    @property
    def checkpoint(self) -> audit_pb2.AuditCheckpoint:
        return self._checkpoint

    def append(self, event: events_pb2.AuditEvent, writer: str) -> StoredRecord:
        """Append `event` as written by the service `writer`; a redelivered event (same id) is
        stored once and returned as stored.

        `writer` comes from the subject the event arrived on, which NATS lets only that service
        publish; a payload naming another service keeps its claim in the reason, marked. Free
        text is cut and redacted again here: events reach the bus from any publisher.
        """
        if not event.event_id:
            raise InvalidArgument("event_id", "an audit event needs an id")
        if event.service and event.service != writer:
            claim = f"[payload named service {bounded(event.service, _CLAIM_CHARS)!r}]"
            event.reason = f"{claim} {event.reason}" if event.reason else claim
        event.service = writer
        event.resource, event.reason = bounded_redacted(event.resource), bounded_redacted(event.reason)
        payload = encode(event)
        key_id = self._keys.signing_key_id
        self._db.execute("BEGIN IMMEDIATE")
        try:
            existing = self._db.execute(
                "SELECT sequence, event, previous_hash, hash, key_id FROM audit_records WHERE event_id = ?",
                (event.event_id,),
            ).fetchone()
            if existing:
                self._db.execute("COMMIT")
                return _record(existing)
            last = self._db.execute("SELECT sequence, hash FROM audit_records ORDER BY sequence DESC LIMIT 1").fetchone()
            last_sequence, previous = last if last else (0, GENESIS_HASH)
            sequence = last_sequence + 1
            digest = self._keys.record_hash(key_id, sequence, previous, payload)
            self._db.execute(
                f"INSERT INTO audit_records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sequence, event.event_id, event.time.ToNanoseconds(), event.tenant, event.principal,
                 event.action, payload, previous, digest, key_id),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._advance_checkpoint(last_sequence, previous, sequence, digest)
        return StoredRecord(sequence, event, previous, digest, key_id)

    def _advance_checkpoint(self, extended: int, extended_head: str, records: int, head: str) -> None:
        if (extended, extended_head) != (self._checkpoint.records, self._checkpoint.head):
            logger.error(
                "the audit log no longer ends where checkpoint %d did: it was cut or rewritten outside this "
                "service; the checkpoint stays as evidence (see `llmos audit verify`)", self._checkpoint.records,
            )
            return
        self._checkpoint = self._keys.sign(records, head, time.time_ns())
        self._unsaved = True
        if time.monotonic() - self._saved_at >= self._checkpoint_interval_s:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Write the latest checkpoint to its file, if it moved since the last write."""
        if not self._unsaved:
            return
        try:
            self._checkpoints.save(self._checkpoint)
        except OSError:
            # Records are stored and the checkpoint is held here; the next write tries again.
            logger.exception("could not write the audit checkpoint to %s", self._checkpoints.path)
            return
        self._unsaved, self._saved_at = False, time.monotonic()

    def _caught_up(self, saved: audit_pb2.AuditCheckpoint) -> audit_pb2.AuditCheckpoint:
        """`saved`, moved to the end of the log when every record after it extends it under a
        held key (the service stopped before writing the checkpoint of its last records)."""
        expected_previous, expected_sequence = saved.head, saved.records + 1
        rows = self._db.execute(
            "SELECT sequence, event, previous_hash, hash, key_id FROM audit_records WHERE sequence > ? ORDER BY sequence",
            (saved.records,),
        )
        for sequence, payload, previous, digest, key_id in rows:
            if (sequence, previous) != (expected_sequence, expected_previous) or key_id == UNKEYED \
                    or not self._keys.holds(key_id) or self._keys.record_hash(key_id, sequence, previous, payload) != digest:
                return saved  # not ours: left for `verify` to report
            expected_previous, expected_sequence = digest, sequence + 1
        if expected_sequence - 1 == saved.records:
            return saved
        checkpoint = self._keys.sign(expected_sequence - 1, expected_previous, time.time_ns())
        self._checkpoints.save(checkpoint)
        return checkpoint

    def _first_checkpoint(self) -> audit_pb2.AuditCheckpoint:
        """With no checkpoint on file: one of the log as it is (empty on a fresh install)."""
        last = self._db.execute("SELECT sequence, hash FROM audit_records ORDER BY sequence DESC LIMIT 1").fetchone()
        records, head = last if last else (0, GENESIS_HASH)
        if records:
            logger.warning(
                "no audit checkpoint at %s: starting one at record %d; records removed from the log before "
                "now cannot be detected", self._checkpoints.path, records,
            )
        checkpoint = self._keys.sign(records, head, time.time_ns())
        self._checkpoints.save(checkpoint)
        return checkpoint

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
            "SELECT sequence, event, previous_hash, hash, key_id FROM audit_records WHERE "
            + " AND ".join(clauses) + " ORDER BY sequence LIMIT ?",
            (*params, query.limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def verify(self, kept: audit_pb2.AuditCheckpoint | None = None) -> Verification:
        """Walk the chain from the first record and report the first one that does not fit; then
        check the log against the latest checkpoint, and against `kept` (one kept elsewhere) if given.

        Raises InvalidArgument when `kept` does not verify.
        """
        anchors = [("the latest checkpoint", self._checkpoint)]
        if kept is not None:
            problem = self._keys.checkpoint_problem(kept)
            if problem:
                raise InvalidArgument("checkpoint", f"cannot be trusted: {problem}")
            anchors.append(("the checkpoint given", kept))
        anchored = {checkpoint.records for _, checkpoint in anchors}
        heads: dict[int, str] = {}  # hash of each anchored record
        checked = 0
        for sequence, digest, problem in self._walk():
            if problem:
                return Verification(False, checked, self._checkpoint, sequence, problem)
            checked += 1
            if sequence in anchored:
                heads[sequence] = digest
        for name, checkpoint in anchors:
            problem_at, problem = _against(checkpoint, checked, heads.get(checkpoint.records, GENESIS_HASH), name)
            if problem:
                return Verification(False, checked, self._checkpoint, problem_at, problem)
        if checked > self._checkpoint.records:
            return Verification(False, checked, self._checkpoint, self._checkpoint.records + 1,
                                f"records {self._checkpoint.records + 1} to {checked} are not covered by the latest checkpoint "
                                "(another process wrote them, or the log had changed before them)")
        return Verification(True, checked, self._checkpoint)

    def _walk(self) -> Iterator[tuple[int, str, str]]:
        """Yields (sequence, hash, "") per good record, or (sequence, "", reason) at the first broken one."""
        expected_previous, expected_sequence = GENESIS_HASH, 1
        key_id, retired = UNKEYED, set[str]()  # the key signing now, those that signed before it
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM audit_records ORDER BY sequence")
        for sequence, event_id, time_ns, tenant, principal, action, payload, previous, digest, record_key in rows:
            if sequence != expected_sequence:
                yield sequence, "", f"record {expected_sequence} is missing"
                return
            if previous != expected_previous:
                yield sequence, "", "does not follow the previous record (reordered or a record removed)"
                return
            if record_key != key_id:
                if record_key in retired:
                    yield sequence, "", (f"signed with key {record_key!r} after a later key took over (rewritten with a "
                                         "retired key, or LLMOS_AUDIT_CHAIN_KEYS lists an old key first)")
                    return
                if not self._keys.holds(record_key):
                    yield sequence, "", f"signed with key {record_key!r}, which LLMOS_AUDIT_CHAIN_KEYS does not hold"
                    return
                retired.add(key_id)
                key_id = record_key
            if self._keys.record_hash(record_key, sequence, previous, payload) != digest:
                yield sequence, "", "content does not match its hash (edited, or hashed without the chain key)"
                return
            try:
                event = events_pb2.AuditEvent.FromString(payload)
            except DecodeError:
                yield sequence, "", "content is not a valid audit event"
                return
            if (event.event_id, event.tenant, event.principal, event.action, event.time.ToNanoseconds()) != (
                event_id, tenant, principal, action, time_ns
            ):
                yield sequence, "", "indexed columns differ from the hashed content (edited)"
                return
            yield sequence, digest, ""
            expected_previous, expected_sequence = digest, sequence + 1


def _against(checkpoint: audit_pb2.AuditCheckpoint, records: int, head: str, name: str) -> tuple[int, str]:
    """Where and why a log of `records` records, whose record `checkpoint.records` has hash
    `head`, disagrees with `checkpoint`; (0, "") when it holds the checkpoint's records unchanged."""
    when = checkpoint.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
    if records < checkpoint.records:
        return records + 1, (
            f"records {records + 1} to {checkpoint.records} are missing at the end of the log "
            f"({name}, of {when}, holds {checkpoint.records})"
        )
    if head != checkpoint.head:
        return max(checkpoint.records, 1), (
            f"the log up to record {checkpoint.records} is not the one {name} (of {when}) recorded: "
            "it was cut and appended to, or rewritten, at or before this record"
        )
    return 0, ""


def _record(row: tuple[int, bytes, str, str, str]) -> StoredRecord:
    sequence, payload, previous, digest, key_id = row
    return StoredRecord(sequence, events_pb2.AuditEvent.FromString(payload), previous, digest, key_id)
