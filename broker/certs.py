"""A development CA and a server certificate, made with ``cryptography`` for a quick TLS start.

``fleetbus broker certs DIR`` writes:

    ca.pem          the CA certificate: give it to devices (device.toml [mqtt] cafile)
    ca.key          the CA's private key (keep it off the broker host in real use)
    server.pem      the broker's certificate, signed by the CA, SAN 127.0.0.1 and localhost (+ --host)
    server.key      the broker's private key

Keys are ECDSA P-256 (small, fast handshakes on constrained boards). This is for development and
closed networks; a production deployment should use its own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import CertificateError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetbus development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_dev_certs(
    directory: Path,
    hosts: Iterable[str] = DEFAULT_HOSTS,
    days: int = 825,
    overwrite: bool = False,
) -> CertPaths:
    """Create a CA and a server certificate for ``hosts`` in ``directory``; returns their paths."""
    paths = CertPaths(
        directory / CA_CERT, directory / CA_KEY, directory / SERVER_CERT, directory / SERVER_KEY
    )
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise CertificateError(f"{existing[0]} already exists; pass --force to replace the certificates")
    host_list = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(minutes=5)  # tolerate small clock skew between hosts
    try:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("fleetbus development CA")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host_list[0]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(_san(host_list), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(paths.ca_key, ca_key)
        _write_key(paths.server_key, server_key)
        paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot create certificates in {directory}: {exc}") from None
    return paths
