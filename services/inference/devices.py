"""Which device the inference service runs its models on, and with which ONNX Runtime providers.

`LLMOS_INFERENCE_DEVICE=cpu` (the default) serves the CPU generation variants on the CPU
provider, and embeds where `LLMOS_EXECUTION_PROVIDER` says. `cuda` serves the `cuda-fp16`
generation artefacts with their KV cache in GPU memory (services.inference.device_cache) and
embeds on the CUDA provider. A service asked for CUDA that cannot have it stops at start with a
message saying what is missing: a running service never quietly falls back to the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnxruntime as ort

from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.settings import ExecutionProvider
from services.inference.settings import InferenceDevice

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Variants each device's generation engine runs: the first is the catalog model's served variant.
CPU_GENERATION_VARIANTS = ("cpu-int4", "int8", "fp32")
CUDA_GENERATION_VARIANTS = ("cuda-fp16",)
GPU_SETUP = (
    "install the `gpu` extra in place of the CPU packages (`bash bench/gpu.sh --install-only` runs "
    "`pip uninstall onnxruntime onnxruntime-genai` and installs onnxruntime-gpu and onnxruntime-genai-cuda) "
    "on a machine with an NVIDIA GPU and driver, or set LLMOS_INFERENCE_DEVICE=cpu"
)


@dataclass(frozen=True)
class DevicePlan:
    """The providers and generation variants a service on `device` uses."""

    device: InferenceDevice
    generation_variants: tuple[str, ...]
    generation_providers: tuple[str, ...]
    embedding_providers: tuple[str, ...]

    @property
    def generation_variant(self) -> str:
        """The variant of the catalog's generation models this device serves."""
        return self.generation_variants[0]


def execution_providers(choice: ExecutionProvider, available: Sequence[str]) -> tuple[str, ...]:
    """Providers for LLMOS_EXECUTION_PROVIDER (embeddings on a CPU device): CUDA when present and asked or auto."""
    if choice is ExecutionProvider.CUDA and CUDA not in available:
        raise FailedPrecondition(f"LLMOS_EXECUTION_PROVIDER=cuda but this onnxruntime has no CUDA provider; {GPU_SETUP}")
    if choice is not ExecutionProvider.CPU and CUDA in available:
        return (CUDA, CPU)
    return (CPU,)


def device_plan(
    device: InferenceDevice, execution_provider: ExecutionProvider, available: Sequence[str] | None = None
) -> DevicePlan:
    """What `device` runs on; FailedPrecondition when it is cuda and onnxruntime has no CUDA provider.

    `available` defaults to onnxruntime.get_available_providers(), which lists what the installed
    package was built with (the CPU package: no CUDA). Whether the CUDA libraries and a GPU are
    really there shows only when a session starts (check_session_provider).
    """
    providers = list(ort.get_available_providers() if available is None else available)
    if device is InferenceDevice.CPU:
        return DevicePlan(device, CPU_GENERATION_VARIANTS, (CPU,), execution_providers(execution_provider, providers))
    if execution_provider is ExecutionProvider.CPU:
        raise InvalidArgument(
            "LLMOS_INFERENCE_DEVICE",
            "cuda contradicts LLMOS_EXECUTION_PROVIDER=cpu; set LLMOS_EXECUTION_PROVIDER to auto or cuda, "
            "or LLMOS_INFERENCE_DEVICE to cpu",
        )
    if CUDA not in providers:
        raise FailedPrecondition(
            f"LLMOS_INFERENCE_DEVICE=cuda but onnxruntime {ort.__version__} has no {CUDA} "
            f"(it has {', '.join(providers) or 'none'}); {GPU_SETUP}"
        )
    return DevicePlan(device, CUDA_GENERATION_VARIANTS, (CUDA, CPU), (CUDA, CPU))


def check_session_provider(what: str, wanted: Sequence[str], running: Sequence[str]) -> None:
    """FailedPrecondition when a session asked for CUDA first runs on something else: ONNX Runtime
    logs a CUDA provider that fails to start (no GPU, no driver, CUDA or cuDNN libraries missing)
    and goes on without it."""
    if wanted and wanted[0] == CUDA and (not running or running[0] != CUDA):
        raise FailedPrecondition(
            f"{what}: LLMOS_INFERENCE_DEVICE=cuda but ONNX Runtime started it on {', '.join(running) or 'nothing'}: "
            "the CUDA provider did not load (see the onnxruntime error above: no GPU visible, an NVIDIA driver "
            "older than the CUDA that onnxruntime-gpu needs, or its CUDA/cuDNN libraries missing; "
            "`nvidia-smi` and `python -c 'import onnxruntime; onnxruntime.preload_dlls(); "
            "onnxruntime.print_debug_info()'` tell which)"
        )
