"""Encryption at rest: AES-256-GCM with key ids, so keys can rotate without re-encrypting.

Keys come from `LLMOS_ENCRYPTION_KEYS` as comma-separated `key_id:base64(32 bytes)` entries; the
first is used to seal, every listed key can open. A sealed blob is
`b"llmos1" | key id length | key id | 12-byte nonce | ciphertext+tag`, and the associated data
(for example the tenant and record key) binds a blob to where it is stored, so moving it
elsewhere fails to open. `llmos keys data-key` prints a new entry.
"""

from __future__ import annotations

import base64
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmos.errors import FailedPrecondition, InvalidArgument

MAGIC = b"llmos1"
NONCE_BYTES = 12


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

    def key_id_of(self, blob: bytes) -> str:
        length = blob[len(MAGIC)]
        return blob[len(MAGIC) + 1:len(MAGIC) + 1 + length].decode(errors="replace")
