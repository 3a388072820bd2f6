"""Device authentication by TLS client certificate: the three modes and their checks.

The TLS handshake does the cryptography: with ``any-certificate`` and ``ocf-identity`` the
listener's SSL context requires a client certificate chaining to the configured CA(s) and valid
now (``ssl.CERT_REQUIRED``). What OpenSSL cannot be told to check is checked here, right after
the handshake and before the connection may carry a single request:

* ``ocf-identity``: the certificate carries the clientAuth EKU *and* the OCF identity EKU
  (1.3.6.1.4.1.44924.1.6), and its subject CN is ``uuid:<device-id>`` (one CN, a UUID in its
  36-character form); the device ID is taken from it.
* both mutual-TLS modes: valid now (again, by our clock) and, when CRLs are configured, not
  revoked by a CRL of its issuer.
* ``none``: nothing (the listener does not ask for a certificate).

Pure functions over ``cryptography`` objects: no I/O, time is an argument. Loading files is
the composition root's job (:func:`parse_crls` takes bytes).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import Unauthorized

OCF_IDENTITY_EKU: Final = x509.ObjectIdentifier("1.3.6.1.4.1.44924.1.6")
_UUID_TEXT: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
OCF_CN_PREFIX: Final = "uuid:"


class AuthMode(enum.StrEnum):
    """How a TLS listener authenticates devices."""

    NONE = "none"  # server-side TLS only
    ANY_CERTIFICATE = "any-certificate"  # mutual TLS, any certificate chaining to the CA(s)
    OCF_IDENTITY = "ocf-identity"  # mutual TLS, OCF identity certificates only

    @property
    def mutual(self) -> bool:
        return self is not AuthMode.NONE


class CertificateRejected(Unauthorized):
    """The client certificate does not meet the listener's mode; the connection is refused."""


@dataclass(frozen=True, slots=True)
class TlsAuthPolicy:
    """The device-authentication settings of one TLS listener."""

    mode: AuthMode = AuthMode.NONE
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    end_session_on_cert_expiry: bool = False


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What an accepted client certificate says (all None/empty without one)."""

    device_id: str | None = None  # only in ocf-identity mode
    subject: str = ""
    not_after: float | None = None  # POSIX seconds

    @property
    def described(self) -> str:
        return self.subject or "no client certificate"


NO_IDENTITY: Final = PeerIdentity()


def check_peer(cert: x509.Certificate | None, policy: TlsAuthPolicy, now: float) -> PeerIdentity:
    """Check a connection's client certificate against the listener's policy.

    Returns the peer's identity, or raises :class:`CertificateRejected` with the reason.
    """
    if not policy.mode.mutual:
        return NO_IDENTITY
    if cert is None:
        raise CertificateRejected("no client certificate")
    subject = cert.subject.rfc4514_string()
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    if now < not_before:
        raise CertificateRejected(f"certificate of {subject!r} not valid yet")
    if now > not_after:
        raise CertificateRejected(f"certificate of {subject!r} expired")
    _check_revocation(cert, policy.crls, subject)
    device_id = None
    if policy.mode is AuthMode.OCF_IDENTITY:
        device_id = ocf_device_id(cert)
    return PeerIdentity(device_id=device_id, subject=subject, not_after=not_after)


def ocf_device_id(cert: x509.Certificate) -> str:
    """The device ID of an OCF identity certificate (raises :class:`CertificateRejected`)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateRejected("not an OCF identity certificate: no EKU extension") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateRejected("not an OCF identity certificate: no clientAuth EKU")
    if OCF_IDENTITY_EKU not in eku:
        raise CertificateRejected(
            f"not an OCF identity certificate: no OCF identity EKU {OCF_IDENTITY_EKU.dotted_string}"
        )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CertificateRejected(
            f"not an OCF identity certificate: {len(cns)} subject common names"
        )
    cn = cns[0].value
    if isinstance(cn, bytes):
        cn = cn.decode("utf-8", "replace")
    if not cn.startswith(OCF_CN_PREFIX) or not _UUID_TEXT.fullmatch(cn[len(OCF_CN_PREFIX) :]):
        raise CertificateRejected(
            f"not an OCF identity certificate: subject CN {cn[:80]!r} is not uuid:<device-id>"
        )
    return cn[len(OCF_CN_PREFIX) :]


def _check_revocation(
    cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList], subject: str
) -> None:
    for crl in crls:
        if crl.issuer != cert.issuer:
            continue
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise CertificateRejected(
                f"certificate of {subject!r} (serial {cert.serial_number:x}) is revoked"
            )


def parse_crls(
    data: bytes, issuers: Sequence[x509.Certificate]
) -> tuple[x509.CertificateRevocationList, ...]:
    """CRLs from PEM (one or more) or DER, each verified against one of ``issuers``.

    Raises ``ValueError`` for a CRL that cannot be parsed or whose signature no issuer
    verifies (a forged CRL could only revoke more, but an unverified one is a mistake).
    """
    if b"-----BEGIN X509 CRL-----" in data:
        blocks = re.findall(
            rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, flags=re.DOTALL
        )
        crls = [x509.load_pem_x509_crl(b) for b in blocks]
    else:
        crls = [x509.load_der_x509_crl(data)]
    for crl in crls:
        signers = [c for c in issuers if c.subject == crl.issuer]
        if not any(_signed_by(crl, c) for c in signers):
            raise ValueError(
                f"CRL of {crl.issuer.rfc4514_string()!r} is not signed by a configured CA"
            )
    return tuple(crls)


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(
        key,
        ec.EllipticCurvePublicKey
        | rsa.RSAPublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return False
    return crl.is_signature_valid(key)
