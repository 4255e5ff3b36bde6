"""GGUF or Hugging Face checkpoint -> ONNX Runtime GenAI folder (model with KV cache, genai_config,
tokenizer): the catalog's SmolLM2, and models people add (llmos.models.registry).

GGUF -> Hugging Face checkpoint (transformers dequantizes the quantized weights), then the
onnxruntime-genai model builder quantizes (int4, CPU) or casts (fp16, CUDA) and writes the folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmos.models.catalog import SourceFiles
from llmos.errors import InvalidArgument
from llmos.models.errors import BuildFailed

Log = Callable[[str], None]

TOKENIZER_CONFIG = "tokenizer_config.json"
SMOKE_PROMPT = "What is the capital of France?"
COMPLETION_SMOKE_PROMPT = "The capital of France is"
# What each served variant asks of the model builder: (precision, execution provider).
VARIANT_BUILDS = {"cpu-int4": ("int4", "cpu"), "fp32": ("fp32", "cpu"), "int8": ("int8", "cpu"), "cuda-fp16": ("fp16", "cuda")}
SMOKE_TOKENS = 8
_OUTPUT_TAIL = 4000


def build_cpu_int4(source: SourceFiles, out: Path, scratch: Path, log: Log) -> None:
    _build(source, out, scratch, log, precision="int4", provider="cpu")
    smoke_test(out, log)


def build_cuda_fp16(source: SourceFiles, out: Path, scratch: Path, log: Log) -> None:
    """Built on any machine (the builder only writes ONNX and genai_config.json); smoke-tested
    where ORT GenAI has CUDA."""
    _build(source, out, scratch, log, precision="fp16", provider="cuda")
    smoke_test_where_it_runs(out, log, provider="cuda")


def smoke_test_where_it_runs(out: Path, log: Log, *, provider: str, chat: bool = True) -> None:
    """The smoke test, unless the artefact is for CUDA and this onnxruntime-genai has none
    (the CPU package: `onnxruntime-genai-cuda`, the `gpu` extra, has it)."""
    import onnxruntime_genai as og

    if provider == "cuda" and not og.is_cuda_available():
        log("  no smoke test: this onnxruntime-genai has no CUDA (install the `gpu` extra on an NVIDIA machine)")
        return
    smoke_test(out, log, chat=chat)


def _build(source: SourceFiles, out: Path, scratch: Path, log: Log, *, precision: str, provider: str) -> None:
    template = gguf_chat_template(source.path)
    if template is None:
        raise BuildFailed(f"{source.path} has no tokenizer.chat_template; cannot serve chat")
    build_from_gguf(source.path, out, scratch, log, precision=precision, provider=provider, template=template)


def build_from_gguf(
    gguf_path: Path, out: Path, scratch: Path, log: Log, *, precision: str, provider: str, template: str | None
) -> None:
    """Dequantize a GGUF to a checkpoint in `scratch`, then build it; `template` None: plain completion."""
    hf_dir = scratch / "hf"
    gguf_to_hf(gguf_path, hf_dir, log)
    build_from_checkpoint(hf_dir, out, scratch, log, precision=precision, provider=provider)
    if template is not None:
        ensure_chat_template(out, template)


def build_from_checkpoint(hf_dir: Path, out: Path, scratch: Path, log: Log, *, precision: str, provider: str) -> None:
    check_builder_architecture(hf_dir)
    run_model_builder(hf_dir, out, scratch / "cache", precision=precision, provider=provider, log=log)
    logits_of_last_position(out / "model.onnx", log)


def logits_of_last_position(model_path: Path, log: Log) -> None:
    """Make the graph compute logits for the last position only (shape batch x 1 x vocab).

    Sampling reads only the next token's logits, but the builder's graph projects every prompt
    position onto the vocabulary: for SmolLM2 that is a 576 x 49,152 matrix per prompt token, a
    fifth of a prefill's work, and (Gemma 3, 262k vocabulary) a 268 MB logits buffer for a
    256-token prompt. A Slice before the vocabulary projection keeps the last position; a decode
    step (one position) is unchanged. onnxruntime-genai reads such logits as they are.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(model_path, load_external_data=False)
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    projection = producers.get("logits")
    # Logits may pass through a cast or a soft cap after the projection: walk back to the MatMul.
    while projection is not None and not projection.op_type.startswith("MatMul"):
        projection = producers.get(projection.input[0])
    if projection is None:
        raise BuildFailed(f"{model_path}: no vocabulary projection (MatMul) found before the logits output")
    hidden = projection.input[0]
    if hidden.endswith("/last_position"):
        return  # already sliced
    sliced = f"{hidden}/last_position"
    constants = [
        helper.make_tensor(f"{sliced}/{name}", TensorProto.INT64, [1], [value])
        for name, value in (("starts", -1), ("ends", 2**63 - 1), ("axes", 1))
    ]
    graph.initializer.extend(constants)
    slice_node = helper.make_node("Slice", [hidden, *(c.name for c in constants)], [sliced], name=f"{projection.name}/last_position")
    graph.node.insert(list(graph.node).index(projection), slice_node)
    projection.input[0] = sliced
    logits = next(output for output in graph.output if output.name == "logits")
    sequence = logits.type.tensor_type.shape.dim[1]
    sequence.ClearField("dim_param")
    sequence.dim_value = 1
    onnx.save(model, model_path)
    log("  logits of the last position only (a Slice before the vocabulary projection)")


def builder_architectures() -> frozenset[str]:
    """The Hugging Face architectures the installed onnxruntime-genai model builder converts, read
    from its source (it dispatches on `config.architectures[0] == "..."`), so the list follows its version."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        raise BuildFailed("onnxruntime-genai's model builder is not installed")
    return frozenset(re.findall(r'architectures\[0\] == "(\w+)"', Path(spec.origin).read_text(encoding="utf-8")))


def check_builder_architecture(hf_dir: Path) -> str:
    """The checkpoint's architecture; InvalidArgument when the model builder cannot convert it."""
    config_path = hf_dir / "config.json"
    try:
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument("checkpoint", f"{config_path} is not a readable Hugging Face config: {exc}") from None
    supported = builder_architectures()
    if not architectures or architectures[0] not in supported:
        named = architectures[0] if architectures else "no architecture"
        raise InvalidArgument(
            "checkpoint",
            f"unknown architecture {named!r} in {config_path}: the onnxruntime-genai model builder converts "
            f"{', '.join(sorted(supported))}",
        )
    return str(architectures[0])


def gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF (the source of truth for the served tokenizer), or
    None for a model without one (a base model: plain completion only)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def gguf_to_hf(gguf_path: Path, hf_dir: Path, log: Log) -> None:
    """Write a Hugging Face checkpoint (fp32 weights, tokenizer) from the GGUF file.

    dequantize=True unpacks every weight into a plain dense model: transformers 5 can otherwise
    keep GGUF blocks packed, and a model loaded that way refuses save_pretrained.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except ValueError as exc:
        if "not supported" in str(exc):  # transformers: "GGUF model with architecture X is not supported yet."
            raise InvalidArgument("gguf", f"unknown architecture: {exc}") from None
        raise
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    log(f"  dequantized {gguf_path.name} to a Hugging Face checkpoint in {time.monotonic() - started:.1f} s")


def run_model_builder(
    hf_dir: Path, out: Path, cache: Path, *, precision: str, provider: str, log: Log
) -> None:
    """Run the onnxruntime-genai model builder in a child process (its CLI is its stable API)."""
    command = [
        sys.executable, "-m", "llmos.models.genai_builder",  # the builder, adapted to transformers 5 configs
        "--input", str(hf_dir),
        "--output", str(out),
        "--precision", precision,
        "--execution_provider", provider,
        "--cache_dir", str(cache),
        "--extra_options", "hf_token=false",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-_OUTPUT_TAIL:]
        raise BuildFailed(f"onnxruntime-genai model builder failed ({result.returncode}):\n{output}")
    log(f"  model builder ({precision}, {provider}) finished in {time.monotonic() - started:.1f} s")


def ensure_chat_template(out: Path, template: str) -> None:
    """Put the GGUF's chat template in tokenizer_config.json, where ORT GenAI reads it.

    Recent transformers save the template to chat_template.jinja instead; the GenAI tokenizer
    and our tokenizer service read tokenizer_config.json.
    """
    path = out / TOKENIZER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("chat_template") != template:
        config["chat_template"] = template
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def smoke_test(out: Path, log: Log, *, chat: bool = True) -> None:
    """Load the folder with ORT GenAI and greedily generate a few tokens from a chat prompt (or,
    for a model without a chat template, a plain completion prompt)."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    if chat:
        messages = json.dumps([{"role": "user", "content": SMOKE_PROMPT}])
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = COMPLETION_SMOKE_PROMPT
    input_ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    # A model with sliding-window attention (Gemma 3) wants a KV cache of at least its window.
    decoder = json.loads((out / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    window = int(decoder.get("sliding_window", {}).get("window_size", 0))
    params.set_search_options(do_sample=False, max_length=max(len(input_ids) + SMOKE_TOKENS, window))
    generator = og.Generator(model, params)
    generator.append_tokens(input_ids)
    for _ in range(SMOKE_TOKENS):
        if generator.is_done():
            break
        generator.generate_next_token()
    text = tokenizer.decode(generator.get_sequence(0)[len(input_ids) :])
    asked = SMOKE_PROMPT if chat else prompt
    if not text.strip():
        raise BuildFailed(f"{out} loads but generated no text for {asked!r}")
    log(f"  smoke test: {asked!r} -> {text.strip()!r}")
