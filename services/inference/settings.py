from __future__ import annotations

from enum import StrEnum

from pydantic import NonNegativeFloat

from llmos.settings import PlatformSettings


class InferenceDevice(StrEnum):
    """Where the models run: `cuda` serves the `cuda-fp16` generation artefacts and embeds on the
    CUDA execution provider (an NVIDIA GPU and the `gpu` extra); `cpu` serves the CPU variants."""

    CPU = "cpu"
    CUDA = "cuda"


class EmbeddingVariant(StrEnum):
    """The artefact of the knowledge base's embedding model (all-MiniLM-L6-v2) that is served:
    `fp32`, or `int8` (dynamic int8, the feed-forward down projections kept fp32; built by
    `llmos models build --int8`). Their vectors of SciFact's abstracts agree to a cosine of at
    least 0.99, so either answers queries against an index built with the other."""

    FP32 = "fp32"
    INT8 = "int8"


class InferenceSettings(PlatformSettings):
    # cpu or cuda; cuda without a usable CUDA execution provider stops the service at start.
    inference_device: InferenceDevice = InferenceDevice.CPU
    # ONNX Runtime intra-op threads per model session; 0 lets ONNX Runtime use every core.
    inference_threads: int = 0
    # Let idle ONNX Runtime workers spin for the next step: faster only on cores nothing else uses.
    inference_thread_spinning: bool = True

    # fp32 by default: `llmos models build` makes the int8 artefact only with --int8.
    inference_embedding_variant: EmbeddingVariant = EmbeddingVariant.FP32

    # Embeddings: dynamic batching.
    inference_embed_max_batch: int = 64           # texts per model call
    # Padded tokens (texts x longest) per model call: bounds one call's duration, and so how long
    # an interactive text can wait behind a running bulk batch (~0.3 s on 2 CPU cores).
    inference_embed_max_batch_tokens: int = 1024
    inference_embed_max_delay_ms: float = 5.0     # how long a lone text waits for company
    inference_embed_max_request_texts: int = 256  # texts in one Embed call
    inference_embed_max_text_chars: int = 32_768
    inference_embed_queue_size: int = 4096        # texts waiting; beyond it RESOURCE_EXHAUSTED
    inference_chunk_workers: int = 32             # chunks.created messages embedded at once (bulk lane)
    # Memory the loaded added embedding models may take together (weights, a call's activations);
    # the default one (the knowledge base's) is always loaded and not counted.
    inference_embedding_memory_mb: int = 1024

    # Generation models: the one requests without a model name get (the dialogue's, loaded at
    # start), and the memory the loaded ones may take together (weights, KV cache, logits); a
    # model named by a request loads on first use, unloading the least recently used idle one.
    inference_generation_model: str = "smollm2-135m-instruct"
    inference_generation_memory_mb: int = 3072

    # Generation: continuous batching.
    inference_max_batch: int = 8                  # sequences decoded together
    inference_queue_size: int = 64                # requests waiting for a slot
    inference_max_new_tokens: int = 1024          # the highest max_new_tokens a request may ask for
    inference_default_max_new_tokens: int = 256
    inference_max_context: int = 2048             # prompt + generated tokens per sequence
    inference_prefix_cache_tokens: int = 4096     # prompt tokens kept with their KV cache (~46 KB each)
    inference_prefix_cache_min_tokens: int = 32   # shorter shared prefixes are not worth reusing
    # Decode slots batch-class requests may not take, so bulk work cannot hold every slot.
    inference_reserved_interactive_slots: int = 1
    # Admission: a request expected to wait longer than this for a decode slot (or past its own
    # deadline) is refused with RESOURCE_EXHAUSTED and a retry hint; 0: only its deadline limits it.
    inference_interactive_max_wait_s: NonNegativeFloat = 10.0
    inference_max_wait_s: NonNegativeFloat = 0.0  # standard and batch requests
