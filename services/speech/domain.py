"""Domain language models: a tenant's knowledge-base and intent text, as spoken words, as ARPA.

Text is kept per tenant and document in the service's own store (`<home>/speech/corpus`), so
a restart rebuilds the same models; a tenant's model is rebuilt whenever one of its documents
changes. Text is normalized the way it is spoken: lower case, numbers as words, symbols
dropped, one sentence a line.

A knowledge base has a few hundred distinct words, and a word outside a model's vocabulary can
never be recognized: a question about a "dryer" or a "tent pole" needs words the articles may
not use. So the model's unigrams are interpolated with the general en-us model's
(`domain_weight` on the domain's): every word PocketSphinx knows stays reachable, while the
domain's bigrams and trigrams still steer the decoder towards how the domain is talked about.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from io import StringIO
from pathlib import Path

import yaml
from pocketsphinx import Decoder
from pocketsphinx.lm import ArpaBoLM

from llmos.spoken import spoken_words

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
# Bumped when build_arpa changes what it writes, so models built before are rebuilt.
MODEL_RECIPE = 2


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
    """Each tenant's spoken-form text by document, on disk, and the tenant's ARPA model.

    `shared_text` (the dialogue's intent examples: how customers phrase requests) goes into every
    tenant's model beside the tenant's own documents. A model's file name carries the recipe it
    was built with, so a model built with other settings is rebuilt rather than used.
    """

    def __init__(
        self, root: Path, shared_text: str = "", background: Mapping[str, float] | None = None, domain_weight: float = 1.0
    ) -> None:
        if not 0.0 < domain_weight <= 1.0:
            raise ValueError(f"domain weight {domain_weight} is not in (0, 1]")
        self._root = root
        self._shared = spoken_sentences(shared_text)
        self._background = background
        self._domain_weight = domain_weight if background else 1.0
        recipe = f"{MODEL_RECIPE}:{self._domain_weight}:{len(background or ())}"
        self._model_name = f"domain-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.arpa"

    @staticmethod
    def _key(value: str) -> str:
        return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]

    def _tenant_dir(self, tenant: str) -> Path:
        return self._root / self._key(tenant)

    def put(self, tenant: str, document_id: str, text: str) -> bool:
        """Store a document's text; False when it is unchanged."""
        folder = self._tenant_dir(tenant) / "documents"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self._key(document_id)}.txt"
        content = "\n".join(spoken_sentences(text)) + "\n"
        if path.exists() and path.read_text(encoding="utf-8") == content:
            return False
        tmp = path.with_suffix(".tmp")
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(path)
        return True

    def remove(self, tenant: str, document_id: str) -> bool:
        path = self._tenant_dir(tenant) / "documents" / f"{self._key(document_id)}.txt"
        if not path.exists():
            return False
        path.unlink()
        return True

    def sentences(self, tenant: str) -> list[str]:
        folder = self._tenant_dir(tenant) / "documents"
        if not folder.exists():
            return []
        return [line for path in sorted(folder.glob("*.txt")) for line in path.read_text(encoding="utf-8").splitlines() if line]

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
        tmp = target.with_suffix(".tmp")
        tmp.write_text(build_arpa(sentences + self._shared, self._background, self._domain_weight), encoding="utf-8")
        tmp.replace(target)
        return target

    def model_path(self, tenant: str) -> Path | None:
        """The tenant's model built with this recipe; None when there is none yet."""
        path = self._tenant_dir(tenant) / self._model_name
        return path if path.exists() else None

    def has_text(self, tenant: str) -> bool:
        folder = self._tenant_dir(tenant) / "documents"
        return folder.exists() and any(folder.glob("*.txt"))

