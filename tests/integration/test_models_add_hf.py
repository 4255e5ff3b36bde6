"""`llmos models add NAME --hf DIR` for a generation model, end to end (issue 15, item 1): a Hugging
Face checkpoint folder (SmolLM2-135M-Instruct, written from its packaged GGUF as transformers
saves it: the chat template in chat_template.jinja) is built by the onnxruntime-genai builder,
recorded, and served by the inference service (a real process) under its own name, beside the
catalog's SmolLM2. Both artefacts come from the same weights through the same builder, so the
added model must answer a chat turn with exactly the default model's greedy tokens.

Building takes 1-3 minutes on 2 busy cores."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmos.clients import InferenceClient
from llmos.models.catalog import CATALOG, get_spec, locate_source
from llmos.models.export_genai import gguf_to_hf
from llmos.models.registry import add_model
from llmos.models.store import RegisteredModel
from llmos.v1 import common_pb2, inference_pb2
from services.inference.core import GENERATION_MODEL
from tests.conftest import NatsServer, RunningStack
from tests.grpc_helpers import connected
from tests.integration.test_inference_embed import start_inference

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

NAME = "smollm2-from-hf"
TOKENS = 24


@pytest.fixture(scope="module")
def added(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, RegisteredModel, Path]]:
    """A home with the catalog's built models linked in and the checkpoint folder added."""
    checkpoint = tmp_path_factory.mktemp("checkpoint") / "SmolLM2-135M-Instruct"
    gguf_to_hf(locate_source(get_spec(GENERATION_MODEL)).path, checkpoint, lambda _: None)
    home = tmp_path_factory.mktemp("models-home")
    (home / "models").mkdir()
    for name in CATALOG:
        (home / "models" / name).symlink_to(models_home / "models" / name, target_is_directory=True)
    yield home, add_model(home, NAME, hf=checkpoint, log=lambda _: None), checkpoint


def test_the_checkpoint_is_recorded_with_its_chat_template(added: tuple[Path, RegisteredModel, Path]) -> None:
    home, model, checkpoint = added
    assert (model.source_format, model.role, model.variant, model.architecture) == ("hf", "generation", "cpu-int4", "LlamaForCausalLM")
    assert model.chat_template == (checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    # The served tokenizer reads the template from tokenizer_config.json, where the GGUF path puts it too.
    served_config = json.loads((model.folder(home) / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert served_config.get("chat_template") == model.chat_template


@pytest.fixture(scope="module")
def served(added: tuple[Path, RegisteredModel, Path], nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    home, _, _ = added
    yield from start_inference(nats_server, home, tmp_path_factory.mktemp("inference-hf"), {})


@pytest.fixture
async def client(served: RunningStack) -> AsyncIterator[InferenceClient]:
    async with connected(served, InferenceClient) as inference_client:
        yield inference_client


async def test_the_added_checkpoint_answers_a_chat_turn_as_the_catalog_model_does(client: InferenceClient) -> None:
    listed = {info.name: info for info in await client.models(timeout_s=30)}
    assert listed[NAME].role == inference_pb2.MODEL_ROLE_GENERATION
    chat = inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="What is the capital of France?")])
    sampling = inference_pb2.SamplingParams(max_new_tokens=TOKENS, temperature=0)
    answers = {}
    for model in (NAME, GENERATION_MODEL):
        responses = [r async for r in client.generate(inference_pb2.GenerateRequest(model=model, messages=chat, sampling=sampling), timeout_s=300)]
        answers[model] = ([token for r in responses for token in r.token_ids], "".join(r.delta for r in responses))
    assert answers[NAME] == answers[GENERATION_MODEL]
    assert "Paris" in answers[NAME][1]
