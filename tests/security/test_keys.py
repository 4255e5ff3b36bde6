"""Keys issued with `llmos keys` work at once, are stored hashed, and stop working when revoked."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import nats
import pytest

from llmos.keys import CACHE_TTL_S, KEYS_BUCKET, KeyStore
from llmos.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.conftest import RunningStack

pytestmark = pytest.mark.security


def llmos_keys(stack: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmos_cli.main", "keys", *args], env=stack.env, cwd=stack.home,
                          capture_output=True, text=True, timeout=60)


async def count_tokens(stack: RunningStack, key: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(stack.addr("tokenizer")) as channel:
        try:
            await tokenizer_pb2_grpc.TokenizerServiceStub(channel).CountTokens(
                tokenizer_pb2.CountTokensRequest(texts=["hi"]), metadata=(("authorization", f"Bearer {key}"),), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_issue_use_list_and_revoke_a_key(stack: RunningStack) -> None:
    created = llmos_keys(stack, "create", "--subject", "carol", "--tenant", "acme", "--role", "user")
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split()[2]
    key = created.stdout.splitlines()[1].strip()
    assert key.startswith(f"llmos_{key_id}_")
    assert await count_tokens(stack, key) == grpc.StatusCode.OK

    connection = await nats.connect(stack.settings.nats_url)
    try:
        js = connection.jetstream()
        bucket = await js.key_value(KEYS_BUCKET)
        stored = [(await bucket.get(digest)).value for digest, _ in await (await KeyStore.open(js)).records()]
    finally:
        await connection.close()
    assert stored and all(key.encode() not in value for value in stored)

    listed = llmos_keys(stack, "list")
    assert key_id in listed.stdout and "carol" in listed.stdout and key not in listed.stdout

    assert llmos_keys(stack, "revoke", key_id).returncode == 0
    await asyncio.sleep(CACHE_TTL_S + 0.5)
    assert await count_tokens(stack, key) == grpc.StatusCode.UNAUTHENTICATED
    missing = llmos_keys(stack, "revoke", key_id)
    assert missing.returncode == 1 and missing.stderr.startswith("llmos: no key with id")


def test_an_unknown_role_is_refused(stack: RunningStack) -> None:
    result = llmos_keys(stack, "create", "--subject", "eve", "--tenant", "acme", "--role", "root")
    assert result.returncode != 0 and "invalid choice" in result.stderr
