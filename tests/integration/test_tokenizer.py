"""The tokenizer service against the model's own tokenizer and chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import transformers

from llmos.clients import TokenizerClient
from llmos.errors import InvalidArgument
from llmos.models import artefact_dir
from tests.conftest import RunningStack
from tests.grpc_helpers import call_with_raw_bytes, connected

pytestmark = pytest.mark.integration


@pytest.fixture
async def tokenizer(stack: RunningStack) -> AsyncIterator[TokenizerClient]:
    async with connected(stack, TokenizerClient) as client:
        yield client


async def test_round_trip_and_offsets(tokenizer: TokenizerClient) -> None:
    text = "Where is my order #A-1234? It's late — très ennuyeux."
    encoded = await tokenizer.tokenize(text)
    assert len(encoded.ids) == len(encoded.tokens) == len(encoded.offsets) > 5
    assert encoded.offsets[0].start == 0 and encoded.offsets[-1].end == len(text)
    assert await tokenizer.detokenize(encoded.ids) == text


async def test_counts_match_tokenize(tokenizer: TokenizerClient) -> None:
    texts = ["hello world", "a much longer sentence with several more tokens in it", ""]
    counts = await tokenizer.count_response(texts)
    assert counts.counts[2] == 0
    for text, count in zip(texts[:2], counts.counts[:2]):
        assert count == len((await tokenizer.tokenize(text)).ids)
    assert counts.total == sum(counts.counts)


async def test_chat_template_matches_the_models_own(tokenizer: TokenizerClient, stack: RunningStack) -> None:
    reference = transformers.AutoTokenizer.from_pretrained(str(artefact_dir(stack.home, "smollm2-135m-instruct")))
    conversations = [
        [{"role": "user", "content": "How do I reset my password?"}],
        [{"role": "system", "content": "You are the help desk of Acme."},
         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Where is order 1234?"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            response = await tokenizer.apply_chat_template(
                [(message["role"], message["content"]) for message in messages], add_generation_prompt=add_generation_prompt
            )
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert response.prompt == expected
            assert list(response.ids) == reference(expected, add_special_tokens=False)["input_ids"]
            assert response.token_count == len(response.ids)


async def test_empty_text_is_invalid(tokenizer: TokenizerClient) -> None:
    with pytest.raises(InvalidArgument, match="text: must not be empty"):
        await tokenizer.tokenize("")


async def test_invalid_utf8_is_invalid_argument(stack: RunningStack) -> None:
    """Bytes a Python client could not even build: field 1 (text) holding \\xff\\xfe."""
    error = await call_with_raw_bytes(stack.addr("tokenizer"), "/llmos.v1.TokenizerService/Tokenize", b"\x0a\x02\xff\xfe")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in error.details()


async def test_unknown_model_and_bad_ids_are_invalid(tokenizer: TokenizerClient) -> None:
    with pytest.raises(InvalidArgument, match="unknown model"):
        await tokenizer.tokenize("hi", model="gpt-9")
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        await tokenizer.detokenize([10**8])
    with pytest.raises(InvalidArgument, match=r"messages\[0\]\.role"):
        await tokenizer.apply_chat_template([("robot", "x")])
