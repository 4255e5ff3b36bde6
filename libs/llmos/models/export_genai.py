"""SmolLM2 GGUF -> ONNX Runtime GenAI folder (model with KV cache, genai_config, tokenizer).

GGUF -> Hugging Face checkpoint (transformers dequantizes the Q4_1 weights), then the
onnxruntime-genai model builder quantizes (int4, CPU) or casts (fp16, CUDA) and writes the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmos.models.catalog import SourceFiles
from llmos.models.errors import BuildFailed

Log = Callable[[str], None]

TOKENIZER_CONFIG = "tokenizer_config.json"
SMOKE_PROMPT = "What is the capital of France?"
SMOKE_TOKENS = 8
_OUTPUT_TAIL = 4000


def build_cpu_int4(source: SourceFiles, out: Path, scratch: Path, log: Log) -> None:
    _build(source, out, scratch, log, precision="int4", provider="cpu")
    smoke_test(out, log)


def build_cuda_fp16(source: SourceFiles, out: Path, scratch: Path, log: Log) -> None:
    """Built on any machine; it can only be loaded where ORT GenAI has CUDA, so no smoke test."""
    _build(source, out, scratch, log, precision="fp16", provider="cuda")


def _build(source: SourceFiles, out: Path, scratch: Path, log: Log, *, precision: str, provider: str) -> None:
    template = gguf_chat_template(source.path)
    hf_dir = scratch / "hf"
    gguf_to_hf(source.path, hf_dir, log)
    run_model_builder(hf_dir, out, scratch / "cache", precision=precision, provider=provider, log=log)
    ensure_chat_template(out, template)


def gguf_chat_template(gguf_path: Path) -> str:
    """The chat template stored in the GGUF, the source of truth for the served tokenizer."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    if field is None:
        raise BuildFailed(f"{gguf_path} has no tokenizer.chat_template; cannot serve chat")
    return str(field.contents())


def gguf_to_hf(gguf_path: Path, hf_dir: Path, log: Log) -> None:
    """Write a Hugging Face checkpoint (fp32 weights, tokenizer) from the GGUF file.

    dequantize=True unpacks every weight into a plain dense model: transformers 5 can otherwise
    keep GGUF blocks packed, and a model loaded that way refuses save_pretrained.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    log(f"  dequantized {gguf_path.name} to a Hugging Face checkpoint in {time.monotonic() - started:.1f} s")


def run_model_builder(
    hf_dir: Path, out: Path, cache: Path, *, precision: str, provider: str, log: Log
) -> None:
    """Run the onnxruntime-genai model builder in a child process (its CLI is its stable API)."""
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
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


def smoke_test(out: Path, log: Log) -> None:
    """Load the folder with ORT GenAI and greedily generate a few tokens from a chat prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": SMOKE_PROMPT}])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    input_ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(input_ids) + SMOKE_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(input_ids)
    while not generator.is_done():
        generator.generate_next_token()
    text = tokenizer.decode(generator.get_sequence(0)[len(input_ids) :])
    if not text.strip():
        raise BuildFailed(f"{out} loads but generated no text for {SMOKE_PROMPT!r}")
    log(f"  smoke test: {SMOKE_PROMPT!r} -> {text.strip()!r}")
