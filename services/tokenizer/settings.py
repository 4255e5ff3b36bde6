from __future__ import annotations

from llmos.settings import PlatformSettings


class TokenizerSettings(PlatformSettings):
    # The generation model whose tokenizer is served by default (an `llmos models` name).
    tokenizer_model: str = "smollm2-135m-instruct"
    # Largest text accepted by Tokenize and per text by CountTokens, in characters.
    tokenizer_max_text_chars: int = 1_000_000
    # Most texts in one CountTokens call.
    tokenizer_max_batch: int = 1024
