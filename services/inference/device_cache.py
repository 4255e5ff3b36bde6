"""The decoder with its slot KV cache in the memory its provider computes in: GPU memory on CUDA.

services.inference.decoder keeps the cache in numpy arrays, which the CPU provider reads and
writes in place. Bound to the CUDA provider, host buffers would be copied to the GPU and back
on every step, all slots' whole cache. Here each layer's keys and values are one ONNX Runtime
allocation on the device, (max_batch, kv_heads, max_context, head_size) like the host cache,
and a row range is bound by pointer arithmetic: rows are contiguous in the first dimension, so
rows [a, b) start `a` row sizes after the base. The slot moves, the prefix cache and pre-emption
copy a row's first `length` positions, which are `kv_heads` strided blocks: one 2-D copy each
(cudaMemcpy2D on CUDA).

`HostMemory` runs the same code on host memory with the CPU provider: the tests compare it with
the numpy decoder on a machine without a GPU; only `CudaMemory`'s runtime calls need one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from llmos.errors import FailedPrecondition
from services.inference.decoder import CachedPrefix, Decoder
from services.inference.devices import CUDA, check_session_provider


class CopyKind(IntEnum):
    """cudaMemcpyKind values."""

    HOST_TO_DEVICE = 1
    DEVICE_TO_HOST = 2
    DEVICE_TO_DEVICE = 3


class DeviceMemory(Protocol):
    """Where the cache lives: ONNX Runtime's name of the device, and strided copies within it and to the host."""

    device: str

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, kind: CopyKind) -> None:
        """Copy `height` blocks of `width` bytes, `src_pitch` apart at `src`, `dst_pitch` apart at `dst`."""
        ...

    def synchronize(self) -> None:
        """Return when every copy is done (the next model run may read what they wrote)."""
        ...


class HostMemory:
    """The cache in host memory: the pointer-bound decoder on the CPU provider."""

    device = "cpu"

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, kind: CopyKind) -> None:
        for block in range(height):
            ctypes.memmove(dst + block * dst_pitch, src + block * src_pitch, width)

    def synchronize(self) -> None:
        return None


class CudaMemory:
    """The cache in GPU memory, copied with the CUDA runtime onnxruntime-gpu itself loads."""

    device = "cuda"
    # The CUDA runtimes onnxruntime-gpu has been built against (13: 1.31 on PyPI; 12: earlier).
    _RUNTIMES = ("libcudart.so.13", "libcudart.so.12")

    def __init__(self) -> None:
        self._cudart = self._load_runtime()
        self._cudart.cudaMemcpy2D.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
        self._cudart.cudaGetErrorString.restype = ctypes.c_char_p

    @classmethod
    def _load_runtime(cls) -> ctypes.CDLL:
        # preload_dlls loads the runtime of the nvidia-* wheels, if that is where it comes from;
        # dlopen by soname then finds the library already in the process.
        ort.preload_dlls(cuda=True, cudnn=False)
        site = Path(ort.__file__).resolve().parents[1]
        candidates = [*cls._RUNTIMES, *sorted(glob.glob(str(site / "nvidia" / "**" / "libcudart.so.1*"), recursive=True))]
        if found := ctypes.util.find_library("cudart"):
            candidates.append(found)
        for candidate in candidates:
            try:
                return ctypes.CDLL(candidate)
            except OSError:
                continue
        raise FailedPrecondition(
            f"the KV cache in GPU memory needs the CUDA runtime library, and none loads (tried {', '.join(candidates)}; "
            f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')!r}): install the `gpu` extra, whose onnxruntime-gpu[cuda] "
            "brings it, or set LLMOS_INFERENCE_DEVICE=cpu"
        )

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"{call} failed: {self._cudart.cudaGetErrorString(status).decode()} ({status})")

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, kind: CopyKind) -> None:
        self._check(self._cudart.cudaMemcpy2D(dst, dst_pitch, src, src_pitch, width, height, int(kind)), "cudaMemcpy2D")

    def synchronize(self) -> None:
        # Device-to-device copies return before they finish, and ONNX Runtime's stream does not wait for them.
        self._check(self._cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


class DeviceCacheDecoder(Decoder):
    """Decoder whose slot KV cache is allocated on `memory.device`; same interface and results."""

    def __init__(
        self,
        folder: Path,
        providers: Sequence[str],
        threads: int,
        max_batch: int,
        max_context: int,
        thread_spinning: bool = True,
        memory: DeviceMemory | None = None,
    ) -> None:
        self.memory: DeviceMemory = memory if memory is not None else CudaMemory()
        super().__init__(folder, providers, threads, max_batch, max_context, thread_spinning)

    def _allocate_cache(self, shape: tuple[int, int, int, int], dtype: type[np.generic]) -> None:
        if self.memory.device == "cuda":  # before allocating: a session that fell back to the CPU says so
            check_session_provider("generation model", (CUDA,), self.session.get_providers())
        self._dtype = dtype
        item = np.dtype(dtype).itemsize
        _, kv_heads, max_context, head_size = shape
        self._position_bytes = head_size * item
        self._pitch = max_context * self._position_bytes  # one head's block of positions
        self._row_bytes = kv_heads * self._pitch
        self._kv_heads, self._head_size = kv_heads, head_size

        def zeroed() -> ort.OrtValue:
            # Zeroed: attention multiplies the masked positions' weights (0) by their values, and
            # uninitialised memory may hold NaN, which 0 does not cancel. On the CPU the OrtValue
            # wraps the array itself, so each layer gets its own.
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.memory.device, 0)

        self._device_keys = [zeroed() for _ in range(self.config.num_layers)]
        self._device_values = [zeroed() for _ in range(self.config.num_layers)]

    def _caches(self) -> list[tuple[str, list[ort.OrtValue]]]:
        return [("key", self._device_keys), ("value", self._device_values)]

    def _binding(self, rows: slice) -> ort.IOBinding:
        key = (rows.start, rows.stop)
        binding = self._bindings.get(key)
        if binding is None:
            binding = self.session.io_binding()
            shape = (rows.stop - rows.start, self._kv_heads, self.max_context, self._head_size)
            for layer in range(self.config.num_layers):
                for kind, caches in self._caches():
                    pointer = caches[layer].data_ptr() + rows.start * self._row_bytes
                    binding.bind_input(f"past_key_values.{layer}.{kind}", self.memory.device, 0, self._dtype, shape, pointer)
                    binding.bind_output(f"present.{layer}.{kind}", self.memory.device, 0, self._dtype, shape, pointer)
            self._bindings[key] = binding
        return binding

    def _copy_positions(self, dst: int, dst_pitch: int, src: int, src_pitch: int, length: int, kind: CopyKind) -> None:
        if length:
            self.memory.copy_2d(dst, dst_pitch, src, src_pitch, length * self._position_bytes, self._kv_heads, kind)

    def move_row(self, source: int, target: int, length: int) -> None:
        for _, caches in self._caches():
            for cache in caches:
                base = cache.data_ptr()
                self._copy_positions(base + target * self._row_bytes, self._pitch, base + source * self._row_bytes,
                                     self._pitch, length, CopyKind.DEVICE_TO_DEVICE)
        self.memory.synchronize()

    def save_prefix(self, row: int, token_ids: Sequence[int]) -> CachedPrefix:
        length = len(token_ids)
        shape = (self.config.num_layers, self._kv_heads, length, self._head_size)
        saved = {"key": np.empty(shape, self._dtype), "value": np.empty(shape, self._dtype)}
        for kind, caches in self._caches():
            for layer, cache in enumerate(caches):
                self._copy_positions(saved[kind][layer].ctypes.data, length * self._position_bytes,
                                     cache.data_ptr() + row * self._row_bytes, self._pitch, length, CopyKind.DEVICE_TO_HOST)
        self.memory.synchronize()
        return CachedPrefix(np.asarray(token_ids, dtype=np.int64), saved["key"], saved["value"])

    def load_prefix(self, row: int, prefix: CachedPrefix, length: int) -> None:
        for kind, caches in self._caches():
            stored = np.ascontiguousarray(prefix.keys if kind == "key" else prefix.values, dtype=self._dtype)
            stored_pitch = stored.shape[2] * self._position_bytes
            for layer, cache in enumerate(caches):
                self._copy_positions(cache.data_ptr() + row * self._row_bytes, self._pitch, stored[layer].ctypes.data,
                                     stored_pitch, length, CopyKind.HOST_TO_DEVICE)
        self.memory.synchronize()
