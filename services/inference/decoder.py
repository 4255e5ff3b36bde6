"""The built decoder (`model.onnx` of the onnxruntime-genai artefact) run with plain ONNX Runtime.

onnxruntime-genai's Generator batches only statically, so the continuous-batching scheduler
drives the graph itself. The KV cache lives in one preallocated buffer per layer and tensor,
shaped (max_batch, kv_heads, max_context, head_size): row r is the cache of the sequence in
slot r. The same memory is bound as both `past_key_values.*` and `present.*`, so
GroupQueryAttention writes each new token's keys and values in place (no per-step copies).

A prompt is prefilled alone into its row; a decode step runs the first `n` rows together with
each row's attention mask holding ones for its own length plus the new token and zeros after,
which is how GroupQueryAttention learns where each sequence's new token goes (right padding;
left padding gives wrong text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class DecoderConfig:
    num_layers: int
    kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def load(cls, folder: Path) -> DecoderConfig:
        model = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
        decoder = model["decoder"]
        eos = model["eos_token_id"]
        return cls(
            num_layers=int(decoder["num_hidden_layers"]),
            kv_heads=int(decoder["num_key_value_heads"]),
            head_size=int(decoder["head_size"]),
            vocab_size=int(model["vocab_size"]),
            context_length=int(model["context_length"]),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
        )


@dataclass(frozen=True)
class CachedPrefix:
    """Keys and values of a prompt's first tokens, shaped (layers, kv_heads, tokens, head_size)."""

    token_ids: np.ndarray
    keys: np.ndarray
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)


class Decoder:
    """One model session plus the slot KV cache; not thread-safe (the scheduler thread owns it)."""

    def __init__(
        self,
        folder: Path,
        providers: Sequence[str],
        threads: int,
        max_batch: int,
        max_context: int,
        thread_spinning: bool = True,
    ) -> None:
        self.config = DecoderConfig.load(folder)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        # Spinning workers keep a core busy between steps; where the service shares its cores
        # (gRPC, the scheduler's Python, other processes) that stalls every step, so it is opt-in.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if thread_spinning else "0")
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=list(providers))
        inputs = {node.name: node for node in self.session.get_inputs()}
        dtype = _ORT_TYPES[inputs["past_key_values.0.key"].type]
        self.max_batch = max_batch
        self.max_context = min(max_context, self.config.context_length)
        self._allocate_cache((max_batch, self.config.kv_heads, self.max_context, self.config.head_size), dtype)
        # One binding per row range, made once: the KV views it binds never move, so a step only
        # rebinds its token ids, mask and the logits view.
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        logits = next(node for node in self.session.get_outputs() if node.name == "logits")
        self._logits_type = _ORT_TYPES[logits.type]
        # Artefacts built since llmos.models.export_genai.logits_of_last_position project the last
        # position only; older ones (and a folder built elsewhere) give logits for every position.
        self._last_position_only = logits.shape[1] == 1
        self._logits = np.empty((max_batch, self.config.vocab_size), self._logits_type)

    def _allocate_cache(self, shape: tuple[int, int, int, int], dtype: type[np.generic]) -> None:
        """The slot KV cache in host memory (services.inference.device_cache: on the provider's device).

        Committed now: np.zeros only maps pages, and the kernel would allocate and zero them on
        the first write into each slot, inside a request's prefill (measured: 100-300 ms of
        system time for each slot's first prompt on a busy machine, every slot once per process).
        """
        self.keys = [np.zeros(shape, dtype) for _ in range(self.config.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(self.config.num_layers)]
        for buffer in (*self.keys, *self.values):
            buffer.fill(0)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _binding(self, rows: slice) -> ort.IOBinding:
        key = (rows.start, rows.stop)
        binding = self._bindings.get(key)
        if binding is None:
            binding = self.session.io_binding()
            for layer in range(self.config.num_layers):
                for kind, buffers in (("key", self.keys), ("value", self.values)):
                    cache = ort.OrtValue.ortvalue_from_numpy(buffers[layer][rows])
                    binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", cache)
                    binding.bind_ortvalue_output(f"present.{layer}.{kind}", cache)
            self._bindings[key] = binding
        return binding

    def _run(self, rows: slice, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run rows `rows` on (n, t) new tokens; returns the (n, t, vocab) logits (t = 1 when the graph
        projects the last position only), valid until the next run."""
        n, t = input_ids.shape
        if self._last_position_only:
            t = 1
        if self._logits.size < n * t * self.config.vocab_size:
            # At least doubled: prompts of growing lengths would otherwise map (and fault in) a
            # new buffer at each one.
            capacity = max(n * t, 2 * self._logits.size // self.config.vocab_size)
            self._logits = np.empty((capacity, self.config.vocab_size), self._logits_type)
        logits = self._logits.reshape(-1)[: n * t * self.config.vocab_size].reshape(n, t, self.config.vocab_size)
        binding = self._binding(rows)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_output("logits", "cpu", 0, self._logits_type, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    def prefill(self, row: int, token_ids: Sequence[int], cached: int = 0) -> np.ndarray:
        """Run a prompt into slot `row` whose first `cached` tokens are already in place.

        Returns the logits (vocab_size,) for the token after the prompt.
        """
        total = len(token_ids)
        input_ids = np.asarray(token_ids[cached:], dtype=np.int64)[None, :]
        attention_mask = np.ones((1, total), dtype=np.int64)
        logits = self._run(slice(row, row + 1), input_ids, attention_mask)
        return logits[0, -1].astype(np.float32)

    def decode(self, token_ids: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
        """One step for rows 0..n-1: row i holds `lengths[i]` tokens and gets `token_ids[i]`.

        Returns logits (n, vocab_size), valid until the next call.
        """
        n = len(token_ids)
        lengths_array = np.asarray(lengths, dtype=np.int64)
        width = int(lengths_array.max()) + 1
        attention_mask = (np.arange(width)[None, :] <= lengths_array[:, None]).astype(np.int64)
        input_ids = np.asarray(token_ids, dtype=np.int64)[:, None]
        return self._run(slice(0, n), input_ids, attention_mask)[:, -1]

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's cache to another slot (compaction when a sequence leaves)."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]

    def save_prefix(self, row: int, token_ids: Sequence[int]) -> CachedPrefix:
        length = len(token_ids)
        return CachedPrefix(
            np.asarray(token_ids, dtype=np.int64),
            np.stack([layer[row, :, :length] for layer in self.keys]),
            np.stack([layer[row, :, :length] for layer in self.values]),
        )

    def load_prefix(self, row: int, prefix: CachedPrefix, length: int) -> None:
        """Put the first `length` tokens of a cached prefix into slot `row`."""
        for index in range(self.config.num_layers):
            self.keys[index][row, :, :length] = prefix.keys[index, :, :length]
            self.values[index][row, :, :length] = prefix.values[index, :, :length]
