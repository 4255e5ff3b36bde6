"""Development secrets stay development secrets (issue 13, item 4).

`.env` publishes an administrator key of every tenant, the services' signing keys, a data key and
a JetStream key; the audit service has a published chain key by default. Outside development mode (`LLMOS_DEV=true`) a service started with any of them refuses to
start, naming the setting and how to make a real value; `llmos up` refuses before starting
anything, and warns in development mode. The compose secrets generator makes every secret a
deployment needs, none of them published.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.assertions import CALLING_SERVICES, ServiceKeys
from llmos.crypto import new_key_entry
from llmos.secrets import (
    PUBLISHED_VALUES,
    SECRETS,
    compose_values,
    development_warning,
    main,
    published_values_in,
    read_env_file,
    refuse_published_values,
)
from llmos.settings import SERVICE_NAMES, PlatformSettings, SettingsError
from llmos.stack import Stack
from tests.conftest import REPO, _settings_from, free_port
from tests.unit.test_compose import read_dotenv

pytestmark = pytest.mark.security

DOTENV = read_dotenv(REPO / ".env")
# Every setting of .env that holds a secret: keys and passwords (public keys are no secret).
SECRET_SETTINGS = tuple(
    variable for variable, value in DOTENV.items()
    if value and variable.endswith(("_KEY", "_KEYS", "_PASSWORD")) and "PUBLIC" not in variable
)


def dotenv_environment(**overrides: str) -> dict[str, str]:
    """The repository's .env as a service reads it, on free ports, with `overrides`."""
    env = {**DOTENV, "LLMOS_NATS_URL": f"nats://127.0.0.1:{free_port()}", **overrides}
    for name in SERVICE_NAMES:
        env[f"LLMOS_{name.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"
    return env


def test_every_secret_of_dotenv_is_refused_outside_development_mode() -> None:
    settings = _settings_from(dotenv_environment())
    assert not settings.dev
    with pytest.raises(SettingsError) as error:
        refuse_published_values(settings)
    message = str(error.value)
    for variable in SECRET_SETTINGS:
        assert f"{variable} holds" in message, variable
    assert "LLMOS_DEV=true" in message and "llmos keys create" in message and "llmos keys data-key" in message
    assert "python -m llmos.secrets compose" in message


@pytest.mark.parametrize("variable", SECRET_SETTINGS)
def test_each_published_value_alone_is_refused(variable: str) -> None:
    """Only one setting left at its .env value (the others emptied): still refused, and named."""
    env = dotenv_environment(**{name: "" for name in SECRET_SETTINGS if name != variable})
    settings = _settings_from(env)
    assert list(published_values_in(settings)) == [variable]
    with pytest.raises(SettingsError, match=variable):
        refuse_published_values(settings)


def test_a_published_value_hidden_among_real_ones_is_refused() -> None:
    """A published key listed after a real one, or the published data key under another key id."""
    published_data_key = DOTENV["LLMOS_ENCRYPTION_KEYS"].partition(":")[2]
    env = dotenv_environment(**{name: "" for name in SECRET_SETTINGS}) | {
        "LLMOS_API_KEYS": "real-key-0123456789=ops:acme:admin,dev-key=dev:demo:admin",
        "LLMOS_ENCRYPTION_KEYS": f"{new_key_entry('new')},renamed:{published_data_key}",
        "LLMOS_JETSTREAM_KEY": "a-real-jetstream-key-0123456789",
    }
    assert set(published_values_in(_settings_from(env))) == {"LLMOS_API_KEYS", "LLMOS_ENCRYPTION_KEYS"}


def test_published_list_covers_dotenv() -> None:
    """Every secret .env ships is in the list the check uses (so the two cannot drift apart):
    each setting whole, or the key of each `key=identity` entry, or the material of each
    `id:material` entry."""
    assert {"LLMOS_API_KEYS", "LLMOS_ENCRYPTION_KEYS", "LLMOS_JETSTREAM_KEY"} <= set(SECRET_SETTINGS)
    for variable in SECRET_SETTINGS:
        entries = DOTENV[variable].split(",")
        secrets = {entry.partition("=")[0] if "=" in entry.rstrip("=") else entry.partition(":")[2] or entry for entry in entries}
        assert secrets <= set(PUBLISHED_VALUES), f"{variable}: {secrets - set(PUBLISHED_VALUES)} missing from PUBLISHED_VALUES"


def test_development_mode_accepts_them_and_warns() -> None:
    settings = _settings_from(dotenv_environment(LLMOS_DEV="true"))
    assert set(refuse_published_values(settings)) == set(SECRET_SETTINGS)
    warning = development_warning(settings)
    assert "development mode" in warning and "LLMOS_API_KEYS" in warning
    assert development_warning(_settings_from(dotenv_environment())) == ""


def test_a_service_started_with_dotenv_values_exits_naming_them(tmp_path: Path) -> None:
    """A real service process with .env's values and no LLMOS_DEV: exit 2 at once, before it
    connects anywhere (the NATS URL points at a closed port)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMOS_")}
    env |= dotenv_environment(LLMOS_HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [sys.executable, "-m", "services.audit"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "LLMOS_API_KEYS holds" in result.stderr and "LLMOS_DEV=true" in result.stderr
    assert "Traceback" not in result.stderr


def test_llmos_up_refuses_before_starting_anything(tmp_path: Path) -> None:
    settings = _settings_from(dotenv_environment(LLMOS_HOME=str(tmp_path / "home")))
    with pytest.raises(SettingsError, match="LLMOS_API_KEYS holds"):
        Stack(settings).start()
    assert not (tmp_path / "home").exists()  # no NATS, no service, not even its home


def test_compose_secrets_make_every_secret_fresh_and_unpublished(tmp_path: Path) -> None:
    path = tmp_path / "compose-secrets.env"
    main(["compose", str(path)])
    assert path.stat().st_mode & 0o777 == 0o600
    values = read_env_file(path)
    for variable in (
        "LLMOS_API_KEYS", "LLMOS_API_KEY", "LLMOS_ENCRYPTION_KEYS", "LLMOS_JETSTREAM_KEY", "LLMOS_QDRANT_API_KEY",
        "LLMOS_AUDIT_CHAIN_KEYS", "LLMOS_SERVICE_PUBLIC_KEYS",
        *(f"LLMOS_NATS_{user.upper()}_PASSWORD" for user in (*SERVICE_NAMES, "admin")),
        *(f"LLMOS_{service.upper()}_SIGNING_KEY" for service in CALLING_SERVICES),
    ):
        assert len(values.get(variable, "")) >= 20, variable
    assert values["LLMOS_API_KEYS"] == f"{values['LLMOS_API_KEY']}=admin:demo:admin"
    # Every service's own signing key (llmos.assertions) verifies under the public keys generated with it.
    signing = ",".join(values[f"LLMOS_{service.upper()}_SIGNING_KEY"] for service in CALLING_SERVICES)
    keys = ServiceKeys.from_settings(_settings_from(dotenv_environment(
        LLMOS_SERVICE_SIGNING_KEYS=signing, LLMOS_SERVICE_PUBLIC_KEYS=values["LLMOS_SERVICE_PUBLIC_KEYS"])))
    for service in CALLING_SERVICES:
        keys.signer(service)
    settings = _settings_from(dotenv_environment(**values, LLMOS_SERVICE_SIGNING_KEYS=signing))
    assert published_values_in(settings) == {}
    refuse_published_values(settings)
    again = compose_values()
    assert all(again[secret.variable] != values[secret.variable] for secret in SECRETS)
    with pytest.raises(SystemExit, match="exists"):
        main(["compose", str(path)])  # never overwrites the keys stored data is sealed under


def test_rotation_replaces_a_secret_and_keeps_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "compose-secrets.env"
    main(["compose", str(path)])
    before = read_env_file(path)
    main(["rotate", str(path), "LLMOS_API_KEY", "LLMOS_ENCRYPTION_KEYS", "LLMOS_NATS_ADMIN_PASSWORD", "LLMOS_INGEST_SIGNING_KEY"])
    after = read_env_file(path)
    assert after["LLMOS_API_KEY"] != before["LLMOS_API_KEY"]
    assert after["LLMOS_API_KEYS"] == f"{after['LLMOS_API_KEY']}=admin:demo:admin"
    assert after["LLMOS_ENCRYPTION_KEYS"].endswith("," + before["LLMOS_ENCRYPTION_KEYS"])
    assert after["LLMOS_NATS_PASSWORD"] == after["LLMOS_NATS_ADMIN_PASSWORD"] != before["LLMOS_NATS_ADMIN_PASSWORD"]
    ingest_public = {entry.partition(":")[0]: entry for entry in after["LLMOS_SERVICE_PUBLIC_KEYS"].split(",")}
    old_public = {entry.partition(":")[0]: entry for entry in before["LLMOS_SERVICE_PUBLIC_KEYS"].split(",")}
    assert ingest_public["ingest"] != old_public["ingest"] and ingest_public["speech"] == old_public["speech"]
    assert after["LLMOS_QDRANT_API_KEY"] == before["LLMOS_QDRANT_API_KEY"]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(SettingsError, match="back them up"):
        main(["rotate", str(path), "LLMOS_JETSTREAM_KEY"])
    with pytest.raises(SettingsError, match="not a generated secret"):
        main(["rotate", str(path), "LLMOS_HOME"])
