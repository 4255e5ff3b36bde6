"""Domain language models: a tenant's knowledge-base and intent text, as spoken words, as ARPA.

Text is kept per tenant and document in the service's own store (`<home>/speech/corpus`), so
a restart rebuilds the same models; a tenant's model is rebuilt whenever one of its documents
changes. Text is normalized the way it is spoken: lower case, numbers as words, symbols
dropped, one sentence a line.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from io import StringIO
from pathlib import Path

import yaml
from pocketsphinx.lm import ArpaBoLM

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1000, "thousand"), (100, "hundred"))
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[a-z]+(?:'[a-z]+)?")
_MAX_DIGITS = 12  # longer digit runs (ids, phone numbers) are read digit by digit


def number_words(value: int) -> list[str]:
    """English words for a non-negative integer, as a person reads it."""
    if value < 20:
        return [_ONES[value]]
    if value < 100:
        tens, ones = divmod(value, 10)
        return [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    for scale, name in _SCALES:
        if value >= scale:
            high, rest = divmod(value, scale)
            return number_words(high) + [name] + (number_words(rest) if rest else [])
    raise AssertionError("unreachable")


def _integer_words(digits: str) -> list[str]:
    if len(digits) > _MAX_DIGITS or (len(digits) > 1 and digits.startswith("0")):
        return [_ONES[int(d)] for d in digits]
    return number_words(int(digits))


def _number_token(token: str) -> list[str]:
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", token):
        token = token.replace(",", "")  # thousands separators
    whole, dot, fraction = token.partition(".")
    if "," in token or "." in fraction:  # a list such as 1,2 or a version such as 1.2.3
        return [word for part in re.split(r"[.,]", token) for word in _integer_words(part)]
    return _integer_words(whole) + (["point"] + [_ONES[int(d)] for d in fraction] if dot else [])


def spoken_words(text: str) -> list[str]:
    """The words of `text` as they would be spoken and transcribed."""
    folded = unicodedata.normalize("NFKC", text).lower().replace("’", "'").replace("%", " percent ")
    words: list[str] = []
    for token in _TOKEN.findall(folded.replace("&", " and ")):
        words.extend(_number_token(token) if token[0].isdigit() else [token])
    return words


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


def build_arpa(sentences: Iterable[str]) -> str:
    """A trigram ARPA model (Katz-style backoff with absolute discounting) of `sentences`."""
    model = ArpaBoLM(text="\n".join(sentences), add_start=True, discount_mass=0.5)
    model.compute()
    out = StringIO()
    model.write(out)
    return out.getvalue()


class DomainCorpus:
    """Each tenant's spoken-form text by document, on disk, and the tenant's ARPA model.

    `shared_text` (the dialogue's intent examples: how customers phrase requests) goes into every
    tenant's model beside the tenant's own documents.
    """

    def __init__(self, root: Path, shared_text: str = "") -> None:
        self._root = root
        self._shared = spoken_sentences(shared_text)

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
        target = self._tenant_dir(tenant) / "domain.arpa"
        if not sentences:
            target.unlink(missing_ok=True)
            return None
        tmp = target.with_suffix(".tmp")
        tmp.write_text(build_arpa(sentences + self._shared), encoding="utf-8")
        tmp.replace(target)
        return target

    def model_path(self, tenant: str) -> Path | None:
        path = self._tenant_dir(tenant) / "domain.arpa"
        return path if path.exists() else None

