"""Development PKI: a CA, server certificates and device certificates (``cryptography``).

Files are PEM, ``<dir>/<name>.crt`` and ``<dir>/<name>.key`` (keys mode 0600).
Device certificates are either OCF identity certificates (subject CN
``uuid:<device-id>``, EKUs clientAuth + serverAuth + the OCF identity EKU
1.3.6.1.4.1.44924.1.6) or plain client certificates with any CN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OCF_IDENTITY_EKU: Final = x509.ObjectIdentifier("1.3.6.1.4.1.44924.1.6")
CA_NAME: Final = "ca"


@dataclass(frozen=True, slots=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)


def _save(
    out_dir: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    chain: Sequence[x509.Certificate] = (),
) -> Issued:
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = out_dir / f"{name}.crt"
    key_path = out_dir / f"{name}.key"
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    cert_path.write_bytes(pem)
    _write_key(key_path, key)
    return Issued(cert, key, cert_path, key_path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(
    out_dir: Path, *, common_name: str = "twinhub development CA", days: int = 3650
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _save(out_dir, CA_NAME, cert, key)


def load_ca(ca_dir: Path) -> Issued:
    cert_path = ca_dir / f"{CA_NAME}.crt"
    key_path = ca_dir / f"{CA_NAME}.key"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return Issued(cert, key, cert_path, key_path)


def issue_crl(ca: Issued, out_path: Path, revoked: Sequence[x509.Certificate]) -> Path:
    """A CRL of ``ca`` revoking ``revoked`` (PEM), valid for a week."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=7))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - dt.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return out_path


def load_or_create_ca(ca_dir: Path) -> Issued:
    if (ca_dir / f"{CA_NAME}.crt").exists():
        return load_ca(ca_dir)
    return create_ca(ca_dir)


def _leaf(
    ca: Issued,
    subject: x509.Name,
    *,
    days: int,
    eku: Sequence[x509.ObjectIdentifier],
    san: Sequence[x509.GeneralName] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    end = not_after or (start + dt.timedelta(days=days))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def issue_server(
    ca: Issued, out_dir: Path, hosts: Sequence[str], *, name: str = "server", days: int = 825
) -> Issued:
    san: list[x509.GeneralName] = []
    for h in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            san.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else name)])
    cert, key = _leaf(
        ca,
        subject,
        days=days,
        san=san,
        eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    return _save(out_dir, name, cert, key, chain=())


def issue_device(
    ca: Issued,
    out_dir: Path,
    *,
    device_id: str | None = None,
    common_name: str | None = None,
    name: str | None = None,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """An OCF identity certificate (``device_id``) or a plain client one (``common_name``);
    valid for ``days`` from ``not_before`` (default: five minutes ago) or until ``not_after``."""
    if (device_id is None) == (common_name is None):
        raise ValueError("give exactly one of device_id (OCF identity) or common_name")
    if device_id is not None:
        uuid.UUID(device_id)  # an OCF device ID is a UUID
        cn = f"uuid:{device_id}"
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, OCF_IDENTITY_EKU]
    else:
        assert common_name is not None
        cn = common_name
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert, key = _leaf(ca, subject, days=days, eku=eku, not_before=not_before, not_after=not_after)
    return _save(out_dir, name or (device_id or cn).replace(":", "_"), cert, key)
