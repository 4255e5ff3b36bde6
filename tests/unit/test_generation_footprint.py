"""What a generation model counts against LLMOS_INFERENCE_GENERATION_MEMORY_MB (issue 15, item 1):
its files, the slot KV cache, and the logits of a whole prompt piece, which a model with Gemma 3's
262k vocabulary makes the largest buffer of all (268 MB at 256 positions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.inference.app import generation_footprint
from services.inference.scheduler import PREFILL_CHUNK_TOKENS

pytestmark = pytest.mark.unit

FLOAT32 = 4


def artefact(folder: Path, vocab_size: int, weights_bytes: int) -> Path:
    folder.mkdir()
    decoder = {"num_hidden_layers": 2, "num_key_value_heads": 1, "head_size": 64}
    model = {"decoder": decoder, "vocab_size": vocab_size, "context_length": 1024, "eos_token_id": 1}
    (folder / "genai_config.json").write_text(json.dumps({"model": model}))
    (folder / "model.onnx.data").write_bytes(b"\0" * weights_bytes)
    return folder


def test_the_prefill_logits_are_counted(tmp_path: Path) -> None:
    folder = artefact(tmp_path / "gemma-like", vocab_size=262_144, weights_bytes=1000)
    files = sum(path.stat().st_size for path in folder.iterdir())
    kv_cache = 2 * 2 * 4 * 1 * 512 * 64 * FLOAT32  # keys and values, layers, slots, heads, context, head size
    assert generation_footprint(folder, max_batch=4, max_context=512) == files + kv_cache + PREFILL_CHUNK_TOKENS * 262_144 * FLOAT32


def test_a_batch_wider_than_a_prompt_piece_counts_its_decode_logits(tmp_path: Path) -> None:
    folder = artefact(tmp_path / "small", vocab_size=1000, weights_bytes=10)
    wide, narrow = PREFILL_CHUNK_TOKENS * 2, PREFILL_CHUNK_TOKENS // 2
    kv_per_slot = 2 * 2 * 1 * 512 * 64 * FLOAT32
    difference = generation_footprint(folder, wide, 512) - generation_footprint(folder, narrow, 512)
    assert difference == (wide - narrow) * kv_per_slot + (wide - PREFILL_CHUNK_TOKENS) * 1000 * FLOAT32
