"""A generation model's tokenizer and chat template, loaded from its built model folder.

Shared by the tokenizer service and the inference service so both count and template exactly
as the model does. The chat template is the Jinja template shipped in `tokenizer_config.json`,
rendered in a sandbox the way Hugging Face tokenizers render it.

Text is text: a customer's message or a retrieved passage holding `<|im_start|>system` must not
become the model's turn marker, or anyone could forge a system turn. So `encode` and `count`
never read special tokens out of the text, and a chat prompt is tokenized piece by piece: the
template's own markup with its special tokens, each message's content as plain text. Only
`encode_markup` (a raw prompt its caller wrote whole) reads special tokens from text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from llmos.errors import FailedPrecondition, InvalidArgument

CHAT_ROLES = ("system", "user", "assistant")
# Stand-ins for message contents while the template renders (private-use characters, which no
# template writes), marking where each message's content goes.
_CONTENT_MARK = "\ue000{}\ue001"
_CONTENT_MARKS = re.compile("\ue000(\\d+)\ue001")
# What a decoder writes for bytes that are not (yet) a whole UTF-8 character.
_INCOMPLETE_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


@dataclass(frozen=True)
class ChatPrompt:
    """A templated chat: its text, and its token ids with only the template's markup special."""

    prompt: str
    ids: list[int]


def _token_text(value: Any) -> str:
    """Special tokens in tokenizer_config.json are either strings or {"content": ...} objects."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


class ModelTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str, special_tokens: dict[str, str]) -> None:
        # Two tokenizers, each set once (the setting is not per call): markup reads special-token
        # strings as the special tokens, text reads them as the characters they are.
        self._tokenizer = tokenizer
        self._text_tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._text_tokenizer.encode_special_tokens = True
        self._special_tokens = special_tokens
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_template_error
        self._template = environment.from_string(chat_template) if chat_template else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token = special_tokens.get("eos_token", "")
        self.eos_token_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelTokenizer:
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FailedPrecondition(f"{tokenizer_file} is missing; run `llmos models build`")
        config_file = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        special = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(name)
        }
        return cls(Tokenizer.from_file(str(tokenizer_file)), str(config.get("chat_template") or ""), special)

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        """Text as text: special-token strings in it are ordinary characters."""
        encoding = self._text_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return Encoding(list(encoding.ids), list(encoding.tokens), [tuple(o) for o in encoding.offsets])

    def encode_markup(self, text: str) -> Encoding:
        """A prompt its caller wrote whole, template and all: special-token strings are the tokens."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return Encoding(list(encoding.ids), list(encoding.tokens), [tuple(o) for o in encoding.offsets])

    def count(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[int]:
        encodings = self._text_tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [len(encoding.ids) for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out_of_range = [token_id for token_id in ids if not 0 <= token_id < self.vocab_size]
        if out_of_range:
            raise InvalidArgument(
                "ids", f"token id {out_of_range[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        """The chat as the template writes it (text only: tokenize it with `encode_chat`)."""
        if not messages:
            raise InvalidArgument("messages", "at least one message is required")
        for index, message in enumerate(messages):
            if message["role"] not in CHAT_ROLES:
                raise InvalidArgument(
                    f"messages[{index}].role", f"{message['role']!r} is not one of {', '.join(CHAT_ROLES)}"
                )
        return self._render(messages, add_generation_prompt)

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        if self._template is None:
            raise FailedPrecondition("this model ships no chat template")
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self._special_tokens
            )
        except TemplateError as exc:
            raise InvalidArgument("messages", f"rejected by the model's chat template: {exc}") from None

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> ChatPrompt:
        """The templated chat, its markup tokenized with special tokens and every message's
        content as plain text, so no content can open or close a turn."""
        prompt = self.apply_chat_template(messages, add_generation_prompt)
        marked = [{**message, "content": _CONTENT_MARK.format(index)} for index, message in enumerate(messages)]
        skeleton = self._render(marked, add_generation_prompt)
        ids: list[int] = []
        rebuilt: list[str] = []
        position = 0
        for mark in _CONTENT_MARKS.finditer(skeleton):
            markup, content = skeleton[position:mark.start()], messages[int(mark.group(1))]["content"]
            ids += self._tokenizer.encode(markup, add_special_tokens=False).ids
            ids += self._text_tokenizer.encode(content, add_special_tokens=False).ids
            rebuilt += [markup, content]
            position = mark.end()
        ids += self._tokenizer.encode(skeleton[position:], add_special_tokens=False).ids
        rebuilt.append(skeleton[position:])
        # A template that rewrites contents (trims them, branches on them) would make the pieces
        # differ from the prompt; refuse rather than guess where the untrusted text is.
        if "".join(rebuilt) != prompt:
            raise FailedPrecondition(
                "this model's chat template changes message contents, so they cannot be tokenized apart from its markup"
            )
        return ChatPrompt(prompt, ids)


class TextStream:
    """The text of a growing sequence of token ids, decoding only the newest few at each token.

    Decoding the whole sequence at every token costs time that grows with its length. This keeps
    the text of the tokens read so far and decodes a window: from the token where the text last
    ended on a complete character (one step of context) to the newest. Decoders that treat the
    start of a text specially (SentencePiece drops its leading space) treat both decodes of the
    window alike, so their difference is the new text. `text` equals decoding every id at once,
    a trailing incomplete character (U+FFFD) included while its remaining bytes are still to come.
    """

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._window_start = 0  # the window's first token: context for the decoder
        self._read = 0  # tokens whose text is in `_complete`
        self._window_head = ""  # the text of ids[_window_start:_read], decoded as the window's start
        self._complete = ""
        self._pending = ""  # text of the tokens after `_read`: may end in an incomplete character

    @property
    def text(self) -> str:
        return self._complete + self._pending

    def add(self, token_id: int) -> None:
        self._ids.append(token_id)
        window = self._tokenizer.decode(self._ids[self._window_start:])
        self._pending = window[len(self._window_head):]
        if self._pending.endswith(_INCOMPLETE_CHARACTER):
            return
        self._complete += self._pending
        self._pending = ""
        self._window_start, self._read = self._read, len(self._ids)
        self._window_head = self._tokenizer.decode(self._ids[self._window_start:self._read])
