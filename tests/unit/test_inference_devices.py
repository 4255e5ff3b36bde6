"""LLMOS_INFERENCE_DEVICE: which generation variant and providers each device uses, and the
messages a service asked for CUDA stops with when it cannot have it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.settings import ExecutionProvider, SettingsError, load_settings
from services.inference.device_cache import CopyKind, CudaMemory
from services.inference.devices import CPU, CUDA, check_session_provider, device_plan
from services.inference.settings import InferenceDevice, InferenceSettings

pytestmark = pytest.mark.unit

CPU_ONLY = ["AzureExecutionProvider", CPU]
WITH_CUDA = [CUDA, CPU]


def test_cpu_serves_the_int4_variant_on_the_cpu_and_embeds_where_the_platform_setting_says() -> None:
    plan = device_plan(InferenceDevice.CPU, ExecutionProvider.AUTO, WITH_CUDA)
    assert plan.generation_variant == "cpu-int4" and set(plan.generation_variants) == {"cpu-int4", "int8", "fp32"}
    assert plan.generation_providers == (CPU,)
    assert plan.embedding_providers == (CUDA, CPU)  # auto, as before the device setting
    assert device_plan(InferenceDevice.CPU, ExecutionProvider.CPU, WITH_CUDA).embedding_providers == (CPU,)
    assert device_plan(InferenceDevice.CPU, ExecutionProvider.AUTO, CPU_ONLY).embedding_providers == (CPU,)


def test_cuda_serves_the_fp16_variant_with_the_cuda_provider_first() -> None:
    plan = device_plan(InferenceDevice.CUDA, ExecutionProvider.AUTO, WITH_CUDA)
    assert plan.generation_variants == ("cuda-fp16",)
    assert plan.generation_providers == plan.embedding_providers == (CUDA, CPU)


def test_cuda_without_the_cuda_provider_says_what_to_install() -> None:
    with pytest.raises(FailedPrecondition) as error:
        device_plan(InferenceDevice.CUDA, ExecutionProvider.AUTO, CPU_ONLY)
    message = error.value.message
    assert f"LLMOS_INFERENCE_DEVICE=cuda but onnxruntime {ort.__version__} has no CUDAExecutionProvider" in message
    assert "(it has AzureExecutionProvider, CPUExecutionProvider)" in message
    assert "`gpu` extra" in message and "bash bench/gpu.sh --install-only" in message
    assert "or set LLMOS_INFERENCE_DEVICE=cpu" in message


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has the CUDA provider")
def test_this_machines_onnxruntime_refuses_cuda() -> None:
    with pytest.raises(FailedPrecondition, match="has no CUDAExecutionProvider"):
        device_plan(InferenceDevice.CUDA, ExecutionProvider.AUTO)


def test_cuda_contradicting_a_cpu_execution_provider_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cuda contradicts LLMOS_EXECUTION_PROVIDER=cpu"):
        device_plan(InferenceDevice.CUDA, ExecutionProvider.CPU, WITH_CUDA)


def test_a_session_that_fell_back_to_the_cpu_stops_the_service() -> None:
    check_session_provider("embedding model m", (CUDA, CPU), [CUDA, CPU])
    check_session_provider("embedding model m", (CPU,), [CPU])
    with pytest.raises(FailedPrecondition) as error:
        check_session_provider("generation model g", (CUDA, CPU), [CPU])
    assert error.value.message.startswith(
        "generation model g: LLMOS_INFERENCE_DEVICE=cuda but ONNX Runtime started it on CPUExecutionProvider: "
        "the CUDA provider did not load"
    )


def test_the_device_setting_is_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    for key in list(os.environ):
        if key.startswith("LLMOS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMOS_NATS_URL", "nats://127.0.0.1:4222")
    for number, name in enumerate(["INGEST", "TOKENIZER", "INFERENCE", "RETRIEVAL", "SPEECH", "DIALOGUE", "AUDIT"]):
        monkeypatch.setenv(f"LLMOS_{name}_ADDR", f"127.0.0.1:{5000 + number}")
    assert load_settings(InferenceSettings).inference_device is InferenceDevice.CPU
    monkeypatch.setenv("LLMOS_INFERENCE_DEVICE", "cuda")
    assert load_settings(InferenceSettings).inference_device is InferenceDevice.CUDA
    monkeypatch.setenv("LLMOS_INFERENCE_DEVICE", "gpu")
    with pytest.raises(SettingsError, match="LLMOS_INFERENCE_DEVICE"):
        load_settings(InferenceSettings)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a machine with an NVIDIA driver")
def test_the_gpu_cache_without_a_gpu_fails_with_the_cuda_runtimes_own_error() -> None:
    """Where a CUDA runtime is installed but no driver (this machine: /usr/local/cuda-13.0), its calls
    go through the ctypes bindings and fail with its message; where none is, CudaMemory says so."""
    try:
        memory = CudaMemory()
    except FailedPrecondition as error:
        assert "the KV cache in GPU memory needs the CUDA runtime library, and none loads" in error.message
        return
    with pytest.raises(RuntimeError, match=r"^cudaDeviceSynchronize failed: .+ \(\d+\)$"):
        memory.synchronize()
    source, target = np.arange(8, dtype=np.float16), np.zeros(8, dtype=np.float16)
    with pytest.raises(RuntimeError, match=r"^cudaMemcpy2D failed: .+ \(\d+\)$"):
        memory.copy_2d(target.ctypes.data, 4, source.ctypes.data, 4, 4, 4, CopyKind.HOST_TO_DEVICE)
