"""The audit chain is keyed and anchored (issue 13, item 10): someone who can write the audit
database but does not hold LLMOS_AUDIT_CHAIN_KEYS cannot edit, delete, reorder or cut records
without Verify saying where, even when they recompute every hash after their change with plain
SHA-256, which is all they can do without the key.

The attacks go through SQL on the database file, as an attacker would: on a store in this
process (each attack on a fresh log, with an exact answer), and on the real audit service on a
real nats-server (stopped, its database changed, started again, asked over gRPC).
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.audit import ALLOW, audit_event
from llmos.bus.broker import Bus
from llmos.bus.subjects import audit_subject
from llmos.crypto import new_key_entry
from llmos.errors import InvalidArgument
from llmos.stack import stop_pids, wait_until_serving
from llmos.v1 import audit_pb2, audit_pb2_grpc, events_pb2
from services.audit.chain import ChainKeys
from services.audit.core import AuditStore
from tests.conftest import NatsServer, _settings_from, platform_environment
from tests.grpc_helpers import ADMIN
from tests.nats_helpers import SecuredNats, secured_nats_server

pytestmark = pytest.mark.security

GENESIS = "0" * 64
RECORDS = 6


# ---------------------------------------------------------------- what an attacker does in SQL


def rechain_without_the_key(db: sqlite3.Connection, start: int) -> None:
    """Recompute every hash from record `start` on as the unkeyed chain did: SHA-256 over the
    previous hash and the record's bytes."""
    row = db.execute("SELECT hash FROM audit_records WHERE sequence = ?", (start - 1,)).fetchone()
    previous = row[0] if row else GENESIS
    for sequence, event in db.execute("SELECT sequence, event FROM audit_records WHERE sequence >= ? ORDER BY sequence",
                                      (start,)).fetchall():
        digest = hashlib.sha256(previous.encode() + event).hexdigest()
        db.execute("UPDATE audit_records SET previous_hash = ?, hash = ? WHERE sequence = ?", (previous, digest, sequence))
        previous = digest


def edit(db: sqlite3.Connection, sequence: int) -> None:
    """Put another principal in a record, in its bytes and its indexed column alike."""
    event = events_pb2.AuditEvent.FromString(db.execute("SELECT event FROM audit_records WHERE sequence = ?", (sequence,)).fetchone()[0])
    event.principal = "mallory"
    db.execute("UPDATE audit_records SET event = ?, principal = ? WHERE sequence = ?",
               (event.SerializeToString(deterministic=True), event.principal, sequence))


def delete(db: sqlite3.Connection, sequence: int) -> None:
    db.execute("DELETE FROM audit_records WHERE sequence = ?", (sequence,))


def close_the_gap(db: sqlite3.Connection, after: int) -> None:
    for (sequence,) in db.execute("SELECT sequence FROM audit_records WHERE sequence > ? ORDER BY sequence", (after,)).fetchall():
        db.execute("UPDATE audit_records SET sequence = ? WHERE sequence = ?", (sequence - 1, sequence))


def swap(db: sqlite3.Connection, first: int, second: int) -> None:
    db.execute("UPDATE audit_records SET sequence = -1 WHERE sequence = ?", (first,))
    db.execute("UPDATE audit_records SET sequence = ? WHERE sequence = ?", (first, second))
    db.execute("UPDATE audit_records SET sequence = ? WHERE sequence = -1", (second,))


def truncate(db: sqlite3.Connection, keep: int) -> None:
    db.execute("DELETE FROM audit_records WHERE sequence > ?", (keep,))


def last_sequence(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT MAX(sequence) FROM audit_records").fetchone()[0])


@dataclass(frozen=True)
class Attack:
    name: str
    tamper: Callable[[sqlite3.Connection], None]
    first_broken: int
    reason: str  # a word the reason must hold


def _edit_and_rechain(db: sqlite3.Connection) -> None:
    edit(db, 3)
    rechain_without_the_key(db, 3)


def _delete_and_rechain(db: sqlite3.Connection) -> None:
    delete(db, 3)
    close_the_gap(db, 3)
    rechain_without_the_key(db, 3)


def _reorder_and_rechain(db: sqlite3.Connection) -> None:
    swap(db, 2, 3)
    rechain_without_the_key(db, 2)


def _rewrite_all_as_unkeyed(db: sqlite3.Connection) -> None:
    """Edit a record and turn the whole log into the old unkeyed chain, which needs no key."""
    edit(db, 3)
    db.execute("UPDATE audit_records SET key_id = ''")
    rechain_without_the_key(db, 1)


ATTACKS = [
    Attack("edit one record", lambda db: edit(db, 3), 3, "edited"),
    Attack("edit one record and recompute the rest", _edit_and_rechain, 3, "chain key"),
    Attack("delete one record", lambda db: delete(db, 3), 4, "missing"),
    Attack("delete one record, renumber and recompute", _delete_and_rechain, 3, "chain key"),
    Attack("reorder two records", lambda db: swap(db, 2, 3), 2, "reordered"),
    Attack("reorder two records and recompute", _reorder_and_rechain, 2, "chain key"),
    Attack("truncate the tail", lambda db: truncate(db, RECORDS - 2), RECORDS - 1, "missing at the end"),
    Attack("rewrite the whole log as an unkeyed chain", _rewrite_all_as_unkeyed, RECORDS, "checkpoint"),
]


# ---------------------------------------------------------------- on the store


def event(seconds: int) -> events_pb2.AuditEvent:
    return audit_event("ingest", "alice", "acme", "ingest/submit", f"document/{seconds}", ALLOW)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    store = AuditStore(tmp_path / "audit.sqlite3", ChainKeys.from_spec(new_key_entry()), tmp_path / "checkpoint.json")
    for second in range(1, RECORDS + 1):
        store.append(event(second), "ingest")
    assert store.verify().intact
    yield store
    store.close()


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_each_attack_on_the_database_is_reported_where_it_happened(store: AuditStore, tmp_path: Path, attack: Attack) -> None:
    db = sqlite3.connect(tmp_path / "audit.sqlite3", isolation_level=None)
    attack.tamper(db)
    db.close()
    result = store.verify()
    assert not result.intact
    assert (result.first_broken_sequence, attack.reason in result.reason) == (attack.first_broken, True), result


def test_a_cut_tail_is_still_reported_when_the_service_went_on_appending(store: AuditStore, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "audit.sqlite3", isolation_level=None)
    truncate(db, RECORDS - 2)
    db.close()
    for second in (10, 11, 12):  # the checkpoint does not follow a log that no longer ends where it did
        store.append(event(second), "ingest")
    result = store.verify()
    assert not result.intact and result.first_broken_sequence == RECORDS and "checkpoint" in result.reason
    assert result.checkpoint.records == RECORDS


def test_a_checkpoint_kept_elsewhere_catches_a_cut_whose_checkpoint_file_was_rolled_back(tmp_path: Path) -> None:
    """Whoever can write the checkpoint file too can put back an older checkpoint; one printed by
    `llmos audit checkpoint` and kept elsewhere is still checked."""
    keys = ChainKeys.from_spec(new_key_entry())
    store = AuditStore(tmp_path / "audit.sqlite3", keys, tmp_path / "checkpoint.json")
    for second in range(1, RECORDS - 1):
        store.append(event(second), "ingest")
    store.close()
    older_file = (tmp_path / "checkpoint.json").read_text()
    store = AuditStore(tmp_path / "audit.sqlite3", keys, tmp_path / "checkpoint.json")
    store.append(event(RECORDS - 1), "ingest")
    store.append(event(RECORDS), "ingest")
    kept = store.verify().checkpoint
    assert kept.records == RECORDS
    store.close()

    db = sqlite3.connect(tmp_path / "audit.sqlite3", isolation_level=None)
    truncate(db, RECORDS - 2)
    db.close()
    (tmp_path / "checkpoint.json").write_text(older_file)
    store = AuditStore(tmp_path / "audit.sqlite3", keys, tmp_path / "checkpoint.json")
    assert store.verify().intact  # the rolled-back file agrees with the cut log
    result = store.verify(kept)
    assert not result.intact and result.first_broken_sequence == RECORDS - 1 and "checkpoint given" in result.reason

    forged = audit_pb2.AuditCheckpoint()
    forged.CopyFrom(kept)
    forged.records = RECORDS - 2
    with pytest.raises(InvalidArgument, match="MAC does not verify"):
        store.verify(forged)
    store.close()


# ---------------------------------------------------------------- on the running service


@pytest.fixture
async def secured_nats(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    async with secured_nats_server(tmp_path / "nats") as server:
        yield server


class AuditProcess:
    """`python -m services.audit` in its own home, as the audit NATS user."""

    def __init__(self, nats: SecuredNats, home: Path) -> None:
        self.env = platform_environment(NatsServer(nats.url, 0, home), home)
        self.env |= {
            "LLMOS_NATS_USER": "audit",
            "LLMOS_NATS_PASSWORD": nats.credentials["audit"],
            "LLMOS_AUDIT_CHAIN_KEYS": new_key_entry(),
        }
        self.settings = _settings_from(self.env)
        self.home = home
        self.database = home / "data" / "audit.sqlite3"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        with (self.settings.logs_dir / "audit.log").open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "services.audit"], cwd=self.home, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_until_serving(self.settings, {"audit": self.process}, timeout_s=60)

    def stop(self) -> None:
        if self.process is not None:
            stop_pids([self.process.pid], timeout_s=15)
            self.process = None

    async def verify(self) -> audit_pb2.VerifyAuditResponse:
        async with grpc.aio.insecure_channel(self.settings.audit_addr) as channel:
            return await audit_pb2_grpc.AuditServiceStub(channel).Verify(audit_pb2.VerifyAuditRequest(), metadata=ADMIN)


@pytest.fixture
def audit_process(secured_nats: SecuredNats, tmp_path: Path) -> Iterator[AuditProcess]:
    home = tmp_path / "home"
    home.mkdir()
    process = AuditProcess(secured_nats, home)
    try:
        yield process
    finally:
        process.stop()


async def log_of(audit: AuditProcess, nats: SecuredNats, records: int) -> int:
    """Records written by ingest through the bus, stored and verified; how many the log holds."""
    ingest = Bus(nats.url, "ingest", max_deliveries=3, user="ingest", password=nats.credentials["ingest"])
    await ingest.start()
    try:
        for second in range(1, records + 1):
            written = event(second)
            written.time.CopyFrom(Timestamp(seconds=second))
            await ingest.publish(audit_subject("ingest"), written, msg_id=written.event_id)
    finally:
        await ingest.close()
    for _ in range(200):
        result = await audit.verify()  # each call is audited too: the log grows as it is read
        if result.intact and result.records_checked >= records:
            return result.records_checked
        await asyncio.sleep(0.1)
    raise AssertionError(f"the log did not reach {records} intact records: {result}")


@pytest.mark.parametrize("attack", ["truncate the tail", "edit one record and recompute the rest"])
async def test_the_running_service_reports_an_attack_made_while_it_was_stopped(
    audit_process: AuditProcess, secured_nats: SecuredNats, attack: str
) -> None:
    audit_process.start()
    await log_of(audit_process, secured_nats, RECORDS)
    audit_process.stop()
    db = sqlite3.connect(audit_process.database, isolation_level=None)
    held = last_sequence(db)
    if attack == "truncate the tail":
        truncate(db, held - 2)
    else:
        _edit_and_rechain(db)
    db.close()
    audit_process.start()
    result = await audit_process.verify()
    assert not result.intact, f"{attack} went unnoticed: {result}"
    if attack == "truncate the tail":
        # The Verify call's own record may already sit where the cut records were.
        assert result.first_broken_sequence in (held - 1, held) and "checkpoint" in result.reason
    else:
        assert result.first_broken_sequence == 3 and "chain key" in result.reason
