from __future__ import annotations

import pytest

from llmos.crypto import AtRest, Sealer, new_key_entry
from llmos.errors import FailedPrecondition, InvalidArgument

pytestmark = pytest.mark.unit


def test_round_trip_binds_the_associated_data() -> None:
    sealer = Sealer.from_spec(new_key_entry("k1"))
    blob = sealer.seal(b"order NW-204518 for alice", b"acme/session-1")
    assert b"alice" not in blob
    assert sealer.open(blob, b"acme/session-1") == b"order NW-204518 for alice"
    with pytest.raises(InvalidArgument, match="stored under another name"):
        sealer.open(blob, b"globex/session-1")


def test_a_flipped_bit_is_detected() -> None:
    sealer = Sealer.from_spec(new_key_entry("k1"))
    blob = bytearray(sealer.seal(b"secret"))
    blob[-1] ^= 1
    with pytest.raises(InvalidArgument, match="altered"):
        sealer.open(bytes(blob))


def test_rotation_keeps_old_records_readable_and_seals_with_the_new_key() -> None:
    old = new_key_entry("2025")
    before = Sealer.from_spec(old).seal(b"old record")
    rotated = Sealer.from_spec(f"{new_key_entry('2026')},{old}")
    assert rotated.open(before) == b"old record"
    assert rotated.key_id_of(rotated.seal(b"new record")) == "2026"
    retired = Sealer.from_spec(new_key_entry("2026"))
    with pytest.raises(FailedPrecondition, match="key '2025'"):
        retired.open(before)


@pytest.mark.parametrize("spec", ["", "k1", "k1:bm90IGEga2V5", "k1:!!!"])
def test_bad_key_specs_fail_with_the_variable_name(spec: str) -> None:
    with pytest.raises((InvalidArgument, FailedPrecondition), match="LLMOS_ENCRYPTION_KEYS"):
        Sealer.from_spec(spec)


def test_at_rest_text_round_trips_and_refuses_mixed_modes() -> None:
    sealing = AtRest(Sealer.from_spec(new_key_entry("k1")), "chunks")
    plain = AtRest(None, "chunks")
    stored = sealing.seal_text("Alice's order NW-204518", b"acme/c1")
    assert "NW-204518" not in stored and sealing.open_text(stored, b"acme/c1") == "Alice's order NW-204518"
    assert plain.seal_text("clear", b"") == "clear" and plain.open_text("clear", b"") == "clear"
    with pytest.raises(FailedPrecondition, match="encrypted \\(key 'k1'\\) but LLMOS_ENCRYPTION_KEYS is empty"):
        plain.open_text(stored, b"acme/c1")
    with pytest.raises(FailedPrecondition, match="stored in plaintext while encryption is on"):
        sealing.open(b"a plaintext record", b"")
