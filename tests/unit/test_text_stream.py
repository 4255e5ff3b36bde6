"""Incremental detokenization: at every token, TextStream's text is the decode of all ids so far."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel

from llmos.tokenization import ModelTokenizer, TextStream

pytestmark = pytest.mark.unit


def byte_level() -> ModelTokenizer:
    """GPT-2 style: one token per byte, so a character of several bytes spans several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(BPE({symbol: index for index, symbol in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return ModelTokenizer(tokenizer, "", {})


def sentencepiece_like() -> ModelTokenizer:
    """Llama/Gemma style: '▁' for spaces, byte-fallback tokens, and the text's first space stripped."""
    pieces = ["<unk>", "▁Hello", "▁world", ",", "▁caf", "<0xC3>", "<0xA9>", "<0xE2>", "<0x82>", "<0xAC>", "▁5", "▁"]
    tokenizer = Tokenizer(WordLevel({piece: index for index, piece in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return ModelTokenizer(tokenizer, "", {})


def assert_matches_full_decode(tokenizer: ModelTokenizer, ids: list[int]) -> None:
    stream = TextStream(tokenizer)
    for count, token in enumerate(ids, start=1):
        stream.add(token)
        assert stream.text == tokenizer.decode(ids[:count]), count


def test_byte_level_text_matches_decoding_every_token_including_split_characters() -> None:
    tokenizer = byte_level()
    ids = tokenizer.encode("Grüße, 世界! a café costs 5 €; 🙂 done").ids
    assert len(ids) > len("Grüße, 世界! a café costs 5 €; 🙂 done")  # some characters span several tokens
    assert_matches_full_decode(tokenizer, ids)


def test_sentencepiece_text_keeps_inner_spaces_and_strips_only_the_first() -> None:
    # "Hello world, café 5 €" with é and € as byte-fallback tokens; the stream ends mid-character.
    ids = [1, 2, 3, 4, 5, 6, 10, 11, 7, 8, 9, 1, 7, 8]
    tokenizer = sentencepiece_like()
    assert tokenizer.decode(ids[:3]) == "Hello world,"
    assert tokenizer.decode(ids).endswith("\ufffd")
    assert_matches_full_decode(tokenizer, ids)
