"""The speech corpus is sealed (issue 13, item 11).

The speech service keeps every tenant's document text (spoken form) under
`LLMOS_HOME/speech/corpus` to rebuild its domain language models. It is sealed with the
platform's data-at-rest keys, bound to its tenant's folder, and private to the service user;
text left in plaintext by an earlier version is sealed when the corpus opens.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llmos.crypto import AtRest, Sealer, new_key_entry
from llmos.errors import FailedPrecondition
from llmos.settings import SettingsError
from services.speech.domain import DOCUMENT_SUFFIX, DomainCorpus
from services.speech.settings import SpeechSettings

pytestmark = pytest.mark.security

SECRET = "The vault code for Contoso's Hamburg branch is kept by Ingrid Falkenberg."
SPOKEN = "ingrid falkenberg"


def sealed() -> AtRest:
    return AtRest(Sealer.from_spec(new_key_entry("speech")), "the speech corpus")


def stored_bytes(root: Path) -> bytes:
    return b"".join(path.read_bytes() for path in root.rglob("*") if path.is_file() and path.suffix != ".arpa")


def test_document_text_is_sealed_on_disk_and_read_back(tmp_path: Path) -> None:
    corpus = DomainCorpus(tmp_path, sealed())
    assert corpus.put("acme", "vault", SECRET)
    assert not corpus.put("acme", "vault", SECRET)  # unchanged: no rewrite, no rebuild
    assert SPOKEN.encode() not in stored_bytes(tmp_path) and b"falkenberg" not in stored_bytes(tmp_path)
    assert any(SPOKEN in line for line in corpus.sentences("acme"))
    assert corpus.build("acme") is not None


def test_files_are_private_to_the_service_user(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # what a shell gives; the corpus must not depend on the service's umask
    try:
        corpus = DomainCorpus(tmp_path / "corpus", sealed())
        corpus.put("acme", "vault", SECRET)
        corpus.build("acme")
    finally:
        os.umask(previous)
    files = [path for path in (tmp_path / "corpus").rglob("*") if path.is_file()]
    folders = [path for path in (tmp_path / "corpus").rglob("*") if path.is_dir()]
    assert len(files) == 2 and folders
    assert {path.stat().st_mode & 0o777 for path in files} == {0o600}
    assert {path.stat().st_mode & 0o777 for path in folders} == {0o700}


def test_a_document_copied_into_another_tenant_does_not_open(tmp_path: Path) -> None:
    at_rest = sealed()
    corpus = DomainCorpus(tmp_path, at_rest)
    corpus.put("acme", "vault", SECRET)
    corpus.put("globex", "other", "Globex sells lamps.")
    stolen = next((tmp_path / DomainCorpus._key("acme") / "documents").glob(f"*{DOCUMENT_SUFFIX}"))
    target = tmp_path / DomainCorpus._key("globex") / "documents" / stolen.name
    shutil.copy(stolen, target)
    with pytest.raises(FailedPrecondition, match="fails authentication"):
        corpus.sentences("globex")


def test_plaintext_left_by_an_earlier_version_is_sealed_at_start(tmp_path: Path) -> None:
    legacy = tmp_path / DomainCorpus._key("acme") / "documents" / f"{DomainCorpus._key('vault')}.txt"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(f"{SPOKEN} keeps the vault code\n")
    corpus = DomainCorpus(tmp_path, sealed())
    assert not legacy.exists()
    assert SPOKEN.encode() not in stored_bytes(tmp_path)
    assert corpus.sentences("acme") == [f"{SPOKEN} keeps the vault code"]


def test_the_service_refuses_a_plaintext_corpus_without_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Speech builds its corpus's sealing from the settings like every store: no keys, no start."""
    from services.speech.app import corpus_at_rest

    for variable in list(os.environ):
        if variable.startswith("LLMOS_"):
            monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)
    addresses = {f"LLMOS_{name}_ADDR": f"127.0.0.1:{5000 + index}" for index, name in enumerate(
        ("INGEST", "TOKENIZER", "INFERENCE", "RETRIEVAL", "SPEECH", "DIALOGUE", "AUDIT"))}
    for variable, value in {**addresses, "LLMOS_NATS_URL": "nats://127.0.0.1:4222"}.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match="the speech corpus would be stored unencrypted"):
        corpus_at_rest(SpeechSettings())  # type: ignore[call-arg]
    monkeypatch.setenv("LLMOS_ENCRYPTION_KEYS", new_key_entry("k"))
    assert corpus_at_rest(SpeechSettings()).key_id == "k"  # type: ignore[call-arg]
