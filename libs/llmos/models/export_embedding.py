"""all-MiniLM-L6-v2 safetensors -> ONNX encoder (last_hidden_state), tokenizer.json, pooling.json.

Pooling is left to serving time (llmos.models.pooling), configured from the checkpoint's
sentence-transformers files. Every export is checked against the torch model before it is kept.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmos.models.catalog import SourceFiles
from llmos.models.errors import BuildFailed
from llmos.models.pooling import MEAN, PoolingConfig, pool

if TYPE_CHECKING:
    import torch

Log = Callable[[str], None]

MODEL_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
# fp32 must match torch to rounding error; int8 weights measured 0.991-0.996 on these sentences.
MIN_COSINE = {"fp32": 0.9999, "int8": 0.99}
# Different lengths, so the check covers padding, and one past max_seq_length, for truncation.
VERIFY_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "LLM OS serves language, retrieval and speech models as small services.",
    "Refunds are issued within 14 days. " * 60,
)


def build_fp32(source: SourceFiles, out: Path, scratch: Path, log: Log) -> None:
    model = load_encoder(source.path)
    export_onnx(model, out / MODEL_NAME, log)
    _write_serving_files(source.path, out)
    verify(model, out, MIN_COSINE["fp32"], log)


def build_int8(source: SourceFiles, out: Path, scratch: Path, log: Log) -> None:
    """Dynamic int8 of the encoder's MatMuls, except each layer's feed-forward down projection.

    Per-channel weight scales (per-tensor int8 drops cosine to fp32 to about 0.92-0.97). Quantizing
    every MatMul left SciFact abstracts at a minimum cosine to fp32 of 0.989; a sensitivity pass
    on corpus sentences (quantize all but one group) found the down projections
    (`layer.N/output/dense`, whose input is the GELU output with its large outliers, quantized
    per tensor at run time) the only group whose exclusion lifts the minimum above 0.99, so they
    stay fp32. The embedding tables (Gather) stay fp32 too: a lookup costs nothing to run in fp32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_encoder(source.path)
    fp32_path = scratch / MODEL_NAME
    export_onnx(model, fp32_path, log)
    kept_fp32 = feed_forward_down_projections(fp32_path)
    if not kept_fp32:
        # Another family's layer names (an added model): every MatMul is quantized and `verify`
        # still holds the result to MIN_COSINE["int8"] against torch.
        log("  no BERT feed-forward down projections found: quantizing every MatMul")
    quantize_dynamic(
        fp32_path,
        out / MODEL_NAME,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=kept_fp32,
    )
    _write_serving_files(source.path, out)
    verify(model, out, MIN_COSINE["int8"], log)


def feed_forward_down_projections(path: Path) -> list[str]:
    """Names of the MatMuls of each BERT layer's `output.dense` (not `attention.output.dense`)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and node.name.endswith("/output/dense/MatMul") and "/attention/" not in node.name
    ]


def load_encoder(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's encoder in eval mode, with plain (eager) attention that exports to ONNX ops."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()


def export_onnx(model: torch.nn.Module, path: Path, log: Log) -> None:
    """Trace to ONNX with dynamic batch and sequence axes; the graph returns last_hidden_state only.

    Uses the TorchScript exporter (dynamo=False), which needs no onnxscript. Its tracer warnings
    are silenced because `verify` checks the result numerically on padded, truncated batches.
    """
    import torch

    class LastHiddenState(torch.nn.Module):
        # The tracer passes inputs positionally; transformers 5's BertModel.forward wants keywords.
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            return self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    started = time.monotonic()
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # Advanced indexing is only used with non-negative position indices here.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            # eval(): the exporter restores the wrapper's mode afterwards, and a new Module is in
            # training mode, which would leave dropout on in the encoder.
            LastHiddenState().eval(),
            _example_inputs(),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    log(f"  exported {path.name} in {time.monotonic() - started:.1f} s")


def _example_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch: with an all-ones mask transformers may skip masking, and the trace with it."""
    import torch

    ids = torch.randint(1000, 2000, (2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return ids * mask, mask, torch.zeros_like(ids)


def _write_serving_files(checkpoint: Path, out: Path) -> None:
    config = pooling_config(checkpoint)
    config.save(out)
    write_tokenizer(checkpoint / TOKENIZER_NAME, out / TOKENIZER_NAME, config.max_seq_length)


def pooling_config(checkpoint: Path) -> PoolingConfig:
    """Read pooling from the sentence-transformers module configs of the checkpoint."""
    modules = json.loads((checkpoint / "modules.json").read_text(encoding="utf-8"))
    types = {module["type"].rsplit(".", 1)[-1]: module["path"] for module in modules}
    if "Pooling" not in types:
        raise BuildFailed(f"{checkpoint}/modules.json has no Pooling module")
    pooling = json.loads((checkpoint / types["Pooling"] / "config.json").read_text(encoding="utf-8"))
    enabled = sorted(key for key, value in pooling.items() if key.startswith("pooling_mode_") and value)
    if enabled != ["pooling_mode_mean_tokens"]:
        raise BuildFailed(f"{checkpoint}: pooling {enabled} is not supported, only mean pooling")
    sbert = json.loads((checkpoint / "sentence_bert_config.json").read_text(encoding="utf-8"))
    return PoolingConfig(
        mode=MEAN,
        normalize="Normalize" in types,
        max_seq_length=int(sbert["max_seq_length"]),
        dimension=int(pooling["word_embedding_dimension"]),
    )


def write_tokenizer(source: Path, target: Path, max_seq_length: int) -> None:
    """Copy the tokenizer, truncating at max_seq_length and padding to the batch's longest.

    The packaged tokenizer.json truncates and pads to a fixed 128; sentence-transformers
    truncates at max_seq_length (256 here) and pads dynamically, which is what we serve.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source))
    if tokenizer.padding is None:
        raise BuildFailed(f"{source} defines no padding token")
    tokenizer.enable_truncation(max_length=max_seq_length)
    tokenizer.enable_padding(pad_id=tokenizer.padding["pad_id"], pad_token=tokenizer.padding["pad_token"])
    tokenizer.save(str(target))


def verify(model: torch.nn.Module, out: Path, min_cosine: float, log: Log) -> None:
    """Embed VERIFY_SENTENCES with ONNX Runtime and with torch; fail unless they agree."""
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    config = PoolingConfig.load(out)
    encodings = Tokenizer.from_file(str(out / TOKENIZER_NAME)).encode_batch(list(VERIFY_SENTENCES))
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    session = ort.InferenceSession(str(out / MODEL_NAME), providers=["CPUExecutionProvider"])
    served = pool(session.run([OUTPUT_NAME], feeds)[0], feeds["attention_mask"], config)
    with torch.inference_mode():
        reference_hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    reference = pool(reference_hidden.numpy(), feeds["attention_mask"], config)
    cosines = (served * reference).sum(axis=1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(reference, axis=1)
    )
    if served.shape[1] != config.dimension or cosines.min() < min_cosine:
        raise BuildFailed(
            f"{out / MODEL_NAME} disagrees with the torch model: shape {served.shape}, "
            f"cosines {np.round(cosines, 6).tolist()} (need >= {min_cosine})"
        )
    log(f"  verified against torch: min cosine {cosines.min():.6f} over {len(cosines)} sentences")
