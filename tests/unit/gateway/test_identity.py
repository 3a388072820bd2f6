"""Client certificate checks of the three TLS authentication modes (gateway.identity)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.identity import (
    NO_IDENTITY,
    OCF_IDENTITY_EKU,
    AuthMode,
    CertificateRejected,
    TlsAuthPolicy,
    check_peer,
    parse_crls,
)
from twinhub_cli import pki

DEVICE = "5a8e3c1e-7d2b-4f7a-9e41-0c6f2d9b1a10"
CLIENT, OCF = ExtendedKeyUsageOID.CLIENT_AUTH, OCF_IDENTITY_EKU
NOW = dt.datetime.now(dt.UTC)
OCF_MODE = TlsAuthPolicy(AuthMode.OCF_IDENTITY)
ANY_MODE = TlsAuthPolicy(AuthMode.ANY_CERTIFICATE)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> pki.Issued:
    return pki.create_ca(tmp_path_factory.mktemp("ca"))


def leaf(
    ca: pki.Issued,
    cns: Sequence[str] = (f"uuid:{DEVICE}",),
    eku: Sequence[x509.ObjectIdentifier] | None = (CLIENT, OCF),
    *,
    start: dt.datetime = NOW - dt.timedelta(minutes=5),
    end: dt.datetime = NOW + dt.timedelta(days=1),
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def now() -> float:
    """The time of the check: now, not import time, since ``pki`` certificates start
    five minutes before they are issued and a slow run may collect this module earlier."""
    return dt.datetime.now(dt.UTC).timestamp()


def test_ocf_identity_certificate_gives_the_device_id(ca: pki.Issued, tmp_path: Path) -> None:
    issued = pki.issue_device(ca, tmp_path, device_id=DEVICE)
    identity = check_peer(issued.cert, OCF_MODE, now())
    assert identity.device_id == DEVICE
    assert identity.subject == f"CN=uuid:{DEVICE}"
    assert identity.not_after == issued.cert.not_valid_after_utc.timestamp()


def test_any_certificate_mode_takes_any_certificate_but_no_device_id(
    ca: pki.Issued, tmp_path: Path
) -> None:
    plain = pki.issue_device(ca, tmp_path, common_name="acme sensor 7").cert
    ocf = pki.issue_device(ca, tmp_path, device_id=DEVICE).cert
    assert check_peer(plain, ANY_MODE, now()).device_id is None
    assert check_peer(ocf, ANY_MODE, now()).device_id is None, "the ID comes from token / di"
    with pytest.raises(CertificateRejected, match="no client certificate"):
        check_peer(None, ANY_MODE, now())


def test_none_mode_ignores_certificates(ca: pki.Issued) -> None:
    assert check_peer(None, TlsAuthPolicy(), now()) is NO_IDENTITY
    assert check_peer(leaf(ca, eku=None), TlsAuthPolicy(), now()) is NO_IDENTITY


@pytest.mark.parametrize(
    ("cns", "eku", "reason"),
    [
        ([f"uuid:{DEVICE}"], None, "no EKU extension"),
        ([f"uuid:{DEVICE}"], [CLIENT], "no OCF identity EKU"),
        ([f"uuid:{DEVICE}"], [OCF], "no clientAuth EKU"),
        ([f"uuid:{DEVICE}"], [ExtendedKeyUsageOID.SERVER_AUTH, OCF], "no clientAuth EKU"),
        ([DEVICE], [CLIENT, OCF], "is not uuid:<device-id>"),
        (["uuid:not-a-uuid"], [CLIENT, OCF], "is not uuid:<device-id>"),
        ([f"uuid:{uuid.UUID(DEVICE).hex}"], [CLIENT, OCF], "is not uuid:<device-id>"),
        ([f"uuid:{DEVICE} "], [CLIENT, OCF], "is not uuid:<device-id>"),
        ([f"uuid:{DEVICE}", f"uuid:{DEVICE}"], [CLIENT, OCF], "2 subject common names"),
        ([], [CLIENT, OCF], "0 subject common names"),
    ],
)
def test_ocf_identity_mode_refuses_what_is_not_an_ocf_identity(
    ca: pki.Issued, cns: list[str], eku: list[x509.ObjectIdentifier] | None, reason: str
) -> None:
    cert = leaf(ca, cns, eku)
    with pytest.raises(CertificateRejected, match=reason.replace("<", ".").replace(">", ".")):
        check_peer(cert, OCF_MODE, now())
    check_peer(cert, ANY_MODE, now())  # fine as "any certificate"


@pytest.mark.parametrize("policy", [OCF_MODE, ANY_MODE])
def test_validity_is_checked_against_the_given_time(ca: pki.Issued, policy: TlsAuthPolicy) -> None:
    cert = leaf(ca)
    with pytest.raises(CertificateRejected, match="expired"):
        check_peer(cert, policy, (NOW + dt.timedelta(days=2)).timestamp())
    with pytest.raises(CertificateRejected, match="not valid yet"):
        check_peer(cert, policy, (NOW - dt.timedelta(hours=1)).timestamp())


def test_revoked_certificates_are_refused(ca: pki.Issued, tmp_path: Path) -> None:
    revoked = pki.issue_device(ca, tmp_path, device_id=DEVICE, name="revoked").cert
    fine = pki.issue_device(ca, tmp_path, device_id=DEVICE, name="fine").cert
    crl_file = pki.issue_crl(ca, tmp_path / "ca.crl", [revoked])
    crls = parse_crls(crl_file.read_bytes(), [ca.cert])
    for mode in (AuthMode.OCF_IDENTITY, AuthMode.ANY_CERTIFICATE):
        policy = TlsAuthPolicy(mode, crls)
        with pytest.raises(CertificateRejected, match="revoked"):
            check_peer(revoked, policy, now())
        check_peer(fine, policy, now())


def test_a_crl_of_another_issuer_revokes_nothing(ca: pki.Issued, tmp_path: Path) -> None:
    other = pki.create_ca(tmp_path / "other", common_name="other CA")
    cert = pki.issue_device(ca, tmp_path, device_id=DEVICE).cert
    crl_file = pki.issue_crl(other, tmp_path / "other.crl", [cert])  # same serial, other CA
    crls = parse_crls(crl_file.read_bytes(), [other.cert])
    check_peer(cert, TlsAuthPolicy(AuthMode.OCF_IDENTITY, crls), now())


def test_crls_must_be_signed_by_a_configured_ca(ca: pki.Issued, tmp_path: Path) -> None:
    impostor = pki.create_ca(tmp_path / "impostor", common_name=ca.cert.subject.rfc4514_string())
    impostor_named_like_ca = pki.Issued(
        ca.cert, impostor.key, impostor.cert_path, impostor.key_path
    )
    forged = pki.issue_crl(impostor_named_like_ca, tmp_path / "forged.crl", [])
    with pytest.raises(ValueError, match="not signed by a configured CA"):
        parse_crls(forged.read_bytes(), [ca.cert])
    good = pki.issue_crl(ca, tmp_path / "good.crl", [])
    der = x509.load_pem_x509_crl(good.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert len(parse_crls(der, [ca.cert])) == 1
    both = good.read_bytes() + good.read_bytes()
    assert len(parse_crls(both, [ca.cert])) == 2
