"""Domain model rebuilds over the real bus (issue 15, item 6): the speech service, in-process,
against a real nats-server, fed document events by JetStream as ingest and retrieval publish them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from llmos.bus.subjects import DOCS_DELETED, DOCS_INDEXED, dead_letter_subject, durable_name, stream_for
from llmos.service import ServiceProcess
from llmos.v1 import events_pb2
from services.speech.app import DEFINITION
from services.speech.domain import DomainCorpus
from services.speech.settings import SpeechSettings
from tests.conftest import NatsServer, environment, platform_environment, running_nats_server
from tests.integration.bus_helpers import last_sequence, messages_after

pytestmark = pytest.mark.integration

DOCUMENTS = 200
SETTLE_S = 0.2


@pytest.fixture(scope="module")
def own_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server of this module's own: on the session's, the `speech` durable would first work
    through every document event other modules published (thousands from the fault tests)."""
    with running_nats_server(tmp_path_factory.mktemp("speech-rebuilds-nats") / "jetstream") as server:
        yield server


@pytest.fixture(scope="module")
def rebuild_settings(own_nats_server: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpeechSettings]:
    home = tmp_path_factory.mktemp("speech-rebuilds")
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    articles = tmp_path_factory.mktemp("bulk-articles")
    for number in range(DOCUMENTS):
        (articles / f"doc{number:03}.txt").write_text(f"Article {number}: where is my parcel number {number}?\n")
    env = platform_environment(own_nats_server, home)
    env["LLMOS_SPEECH_DOMAIN_SEED"] = f"bulk={articles}"
    env["LLMOS_SPEECH_DOMAIN_LM_EXCLUDE"] = "throwaway-eval"
    env["LLMOS_SPEECH_DOMAIN_LM_SETTLE_S"] = str(SETTLE_S)
    with environment(env):
        yield SpeechSettings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
async def speech_service(rebuild_settings: SpeechSettings) -> AsyncIterator[ServiceProcess]:
    process = ServiceProcess(DEFINITION, rebuild_settings)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()


async def publish_all(url: str, subject: str, events: list[bytes]) -> None:
    connection = await nats.connect(url)
    try:
        js = connection.jetstream()
        await asyncio.gather(*(js.publish(subject, event) for event in events))
    finally:
        await connection.close()


async def drained(url: str, subject: str, timeout_s: float) -> bool:
    """Whether speech's consumer of `subject` has acknowledged everything within `timeout_s`."""
    connection = await nats.connect(url)
    try:
        js = connection.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            info = await js.consumer_info(stream_for(subject).name, durable_name("speech", subject))
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await connection.close()


def rebuilds_of(tenant: str, caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for record in caplog.records if record.getMessage().startswith(f"domain language model of tenant {tenant} rebuilt"))


async def test_deleting_two_hundred_documents_rebuilds_at_most_twice(
    speech_service: ServiceProcess, rebuild_settings: SpeechSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.speech.core")
    corpus = rebuild_settings.home / "speech" / "corpus" / DomainCorpus._key("bulk")
    assert list(corpus.glob("domain*.arpa"))  # the seed's model, built at start
    events = [
        events_pb2.DocumentDeleted(tenant="bulk", document_id=f"seed:doc{number:03}.txt").SerializeToString()
        for number in range(DOCUMENTS)
    ]
    await publish_all(rebuild_settings.nats_url, DOCS_DELETED, events)
    assert await drained(rebuild_settings.nats_url, DOCS_DELETED, 60.0)
    for _ in range(100):  # the last rebuild, with no text left, removes the model
        if not list(corpus.glob("domain*.arpa")):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(3 * SETTLE_S)  # no rebuild trails behind
    assert not list(corpus.glob("domain*.arpa")) and not list((corpus / "documents").iterdir())
    assert 1 <= rebuilds_of("bulk", caplog) <= 2  # one per event before debouncing: 200


async def test_an_excluded_tenant_is_neither_fetched_nor_rebuilt(
    speech_service: ServiceProcess, rebuild_settings: SpeechSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.speech.core")
    url = rebuild_settings.nats_url
    letters_before = await last_sequence(url, dead_letter_subject(DOCS_INDEXED))
    # No retrieval runs here: fetching any of these documents would fail and be retried.
    events = [
        events_pb2.DocumentIndexed(tenant="throwaway-eval", document_id=f"eval-{number}").SerializeToString()
        for number in range(DOCUMENTS)
    ]
    await publish_all(url, DOCS_INDEXED, events)
    assert await drained(url, DOCS_INDEXED, 30.0)
    await asyncio.sleep(3 * SETTLE_S)
    assert rebuilds_of("throwaway-eval", caplog) == 0
    assert not (rebuild_settings.home / "speech" / "corpus" / DomainCorpus._key("throwaway-eval")).exists()
    assert not await messages_after(url, dead_letter_subject(DOCS_INDEXED), letters_before)
