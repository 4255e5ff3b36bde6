"""The onnxruntime-genai model builder, run as `python -m llmos.models.genai_builder <its arguments>`,
with one adaptation to the transformers it runs beside.

transformers 5 reads a Gemma 3 config's RoPE as one set per layer type
(`rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`); the builder's
Gemma3Model (onnxruntime-genai 0.x) expects the transformers 4 form: flat `rope_parameters`
(`rope_type`, `rope_theta` of the global layers) and `rope_local_base_freq` for the sliding ones,
and fails with `KeyError: 'rope_type'`. The config is handed to the builder in that form; its
Gemma 4 builder reads the per-type form itself and is left alone. The exported model is checked
against transformers' own greedy output (tests/integration/test_models_add.py).
"""

from __future__ import annotations

import runpy
from typing import Any

GEMMA3_TEXT = "gemma3_text"


def builder_form(config: Any) -> Any:
    """`config` with per-layer-type RoPE flattened as the builder's Gemma3Model reads it."""
    params = getattr(config, "rope_parameters", None)
    if getattr(config, "model_type", "") == GEMMA3_TEXT and isinstance(params, dict) and "full_attention" in params:
        full, sliding = params["full_attention"], params.get("sliding_attention", params["full_attention"])
        config.rope_parameters = dict(full)
        config.rope_local_base_freq = sliding["rope_theta"]
    return config


def main() -> None:
    import transformers

    load = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        return builder_form(load(*args, **kwargs))

    # The builder imports AutoConfig by name when its module runs, so the adapted loader must be
    # in place first.
    transformers.AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
