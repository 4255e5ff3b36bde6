"""How faithful the served generation artefacts are to the weights they were built from.

The catalog's SmolLM2 ships as a Q4_1 GGUF; the build dequantizes it to float32 and the
onnxruntime-genai builder quantizes that again (int4 by default). The float32 checkpoint holds the
GGUF's values exactly, so run in torch it is the model as published, and each artefact is scored
against it teacher-forced: the reference's own greedy continuation (32 tokens after each chat
prompt) is fed to the artefact token by token, and at every position the artefact's next-token
choice is compared with the reference's (top-1 agreement) and its distribution with the
reference's (KL divergence, reference || artefact). Decode speed is measured on the same decoder
(one stream, greedy, 64 steps), so fidelity and speed are read side by side.

`python -m bench.generate.fidelity [--variants cpu-int4,int8,...]` builds each variant into a
scratch folder (the build extra: torch, transformers) and writes bench/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.inference.service import print_table, write_results
from llmos.models.catalog import get_spec, locate_source
from llmos.models.export_genai import VARIANT_BUILDS, build_from_checkpoint, gguf_to_hf
from services.inference.core import CPU
from services.inference.decoder import Decoder

MODEL = "smollm2-135m-instruct"
CONTINUATION_TOKENS = 32
SPEED_STEPS = 64
# Questions of every kind a user might send; none is tuned on.
QUESTIONS = (
    "What is the capital of France?", "How does photosynthesis work?", "Write a haiku about the sea.",
    "Explain what a database index is.", "What should I pack for a weekend hike?", "Who wrote Pride and Prejudice?",
    "How do I change the delivery address of an order?", "Summarize the causes of the First World War.",
    "What is 17 times 23?", "Give me three tips for learning a language.", "Why is the sky blue?",
    "How long are gift cards valid?", "Translate 'good morning' into Spanish.", "What is a prime number?",
    "Describe a cat in two sentences.", "What happens when water boils?",
)


def reference_runs(checkpoint: Path) -> list[tuple[list[int], list[int], np.ndarray]]:
    """Per question: chat prompt ids, the reference's greedy continuation, its logits for each
    continuation token (positions prompt-1 .. end-1), all from the float32 checkpoint in torch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    runs = []
    with torch.no_grad():
        for question in QUESTIONS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
            prompt = tokenizer(text, return_tensors="pt").input_ids
            full = model.generate(prompt, max_new_tokens=CONTINUATION_TOKENS, do_sample=False)
            start = prompt.shape[1]
            logits = model(full).logits[0, start - 1:-1].float().numpy()
            runs.append((full[0, :start].tolist(), full[0, start:].tolist(), logits))
    return runs


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def score(folder: Path, runs: list[tuple[list[int], list[int], np.ndarray]], threads: int) -> dict[str, Any]:
    decoder = Decoder(folder, [CPU], threads, 1, 1024)
    agreed, kls, first_divergence = [], [], []
    for prompt, continuation, reference in runs:
        logits = decoder.prefill(0, prompt)
        diverged = None
        for position, token in enumerate(continuation):
            same = int(np.argmax(logits)) == token
            agreed.append(same)
            if not same and diverged is None:
                diverged = position
            p, q = _log_softmax(reference[position]), _log_softmax(logits.astype(np.float32))
            kls.append(float(np.sum(np.exp(p) * (p - q))))
            logits = decoder.decode([token], [len(prompt) + position])[0].astype(np.float32)
        first_divergence.append(len(continuation) if diverged is None else diverged)
    prompt = runs[0][0]
    started = time.perf_counter()
    decoder.prefill(0, prompt)
    for step in range(SPEED_STEPS):
        decoder.decode([runs[0][1][0]], [len(prompt) + step])
    return {
        "top1_agreement": float(np.mean(agreed)),
        "kl_mean": float(np.mean(kls)),
        "kl_p95": float(np.percentile(kls, 95)),
        "first_divergence_median": float(np.median(first_divergence)),
        "prompts_agreeing_on_all": sum(d == CONTINUATION_TOKENS for d in first_divergence),
        "decode_tokens_per_s": SPEED_STEPS / (time.perf_counter() - started),
        "weights_mb": sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="cpu-int4,int8", help=f"comma-separated, of {', '.join(VARIANT_BUILDS)}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANT_BUILDS or VARIANT_BUILDS[v][1] != "cpu"]
    if unknown:
        parser.error(f"not a CPU variant: {', '.join(unknown)}")
    gguf = locate_source(get_spec(MODEL)).path
    results: dict[str, Any] = {"model": MODEL, "source": gguf.name, "questions": len(QUESTIONS),
                               "continuation_tokens": CONTINUATION_TOKENS, "threads": args.threads, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="llmos-fidelity-") as scratch:
        checkpoint = Path(scratch) / "hf"
        gguf_to_hf(gguf, checkpoint, print)
        runs = reference_runs(checkpoint)
        for variant in variants:
            out = Path(scratch) / variant
            precision, provider = VARIANT_BUILDS[variant]
            build_from_checkpoint(checkpoint, out, Path(scratch) / f"{variant}-work", print, precision=precision, provider=provider)
            results["variants"][variant] = score(out, runs, args.threads)
    rows = [(variant, f"{r['top1_agreement']:.1%}", f"{r['kl_mean']:.3f}", f"{r['kl_p95']:.3f}", f"{r['first_divergence_median']:.1f}",
             f"{r['prompts_agreeing_on_all']}/{len(QUESTIONS)}", f"{r['decode_tokens_per_s']:.0f}", f"{r['weights_mb']:.0f}")
            for variant, r in results["variants"].items()]
    print_table(
        f"Fidelity to {gguf.name} (float32 in torch), teacher-forced over {CONTINUATION_TOKENS} greedy tokens of {len(QUESTIONS)} chat prompts",
        ("variant", "top-1 agreement", "KL mean", "KL p95", "first divergence (median)", "all 32 agree", "decode tok/s", "weights MB"),
        rows,
    )
    print(f"wrote {write_results('fidelity', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
