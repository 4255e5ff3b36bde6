"""The prefix KV cache of the inference service is kept per tenant (issue 13, item 13).

A prompt prefix cached for one tenant is never reused for another: reuse would show in the
usage (cached prompt tokens) and in the time to first token, telling one tenant what another
tenant's prompts began with. Runs the real generation model through the scheduler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.models.store import artefact_dir
from llmos.tokenization import ModelTokenizer
from services.inference.app import GENERATION_VARIANT
from services.inference.core import CPU, GENERATION_MODEL
from services.inference.decoder import Decoder
from services.inference.scheduler import GenerationRequest, GenerationScheduler, PrefixCache, SamplingConfig, Usage

pytestmark = pytest.mark.security

# A shared prefix well over the cache's 32-token minimum, then two different endings.
POLICY = (
    "Internal note for the support team of Acme. Refunds above 500 EUR need the approval of the "
    "finance lead, Dana Whitfield, and are paid out on the first working day of the next month. "
    "Customers with a gold membership may return items within 90 days instead of 30."
)


async def usage_of(engine: GenerationScheduler, prompt: list[int], tenant: str) -> Usage:
    events = [event async for event in engine.submit(GenerationRequest(prompt, SamplingConfig(2), tenant, 1))]
    usage = events[-1].usage
    assert usage is not None
    return usage


async def test_two_tenants_with_the_same_prompt_prefix_do_not_share_a_cache_entry(models_home: Path) -> None:
    folder = artefact_dir(models_home, GENERATION_MODEL, GENERATION_VARIANT)
    tokenizer = ModelTokenizer.from_dir(folder)
    engine = GenerationScheduler(Decoder(folder, [CPU], 2, 2, 512), tokenizer, 4, 0, PrefixCache(4096, 32))
    first = tokenizer.encode(f"{POLICY}\nQuestion: who approves large refunds?").ids
    second = tokenizer.encode(f"{POLICY}\nQuestion: how long can gold members return items?").ids
    engine.start()
    try:
        assert (await usage_of(engine, first, "acme")).cached_prompt_tokens == 0
        # The same tenant reuses its own prefix: the cache works ...
        assert (await usage_of(engine, second, "acme")).cached_prompt_tokens >= 32
        # ... but another tenant sending the same prompts starts cold, both times.
        assert (await usage_of(engine, second, "globex")).cached_prompt_tokens == 0
        assert (await usage_of(engine, first, "acme/eu")).cached_prompt_tokens == 0
        # Its own entry then serves it, and acme's entries are still acme's.
        assert (await usage_of(engine, first, "globex")).cached_prompt_tokens >= 32
        assert (await usage_of(engine, first, "acme")).cached_prompt_tokens >= 32
    finally:
        await engine.stop()
