"""The keys of the audit chain: each record's hash is an HMAC-SHA256 under a key held outside the
database, and checkpoints of the chain's length and head are MACed under the same keys.

Keys come from `LLMOS_AUDIT_CHAIN_KEYS` as comma-separated `key_id:base64(32 bytes)` entries, the
format of LLMOS_ENCRYPTION_KEYS: the first one signs, every listed one verifies. Each record
carries the id of the key that signed it, so rotating is putting a new key first and keeping the
old ones after it for as long as their records are kept.

Someone who can write the database but does not hold a key can edit, delete or reorder records
and recompute every hash after them with plain SHA-256, but cannot make hashes that verify; and
records removed at the tail are caught by the checkpoint, which the database does not hold.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from llmos.v1 import audit_pb2

KEY_BYTES = 32
# Records stored before the chain was keyed carry no key id: plain SHA-256 over the previous
# hash and the record's bytes. They verify only before the first keyed record.
UNKEYED = ""
GENESIS_HASH = "0" * 64
_RECORD = b"llmos-audit-record\x00"
_CHECKPOINT = b"llmos-audit-checkpoint\x00"


def unkeyed_hash(previous_hash: str, event_bytes: bytes) -> str:
    return hashlib.sha256(previous_hash.encode("ascii") + event_bytes).hexdigest()


@dataclass(frozen=True)
class ChainKeys:
    keys: dict[str, bytes]  # key id -> key, the signing key first

    @classmethod
    def from_spec(cls, spec: str) -> ChainKeys:
        """Parse `key_id:base64key,...`; ValueError names the entry that is wrong."""
        keys: dict[str, bytes] = {}
        for entry in filter(None, (part.strip() for part in spec.split(","))):
            key_id, sep, encoded = entry.partition(":")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if not sep or not key_id or len(key) != KEY_BYTES:
                raise ValueError(f"entry {key_id!r} is not key_id:base64({KEY_BYTES} bytes); make one with "
                                 "`python -m llmos.secrets new LLMOS_AUDIT_CHAIN_KEYS`")
            if key_id in keys:
                raise ValueError(f"key id {key_id!r} is listed twice")
            keys[key_id] = key
        if not keys:
            raise ValueError("no key: the audit chain needs at least one key_id:base64key entry")
        return cls(keys)

    @property
    def signing_key_id(self) -> str:
        return next(iter(self.keys))

    def holds(self, key_id: str) -> bool:
        return key_id in self.keys

    def record_hash(self, key_id: str, sequence: int, previous_hash: str, event_bytes: bytes) -> str:
        """The hash of record `sequence`: over its key id, position, predecessor and bytes."""
        if key_id == UNKEYED:
            return unkeyed_hash(previous_hash, event_bytes)
        message = b"\x00".join((key_id.encode(), str(sequence).encode(), previous_hash.encode("ascii"), event_bytes))
        return hmac.new(self.keys[key_id], _RECORD + message, hashlib.sha256).hexdigest()

    def sign(self, records: int, head: str, time_ns: int) -> audit_pb2.AuditCheckpoint:
        """A checkpoint of a chain of `records` records ending in `head`, signed now."""
        checkpoint = audit_pb2.AuditCheckpoint(records=records, head=head, key_id=self.signing_key_id)
        checkpoint.time.FromNanoseconds(time_ns)
        checkpoint.mac = self._checkpoint_mac(checkpoint)
        return checkpoint

    def checkpoint_problem(self, checkpoint: audit_pb2.AuditCheckpoint) -> str:
        """Why `checkpoint` cannot be trusted, or "" when its MAC verifies under a held key."""
        if not self.holds(checkpoint.key_id):
            return f"it is signed with key {checkpoint.key_id!r}, which LLMOS_AUDIT_CHAIN_KEYS does not hold"
        if not hmac.compare_digest(self._checkpoint_mac(checkpoint), checkpoint.mac):
            return "its MAC does not verify (altered, or not made by this audit service)"
        return ""

    def _checkpoint_mac(self, checkpoint: audit_pb2.AuditCheckpoint) -> str:
        fields = (checkpoint.key_id, str(checkpoint.records), checkpoint.head, str(checkpoint.time.ToNanoseconds()))
        message = "\x00".join(fields).encode()
        return hmac.new(self.keys[checkpoint.key_id], _CHECKPOINT + message, hashlib.sha256).hexdigest()
