"""The CUDA path, as far as a machine without an NVIDIA GPU can take it (issue 15, item 8).

- `llmos models add NAME --gguf SmolLM2 --variant cuda-fp16` builds the fp16 CUDA artefact here
  (the onnxruntime-genai builder only writes ONNX and genai_config.json): its config names the
  cuda provider, its weights, KV cache and logits are fp16.
- The decoder that keeps the slot KV cache in the provider's memory (the CUDA engine) gives
  exactly the numpy decoder's logits, run on host memory with the CPU provider: the int4 model
  and the fp16 CUDA artefact, through prefill, batched decode, a slot move and the prefix cache.
- The service asked for CUDA on this onnxruntime stops at start and says what is missing.
What does not run here: cudaMemcpy2D and the CUDA provider itself (bench/gpu.sh, on a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.gpu_check import exercise
from llmos.models.catalog import get_spec, locate_source
from llmos.models.manifest import artefact_problems
from llmos.models.store import RegisteredModel, added_artefact_dir, artefact_dir, registered_models
from llmos.settings import ExecutionProvider
from llmos.tokenization import ModelTokenizer
from llmos_cli.main import main
from services.inference.app import generation_candidates
from services.inference.core import GENERATION_MODEL
from services.inference.decoder import Decoder
from services.inference.device_cache import DeviceCacheDecoder, HostMemory
from services.inference.devices import CPU, CUDA, device_plan
from services.inference.settings import InferenceDevice, InferenceSettings
from tests.conftest import NatsServer, platform_environment

pytestmark = pytest.mark.integration

NAME = "smollm2-fp16"
FLOAT16 = onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def cuda_artefact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RegisteredModel]:
    """SmolLM2's packaged GGUF added as cuda-fp16 through the CLI, in a home of its own."""
    home = tmp_path_factory.mktemp("cuda-home")
    gguf = locate_source(get_spec(GENERATION_MODEL)).path
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMOS_HOME", str(home))
        assert main(["models", "add", NAME, "--gguf", str(gguf), "--variant", "cuda-fp16"]) == 0
    model, folder = added_artefact_dir(home, NAME)
    return folder, model


def test_the_cuda_fp16_artefact_is_built_for_the_cuda_provider_with_fp16_weights(
    cuda_artefact: tuple[Path, RegisteredModel],
) -> None:
    folder, model = cuda_artefact
    assert (model.variant, model.role, model.source_format) == ("cuda-fp16", "generation", "gguf")
    assert not artefact_problems(folder, check_hashes=True)
    config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    provider_options = config["model"]["decoder"]["session_options"]["provider_options"]
    assert [next(iter(option)) for option in provider_options] == ["cuda"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    float_weights = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, FLOAT16)]
    assert float_weights and all(t.data_type == FLOAT16 for t in float_weights)
    # Every matrix is a plain fp16 MatMul: nothing quantized (the CPU variant's MatMulNBits).
    assert not any(node.op_type == "MatMulNBits" for node in graph.node)
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.output]}
    assert types["past_key_values.0.key"] == types["present.0.value"] == types["logits"] == FLOAT16
    # fp16: two bytes a parameter, about 135 M of them.
    assert 250e6 < (folder / "model.onnx.data").stat().st_size < 300e6
    assert model.chat_template and "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("variant", ["cpu-int4", "cuda-fp16"])
def test_the_device_cache_decoder_gives_the_host_decoders_logits(
    variant: str, models_home: Path, cuda_artefact: tuple[Path, RegisteredModel]
) -> None:
    folder = artefact_dir(models_home, GENERATION_MODEL) if variant == "cpu-int4" else cuda_artefact[0]
    tokenizer = ModelTokenizer.from_dir(folder)
    host, host_text = exercise(Decoder(folder, [CPU], 2, 2, 256), tokenizer)
    device = DeviceCacheDecoder(folder, [CPU], 2, 2, 256, memory=HostMemory())
    assert device.providers == [CPU]
    pointer, pointer_text = exercise(device, tokenizer)
    assert pointer_text == host_text and ("Paris" in host_text or "France" in host_text)
    assert len(pointer) == len(host)
    for index, (expected, got) in enumerate(zip(host, pointer, strict=True)):
        assert np.array_equal(expected, got), f"call {index}: logits differ by {np.abs(expected - got).max()}"


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has the CUDA provider")
def test_the_service_asked_for_cuda_stops_and_says_what_is_missing(
    nats_server: NatsServer, models_home: Path, tmp_path: Path
) -> None:
    (tmp_path / "models").symlink_to(models_home / "models", target_is_directory=True)
    env = {**platform_environment(nats_server, tmp_path), "LLMOS_INFERENCE_DEVICE": "cuda"}
    result = subprocess.run(
        [sys.executable, "-m", "services.inference"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"LLMOS_INFERENCE_DEVICE=cuda but onnxruntime {ort.__version__} has no CUDAExecutionProvider" in output
    assert "bash bench/gpu.sh --install-only" in output


def test_a_cpu_service_does_not_offer_an_added_cuda_model(cuda_artefact: tuple[Path, RegisteredModel]) -> None:
    folder, _ = cuda_artefact
    home = folder.parents[2]
    assert NAME in registered_models(home)
    settings = InferenceSettings.model_construct(home=home, inference_max_context=2048, inference_max_batch=8)
    cpu = generation_candidates(settings, device_plan(InferenceDevice.CPU, ExecutionProvider.CPU), 1)()
    cuda = generation_candidates(settings, device_plan(InferenceDevice.CUDA, ExecutionProvider.AUTO, [CUDA, CPU]), 1)()
    assert NAME not in cpu
    assert cuda[NAME].served.variant == "cuda-fp16"
