"""The Qdrant server of the compose deployment requires an API key (issue 13, item 11).

The key comes from the compose secrets file; only the retrieval service receives it, as
`LLMOS_QDRANT_API_KEY`, and its Qdrant client sends it on every call (checked against a small
HTTP server that answers like Qdrant only when the key is right). Every service container's
environment (.env, then the compose file's values) holds no published development secret.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llmos.secrets import compose_values, published_values_in
from services.retrieval.app import open_index
from services.retrieval.settings import RetrievalSettings
from tests.conftest import _settings_from
from tests.unit.test_compose import ENV_FILE, load_compose, read_dotenv

pytestmark = pytest.mark.security

LLMOS_SERVICES = ("ingest", "tokenizer", "inference", "retrieval", "speech", "dialogue", "audit")


@pytest.fixture(scope="module")
def compose() -> tuple[dict[str, Any], dict[str, str]]:
    secrets = compose_values()
    return load_compose(secrets=secrets), secrets


def test_the_qdrant_server_requires_the_generated_key(compose: tuple[dict[str, Any], dict[str, str]]) -> None:
    model, secrets = compose
    qdrant = model["services"]["qdrant"]
    assert qdrant["environment"]["QDRANT__SERVICE__API_KEY"] == secrets["LLMOS_QDRANT_API_KEY"]
    # The readiness probe presents the key from the container's own environment.
    assert "api-key: %s" in " ".join(qdrant["healthcheck"]["test"]) and "$QDRANT__SERVICE__API_KEY" in " ".join(qdrant["healthcheck"]["test"])


def test_only_retrieval_holds_the_qdrant_key(compose: tuple[dict[str, Any], dict[str, str]]) -> None:
    model, secrets = compose
    for name in LLMOS_SERVICES:
        environment = model["services"][name]["environment"]
        expected = secrets["LLMOS_QDRANT_API_KEY"] if name == "retrieval" else None
        assert environment.get("LLMOS_QDRANT_API_KEY") == expected, name


def test_without_the_secrets_file_compose_stops_on_the_qdrant_key() -> None:
    with pytest.raises(AssertionError, match="LLMOS_QDRANT_API_KEY is not set"):
        load_compose(secrets={key: value for key, value in compose_values().items() if key != "LLMOS_QDRANT_API_KEY"})


def test_no_container_starts_with_a_published_secret(compose: tuple[dict[str, Any], dict[str, str]]) -> None:
    """A container's environment: .env (env_file), then the service's `environment`."""
    model, _ = compose
    for name in LLMOS_SERVICES:
        environment = {**read_dotenv(ENV_FILE), **{key: str(value) for key, value in model["services"][name]["environment"].items()}}
        assert "LLMOS_DEV" not in environment
        assert published_values_in(_settings_from(environment)) == {}, name


class _FakeQdrant(BaseHTTPRequestHandler):
    """Answers `collection exists` like a Qdrant server with an API key, and records each call's key."""

    key = ""
    seen: list[str | None] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("api-key"))
        if self.headers.get("api-key") != self.key:
            self._answer(401, {"status": {"error": "Must provide an API key or an Authorization bearer token"}})
        elif self.path == "/":
            self._answer(200, {"title": "qdrant - vector search engine", "version": "1.20.0"})
        else:
            self._answer(200, {"result": {"exists": True}, "status": "ok", "time": 0.0})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def fake_qdrant() -> Iterator[str]:
    _FakeQdrant.key = compose_values()["LLMOS_QDRANT_API_KEY"]
    _FakeQdrant.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeQdrant)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _retrieval_settings(monkeypatch: pytest.MonkeyPatch, url: str, key: str) -> RetrievalSettings:
    environment = read_dotenv(ENV_FILE) | {"LLMOS_QDRANT_URL": url, "LLMOS_QDRANT_API_KEY": key}
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    return RetrievalSettings(_env_file=None)  # type: ignore[call-arg]


def test_retrieval_presents_the_key_to_the_server(fake_qdrant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    index = open_index(_retrieval_settings(monkeypatch, fake_qdrant, _FakeQdrant.key))
    assert index is not None
    assert _FakeQdrant.seen and set(_FakeQdrant.seen) == {_FakeQdrant.key}


def test_a_wrong_key_is_refused_by_the_server(fake_qdrant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Exception, match="401|Unauthorized|API key"):
        open_index(_retrieval_settings(monkeypatch, fake_qdrant, "not-the-key"))
    assert "not-the-key" in _FakeQdrant.seen
