"""`fedcompute certs dev`: a local CA and one certificate per component, for a laptop, CI or a first cluster.

Every certificate is signed by the CA, carries ``serverAuth`` and ``clientAuth`` (components are servers and
mTLS clients of each other), and names the hosts given (default ``localhost`` and ``127.0.0.1``) plus the
component's own service name (``fedcompute-server``…, as in deploy/). ECDSA P-256, a year's validity. The CA's
private key is written beside it (mode 0600): fine for development, never for production, where the cluster's
own CA (cert-manager, a cloud PKI) issues them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

COMPONENT_NAMES = ("server", "keys", "verifier", "dealer", "aggregator", "modelupdater", "operator")
VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class DevCerts:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}-key.pem"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_dev_certs(
    directory: Path,
    hosts: list[str] | None = None,
    names: tuple[str, ...] = COMPONENT_NAMES,
    now: dt.datetime | None = None,
) -> DevCerts:
    """Write ``ca.pem`` (+ ``ca-key.pem``) and ``NAME.pem``/``NAME-key.pem`` for each name into ``directory``."""
    hosts = hosts or ["localhost", "127.0.0.1"]
    start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcompute development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = DevCerts(directory)
    _write(out.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(directory / "ca-key.pem", _key_pem(ca_key), private=True)
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [_san(h) for h in hosts] + [x509.DNSName(f"fedcompute-{name}")]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedcompute-{name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(out.cert(name), cert.public_bytes(serialization.Encoding.PEM))
        _write(out.key(name), _key_pem(key), private=True)
    return out
