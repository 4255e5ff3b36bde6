"""Before the GPU benchmarks (bench/gpu.sh): the embedding model and the fp16 decoder start on
the CUDA provider, and the decoder with its KV cache in GPU memory says what the same decoder
says on the CPU, through every cache operation the scheduler uses.

`python -m bench.gpu_check [--home .llmos] [--out FILE]` prints its findings as JSON (and writes them to FILE); exit 1 when a session is not on
CUDA or the greedy tokens of the two devices differ in more than one place in three.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.inference.service import REPO
from llmos.embedding import EmbeddingModel
from llmos.models.store import artefact_dir
from llmos.settings import ExecutionProvider
from llmos.tokenization import ModelTokenizer
from services.inference.core import EMBEDDING_MODEL, GENERATION_MODEL
from services.inference.decoder import Decoder
from services.inference.device_cache import DeviceCacheDecoder, HostMemory
from services.inference.devices import CPU, check_session_provider, device_plan
from services.inference.settings import InferenceDevice

# fp16 on two devices sums in different orders: a near-tie may flip, a broken cache flips most.
MIN_AGREEMENT = 2 / 3


def exercise(decoder: Decoder, tokenizer: ModelTokenizer) -> tuple[list[np.ndarray], str]:
    """Logits of every call in a scheduler-like sequence: two prompts prefilled into their rows,
    batched steps, a prefix saved, the second row moved into the first, steps, the prefix loaded
    back and the prompt's last token prefilled over it. Returns them and the moved row's text."""
    first = tokenizer.encode("Once upon a time, in a small village by the sea, there lived").ids
    second = tokenizer.encode("The capital of France is").ids
    logits = [decoder.prefill(0, first).copy(), decoder.prefill(1, second).copy()]
    tokens = [[int(np.argmax(logits[0]))], [int(np.argmax(logits[1]))]]
    lengths = [len(first), len(second)]
    for _ in range(6):
        step = np.array(decoder.decode([row[-1] for row in tokens], lengths), dtype=np.float32)
        logits.append(step)
        for row in range(2):
            tokens[row].append(int(np.argmax(step[row])))
            lengths[row] += 1
    prefix = decoder.save_prefix(1, second)
    decoder.move_row(1, 0, lengths[1])
    moved, length = tokens[1], lengths[1]
    for _ in range(4):
        step = np.array(decoder.decode([moved[-1]], [length]), dtype=np.float32)
        logits.append(step)
        moved.append(int(np.argmax(step[0])))
        length += 1
    decoder.load_prefix(1, prefix, len(second) - 1)
    logits.append(decoder.prefill(1, second, cached=len(second) - 1).copy())
    return logits, tokenizer.decode(moved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=REPO / ".llmos")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    plan = device_plan(InferenceDevice.CUDA, ExecutionProvider.AUTO)
    embedding = EmbeddingModel.from_dir(artefact_dir(args.home, EMBEDDING_MODEL), plan.embedding_providers)
    check_session_provider(f"embedding model {EMBEDDING_MODEL}", plan.embedding_providers, embedding.providers)
    folder = artefact_dir(args.home, GENERATION_MODEL, plan.generation_variant)
    tokenizer = ModelTokenizer.from_dir(folder)
    gpu = DeviceCacheDecoder(folder, plan.generation_providers, 0, 2, 256)
    check_session_provider(f"generation model {GENERATION_MODEL}", plan.generation_providers, gpu.providers)
    on_gpu, gpu_text = exercise(gpu, tokenizer)
    on_cpu, cpu_text = exercise(DeviceCacheDecoder(folder, [CPU], 0, 2, 256, memory=HostMemory()), tokenizer)
    greedy = [np.argmax(a, axis=-1) == np.argmax(b, axis=-1) for a, b in zip(on_gpu, on_cpu, strict=True)]
    agreement = float(np.mean(np.concatenate([np.atleast_1d(same) for same in greedy])))
    result = {
        "embedding_providers": embedding.providers, "generation_providers": gpu.providers,
        "greedy_agreement_with_cpu": agreement,
        "max_logit_difference": max(float(np.abs(a - b).max()) for a, b in zip(on_gpu, on_cpu, strict=True)),
        "gpu_text": gpu_text, "cpu_text": cpu_text,
    }
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if agreement >= MIN_AGREEMENT else 1


if __name__ == "__main__":
    raise SystemExit(main())
