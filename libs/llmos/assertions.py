"""Service identities: a call one service makes to another carries a signed principal assertion.

A service never forwards the API key its caller presented. For each call it signs a JWT
(`authorization: Service <jwt>`) that names the principal it acts for (subject, tenant, roles:
its caller's, or `llmos.auth.event_principal` for a bus event's tenant), the service that signs
(`iss`, also the key id), the one service it is for (`aud`), when it was made and when it expires
(`iat`, `exp`: `ASSERTION_TTL_S` later) and a unique id (`jti`). The callee accepts it only when
the signature verifies under the issuer's public key, it is addressed to the callee, it has not
expired, it lives no longer than `MAX_LIFETIME_S` and its id was not seen before; then
`llmos.policy.authorize` checks that the issuer may call that RPC at all (`SERVICE_CALLS`).

Ed25519 (EdDSA) rather than an HMAC per service: a callee verifies with the caller's public key
and holds no secret of it, so a compromised callee (say the tokenizer) cannot mint assertions as
its callers; each service holds only its own private key. Keys come from settings:
`LLMOS_SERVICE_SIGNING_KEYS` (`service:key,...`, base64url of the 32-byte private key; a service
uses its own entry, so a deployment gives each service only its own) and
`LLMOS_SERVICE_PUBLIC_KEYS` (every calling service's public key, not secret). `llmos keys
service-keys` prints a fresh set.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from llmos.auth import Principal
from llmos.errors import LlmosError, Unauthenticated
from llmos.policy import ROLE_PERMISSIONS, SERVICE_CALLS
from llmos.settings import PlatformSettings, SettingsError

SERVICE_SCHEME = "Service"
ALGORITHM = "EdDSA"
# An assertion is made for one call and sent at once: a few seconds cover the call's start.
ASSERTION_TTL_S = 10
# The longest lifetime a callee accepts (exp - iat), whatever the signer chose.
MAX_LIFETIME_S = 30
# Clock difference tolerated between hosts when checking iat and exp.
CLOCK_LEEWAY_S = 5
SIGNING_KEYS_VARIABLE = "LLMOS_SERVICE_SIGNING_KEYS"
PUBLIC_KEYS_VARIABLE = "LLMOS_SERVICE_PUBLIC_KEYS"
# The services that call others: only they have keys.
CALLING_SERVICES = tuple(SERVICE_CALLS)
# Seen assertion ids are first pruned of expired ones when this many are kept.
_PRUNE_AT = 4096
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "exp", "jti", "tenant", "roles"]


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_text(key: Ed25519PrivateKey) -> str:
    return _encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def new_service_keys(services: tuple[str, ...] = CALLING_SERVICES) -> tuple[str, str]:
    """Fresh keys for `services`: (LLMOS_SERVICE_SIGNING_KEYS, LLMOS_SERVICE_PUBLIC_KEYS) values."""
    keys = {service: Ed25519PrivateKey.generate() for service in services}
    signing = ",".join(f"{service}:{_encode(key.private_bytes_raw())}" for service, key in keys.items())
    public = ",".join(f"{service}:{public_key_text(key)}" for service, key in keys.items())
    return signing, public


def service_key_environment() -> dict[str, str]:
    """Environment variables with a fresh set of service keys (test and benchmark stacks)."""
    signing, public = new_service_keys()
    return {SIGNING_KEYS_VARIABLE: signing, PUBLIC_KEYS_VARIABLE: public}


def _parse(variable: str, spec: str) -> dict[str, bytes]:
    """`service:base64url,...` -> raw 32-byte keys by service; SettingsError naming what is wrong."""
    keys: dict[str, bytes] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        service, sep, text = entry.partition(":")
        if not sep or not service or not text:
            raise SettingsError(f"{variable}: entry {service or entry[:8]!r}… is not service:key")
        if service not in CALLING_SERVICES:
            raise SettingsError(
                f"{variable}: {service!r} calls no other service and has no key (services that do: {', '.join(CALLING_SERVICES)})"
            )
        try:
            raw = _decode(text)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise SettingsError(f"{variable}: the key of {service!r} is not 32 bytes of base64url; make keys with `llmos keys service-keys`")
        keys[service] = raw
    return keys


@dataclass(frozen=True)
class AssertionSigner:
    """What one service signs its outgoing calls with."""

    service: str
    key: Ed25519PrivateKey

    def sign(self, principal: Principal, audience: str, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": self.service,
            "aud": audience,
            "sub": principal.subject,
            "tenant": principal.tenant,
            "roles": sorted(principal.roles),
            "iat": issued,
            "exp": issued + ASSERTION_TTL_S,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self.key, algorithm=ALGORITHM, headers={"kid": self.service})

    def authorization(self, principal: Principal, audience: str) -> str:
        """The `authorization` metadata value of a call to `audience` for `principal`."""
        return f"{SERVICE_SCHEME} {self.sign(principal, audience)}"


class AssertionVerifier:
    """What one service (the audience) accepts: assertions addressed to it by a known service."""

    def __init__(self, audience: str, public_keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.audience = audience
        self._public_keys = dict(public_keys)
        # jti -> expiry: an assertion opens one call; a replay within its lifetime is refused.
        self._seen: dict[str, float] = {}
        self._prune_at = _PRUNE_AT

    def verify(self, token: str) -> Principal:
        """The principal `token` asserts, or Unauthenticated saying why it is refused."""
        try:
            issuer = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"service assertion refused: not a signed assertion ({exc})") from None
        key = self._public_keys.get(issuer) if isinstance(issuer, str) else None
        if key is None:
            raise Unauthenticated(f"service assertion refused: {str(issuer)[:40]!r} is not a service whose assertions {self.audience} accepts")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=issuer,
                leeway=CLOCK_LEEWAY_S,
                options={"require": _REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"service assertion refused: it is not addressed to {self.audience}") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"service assertion refused: {exc}") from None
        if not isinstance(claims["exp"], int) or claims["exp"] - int(claims["iat"]) > MAX_LIFETIME_S:
            raise Unauthenticated(f"service assertion refused: it lives longer than {MAX_LIFETIME_S} s")
        self._first_use(str(claims["jti"]), claims["exp"] + CLOCK_LEEWAY_S)
        return _principal(claims, issuer)

    def _first_use(self, jti: str, expires_at: float) -> None:
        if jti in self._seen:
            raise Unauthenticated("service assertion refused: it was used already (each call carries a new one)")
        if len(self._seen) >= self._prune_at:
            now = time.time()
            self._seen = {seen: until for seen, until in self._seen.items() if until > now}
            # Amortized: the next pruning waits until the live set has doubled.
            self._prune_at = max(_PRUNE_AT, 2 * len(self._seen))
        self._seen[jti] = expires_at


def _principal(claims: Mapping[str, object], issuer: str) -> Principal:
    roles = claims["roles"]
    subject = claims["sub"]
    tenant = claims["tenant"]
    if not (isinstance(roles, list) and all(isinstance(role, str) and role in ROLE_PERMISSIONS for role in roles)):
        raise Unauthenticated("service assertion refused: its roles are not a list of known roles")
    if not (isinstance(subject, str) and subject and isinstance(tenant, str)):
        raise Unauthenticated("service assertion refused: it names no subject or tenant")
    try:
        return Principal(subject, tenant, frozenset(roles), service=issuer)
    except LlmosError as exc:
        raise Unauthenticated(f"service assertion refused: {exc.message}") from None


@dataclass(frozen=True)
class ServiceKeys:
    """The service keys of this process's settings."""

    signing: Mapping[str, Ed25519PrivateKey]
    public: Mapping[str, Ed25519PublicKey]

    @classmethod
    def from_settings(cls, settings: PlatformSettings) -> ServiceKeys:
        signing = _parse(SIGNING_KEYS_VARIABLE, settings.service_signing_keys)
        public = _parse(PUBLIC_KEYS_VARIABLE, settings.service_public_keys)
        return cls(
            {service: Ed25519PrivateKey.from_private_bytes(raw) for service, raw in signing.items()},
            {service: Ed25519PublicKey.from_public_bytes(raw) for service, raw in public.items()},
        )

    def signer(self, service: str) -> AssertionSigner:
        """`service`'s signer; SettingsError when its key is missing or does not match its public key."""
        key = self.signing.get(service)
        if key is None:
            raise SettingsError(
                f"{SIGNING_KEYS_VARIABLE} holds no key of {service!r}, which calls other services; "
                "make keys with `llmos keys service-keys` and give it its own entry"
            )
        published = self.public.get(service)
        if published is None or public_key_text(key) != _encode(published.public_bytes(Encoding.Raw, PublicFormat.Raw)):
            raise SettingsError(
                f"{PUBLIC_KEYS_VARIABLE} does not hold the public key of {service!r}'s signing key: "
                "the services it calls would refuse its assertions"
            )
        return AssertionSigner(service, key)

    def verifier(self, audience: str) -> AssertionVerifier:
        return AssertionVerifier(audience, self.public)
