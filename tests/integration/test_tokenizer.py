"""The tokenizer service against the model's own tokenizer and chat template."""

from __future__ import annotations

import grpc
import pytest
import transformers

from llmos.models import artefact_dir
from llmos.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tests.conftest import RunningStack
from tests.grpc_helpers import ADMIN, call_with_raw_bytes

pytestmark = pytest.mark.integration


@pytest.fixture
async def tokenizer(stack: RunningStack):  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(stack.addr("tokenizer")) as channel:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)


async def test_round_trip_and_offsets(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Where is my order #A-1234? It's late — très ennuyeux."
    encoded = await tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text=text), metadata=ADMIN)
    assert len(encoded.ids) == len(encoded.tokens) == len(encoded.offsets) > 5
    assert encoded.offsets[0].start == 0 and encoded.offsets[-1].end == len(text)
    decoded = await tokenizer.Detokenize(tokenizer_pb2.DetokenizeRequest(ids=encoded.ids), metadata=ADMIN)
    assert decoded.text == text


async def test_counts_match_tokenize(tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = ["hello world", "a much longer sentence with several more tokens in it", ""]
    counts = await tokenizer.CountTokens(tokenizer_pb2.CountTokensRequest(texts=texts), metadata=ADMIN)
    assert counts.counts[2] == 0
    for text, count in zip(texts[:2], counts.counts[:2]):
        encoded = await tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text=text), metadata=ADMIN)
        assert count == len(encoded.ids)
    assert counts.total == sum(counts.counts)


async def test_chat_template_matches_the_models_own(tokenizer, stack: RunningStack) -> None:  # type: ignore[no-untyped-def]
    reference = transformers.AutoTokenizer.from_pretrained(str(artefact_dir(stack.home, "smollm2-135m-instruct")))
    conversations = [
        [{"role": "user", "content": "How do I reset my password?"}],
        [{"role": "system", "content": "You are the help desk of Acme."},
         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Where is order 1234?"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            response = await tokenizer.ApplyChatTemplate(
                tokenizer_pb2.ApplyChatTemplateRequest(
                    messages=[common_pb2.ChatMessage(**message) for message in messages],
                    add_generation_prompt=add_generation_prompt,
                ),
                metadata=ADMIN,
            )
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert response.prompt == expected
            assert list(response.ids) == reference(expected, add_special_tokens=False)["input_ids"]
            assert response.token_count == len(response.ids)


async def test_empty_text_is_invalid(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text=""), metadata=ADMIN)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text: must not be empty" in error.value.details()


async def test_invalid_utf8_is_invalid_argument(stack: RunningStack) -> None:
    """Bytes a Python client could not even build: field 1 (text) holding \\xff\\xfe."""
    error = await call_with_raw_bytes(stack.addr("tokenizer"), "/llmos.v1.TokenizerService/Tokenize", b"\x0a\x02\xff\xfe")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in error.details()


async def test_unknown_model_and_bad_ids_are_invalid(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text="hi", model="gpt-9"), metadata=ADMIN)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown model" in error.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await tokenizer.Detokenize(tokenizer_pb2.DetokenizeRequest(ids=[10**8]), metadata=ADMIN)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary" in error.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await tokenizer.ApplyChatTemplate(
            tokenizer_pb2.ApplyChatTemplateRequest(messages=[common_pb2.ChatMessage(role="robot", content="x")]),
            metadata=ADMIN,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in error.value.details()
