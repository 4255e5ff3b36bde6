from __future__ import annotations

import pytest

from llmos.settings import PlatformSettings, SettingsError, load_settings

pytestmark = pytest.mark.unit

ADDRS = {f"LLMOS_{name}_ADDR": f"127.0.0.1:{5000 + i}" for i, name in enumerate(
    ["INGEST", "TOKENIZER", "INFERENCE", "RETRIEVAL", "SPEECH", "DIALOGUE", "AUDIT"])}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:
    """No LLMOS_ variables and no .env file in the working directory."""
    import os

    for key in list(os.environ):
        if key.startswith("LLMOS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_missing_required_settings_name_each_variable(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(PlatformSettings)
    message = str(error.value)
    assert "LLMOS_NATS_URL is required but not set" in message
    assert "LLMOS_AUDIT_ADDR is required but not set" in message


def test_malformed_address_is_rejected_with_its_variable(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in ADDRS.items():
        clean_env.setenv(key, value)
    clean_env.setenv("LLMOS_NATS_URL", "nats://127.0.0.1:4222")
    clean_env.setenv("LLMOS_TOKENIZER_ADDR", "no-port-here")
    with pytest.raises(SettingsError, match="LLMOS_TOKENIZER_ADDR .*HOST:PORT"):
        load_settings(PlatformSettings)


def test_listen_address_uses_bind_host_and_service_port(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in ADDRS.items():
        clean_env.setenv(key, value)
    clean_env.setenv("LLMOS_NATS_URL", "nats://127.0.0.1:4222")
    clean_env.setenv("LLMOS_BIND_HOST", "0.0.0.0")
    settings = load_settings(PlatformSettings)
    assert settings.service_addr("tokenizer") == "127.0.0.1:5001"
    assert settings.listen_addr("tokenizer") == "0.0.0.0:5001"
    with pytest.raises(KeyError, match="unknown service"):
        settings.service_addr("nope")


def test_repository_env_file_describes_a_complete_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed .env is the map of ports: it alone must make valid settings."""
    import os
    from pathlib import Path

    for key in list(os.environ):
        if key.startswith("LLMOS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    settings = load_settings(PlatformSettings)
    ports = {settings.service_addr(name).rpartition(":")[2] for name in
             ("ingest", "tokenizer", "inference", "retrieval", "speech", "dialogue", "audit")}
    assert len(ports) == 7


def test_private_home_is_created_0700_tightened_and_sets_umask(tmp_path) -> None:
    import os

    from llmos.settings import private_home

    previous = os.umask(0o022)
    try:
        home = private_home(tmp_path / "new" / "home")
        assert home.stat().st_mode & 0o777 == 0o700
        (home / "store.db").write_bytes(b"")  # created after: private by the umask
        (home / "logs").mkdir()
        assert (home / "store.db").stat().st_mode & 0o777 == 0o600
        assert (home / "logs").stat().st_mode & 0o777 == 0o700
        existing = tmp_path / "existing"
        existing.mkdir()
        existing.chmod(0o755)
        assert private_home(existing).stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(previous)
