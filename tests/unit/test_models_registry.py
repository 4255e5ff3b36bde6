"""Models people bring (issue 15, item 1): what `llmos models add` refuses before building, the
registry it keeps, and `remove`. Building itself is in tests/integration/test_models_add.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from llmos.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from llmos.models.catalog import Role, get_spec, locate_source
from llmos.models.registry import add_model, inspect_gguf, remove_model
from llmos.models.store import RegisteredModel, refresh_index, registered_models, registry_path
from llmos_cli.main import main

pytestmark = pytest.mark.unit

SMOLLM2_GGUF = locate_source(get_spec("smollm2-135m-instruct")).path


def tiny_gguf(path: Path, architecture: str) -> Path:
    """A well-formed GGUF declaring `architecture`, with one small tensor."""
    writer = GGUFWriter(str(path), architecture)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quiet(_: str) -> None:
    pass


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"PK\x03\x04 a zip file, not a model" * 100)
    with pytest.raises(InvalidArgument, match="is not a GGUF file"):
        add_model(tmp_path / "home", "mine", gguf=junk, log=quiet)
    with pytest.raises(InvalidArgument, match="is not a file"):
        add_model(tmp_path / "home", "mine", gguf=tmp_path / "missing.gguf", log=quiet)


def test_a_truncated_gguf_is_refused_as_corrupt(tmp_path: Path) -> None:
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(SMOLLM2_GGUF.read_bytes()[: 1 << 16])  # the header and part of its metadata
    with pytest.raises(InvalidArgument, match="corrupt or truncated"):
        add_model(tmp_path / "home", "mine", gguf=truncated, log=quiet)
    assert not registered_models(tmp_path / "home")


def test_an_unknown_architecture_is_refused_naming_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown architecture 'made-up-arch'.*llama"):
        add_model(tmp_path / "home", "mine", gguf=tiny_gguf(tmp_path / "odd.gguf", "made-up-arch"), log=quiet)
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"], "model_type": "made_up"}))
    with pytest.raises(InvalidArgument, match="unknown architecture 'MadeUpForCausalLM'.*LlamaForCausalLM"):
        add_model(tmp_path / "home", "mine", hf=checkpoint, log=quiet)
    with pytest.raises(InvalidArgument, match="unknown architecture 'made_up' for embeddings"):
        add_model(tmp_path / "home", "mine", hf=checkpoint, role=Role.EMBEDDING, log=quiet)


def test_names_taken_bad_names_and_mismatched_options_are_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with pytest.raises(AlreadyExists, match="taken by a built-in model"):
        add_model(home, "smollm2-135m-instruct", gguf=SMOLLM2_GGUF, log=quiet)
    registry_path(home).parent.mkdir(parents=True, exist_ok=True)
    registry_path(home).write_text(json.dumps({"models": [
        RegisteredModel("gemma", "generation", "cpu-int4", "gguf", "/somewhere/g.gguf", "0" * 64, "gemma3",
                        "gemma", None, 32768, "2026-01-01T00:00:00+00:00").to_dict()
    ]}))
    with pytest.raises(AlreadyExists, match="'gemma' is taken .*llmos models remove gemma"):
        add_model(home, "gemma", gguf=SMOLLM2_GGUF, log=quiet)
    with pytest.raises(InvalidArgument, match="not a model name"):
        add_model(home, "My Model/1", gguf=SMOLLM2_GGUF, log=quiet)
    with pytest.raises(InvalidArgument, match="exactly one of --gguf FILE or --hf DIR"):
        add_model(home, "other", log=quiet)
    with pytest.raises(InvalidArgument, match="'cpu-int4' is not a variant of embedding models; accepted: fp32, int8"):
        add_model(home, "other", hf=tmp_path, role=Role.EMBEDDING, variant="cpu-int4", log=quiet)
    with pytest.raises(InvalidArgument, match="--hf DIR"):
        add_model(home, "other", gguf=SMOLLM2_GGUF, role=Role.EMBEDDING, log=quiet)


def test_gguf_metadata_is_what_the_registry_records() -> None:
    checkpoint = inspect_gguf(SMOLLM2_GGUF)
    assert checkpoint.architecture == "llama"
    assert checkpoint.licence == "apache-2.0"  # general.license, as declared
    assert checkpoint.chat_template and "<|im_start|>" in checkpoint.chat_template
    assert checkpoint.context_length == 8192
    assert len(checkpoint.sha256) == 64


def test_remove_forgets_an_added_model_and_keeps_built_in_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    model = RegisteredModel("gemma", "generation", "cpu-int4", "gguf", "/somewhere/g.gguf", "0" * 64, "gemma3",
                            "gemma", None, 32768, "2026-01-01T00:00:00+00:00")
    model.folder(home).mkdir(parents=True)
    (model.folder(home) / "model.onnx").write_bytes(b"x")
    registry_path(home).write_text(json.dumps({"models": [model.to_dict()]}))
    with pytest.raises(FailedPrecondition, match="built-in"):
        remove_model(home, "all-minilm-l6-v2")
    assert remove_model(home, "gemma") == model
    assert not registered_models(home) and not (home / "models" / "gemma").exists()
    with pytest.raises(NotFound, match="no model 'gemma'; known models: smollm2-135m-instruct"):
        remove_model(home, "gemma")
    assert refresh_index(home).artefacts == ()  # nothing built in this home


def test_the_cli_reports_a_taken_name_as_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    assert main(["models", "add", "all-minilm-l6-v2", "--gguf", str(SMOLLM2_GGUF)]) == 1
    assert "taken by a built-in model" in capsys.readouterr().err
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert {row["name"] for row in listed} == {"smollm2-135m-instruct", "all-minilm-l6-v2", "kokoro-82m"}
    assert not any(row["built"] for row in listed)


def test_gemma3_configs_reach_the_builder_in_the_form_it_reads() -> None:
    from transformers import Gemma3TextConfig

    from llmos.models.genai_builder import builder_form

    config = builder_form(Gemma3TextConfig(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert config.rope_local_base_freq == 10_000.0
