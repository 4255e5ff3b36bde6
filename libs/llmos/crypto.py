"""Encryption at rest: AES-256-GCM with key ids, so keys can rotate without re-encrypting.

Keys come from `LLMOS_ENCRYPTION_KEYS` as comma-separated `key_id:base64(32 bytes)` entries; the
first is used to seal, every listed key can open. A sealed blob is
`b"llmos1" | key id length | key id | 12-byte nonce | ciphertext+tag`, and the associated data
(for example the tenant and record key) binds a blob to where it is stored, so moving it
elsewhere fails to open. `llmos keys data-key` prints a new entry.

Stores seal through `AtRest`, which also decides what happens without keys: a service refuses to
start unless `LLMOS_PLAINTEXT_AT_REST=true` says plaintext is acceptable (then it warns).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.settings import PlatformSettings, SettingsError

logger = logging.getLogger(__name__)

MAGIC = b"llmos1"
NONCE_BYTES = 12
T = TypeVar("T", bytes, str)
# Sealed text (for string-typed stores such as a Qdrant payload) is the blob in base64, which
# always starts with MAGIC's encoding.
SEALED_TEXT_PREFIX = base64.b64encode(MAGIC).decode()


def new_key_entry(key_id: str | None = None) -> str:
    """A fresh `key_id:base64key` entry for LLMOS_ENCRYPTION_KEYS."""
    return f"{key_id or secrets.token_hex(4)}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


class Sealer:
    def __init__(self, keys: dict[str, bytes], active_key_id: str) -> None:
        if active_key_id not in keys:
            raise InvalidArgument("LLMOS_ENCRYPTION_KEYS", f"active key {active_key_id!r} is not among the keys")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.active_key_id = active_key_id

    @classmethod
    def from_spec(cls, spec: str) -> Sealer:
        keys: dict[str, bytes] = {}
        for entry in filter(None, (part.strip() for part in spec.split(","))):
            key_id, sep, encoded = entry.partition(":")
            try:
                key = base64.b64decode(encoded, validate=True)
            except ValueError:
                key = b""
            if not sep or not key_id or len(key) != 32:
                raise InvalidArgument("LLMOS_ENCRYPTION_KEYS", f"entry {key_id!r} is not key_id:base64(32 bytes)")
            keys[key_id] = key
        if not keys:
            raise FailedPrecondition("no encryption key: set LLMOS_ENCRYPTION_KEYS (make one with `llmos keys data-key`)")
        return cls(keys, next(iter(keys)))

    def seal(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        key_id = self.active_key_id.encode()
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._ciphers[self.active_key_id].encrypt(nonce, plaintext, associated_data)
        return MAGIC + bytes([len(key_id)]) + key_id + nonce + ciphertext

    def open(self, blob: bytes, associated_data: bytes = b"") -> bytes:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
            raise InvalidArgument("sealed data", "not a sealed record")
        length = blob[len(MAGIC)]
        start = len(MAGIC) + 1
        key_id = blob[start:start + length].decode(errors="replace")
        nonce = blob[start + length:start + length + NONCE_BYTES]
        if key_id not in self._ciphers:
            raise FailedPrecondition(f"record sealed with key {key_id!r}, which is not configured any more")
        try:
            return self._ciphers[key_id].decrypt(nonce, blob[start + length + NONCE_BYTES:], associated_data)
        except InvalidTag:
            raise InvalidArgument("sealed data", "fails authentication: altered, or stored under another name") from None

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        length = blob[len(MAGIC)]
        return blob[len(MAGIC) + 1:len(MAGIC) + 1 + length].decode(errors="replace")


class AtRest:
    """How one store keeps its records: sealed under the configured keys, or, only where settings
    allow it, in plaintext. A record sealed under a key that is no longer configured fails with
    an error naming the key id."""

    def __init__(self, sealer: Sealer | None, store: str) -> None:
        self.sealer = sealer
        self.store = store

    @classmethod
    def from_settings(cls, settings: PlatformSettings, store: str) -> AtRest:
        if settings.encryption_keys:
            return cls(Sealer.from_spec(settings.encryption_keys), store)
        if not settings.plaintext_at_rest:
            raise SettingsError(
                f"{store} would be stored unencrypted: set LLMOS_ENCRYPTION_KEYS (`llmos keys data-key` makes a key), "
                "or LLMOS_PLAINTEXT_AT_REST=true to accept plaintext"
            )
        logger.warning("%s is stored in PLAINTEXT: LLMOS_ENCRYPTION_KEYS is empty and LLMOS_PLAINTEXT_AT_REST=true", store)
        return cls(None, store)

    @property
    def key_id(self) -> str:
        """The key new records are sealed with; empty when they are stored in plaintext."""
        return self.sealer.active_key_id if self.sealer else ""

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        return self.sealer.seal(plaintext, associated_data) if self.sealer else plaintext

    def open(self, record: bytes, associated_data: bytes) -> bytes:
        if not record.startswith(MAGIC):
            return self._plaintext(record)
        if self.sealer is None:
            raise FailedPrecondition(
                f"a record of {self.store} is encrypted (key {Sealer.key_id_of(record)!r}) but LLMOS_ENCRYPTION_KEYS is empty"
            )
        try:
            return self.sealer.open(record, associated_data)
        except InvalidArgument:
            # A stored record, not the caller's input: say what is wrong with the store.
            raise FailedPrecondition(
                f"a record of {self.store} fails authentication: it was altered, or copied from another record"
            ) from None

    def seal_text(self, text: str, associated_data: bytes) -> str:
        if self.sealer is None:
            return text
        return base64.b64encode(self.sealer.seal(text.encode(), associated_data)).decode()

    def open_text(self, stored: str, associated_data: bytes) -> str:
        if stored.startswith(SEALED_TEXT_PREFIX):
            return self.open(base64.b64decode(stored), associated_data).decode()
        return self._plaintext(stored)

    def _plaintext(self, record: T) -> T:
        if self.sealer is not None:
            raise FailedPrecondition(
                f"a record of {self.store} is stored in plaintext while encryption is on "
                "(written with LLMOS_PLAINTEXT_AT_REST=true?); write it again to seal it"
            )
        return record
