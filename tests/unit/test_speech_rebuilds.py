"""Domain language model rebuilds are debounced per tenant, and a tenant can opt out (issue 15, item 6)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmos.crypto import AtRest
from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.v1 import events_pb2
from services.speech.core import SpeechCore
from services.speech.domain import CoalescedRebuilds, DomainCorpus, DomainModelPolicy, tenant_list

pytestmark = pytest.mark.unit

PLAINTEXT = AtRest(None, "speech corpus")


class CountingCorpus(DomainCorpus):
    """The real corpus, counting the models it builds per tenant."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, PLAINTEXT)
        self.builds: dict[str, int] = {}
        self.sentences_built: list[int] = []  # sentences in each model built

    def build(self, tenant: str) -> Path | None:
        self.builds[tenant] = self.builds.get(tenant, 0) + 1
        self.sentences_built.append(len(self.sentences(tenant)))
        return super().build(tenant)


class DomainModels:
    """The part of AsrEngine the domain-model code uses: which model each tenant decodes with."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def set_domain_model(self, tenant: str, path: Path | None) -> None:
        if path is None:
            self.paths.pop(tenant, None)
        else:
            self.paths[tenant] = path

    def has_domain_model(self, tenant: str) -> bool:
        return tenant in self.paths


class Documents:
    def __init__(self) -> None:
        self.fetched = 0

    async def text(self, tenant: str, document_id: str) -> str:
        self.fetched += 1
        return f"Article {document_id} of {tenant}: where is my parcel number {document_id[1:]}?"


def speech_core(corpus: DomainCorpus, engine: DomainModels, documents: Documents, policy: DomainModelPolicy) -> SpeechCore:
    # Recognition and synthesis parts are not used by the domain-model code.
    return SpeechCore(None, None, engine, corpus, None, None, 0, documents.text, policy)  # type: ignore[arg-type]


async def test_two_hundred_indexed_documents_cause_at_most_two_rebuilds(tmp_path: Path) -> None:
    corpus, engine, documents = CountingCorpus(tmp_path), DomainModels(), Documents()
    core = speech_core(corpus, engine, documents, DomainModelPolicy(settle_s=0.05))
    for number in range(200):
        await core.document_indexed(events_pb2.DocumentIndexed(tenant="eval", document_id=f"d{number}"))
    await core.rebuilds_settled()
    assert 1 <= corpus.builds["eval"] <= 2  # the code before this change built 200 models
    assert documents.fetched == 200
    assert corpus.sentences_built[-1] == 400  # the model in use has all 200 documents (2 sentences each)
    assert engine.paths["eval"] == corpus.model_path("eval")

    for number in range(200):
        await core.document_deleted(events_pb2.DocumentDeleted(tenant="eval", document_id=f"d{number}"))
    await core.rebuilds_settled()
    assert 2 <= corpus.builds["eval"] <= 4  # before: 400 in all
    assert not engine.has_domain_model("eval") and corpus.model_path("eval") is None


async def test_changes_during_a_rebuild_cause_exactly_one_more() -> None:
    started: list[str] = []
    release = asyncio.Event()

    async def rebuild(tenant: str) -> None:
        started.append(tenant)
        await release.wait()

    rebuilds = CoalescedRebuilds(rebuild, settle_s=0.0)
    rebuilds.request("acme")
    for _ in range(50):
        await asyncio.sleep(0)
    assert started == ["acme"]  # one in flight
    for _ in range(30):
        rebuilds.request("acme")  # arrive while it runs
    rebuilds.request("globex")  # another tenant is not held up by acme's
    for _ in range(50):
        await asyncio.sleep(0)
    assert started == ["acme", "globex"]
    release.set()
    await rebuilds.settled()
    assert started == ["acme", "globex", "acme"]


async def test_changes_that_keep_coming_space_the_rebuilds_by_their_cost() -> None:
    """A bulk ingest changes the tenant every few ms for longer than a rebuild takes: rebuilds are
    spaced by REBUILD_SPACING times the last one's duration, not run back to back, and the last
    one comes after the last change."""
    rebuild_s, settle_s = 0.02, 0.05
    rebuilt_at: list[float] = []
    loop = asyncio.get_running_loop()

    async def rebuild(tenant: str) -> None:
        await asyncio.sleep(rebuild_s)
        rebuilt_at.append(loop.time())

    rebuilds = CoalescedRebuilds(rebuild, settle_s)
    started = loop.time()
    while loop.time() - started < 0.6:
        rebuilds.request("eval")
        await asyncio.sleep(0.01)
    last_change = loop.time()
    await rebuilds.settled()
    # Back to back (settle, rebuild, settle, ...) that was one rebuild every 0.07 s: 9 or more.
    assert 2 <= len(rebuilt_at) <= 5
    gaps = [later - earlier for earlier, later in zip(rebuilt_at, rebuilt_at[1:-1])]
    assert all(gap >= CoalescedRebuilds.REBUILD_SPACING * rebuild_s for gap in gaps)
    assert rebuilt_at[-1] >= last_change + settle_s


async def test_a_failed_rebuild_does_not_stop_later_ones() -> None:
    attempts: list[str] = []

    async def rebuild(tenant: str) -> None:
        attempts.append(tenant)
        if len(attempts) == 1:
            raise OSError("disk full")

    rebuilds = CoalescedRebuilds(rebuild, settle_s=0.0)
    rebuilds.request("acme")
    await rebuilds.settled()
    rebuilds.request("acme")
    await rebuilds.settled()
    assert attempts == ["acme", "acme"]


@pytest.mark.parametrize(
    "policy",
    [DomainModelPolicy(settle_s=0.0, excluded=frozenset({"eval"})), DomainModelPolicy(settle_s=0.0, tenants=frozenset({"acme"}))],
    ids=["excluded", "not-listed"],
)
async def test_an_opted_out_tenant_costs_no_fetch_and_no_rebuild(tmp_path: Path, policy: DomainModelPolicy) -> None:
    corpus, engine, documents = CountingCorpus(tmp_path), DomainModels(), Documents()
    core = speech_core(corpus, engine, documents, policy)
    for number in range(200):
        await core.document_indexed(events_pb2.DocumentIndexed(tenant="eval", document_id=f"d{number}"))
        await core.document_deleted(events_pb2.DocumentDeleted(tenant="eval", document_id=f"d{number}"))
    await core.document_indexed(events_pb2.DocumentIndexed(tenant="acme", document_id="d1"))
    await core.rebuilds_settled()
    assert corpus.builds == {"acme": 1} and documents.fetched == 1
    assert not corpus.has_text("eval")
    assert await core._domain_tenant("eval", "") is None  # heard with the general model
    with pytest.raises(FailedPrecondition, match="LLMOS_SPEECH_DOMAIN_LM"):
        await core._domain_tenant("eval", "domain")
    assert await core._domain_tenant("acme", "domain") == "acme"


def test_tenant_lists_are_checked() -> None:
    assert tenant_list("LLMOS_SPEECH_DOMAIN_LM_EXCLUDE", " eval, scifact-eval ,") == {"eval", "scifact-eval"}
    assert tenant_list("LLMOS_SPEECH_DOMAIN_LM_EXCLUDE", "") == frozenset()
    with pytest.raises(InvalidArgument, match="LLMOS_SPEECH_DOMAIN_LM_EXCLUDE"):
        tenant_list("LLMOS_SPEECH_DOMAIN_LM_EXCLUDE", "acme;eval")
    with pytest.raises(InvalidArgument, match="negative"):
        DomainModelPolicy(settle_s=-1)
