"""Tokenizer logic, independent of gRPC: validation and limits over `ModelTokenizer`.

Tokenize and CountTokens read special-token strings in the text as plain characters, and a
templated chat has only the template's markup as special tokens (`llmos.tokenization`).
"""

from __future__ import annotations

from collections.abc import Sequence

from llmos.errors import InvalidArgument
from llmos.tokenization import ChatPrompt, Encoding, ModelTokenizer


class TokenizerCore:
    def __init__(self, tokenizers: dict[str, ModelTokenizer], default_model: str, max_text_chars: int, max_batch: int) -> None:
        self._tokenizers = tokenizers
        self._default_model = default_model
        self._max_text_chars = max_text_chars
        self._max_batch = max_batch

    def _tokenizer(self, model: str) -> ModelTokenizer:
        name = model or self._default_model
        if name not in self._tokenizers:
            raise InvalidArgument("model", f"unknown model {name!r}; available: {', '.join(sorted(self._tokenizers))}")
        return self._tokenizers[name]

    def _check_text(self, field: str, text: str) -> None:
        if len(text) > self._max_text_chars:
            raise InvalidArgument(field, f"{len(text)} characters is over the limit of {self._max_text_chars}")

    def tokenize(self, text: str, model: str, add_special_tokens: bool) -> Encoding:
        if not text:
            raise InvalidArgument("text", "must not be empty")
        self._check_text("text", text)
        return self._tokenizer(model).encode(text, add_special_tokens)

    def detokenize(self, ids: Sequence[int], model: str, skip_special_tokens: bool) -> str:
        if not ids:
            raise InvalidArgument("ids", "must not be empty")
        return self._tokenizer(model).decode(ids, skip_special_tokens)

    def count_tokens(self, texts: Sequence[str], model: str, add_special_tokens: bool) -> list[int]:
        if not texts:
            raise InvalidArgument("texts", "at least one text is required")
        if len(texts) > self._max_batch:
            raise InvalidArgument("texts", f"{len(texts)} texts is over the limit of {self._max_batch} per call")
        for index, text in enumerate(texts):
            self._check_text(f"texts[{index}]", text)
        return self._tokenizer(model).count(texts, add_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], model: str, add_generation_prompt: bool
    ) -> ChatPrompt:
        for index, message in enumerate(messages):
            self._check_text(f"messages[{index}].content", message["content"])
        return self._tokenizer(model).encode_chat(messages, add_generation_prompt)
