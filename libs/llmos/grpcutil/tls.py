"""TLS for gRPC: a development CA with per-service certificates, and the credentials built from them.

`llmos certs --out DIR` writes `ca.pem`, and `<name>.pem`/`<name>-key.pem` for every service
and for `client` (the command line and other callers). With `LLMOS_TLS_DIR=DIR` every service
serves TLS with its own certificate and verifies peers against `ca.pem`; with
`LLMOS_TLS_MUTUAL=true` it also requires a client certificate signed by that CA (services
present their own when they call each other).

The CA's private key never enters DIR, which every service reads: it stays in its own folder
(`DIR-ca` unless given, 0700), where a later `llmos certs` finds it to issue fresh certificates
under the same CA. Each certificate may do only what its role needs: a service's serves and
calls (serverAuth, clientAuth), `client`'s only calls (clientAuth), and only the CA signs.
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


def default_ca_folder(folder: Path) -> Path:
    """Where the CA's private key lives: beside the certificates folder, never in it."""
    return folder.with_name(folder.name + "-ca")


def extended_usages(name: str) -> list[x509.ObjectIdentifier]:
    """What a certificate may be used for: services serve and call each other, `client` only calls."""
    if name == CLIENT_NAME:
        return [ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not signs_certificates, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=signs_certificates, crl_sign=signs_certificates,
        encipher_only=False, decipher_only=False,
    )


def _certificate_authority(ca_folder: Path, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA kept in `ca_folder`, made there when it has none."""
    cert_path, key_path = ca_folder / "ca.pem", ca_folder / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(f"{key_path} is not an EC private key")
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    ca_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LLM OS development CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(signs_certificates=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_certificates(
    folder: Path, names: tuple[str, ...], hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), ca_folder: Path | None = None
) -> Path:
    """One certificate per name, valid for `hosts` and the name itself (compose), signed by the CA
    in `ca_folder` (made when missing). Returns the CA folder."""
    ca_folder = ca_folder or default_ca_folder(folder)
    if ca_folder.resolve() == folder.resolve():
        raise FailedPrecondition("the CA folder must not be the certificates folder: services read that one")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert, ca_key = _certificate_authority(ca_folder, now)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
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
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(signs_certificates=False), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(extended_usages(name)), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files = TlsFiles(folder, name)
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(files.key, key)
    return ca_folder
