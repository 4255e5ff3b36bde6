"""bench/results/gpu.json from the GPU run's parts (bench/gpu.sh): the GPU and its driver, the
versions that ran, generation at each stream count and embeddings, all on CUDA.

`python -m bench.gpu_report --generate PARTS/generate.json --embed PARTS/embed.json --check PARTS/check.json --out bench/results/gpu.json`
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

# Versions of what the GPU path runs on, recorded with its figures.
PACKAGES = ("onnxruntime-gpu", "onnxruntime-genai-cuda", "onnxruntime", "onnxruntime-genai", "torch", "sentence-transformers")
SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap")


def gpu_info(nvidia_smi: str) -> dict[str, str]:
    """The first GPU as nvidia-smi describes it, and the CUDA version its driver supports."""
    query = subprocess.run([nvidia_smi, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                           capture_output=True, text=True, check=True).stdout
    header = subprocess.run([nvidia_smi], capture_output=True, text=True, check=True).stdout
    return parse_gpu_info(query, header)


def parse_gpu_info(query_csv: str, header: str) -> dict[str, str]:
    first = query_csv.strip().splitlines()[0]
    info = dict(zip(SMI_FIELDS, (value.strip() for value in first.split(",")), strict=True))
    cuda = match.group(1) if (match := re.search(r"CUDA Version:\s*([\d.]+)", header)) else ""
    return {"name": info["name"], "driver": info["driver_version"], "driver_cuda": cuda,
            "memory": info["memory.total"], "compute_capability": info["compute_cap"]}


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def report(gpu: dict[str, str], check: dict[str, Any], generate: dict[str, Any], embed: dict[str, Any],
           installed: dict[str, str]) -> dict[str, Any]:
    streams = {
        count: {"tokens_per_s": figures["aggregate_tokens_per_s"], "ttft_ms_p50": figures["ttft_ms_p50"],
                "ttft_ms_p95": figures["ttft_ms_p95"], "stream_decode_tokens_per_s": figures["stream_decode_tokens_per_s_median"]}
        for count, figures in generate["streams"].items()
    }
    return {
        "gpu": gpu,
        "versions": installed,
        "check": check,
        "generation": {"model": generate["model"], "max_new_tokens": generate["max_new_tokens"], "streams": streams,
                       "load": generate["load"]},
        "embedding": {
            "texts": embed["texts"], "providers": embed["direct_providers"],
            "served_sentences_per_s": embed["served_sentences_per_s"],
            "direct_sentences_per_s": embed["direct_sentences_per_s"],
            "reference_sentences_per_s": embed["reference_sentences_per_s"], "reference_device": embed["reference_device"],
            "served_min_cosine": embed["served_min_cosine"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.splitlines()[0])
    parser.add_argument("--generate", type=Path, required=True, help="python -m bench.generate.streams --out")
    parser.add_argument("--embed", type=Path, required=True, help="python -m bench.embed's results")
    parser.add_argument("--check", type=Path, required=True, help="python -m bench.gpu_check --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = report(
        gpu_info(os.environ.get("NVIDIA_SMI", "nvidia-smi")),
        json.loads(args.check.read_text(encoding="utf-8")),
        json.loads(args.generate.read_text(encoding="utf-8")),
        json.loads(args.embed.read_text(encoding="utf-8")),
        versions(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
