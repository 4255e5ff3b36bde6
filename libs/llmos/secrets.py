"""Every secret the platform runs with: the published development values it refuses outside
development mode, and the one generator of a deployment's secrets.

`.env` ships development values (an administrator key for every tenant, the services' signing
keys, a data key and a JetStream key; the audit service has a development chain key by default)
so that `make demo` works on a fresh clone. Anyone can read them, so a service
refuses to start while a setting holds one, unless `LLMOS_DEV=true` says this is a development
machine (`make demo`, `make up` and the test stacks set it); `llmos up` then warns.

`python -m llmos.secrets compose FILE` writes a deployment's secrets (the env file docker compose
reads beside `.env`), `python -m llmos.secrets rotate FILE NAME…` replaces some of them, and
`python -m llmos.secrets new NAME` prints one fresh value. A new kind of secret is one more row of
`SECRETS`.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llmos.assertions import CALLING_SERVICES, new_service_keys, public_key_text
from llmos.crypto import new_key_entry
from llmos.natsauth import ADMIN_USER, BUS_USERS, new_secret, password_variable
from llmos.settings import ENV_PREFIX, PlatformSettings, SettingsError

DEV_MODE_VARIABLE = f"{ENV_PREFIX}DEV"

# Every secret value the repository publishes (.env; docker-compose.yml holds none), and what it is.
# A setting is checked entry by entry, so `LLMOS_API_KEYS=mine=…,dev-key=…` or a published data key
# under another key id is caught too. tests/security/test_dev_secrets.py checks that every secret
# in .env is listed here.
PUBLISHED_VALUES: dict[str, str] = {
    "dev-key": "the development administrator key of every tenant shipped in .env",
    # The shared service key of earlier versions' .env.
    "svc-dev-key": "the development service key shipped in .env",
    "62VLijWafwJLaEMMGR6QNTqLDc3MUUV39TKeC786wEs=": "the development data-at-rest key shipped in .env",
    "dev-jetstream-key-change-me-0123456789": "the development JetStream key shipped in .env",
    "4t5NqBSlEF-OUNaIyEmcfxmjUlz0xmtmaNMr7w0__p8": "ingest's development signing key shipped in .env",
    "ekif9Il-vEhKuWuB8JzsYM7XqiWVUN5t3mYPvPjAOzA": "retrieval's development signing key shipped in .env",
    "C_MQRHfAt8TyCmIjdiP2dLxz7AOCexxOV4llX3yiizU": "speech's development signing key shipped in .env",
    "vfgfJS0h9yavlOtex_BlkVDoFivR4Vbz71VB8ewVx_A": "dialogue's development signing key shipped in .env",
    "B9SyL3OAs6uQqV_DSUygW1j7bFc26m4uOHr2DubBOqE": "the gateway's development signing key shipped in .env",
    # services/audit/settings.py's default.
    "vBHev955AhMOgWViIb1B5dnUAlEjGjNHTy4nvM2vHm4=": "the development audit chain key (the audit service's default)",
}

# How to make a real value, by setting.
HOW_TO_GENERATE: dict[str, str] = {
    "api_keys": "issue keys with `llmos keys create` and drop the development entries",
    "api_key": "issue a key with `llmos keys create`",
    "service_signing_keys": "`llmos keys service-keys` (each service gets only its own entry)",
    "audit_chain_keys": "`python -m llmos.secrets new LLMOS_AUDIT_CHAIN_KEYS` (put it first, keep the old keys after it)",
    "encryption_keys": "`llmos keys data-key`",
    "jetstream_key": "`python -m llmos.secrets new LLMOS_JETSTREAM_KEY` (existing streams need the old key: back them up first)",
}
_ANY = "`python -m llmos.secrets compose FILE` makes every secret of a deployment"


def _parts(value: str) -> set[str]:
    """The value, each comma-separated entry, each entry's key (`key=…`) and material (`id:material`)."""
    found = {value}
    for entry in (part.strip() for part in value.split(",")):
        found |= {entry, entry.partition("=")[0], entry.partition(":")[2]}
    return found


def published_values_in(settings: PlatformSettings) -> dict[str, str]:
    """Setting variable -> what published value it holds, over every text setting of `settings`."""
    found: dict[str, str] = {}
    for field in type(settings).model_fields:
        value = getattr(settings, field)
        if isinstance(value, str) and value:
            hits = [PUBLISHED_VALUES[part] for part in sorted(_parts(value)) if part in PUBLISHED_VALUES]
            if hits:
                found[ENV_PREFIX + field.upper()] = "; ".join(hits)
    return found


def refuse_published_values(settings: PlatformSettings) -> dict[str, str]:
    """Outside development mode, stop with one line per setting holding a published value and how
    to make a real one. In development mode, return what is published (for a warning)."""
    found = published_values_in(settings)
    if not found or settings.dev:
        return found
    lines = []
    for variable, what in found.items():
        how = HOW_TO_GENERATE.get(variable.removeprefix(ENV_PREFIX).lower(), _ANY)
        lines.append(f"  {variable} holds {what}; make a real value: {how}")
    raise SettingsError(
        "refusing to start with published development secrets (anyone can read them in the repository):\n"
        + "\n".join(lines)
        + f"\n{_ANY}; on a development machine set {DEV_MODE_VARIABLE}=true to accept them"
    )


def development_warning(settings: PlatformSettings) -> str:
    """What `llmos up` prints in development mode: empty outside it."""
    if not settings.dev:
        return ""
    published = published_values_in(settings)
    held = f": {', '.join(published)} hold published values" if published else ""
    return (
        f"warning: development mode ({DEV_MODE_VARIABLE}=true){held}. Anyone who reads the repository "
        "holds these keys; never expose this stack beyond this machine"
    )


# ---------------------------------------------------------------------------- generating secrets


@dataclass(frozen=True)
class Secret:
    """One generated secret of a deployment: its variable, how a fresh value is made, and how a
    rotation combines the new value with the old one (default: replace it)."""

    variable: str
    make: Callable[[], str]
    about: str
    rotate: Callable[[str, str], str] = lambda new, old: new
    # Set when rotating it in place would lose data: what to do instead.
    not_rotatable: str = ""


def _signing_key_variable(service: str) -> str:
    """The compose secret holding `service`'s own entry of LLMOS_SERVICE_SIGNING_KEYS."""
    return f"LLMOS_{service.upper()}_SIGNING_KEY"


def _new_signing_key(service: str) -> Callable[[], str]:
    return lambda: new_service_keys((service,))[0]


def _public_keys(values: Mapping[str, str]) -> str:
    """LLMOS_SERVICE_PUBLIC_KEYS of the signing keys in `values`."""
    entries = []
    for service in CALLING_SERVICES:
        encoded = values[_signing_key_variable(service)].partition(":")[2]
        key = Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        entries.append(f"{service}:{public_key_text(key)}")
    return ",".join(entries)


def _keep_old_keys(new: str, old: str) -> str:
    """Rotation of a key list: the new key first (it seals or signs), the old ones after it (they
    still open or verify what was written under them)."""
    return f"{new},{old}" if old else new


# The deployment's administrator key is a static key (LLMOS_API_KEYS); `llmos keys create`
# issues the others from the key store.
ADMIN_IDENTITY = "admin:demo:admin"
SECRETS: tuple[Secret, ...] = (
    *(Secret(password_variable(user), new_secret, f"NATS password of {user}") for user in (*BUS_USERS, ADMIN_USER)),
    Secret("LLMOS_API_KEY", new_secret, "the administrator key host tools present"),
    *(
        Secret(_signing_key_variable(service), _new_signing_key(service), f"{service}'s key signing its calls to other services")
        for service in CALLING_SERVICES
    ),
    Secret("LLMOS_ENCRYPTION_KEYS", new_key_entry, "data-at-rest keys, the first seals", rotate=_keep_old_keys),
    Secret(
        "LLMOS_JETSTREAM_KEY", new_secret, "nats-server's JetStream encryption key",
        not_rotatable="streams stored under the old key become unreadable: back them up (`nats stream backup`), "
        "stop the stack, put a new key in the file (`python -m llmos.secrets new LLMOS_JETSTREAM_KEY`), restore them",
    ),
    Secret("LLMOS_QDRANT_API_KEY", new_secret, "the Qdrant server's API key"),
    Secret("LLMOS_AUDIT_CHAIN_KEYS", new_key_entry, "the audit chain's HMAC keys, the first signs", rotate=_keep_old_keys),
)
_TABLE = {secret.variable: secret for secret in SECRETS}


def _derived(values: Mapping[str, str]) -> dict[str, str]:
    """Settings made from the secrets: the static key the services accept, every service's
    public key, and the admin NATS login of command-line tools on the host."""
    return {
        "LLMOS_API_KEYS": f"{values['LLMOS_API_KEY']}={ADMIN_IDENTITY}",
        "LLMOS_SERVICE_PUBLIC_KEYS": _public_keys(values),
        "LLMOS_NATS_USER": ADMIN_USER,
        "LLMOS_NATS_PASSWORD": values[password_variable(ADMIN_USER)],
    }


def compose_values() -> dict[str, str]:
    """Fresh values of every compose secret."""
    values = {secret.variable: secret.make() for secret in SECRETS}
    return {**values, **_derived(values)}


def env_file_text(values: Mapping[str, str]) -> str:
    return "".join(f"{variable}={value}\n" for variable, value in values.items())


def compose_secrets() -> str:
    """The env file for `docker compose --env-file .env --env-file FILE` (and `set -a; . FILE` for
    command-line tools on the host)."""
    return env_file_text(compose_values())


def rotated(values: Mapping[str, str], variables: Sequence[str]) -> dict[str, str]:
    """`values` with a fresh value for each of `variables`, and the settings made from them."""
    result = dict(values)
    for variable in variables:
        secret = _TABLE.get(variable)
        if secret is None:
            raise SettingsError(f"{variable} is not a generated secret; known: {', '.join(_TABLE)}")
        if secret.not_rotatable:
            raise SettingsError(f"{variable} is not rotated in place: {secret.not_rotatable}")
        result[variable] = secret.rotate(secret.make(), values.get(variable, ""))
    return {**result, **_derived(result)}


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        variable, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[variable.strip()] = value.strip()
    return values


def write_private(path: Path, text: str, replace: bool = False) -> None:
    """Write `text` to a file only this user can read (0600), atomically when replacing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".tmp") if replace else path
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    with os.fdopen(os.open(target, flags, 0o600), "w") as handle:
        handle.write(text)
    if replace:
        target.replace(path)


def main(argv: Sequence[str]) -> None:
    usage = (
        "usage: python -m llmos.secrets compose FILE | rotate FILE VARIABLE... | new VARIABLE\n"
        + "\n".join(f"  {secret.variable:<30} {secret.about}" for secret in SECRETS)
    )
    command, arguments = (argv[0], list(argv[1:])) if argv else ("", [])
    if command == "compose" and len(arguments) == 1:
        path = Path(arguments[0])
        if path.exists():
            raise SystemExit(f"{path} exists; keep it (stored data is encrypted under its keys) or rotate what you need")
        write_private(path, compose_secrets())
        print(f"wrote {path}; start with: docker compose --env-file .env --env-file {path} up")
    elif command == "rotate" and len(arguments) >= 2:
        path = Path(arguments[0])
        values = rotated(read_env_file(path), arguments[1:])
        write_private(path, env_file_text(values), replace=True)
        print(f"rotated {', '.join(arguments[1:])} in {path}; restart the stack (`docker compose up -d`) to use them")
    elif command == "new" and len(arguments) == 1 and arguments[0] in _TABLE:
        print(_TABLE[arguments[0]].make())
    else:
        raise SystemExit(usage)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None
