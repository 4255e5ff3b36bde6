"""Domain language models: a tenant's knowledge-base and intent text, as spoken words, as ARPA.

Text is kept per tenant and document in the service's own store (`<home>/speech/corpus`), so
a restart rebuilds the same models; a tenant's model is rebuilt whenever one of its documents
changes, once per burst of changes: `CoalescedRebuilds` keeps at most one rebuild of a tenant in
flight and folds the changes that arrive meanwhile into one more (a bulk ingest of thousands of
documents costs a handful of rebuilds, not one per document), and `DomainModelPolicy` says which
tenants get a model at all. That text is every tenant's documents, so it is sealed with the platform's data-at-rest
keys (`LLMOS_ENCRYPTION_KEYS`), each file bound to its tenant's folder and its name; files and
folders are the service user's alone (0600/0700). The ARPA models hold only n-gram statistics
of the text, and PocketSphinx reads them from a file: they stay in clear, 0600. Text is normalized the way it is spoken: lower case, numbers as words, symbols
dropped, one sentence a line.

A knowledge base has a few hundred distinct words, and a word outside a model's vocabulary can
never be recognized: a question about a "dryer" or a "tent pole" needs words the articles may
not use. So the model's unigrams are interpolated with the general en-us model's
(`domain_weight` on the domain's): every word PocketSphinx knows stays reachable, while the
domain's bigrams and trigrams still steer the decoder towards how the domain is talked about.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import yaml
from pocketsphinx import Decoder
from pocketsphinx.lm import ArpaBoLM

from llmos.auth import check_tenant
from llmos.crypto import AtRest
from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.spoken import spoken_words

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
# Bumped when build_arpa changes what it writes, so models built before are rebuilt.
MODEL_RECIPE = 2
DOCUMENT_SUFFIX = ".doc"
# Documents written in plaintext by versions before sealing; sealed at start.
_PLAINTEXT_SUFFIX = ".txt"


def _write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically, readable by this user only."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def spoken_sentences(text: str) -> list[str]:
    return [line for line in (" ".join(spoken_words(part)) for part in _SENTENCE_END.split(text)) if line]


def intent_examples(path: Path) -> list[str]:
    """Every string in an intents YAML file (examples under each intent)."""
    def strings(node: object) -> Iterable[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    return list(strings(yaml.safe_load(path.read_text(encoding="utf-8"))))


def read_seed(path: Path) -> list[tuple[str, str]]:
    """(document key, text) from a file or folder of .md/.txt articles and .yaml intent files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    documents = []
    for file in files:
        if file.suffix in (".yaml", ".yml"):
            documents.append((f"seed:{file.name}", "\n".join(intent_examples(file))))
        elif file.suffix in (".md", ".txt"):
            documents.append((f"seed:{file.name}", file.read_text(encoding="utf-8")))
    return documents


def general_unigrams(decoder: Decoder, general_search: str) -> dict[str, float]:
    """log10 P(word) under the general en-us model of `decoder` (its search `general_search`), for
    each word of its dictionary that the model has."""
    model = decoder.get_lm(general_search)
    unknown = decoder.logmath.get_zero()
    with open(decoder.config["dict"], encoding="utf-8") as dictionary:
        words = {line.split(maxsplit=1)[0] for line in dictionary if line.strip() and "(" not in line.split(maxsplit=1)[0]}
    log_probs = ((word, model.prob([word])) for word in words)
    return {word: decoder.logmath.log_to_log10(value) for word, value in log_probs if value != unknown}


def build_arpa(sentences: Iterable[str], background: Mapping[str, float] | None = None, domain_weight: float = 1.0) -> str:
    """A trigram ARPA model (Katz-style backoff with absolute discounting) of `sentences`.

    With `background` (log10 unigram probabilities), unigrams are
    `domain_weight * P_domain + (1 - domain_weight) * P_background`, over both vocabularies.
    """
    model = ArpaBoLM(text="\n".join(sentences), add_start=True, discount_mass=0.5)
    model.compute()
    if background and domain_weight < 1.0:
        _interpolate_unigrams(model, background, domain_weight)
    out = StringIO()
    model.write(out)
    return out.getvalue()


def _interpolate_unigrams(model: ArpaBoLM, background: Mapping[str, float], domain_weight: float) -> None:
    """Rewrite a computed model's unigrams and their backoff weights, as ArpaBoLM.compute defines them."""
    mass = model.deflator  # what ArpaBoLM's unigrams sum to
    probs = {word: domain_weight * prob for word, prob in model.prob_1.items()}
    for word, log10_prob in background.items():
        probs[word] = probs.get(word, 0.0) + (1.0 - domain_weight) * mass * 10.0**log10_prob
    model.prob_1 = probs
    model.alpha_1 = {
        word: model.discount_mass / (1.0 - sum(probs[following] for following in model.grams_2.get(word, {})))
        for word in probs
    }
    model.count_1 = len(probs)


class DomainCorpus:
    """Each tenant's spoken-form text by document, sealed on disk, and the tenant's ARPA model.

    `shared_text` (the dialogue's intent examples: how customers phrase requests) goes into every
    tenant's model beside the tenant's own documents. A model's file name carries the recipe it
    was built with, so a model built with other settings is rebuilt rather than used.
    """

    def __init__(
        self,
        root: Path,
        at_rest: AtRest,
        shared_text: str = "",
        background: Mapping[str, float] | None = None,
        domain_weight: float = 1.0,
    ) -> None:
        if not 0.0 < domain_weight <= 1.0:
            raise ValueError(f"domain weight {domain_weight} is not in (0, 1]")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root = root
        self._at_rest = at_rest
        self._shared = spoken_sentences(shared_text)
        self._background = background
        self._domain_weight = domain_weight if background else 1.0
        recipe = f"{MODEL_RECIPE}:{self._domain_weight}:{len(background or ())}"
        self._model_name = f"domain-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.arpa"
        self._seal_plaintext_documents()

    @staticmethod
    def _key(value: str) -> str:
        return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]

    def _tenant_dir(self, tenant: str) -> Path:
        return self._root / self._key(tenant)

    def _documents(self, tenant: str) -> Path:
        return self._tenant_dir(tenant) / "documents"

    def _document_path(self, tenant: str, document_id: str) -> Path:
        return self._documents(tenant) / f"{self._key(document_id)}{DOCUMENT_SUFFIX}"

    @staticmethod
    def _bound_to(path: Path) -> bytes:
        """Associated data of a sealed document: its tenant folder and its name, so a file copied
        into another tenant's folder does not open."""
        return f"{path.parent.parent.name}/{path.stem}".encode()

    def _read(self, path: Path) -> str:
        return self._at_rest.open(path.read_bytes(), self._bound_to(path)).decode("utf-8")

    def _write(self, path: Path, text: str) -> None:
        path.parent.parent.mkdir(mode=0o700, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _write_private(path, self._at_rest.seal(text.encode("utf-8"), self._bound_to(path)))

    def _seal_plaintext_documents(self) -> None:
        for legacy in self._root.glob(f"*/documents/*{_PLAINTEXT_SUFFIX}"):
            self._write(legacy.with_suffix(DOCUMENT_SUFFIX), legacy.read_text(encoding="utf-8"))
            legacy.unlink()

    def put(self, tenant: str, document_id: str, text: str) -> bool:
        """Store a document's text; False when it is unchanged."""
        path = self._document_path(tenant, document_id)
        content = "\n".join(spoken_sentences(text)) + "\n"
        if path.exists() and self._stored(path) == content:
            return False
        self._write(path, content)
        return True

    def _stored(self, path: Path) -> str | None:
        """A document's stored text; None when it was sealed under a key no longer configured
        (it is then written again under the current one)."""
        try:
            return self._read(path)
        except FailedPrecondition:
            return None

    def remove(self, tenant: str, document_id: str) -> bool:
        path = self._document_path(tenant, document_id)
        if not path.exists():
            return False
        path.unlink()
        return True

    def sentences(self, tenant: str) -> list[str]:
        folder = self._documents(tenant)
        if not folder.exists():
            return []
        return [line for path in sorted(folder.glob(f"*{DOCUMENT_SUFFIX}")) for line in self._read(path).splitlines() if line]

    def build(self, tenant: str) -> Path | None:
        """Write the tenant's ARPA model from its text; None when the tenant has no text."""
        sentences = self.sentences(tenant)
        folder = self._tenant_dir(tenant)
        for stale in folder.glob("domain*.arpa"):
            if stale.name != self._model_name:
                stale.unlink()
        target = folder / self._model_name
        if not sentences:
            target.unlink(missing_ok=True)
            return None
        arpa = build_arpa(sentences + self._shared, self._background, self._domain_weight)
        _write_private(target, arpa.encode("utf-8"))
        return target

    def model_path(self, tenant: str) -> Path | None:
        """The tenant's model built with this recipe; None when there is none yet."""
        path = self._tenant_dir(tenant) / self._model_name
        return path if path.exists() else None

    def has_text(self, tenant: str) -> bool:
        folder = self._documents(tenant)
        return folder.exists() and any(folder.glob(f"*{DOCUMENT_SUFFIX}"))


def tenant_list(setting: str, value: str) -> frozenset[str]:
    """Tenants named in a comma-separated setting."""
    return frozenset(check_tenant(part.strip(), setting) for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class DomainModelPolicy:
    """Which tenants get a domain model, and how long changes settle before a rebuild.

    A tenant without one (a throwaway evaluation tenant, say) costs nothing when its documents
    are indexed or deleted: no document is fetched, no model rebuilt; it is heard with the
    general model.
    """

    settle_s: float = 1.0
    tenants: frozenset[str] = frozenset()  # empty: every tenant not excluded
    excluded: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.settle_s < 0:
            raise InvalidArgument("LLMOS_SPEECH_DOMAIN_LM_SETTLE_S", f"{self.settle_s} is negative")

    def builds_for(self, tenant: str) -> bool:
        return tenant not in self.excluded and (not self.tenants or tenant in self.tenants)


class CoalescedRebuilds:
    """Rebuilds of each tenant's model, debounced: at most one in flight per tenant.

    A rebuild reads every document of the tenant, so one per change made a bulk ingest quadratic.
    A rebuild starts once the tenant's changes have settled (`settle_s` without a new request);
    while changes keep coming (a bulk ingest), once REBUILD_SPACING times the tenant's last rebuild
    has passed since the first change it answers. Requests that arrive before it starts join it;
    requests that arrive while it runs cause exactly one more rebuild after it. Spaced so, rebuilds
    take at most about 1/(1 + REBUILD_SPACING) of a core during a bulk ingest: started one after
    another, each thrown away by the next, they took 0.64 cores for the 9 minutes of indexing
    SciFact's 5,183 abstracts (a rebuild took 11 s at 3,700 documents).
    """

    REBUILD_SPACING = 10.0

    def __init__(self, rebuild: Callable[[str], Awaitable[None]], settle_s: float) -> None:
        self._rebuild = rebuild
        self._settle_s = settle_s
        self._last_request: dict[str, float] = {}  # tenants with a change not yet rebuilt: its latest time
        self._first_request: dict[str, float] = {}  # ... and the earliest
        self._last_rebuild_s: dict[str, float] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def request(self, tenant: str) -> None:
        now = asyncio.get_running_loop().time()
        self._last_request[tenant] = now
        self._first_request.setdefault(tenant, now)
        if tenant not in self._running:
            self._running[tenant] = asyncio.create_task(self._run(tenant), name=f"domain-lm-rebuild-{tenant}")

    def _due_in(self, tenant: str) -> float:
        """Seconds until the tenant's pending changes are rebuilt (0: now)."""
        spacing = max(self._settle_s, self.REBUILD_SPACING * self._last_rebuild_s.get(tenant, 0.0))
        due = min(self._last_request[tenant] + self._settle_s, self._first_request[tenant] + spacing)
        return max(0.0, due - asyncio.get_running_loop().time())

    async def _run(self, tenant: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while tenant in self._last_request:
                while (wait := self._due_in(tenant)) > 0:
                    await asyncio.sleep(wait)
                # Requests from here on need a rebuild after this one.
                del self._last_request[tenant], self._first_request[tenant]
                started = loop.time()
                try:
                    await self._rebuild(tenant)
                except Exception:
                    # The text is stored: the next change, or the next start, builds the model.
                    logger.exception("domain language model of tenant %s failed to rebuild", tenant)
                self._last_rebuild_s[tenant] = loop.time() - started
        finally:
            del self._running[tenant]

    def pending(self, tenant: str) -> bool:
        return tenant in self._running

    async def settled(self) -> None:
        """Wait until no rebuild is pending or running (at close, so the models on disk are current)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)
