"""TLS for gRPC: a development CA with per-service certificates, and the credentials built from them.

`llmos certs --out DIR` writes `ca.pem`, and `<name>.pem`/`<name>-key.pem` for every service
and for `client` (the command line and other callers). With `LLMOS_TLS_DIR=DIR` every service
serves TLS with its own certificate and verifies peers against `ca.pem`; with
`LLMOS_TLS_MUTUAL=true` it also requires a client certificate signed by that CA (services
present their own when they call each other).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmos.errors import FailedPrecondition
from llmos.settings import PlatformSettings

CLIENT_NAME = "client"
_VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class TlsFiles:
    """The certificate files of one party (a service or `client`) in a certificates folder."""

    folder: Path
    name: str

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.folder / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.folder / f"{self.name}-key.pem"

    def read(self) -> tuple[bytes, bytes, bytes]:
        missing = [str(path) for path in (self.ca, self.cert, self.key) if not path.exists()]
        if missing:
            raise FailedPrecondition(f"TLS is configured but {', '.join(missing)} missing; run `llmos certs --out {self.folder}`")
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def server_credentials(files: TlsFiles, mutual: bool) -> grpc.ServerCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=mutual)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Verify the server against the CA and present our own certificate (used by mutual TLS)."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def caller_credentials(settings: PlatformSettings, name: str = CLIENT_NAME) -> grpc.ChannelCredentials | None:
    """Credentials for calls made by `name` (a service, or `client`), or None without TLS."""
    return channel_credentials(TlsFiles(settings.tls_dir, name)) if settings.tls_dir else None


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_certificates(folder: Path, names: tuple[str, ...], hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
    """A fresh CA and one certificate per name, valid for `hosts` and the name itself (compose)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LLM OS development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "ca-key.pem", ca_key)
    for name in names:
        key = _key()
        alt_names: list[x509.GeneralName] = [x509.DNSName(name)]
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files = TlsFiles(folder, name)
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(files.key, key)
