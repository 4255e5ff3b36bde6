"""`llmos models build` end to end: real packaged weights in, served artefacts out.

Builds once per session into a temporary home (about a minute on two cores), then checks the
artefacts the way the services will use them, against references computed here with torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
import torch
import transformers
from tokenizers import Tokenizer

from llmos.models import (
    ModelsManifest,
    artefact_dir,
    build_models,
    get_spec,
    load_manifest,
    locate_source,
    models_built,
)
from llmos.models.manifest import MANIFEST_NAME, artefact_problems, read_artefact_manifest, sha256_file
from llmos.models.pooling import PoolingConfig, pool

pytestmark = pytest.mark.integration


GENERATION = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"
SENTENCES = [
    "How do I reset my password?",
    "Our refund policy allows returns within 30 days.",
    "A cat sat on the mat.",
    "word " * 400,  # longer than max_seq_length: checks the served tokenizer truncates like the reference
]


def _quiet(_: str) -> None:
    """Build log sink."""


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("llmos-home")
    build_models(home, log=_quiet)
    return home


def test_manifest_lists_every_artefact_with_matching_hashes(home: Path) -> None:
    index = load_manifest(home)
    assert models_built(home)
    assert {(a.name, a.variant) for a in index.artefacts} >= {(GENERATION, "cpu-int4"), (EMBEDDING, "fp32")}
    for artefact in index.artefacts:
        folder = artefact_dir(home, artefact.name, artefact.variant)
        assert read_artefact_manifest(folder) == artefact
        assert artefact.licence == get_spec(artefact.name).licence
        assert artefact.source_version
        assert {"torch", "transformers", "onnxruntime-genai"} <= set(artefact.builders)
        for entry in artefact.files:
            path = folder / entry.path
            assert path.stat().st_size == entry.size
            assert sha256_file(path) == entry.sha256


def test_generation_folder_loads_and_generates_greedily(home: Path) -> None:
    folder = artefact_dir(home, GENERATION)
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.apply_chat_template(
        json.dumps([{"role": "user", "content": "Name a colour."}]), add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    input_ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(input_ids) + 6)
    generator = og.Generator(model, params)
    generator.append_tokens(input_ids)
    while not generator.is_done():
        generator.generate_next_token()
    new_tokens = generator.get_sequence(0)[len(input_ids) :]
    assert 1 <= len(new_tokens) <= 6
    assert tokenizer.decode(new_tokens).strip()


def test_chat_template_comes_from_the_gguf(home: Path) -> None:
    gguf_path = locate_source(get_spec(GENERATION)).path
    template = gguf.GGUFReader(gguf_path).fields["tokenizer.chat_template"].contents()
    config = json.loads((artefact_dir(home, GENERATION) / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template


def _torch_reference(sentences: list[str]) -> np.ndarray:
    """Sentence vectors as sentence-transformers defines them, without it: mean pool + L2 norm."""
    checkpoint = locate_source(get_spec(EMBEDDING)).path
    max_seq_length = json.loads((checkpoint / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModel.from_pretrained(checkpoint).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=1).numpy()


def _served_embeddings(folder: Path, sentences: list[str]) -> np.ndarray:
    """Sentence vectors the way the inference service computes them: tokenizers + ORT + pooling.json."""
    encodings = Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(sentences)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(["last_hidden_state"], feeds)
    return pool(hidden, feeds["attention_mask"], PoolingConfig.load(folder))


@pytest.mark.parametrize(("variant", "min_cosine"), [("fp32", 0.9999), ("int8", 0.99)])
def test_embeddings_match_the_torch_reference(home: Path, variant: str, min_cosine: float) -> None:
    if variant == "int8":
        build_models(home, int8=True, log=_quiet)
    served = _served_embeddings(artefact_dir(home, EMBEDDING, variant), SENTENCES)
    reference = _torch_reference(SENTENCES)
    assert served.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    cosines = (served * reference).sum(axis=1)
    assert cosines.min() >= min_cosine, cosines


def _snapshot(index: ModelsManifest, home: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every artefact file: unchanged only if nothing was rewritten."""
    snapshot = {}
    for artefact in index.artefacts:
        folder = artefact_dir(home, artefact.name, artefact.variant)
        for path in [folder / MANIFEST_NAME, *(folder / e.path for e in artefact.files)]:
            stat = path.stat()
            snapshot[str(path)] = (stat.st_ino, stat.st_mtime_ns)
    return snapshot


def test_second_build_is_a_no_op(home: Path) -> None:
    before = _snapshot(load_manifest(home), home)
    messages: list[str] = []
    started = time.monotonic()
    build_models(home, log=messages.append)
    assert time.monotonic() - started < 10
    assert all(message.endswith("up to date") for message in messages), messages
    assert _snapshot(load_manifest(home), home) == before


def test_a_damaged_file_rebuilds_only_its_artefact(home: Path) -> None:
    folder = artefact_dir(home, EMBEDDING)
    (folder / "pooling.json").write_text('{"mode": "max"}')
    messages: list[str] = []
    build_models(home, log=messages.append)
    assert any(m.startswith(f"{GENERATION}/cpu-int4: up to date") for m in messages)
    assert any(m.startswith(f"{EMBEDDING}/fp32: building (pooling.json") for m in messages)
    assert artefact_problems(artefact_dir(home, EMBEDDING), check_hashes=True) == []
    assert PoolingConfig.load(folder).mode == "mean"
