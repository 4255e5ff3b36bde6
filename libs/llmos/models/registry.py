"""Models people bring: `llmos models add NAME --gguf FILE | --hf DIR`, `list`, `remove`.

A model is built from a local checkpoint by the same exporters as the catalog's models
(llmos.models.export_genai for generation, export_embedding for embeddings) into
`<home>/models/<name>/<variant>/`, with the artefact manifest every artefact has, and recorded in
`<home>/models/registry.json` with what the checkpoint declares: its sha256, where it came from,
its licence, its chat template (None for a base model: plain completion only) and its context
length. Names are those of the catalog's models too, so a name is taken once, by either.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmos.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from llmos.models import export_embedding, export_genai
from llmos.models.build import Log, exclusive_builds, manifest_of, staging_folder
from llmos.models.catalog import CATALOG, EMBEDDING_VARIANTS, Role, SourceFiles, models_root
from llmos.models.manifest import MANIFEST_NAME, sha256_file, write_json_atomic
from llmos.models.store import RegisteredModel, refresh_index, registered_model, registered_models, registry_path

GGUF, HF = "gguf", "hf"
GGUF_MAGIC = b"GGUF"
NOT_DECLARED = "not declared"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
NAME_RULE = "1 to 63 lower-case letters, digits, '.', '-' and '_', starting with a letter or digit"
# Encoders the embedding exporter traces (AutoModel, last_hidden_state, a fast tokenizer.json).
EMBEDDING_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert"})
DEFAULT_VARIANTS = {Role.GENERATION: "cpu-int4", Role.EMBEDDING: "fp32"}
ROLE_VARIANTS = {Role.GENERATION: tuple(export_genai.VARIANT_BUILDS), Role.EMBEDDING: EMBEDDING_VARIANTS}


@dataclass(frozen=True)
class _Checkpoint:
    """What add learns from a checkpoint before building anything."""

    architecture: str
    licence: str
    chat_template: str | None
    context_length: int
    sha256: str


def _write_registry(home: Path, models: dict[str, RegisteredModel]) -> None:
    write_json_atomic(registry_path(home), {"models": [model.to_dict() for model in sorted(models.values(), key=lambda m: m.name)]})


def check_name(name: str, home: Path) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument("name", f"{name!r} is not a model name: use {NAME_RULE}")
    if name in CATALOG:
        raise AlreadyExists(f"model name {name!r} is taken by a built-in model; choose another name")
    taken = registered_models(home).get(name)
    if taken is not None:
        raise AlreadyExists(f"model name {name!r} is taken (added from {taken.source}); `llmos models remove {name}` first")


def _variant(role: Role, variant: str | None) -> str:
    chosen = variant or DEFAULT_VARIANTS[role]
    if chosen not in ROLE_VARIANTS[role]:
        raise InvalidArgument("variant", f"{chosen!r} is not a variant of {role.value} models; accepted: {', '.join(ROLE_VARIANTS[role])}")
    return chosen


def inspect_gguf(path: Path) -> _Checkpoint:
    """Architecture, licence, template and context length from a GGUF's metadata; a file that is
    not a readable GGUF is InvalidArgument."""
    if not path.is_file():
        raise InvalidArgument("gguf", f"{path} is not a file")
    with path.open("rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise InvalidArgument("gguf", f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument("gguf", f"{path} is corrupt or truncated: {type(exc).__name__}: {exc}") from None

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    architecture = value("general.architecture")
    if not architecture:
        raise InvalidArgument("gguf", f"{path} declares no general.architecture")
    check_gguf_architecture(str(architecture))
    return _Checkpoint(
        architecture=str(architecture),
        licence=str(value("general.license") or NOT_DECLARED),
        chat_template=export_genai.gguf_chat_template(path),
        context_length=int(value(f"{architecture}.context_length") or 0),
        sha256=sha256_file(path),
    )


def check_gguf_architecture(architecture: str) -> None:
    """InvalidArgument unless transformers can turn a GGUF of `architecture` into a checkpoint
    for the model builder (its GGUF loader's own table, read from the installed version)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    readable = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}
    # transformers' loader spells a few llama.cpp names its own way (qwen2moe -> qwen2_moe).
    if architecture not in readable and architecture.replace("moe", "_moe").replace("-", "_") not in readable:
        raise InvalidArgument(
            "gguf", f"unknown architecture {architecture!r}: GGUF files of {', '.join(sorted(readable))} can be converted"
        )


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _readme_licence(folder: Path) -> str:
    """The `license:` of a model card's front matter, as Hugging Face folders declare it."""
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---") and (match := re.search(r"^license:\s*(\S.*)$", text.split("---", 2)[1], re.MULTILINE)):
            return match.group(1).strip().strip("'\"")
    return NOT_DECLARED


def _folder_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, json.JSONDecodeError):
        return None
    return template if isinstance(template, str) else None


def inspect_hf(folder: Path, role: Role) -> _Checkpoint:
    if not folder.is_dir():
        raise InvalidArgument("hf", f"{folder} is not a folder")
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument("hf", f"{config_path} is not a readable Hugging Face config: {exc}") from None
    if role is Role.GENERATION:
        architecture = export_genai.check_builder_architecture(folder)
        context_length = int(config.get("max_position_embeddings") or config.get("n_positions") or 0)
        template = _folder_chat_template(folder)
    else:
        architecture = str(config.get("model_type", ""))
        if architecture not in EMBEDDING_MODEL_TYPES:
            raise InvalidArgument(
                "hf", f"unknown architecture {architecture!r} for embeddings: a sentence-transformers folder of "
                f"{', '.join(sorted(EMBEDDING_MODEL_TYPES))} is accepted",
            )
        context_length = export_embedding.pooling_config(folder).max_seq_length
        template = None
    return _Checkpoint(architecture, _readme_licence(folder), template, context_length, _folder_sha256(folder))


def add_model(
    home: Path,
    name: str,
    *,
    gguf: Path | None = None,
    hf: Path | None = None,
    role: Role = Role.GENERATION,
    variant: str | None = None,
    log: Log = print,
) -> RegisteredModel:
    """Build a served artefact from a local checkpoint and record it; checks come before the build."""
    if (gguf is None) == (hf is None):
        raise InvalidArgument("source", "give exactly one of --gguf FILE or --hf DIR")
    if role not in ROLE_VARIANTS:
        raise InvalidArgument("role", f"{role.value!r} cannot be added; accepted: {', '.join(r.value for r in ROLE_VARIANTS)}")
    if gguf is not None and role is not Role.EMBEDDING:
        source_format, source = GGUF, gguf.resolve()
    elif gguf is not None:
        raise InvalidArgument("gguf", "embedding models are added from a sentence-transformers folder: --hf DIR")
    else:
        assert hf is not None
        source_format, source = HF, hf.resolve()
    chosen = _variant(role, variant)
    root = models_root(home)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_builds(root, log):
        check_name(name, home)
        checkpoint = inspect_gguf(source) if source_format == GGUF else inspect_hf(source, role)
        model = RegisteredModel(
            name=name, role=role.value, variant=chosen, source_format=source_format, source=str(source),
            sha256=checkpoint.sha256, architecture=checkpoint.architecture, licence=checkpoint.licence,
            chat_template=checkpoint.chat_template, context_length=checkpoint.context_length,
            added_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        log(f"{name}/{chosen}: building from {source} ({checkpoint.architecture}, "
            f"{'chat template' if checkpoint.chat_template else 'no chat template: plain completion'})")
        with staging_folder(model.folder(home)) as (staging, scratch):
            _build(model, source, staging, scratch, log)
            manifest = manifest_of(name, chosen, role, f"{source_format}:{source}", checkpoint.sha256, checkpoint.licence, staging)
            write_json_atomic(staging / MANIFEST_NAME, manifest.to_dict())
        models = registered_models(home)
        models[name] = model
        _write_registry(home, models)
        refresh_index(home)
    log(f"{name}/{chosen}: added, in {model.folder(home)}")
    return model


def _build(model: RegisteredModel, source: Path, out: Path, scratch: Path, log: Log) -> None:
    if model.role == Role.EMBEDDING.value:
        files = SourceFiles(HF, model.sha256[:12], source)
        (export_embedding.build_fp32 if model.variant == "fp32" else export_embedding.build_int8)(files, out, scratch, log)
        return
    precision, provider = export_genai.VARIANT_BUILDS[model.variant]
    if model.source_format == GGUF:
        export_genai.build_from_gguf(
            source, out, scratch, log, precision=precision, provider=provider, template=model.chat_template
        )
    else:
        export_genai.build_from_checkpoint(source, out, scratch, log, precision=precision, provider=provider)
        if model.chat_template is not None:  # transformers 5 saves it beside, in chat_template.jinja
            export_genai.ensure_chat_template(out, model.chat_template)
    export_genai.smoke_test_where_it_runs(out, log, provider=provider, chat=model.chat_template is not None)


def remove_model(home: Path, name: str) -> RegisteredModel:
    """Forget an added model and delete its artefact; the catalog's models stay."""
    if name in CATALOG:
        raise FailedPrecondition(f"{name!r} is a built-in model; only added models can be removed")
    root = models_root(home)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_builds(root, lambda _: None):
        model = registered_model(home, name)
        models = registered_models(home)
        del models[name]
        _write_registry(home, models)
        shutil.rmtree(root / name, ignore_errors=True)
        refresh_index(home)
    return model
