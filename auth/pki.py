"""The relay's private PKI: the device CA, device enrollment, and certificate checks.

Pure: bytes and certificate objects in, objects and bytes out. Nothing here opens a
file, reads the clock or touches a socket; the caller passes ``now`` (an aware
datetime) and does all I/O.
"""

# Theory of operation
# ===================
# The broker is its own certificate authority for devices (the datasheet's enrollment:
# the device makes a key and a CSR carrying its unique id, a service engineer has the
# cloud sign it, and the signed certificate goes back to the device). The CA signs
# device client certificates and the broker's server certificates.
#
# Rule 1: a device's identity is its device id, and it lives in exactly one place in
#         a certificate we issue: the SAN URI ``urn:relay:device:<id>``, mirrored in
#         the subject CN. Nothing else in a certificate names a device (invariant 6).
# Rule 2: a CSR is untrusted input, and only two things are ever taken from it: the
#         public key (after the key policy and the proof-of-possession signature
#         check) and the validated device id. Everything else the CSR asks for (CA
#         rights, server use, extra names, key usages, other extensions, attributes)
#         is dropped and reported in ``SignedDevice.ignored_requests``, so the
#         operator and the audit log see what a request tried.
# Rule 3: the signing profile is fixed in code (see _leaf_builder). Validity comes
#         from the caller, never from the request; a CSR cannot carry one anyway.
# Rule 4: every check raises (CertificateRequestError, UntrustedPeer) with a short
#         reason code; nothing returns a bool for a security decision.
#
# Keys are ECDSA P-256 throughout. Ed25519 would be smaller, but Chromium (the
# engineer console) and cryptography's own X.509 verifier reject Ed25519 certificate
# chains, so it is refused even when a CSR offers it.

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    rsa,
    x448,
    x25519,
)
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import (
    AttributeOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
)

from .errors import CertificateRequestError, UntrustedPeer

__all__ = [
    "DEVICE_ID_PATTERN",
    "DEVICE_URI_PREFIX",
    "CertificateAuthority",
    "DeviceIdentity",
    "SignedDevice",
    "build_device_csr",
    "certificate_fingerprint",
    "create_ca",
    "device_identity",
    "generate_private_key",
    "issue_server_certificate",
    "load_ca",
    "load_private_key",
    "private_key_pem",
    "sign_device_csr",
    "validate_device_id",
    "verify_device_certificate",
]

#: What a device id may look like: 1 to 64 characters, ASCII letters, digits, ``.``,
#: ``_`` and ``-``, starting with a letter or digit. No ``:`` (it would be ambiguous
#: inside the URN), no ``/`` (device ids appear in URL paths and file names), no
#: spaces. 64 is also the X.520 upper bound for a commonName, which mirrors the id.
#: Match with :meth:`re.Pattern.fullmatch` (or :func:`validate_device_id`): ``$``
#: alone also matches before a trailing newline.
DEVICE_ID_PATTERN: Final[re.Pattern[str]] = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
)

#: A device certificate names its device in one SAN URI: this prefix plus the id.
DEVICE_URI_PREFIX: Final = "urn:relay:device:"

# Issued certificates start this much before ``now``, so that a peer whose clock
# runs a little behind ours does not reject a certificate issued a moment ago.
_CLOCK_SKEW: Final = timedelta(minutes=5)

# Key policy for CSRs. P-256 is what our own tools generate; P-384, P-521 and
# RSA >= 2048 are accepted because TLS stacks and verifiers all handle them (some
# instrument makers have an HSM that only does RSA).
_ACCEPTED_CURVES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})
_MIN_RSA_BITS: Final = 2048
# Above this, a device's signature does not fit a grant receipt
# (relay.proto.receipts.MAX_SIGNATURE_BYTES, 1 KiB): such a device could enroll and
# never grant a session.
_MAX_RSA_BITS: Final = 8192

# Attacker-chosen text (names from a CSR) ends up in audit events and log lines;
# it is escaped and cut to this length there.
_MAX_DESCRIPTION_CHARS: Final = 200

# PKCS #9 extensionRequest: the CSR attribute that carries the requested
# extensions. cryptography has no constant for it; its content is read through
# ``csr.extensions`` instead, so it is not reported as an ignored attribute.
_EXTENSION_REQUEST: Final = x509.ObjectIdentifier("1.2.840.113549.1.9.14")

_EKU_NAMES: Final[dict[x509.ObjectIdentifier, str]] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

_EXTENSION_NAMES: Final[dict[x509.ObjectIdentifier, str]] = {
    ExtensionOID.SUBJECT_KEY_IDENTIFIER: "subjectKeyIdentifier",
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: "authorityKeyIdentifier",
    ExtensionOID.NAME_CONSTRAINTS: "nameConstraints",
    ExtensionOID.CERTIFICATE_POLICIES: "certificatePolicies",
    ExtensionOID.CRL_DISTRIBUTION_POINTS: "cRLDistributionPoints",
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS: "authorityInfoAccess",
    ExtensionOID.ISSUER_ALTERNATIVE_NAME: "issuerAltName",
    ExtensionOID.OCSP_NO_CHECK: "ocspNoCheck",
    ExtensionOID.TLS_FEATURE: "tlsFeature",
}

_ATTRIBUTE_NAMES: Final[dict[x509.ObjectIdentifier, str]] = {
    AttributeOID.CHALLENGE_PASSWORD: "challengePassword",
    AttributeOID.UNSTRUCTURED_NAME: "unstructuredName",
}

# Key types with a fixed size, for messages about refused keys.
_FIXED_SIZE_KEYS: Final = (
    (ed25519.Ed25519PublicKey, "Ed25519 (256 bits)"),
    (ed448.Ed448PublicKey, "Ed448 (456 bits)"),
    (x25519.X25519PublicKey, "X25519 (256 bits, key agreement only)"),
    (x448.X448PublicKey, "X448 (448 bits, key agreement only)"),
)

# Exceptions cryptography raises while lazily decoding parts of a parsed CSR or
# certificate (extensions, names). All mean "the encoding is broken".
# UserWarning is here because cryptography *warns* (rather than raising) when it
# decodes a name whose commonName is not 1 to 64 characters or whose country name
# is not 2, and where warnings are errors (our test suite, ``python -W error``)
# that warning arrives as an exception.
_DECODE_ERRORS: Final = (
    ValueError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UserWarning,
)

_ExtensionT = TypeVar("_ExtensionT", bound=x509.ExtensionType)


def validate_device_id(text: str) -> str:
    """Check that *text* is a well-formed device id and return it unchanged.

    See :data:`DEVICE_ID_PATTERN` for the syntax.

    Raises:
        ValueError: *text* is not a valid device id. The message says why and
            shows the (escaped, shortened) input.
    """
    if DEVICE_ID_PATTERN.fullmatch(text) is None:
        raise ValueError(
            f"invalid device id '{_printable(text)}': use 1 to 64 characters "
            "(ASCII letters, digits, '.', '_' or '-'), starting with a letter or digit"
        )
    return text


# ---------------------------------------------------------------------------
# Keys


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """Generate a new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise *key* as unencrypted PKCS #8 PEM.

    The result is a secret: the caller writes it with mode 0600 (or keeps it in a
    secret store), never into logs.
    """
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM private key, which must be an elliptic-curve key.

    Any curve is accepted here; keys this package generates are P-256.

    Raises:
        ValueError: *pem* is not a PEM private key, is encrypted, or is not an
            elliptic-curve key.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (TypeError, UnsupportedAlgorithm) as error:
        # cryptography raises TypeError for an encrypted key and UnsupportedAlgorithm
        # for an exotic one; to the caller both are simply "not a usable key".
        raise ValueError(f"cannot load private key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"private key is a {type(key).__name__}; an elliptic-curve (ECDSA "
            "P-256) key is required"
        )
    return key


# ---------------------------------------------------------------------------
# The CA


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """The device CA: its private key and its self-signed certificate.

    Build one with :func:`create_ca` or :func:`load_ca`; both guarantee that
    *key* matches *certificate*.
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def certificate_pem(self) -> bytes:
        """Return the CA certificate as PEM (public; devices need it as a trust anchor)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """Return the CA key as unencrypted PKCS #8 PEM; the caller writes it 0600."""
        return private_key_pem(self.key)


def create_ca(
    *, common_name: str, now: datetime, lifetime: timedelta
) -> CertificateAuthority:
    """Create a new self-signed device CA with a fresh P-256 key.

    The certificate has BasicConstraints CA:TRUE with pathlen 0 (it signs only
    leaf certificates, never another CA) and KeyUsage keyCertSign and cRLSign,
    both critical, a SubjectKeyIdentifier and a random serial number. It is valid
    from 5 minutes before *now* (clock skew) until *now* + *lifetime*, in whole
    seconds.

    Args:
        common_name: The subject CN, 1 to 64 characters.
        now: The current time, timezone-aware.
        lifetime: How long the CA is valid; positive.

    Raises:
        ValueError: *now* is naive, *lifetime* is not positive, or *common_name*
            is empty or longer than 64 characters.
    """
    not_before, not_after = _validity(now, lifetime)
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key=key, certificate=certificate)


def load_ca(*, key_pem: bytes, certificate_pem: bytes) -> CertificateAuthority:
    """Load a CA from its PEM private key and PEM certificate.

    Not checked: the certificate's validity period. An expired CA still loads, so
    that an operator can inspect it; see :func:`sign_device_csr` for signing.

    Raises:
        ValueError: Either input does not parse, the key is not an elliptic-curve
            key, the key does not belong to the certificate, or the certificate is
            not a CA certificate (BasicConstraints CA:TRUE).
    """
    key = load_private_key(key_pem)
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        public_key = certificate.public_key()
        constraints = _find_extension(certificate.extensions, x509.BasicConstraints)
    except (*_DECODE_ERRORS, x509.InvalidVersion, UnsupportedAlgorithm) as error:
        raise ValueError(f"cannot load CA certificate: {error}") from None
    if public_key != key.public_key():
        raise ValueError("the CA private key does not match the CA certificate")
    if constraints is None or not constraints.ca:
        raise ValueError(
            "the CA certificate is not a CA certificate (no BasicConstraints CA:TRUE)"
        )
    return CertificateAuthority(key=key, certificate=certificate)


# ---------------------------------------------------------------------------
# Device enrollment


def build_device_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """Build the PEM certificate signing request a device sends for enrollment.

    The request has subject CN=*device_id* and one SAN URI
    ``urn:relay:device:<device_id>``, and is signed with *key* (SHA-256), which
    proves that the device holds the private key.

    Raises:
        ValueError: *device_id* is not a valid device id.
    """
    validate_device_id(device_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_device_subject(device_id))
        .add_extension(_device_alt_name(device_id), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a device certificate says the device is, and which certificate said it.

    Attributes:
        device_id: The device id from the certificate's SAN URI (equal to its CN).
        serial_hex: The certificate serial number, lowercase hex without ``0x``.
        fingerprint_sha256: Lowercase hex SHA-256 over the DER certificate; this
            is what revocation lists and audit events pin.
        not_before: Start of the validity period (aware, UTC).
        not_after: End of the validity period (aware, UTC).
    """

    device_id: str
    serial_hex: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class SignedDevice:
    """The result of signing a device CSR.

    Attributes:
        certificate: The issued device certificate.
        identity: The identity it carries.
        ignored_requests: Human-readable descriptions of everything the CSR asked
            for that the fixed profile did not grant, for example
            ``"basicConstraints CA:TRUE"``, ``"extendedKeyUsage serverAuth"``,
            ``"subjectAltName DNS:evil.example"`` or ``"keyUsage keyCertSign"``.
            Text taken from the CSR is escaped and shortened, so it is safe to
            log. Empty when the CSR asked only for what it got.
    """

    certificate: x509.Certificate
    identity: DeviceIdentity
    ignored_requests: tuple[str, ...]

    def certificate_pem(self) -> bytes:
        """Return the issued certificate as PEM, to send back to the device."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def sign_device_csr(
    ca: CertificateAuthority,
    csr_pem: bytes,
    *,
    now: datetime,
    lifetime: timedelta,
    max_csr_bytes: int,
) -> SignedDevice:
    """Sign a device's certificate signing request with the fixed device profile.

    Only the public key and the device id (the subject CN) are taken from the
    request. The issued certificate always has: subject CN=<device id>; one SAN
    URI ``urn:relay:device:<device id>``; BasicConstraints CA:FALSE and KeyUsage
    digitalSignature, both critical; ExtendedKeyUsage clientAuth only; subject and
    authority key identifiers; a random serial; validity from 5 minutes before
    *now* to *now* + *lifetime* (whole seconds); SHA-256. Whatever else the
    request asks for is not granted and is listed in
    :attr:`SignedDevice.ignored_requests`.

    Args:
        ca: The device CA.
        csr_pem: The request, PEM or DER. Untrusted.
        now: The current time, timezone-aware.
        lifetime: How long the device certificate is valid; positive.
        max_csr_bytes: Requests longer than this are refused without parsing.

    Returns:
        The issued certificate and its identity.

    Raises:
        CertificateRequestError: The request was refused; ``reason`` is
            ``'too_large'``, ``'malformed'``, ``'bad_signature'``, ``'weak_key'``
            (not ECDSA P-256/P-384/P-521 or RSA >= 2048 bits) or
            ``'bad_device_id'`` (no single valid CN, or a SAN URI naming another
            device).
        ValueError: *now* is naive or *lifetime* is not positive. These are the
            caller's mistakes, not the requester's.

    Not checked: whether the device id is already enrolled or revoked, or whether
    the requester may enroll it (the caller decides that before calling this).
    Nor whether the CA is valid at *now* or outlives the new certificate: the
    lifetime is exactly what was asked, and a certificate that outlives its CA
    stops verifying when the CA expires. Callers that care compare
    ``ca.certificate.not_valid_after_utc`` with ``now + lifetime`` first.
    """
    # Check the caller's arguments first: a misconfigured lifetime is not the
    # requester's fault and must not be reported as a refused request.
    not_before, not_after = _validity(now, lifetime)
    # Bounded work: measure before parsing, so a huge upload costs a len().
    if len(csr_pem) > max_csr_bytes:
        raise CertificateRequestError(
            "too_large",
            f"certificate request is {len(csr_pem)} bytes; the limit is "
            f"{max_csr_bytes} bytes",
        )
    csr = _load_csr(csr_pem)
    public_key = _accepted_public_key(csr)
    # Proof of possession. Checked after the key policy so that a weak key is
    # reported as such, and before anything else in the request is looked at:
    # the content of a request nobody signed is not worth interpreting.
    if not csr.is_signature_valid:
        raise CertificateRequestError(
            "bad_signature",
            "the certificate request's signature does not verify with its own "
            "public key (corrupted, or not made by the key holder)",
        )
    request = _read_request(csr)
    device_id = _requested_device_id(request.common_names)
    ignored = [f"subject {attribute}" for attribute in request.other_subject]
    for extension in request.extensions:
        ignored.extend(_ignored_in_extension(extension, device_id))
    ignored.extend(
        f"attribute {_oid_name(oid, _ATTRIBUTE_NAMES)}"
        for oid in request.attribute_oids
        if oid != _EXTENSION_REQUEST
    )
    certificate = (
        _leaf_builder(
            ca,
            subject=_device_subject(device_id),
            public_key=public_key,
            not_before=not_before,
            not_after=not_after,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_device_alt_name(device_id), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return SignedDevice(
        certificate=certificate,
        identity=device_identity(certificate),
        ignored_requests=tuple(ignored),
    )


# ---------------------------------------------------------------------------
# Server certificates


def issue_server_certificate(
    ca: CertificateAuthority,
    *,
    names: Sequence[str],
    now: datetime,
    lifetime: timedelta,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a TLS server certificate for the broker, with a fresh P-256 key.

    Each of *names* becomes a SAN entry: an IPAddress if it parses as an IPv4 or
    IPv6 address, a DNSName otherwise. The subject CN is the first name (clients
    match on the SAN; the CN is for humans). The certificate has
    ExtendedKeyUsage serverAuth only, BasicConstraints CA:FALSE and KeyUsage
    digitalSignature (both critical), key identifiers, and validity from 5
    minutes before *now* to *now* + *lifetime*.

    Args:
        ca: The issuing CA.
        names: Host names and IP addresses; at least one. DNS names must already
            be ASCII (IDNA A-labels).
        now: The current time, timezone-aware.
        lifetime: How long the certificate is valid; positive.

    Returns:
        The new private key and its certificate.

    Raises:
        ValueError: *names* is empty or has an empty or non-ASCII entry, the first
            name is longer than 64 characters, *now* is naive, or *lifetime* is
            not positive.

    Not checked: whether the CA outlives the certificate (as for
    :func:`sign_device_csr`).
    """
    not_before, not_after = _validity(now, lifetime)
    if not names:
        raise ValueError("a server certificate needs at least one name")
    alt_names: list[x509.GeneralName] = []
    for name in names:
        if not name:
            raise ValueError("server certificate names must not be empty")
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            # Not an address, so a host name. DNSName itself refuses non-ASCII.
            alt_names.append(x509.DNSName(name))
    key = generate_private_key()
    certificate = (
        _leaf_builder(
            ca,
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            public_key=key.public_key(),
            not_before=not_before,
            not_after=not_after,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return key, certificate


# ---------------------------------------------------------------------------
# Checking device certificates


def device_identity(certificate: x509.Certificate) -> DeviceIdentity:
    """Read the device identity from a device certificate.

    The certificate must carry exactly one SAN URI ``urn:relay:device:<id>``
    (the prefix is matched case-insensitively, so that a differently-cased
    second URI counts as a second claim), *id* must be a valid device id, and
    the subject must have exactly one CN, equal to *id*.

    Not checked: the signature, the issuer, the validity period, or the key
    usages. Use this only on a certificate that TLS has already verified against
    the device CA, or call :func:`verify_device_certificate` instead.

    Raises:
        UntrustedPeer: ``reason`` is ``'no_device_id'`` (no device URI),
            ``'bad_device_id'`` (several device URIs, an invalid id, or
            extensions that do not parse) or ``'id_mismatch'`` (CN differs).
    """
    try:
        extensions = certificate.extensions
    except _DECODE_ERRORS as error:
        raise UntrustedPeer(
            "bad_device_id", f"certificate extensions do not parse: {error}"
        ) from None
    alt_name = _find_extension(extensions, x509.SubjectAlternativeName)
    uris = (
        []
        if alt_name is None
        else alt_name.get_values_for_type(x509.UniformResourceIdentifier)
    )
    claims = [uri for uri in uris if _is_device_uri(uri)]
    if not claims:
        raise UntrustedPeer(
            "no_device_id",
            f"certificate has no {DEVICE_URI_PREFIX}<id> subjectAltName URI",
        )
    if len(claims) > 1:
        raise UntrustedPeer(
            "bad_device_id",
            f"certificate names {len(claims)} devices; exactly one is allowed",
        )
    device_id = claims[0][len(DEVICE_URI_PREFIX) :]
    try:
        validate_device_id(device_id)
    except ValueError as error:
        raise UntrustedPeer("bad_device_id", str(error)) from None
    try:
        common_names = [
            attribute.value
            for attribute in certificate.subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
        ]
    except _DECODE_ERRORS as error:
        # In practice a UserWarning raised as an error (see _DECODE_ERRORS): an
        # out-of-range commonName, which cannot equal a valid device id anyway.
        raise UntrustedPeer(
            "id_mismatch", f"certificate subject is not CN=<device id>: {error}"
        ) from None
    if common_names != [device_id]:
        raise UntrustedPeer(
            "id_mismatch",
            f"certificate subject CN does not match its device id {device_id!r}",
        )
    return DeviceIdentity(
        device_id=device_id,
        serial_hex=format(certificate.serial_number, "x"),
        fingerprint_sha256=certificate_fingerprint(certificate),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
    )


def verify_device_certificate(
    ca_certificate: x509.Certificate,
    certificate: x509.Certificate,
    *,
    now: datetime,
) -> DeviceIdentity:
    """Fully check a device certificate against the device CA, without TLS.

    Used by the agent on its own certificate, by the broker as defence in depth
    after the TLS handshake, and by tests. Checks, in order: issued by
    *ca_certificate* (issuer name and signature), valid at *now*, not a CA
    (BasicConstraints CA:TRUE refused; absent means not a CA, RFC 5280
    §4.2.1.9), ExtendedKeyUsage contains clientAuth, then
    :func:`device_identity`.

    Not checked: revocation (the caller holds the revocation list and compares
    :attr:`DeviceIdentity.fingerprint_sha256`), and the CA certificate itself,
    which is the caller's trust anchor (its own validity period included).

    Returns:
        The device identity.

    Raises:
        UntrustedPeer: ``reason`` is ``'not_signed_by_ca'``, ``'expired'``,
            ``'not_yet_valid'``, ``'is_ca'``, ``'not_client_cert'`` (also when
            the extensions do not parse), or one of :func:`device_identity`'s.
        ValueError: *now* is naive.
    """
    _require_aware(now)
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        # ValueError: issuer name differs (or the signature algorithm parameters
        # are invalid); TypeError/UnsupportedAlgorithm: key or algorithm the CA
        # could never have used; InvalidSignature: forged or altered.
        # The message leaves out the claimed issuer on purpose: decoding the
        # name of an unverified certificate can itself warn (see _read_request).
        raise UntrustedPeer(
            "not_signed_by_ca", "certificate is not signed by the device CA"
        ) from None
    if now < certificate.not_valid_before_utc:
        raise UntrustedPeer(
            "not_yet_valid",
            f"certificate is valid only from {certificate.not_valid_before_utc}",
        )
    if now > certificate.not_valid_after_utc:
        raise UntrustedPeer(
            "expired", f"certificate expired at {certificate.not_valid_after_utc}"
        )
    try:
        extensions = certificate.extensions
    except _DECODE_ERRORS as error:
        raise UntrustedPeer(
            "not_client_cert", f"certificate extensions do not parse: {error}"
        ) from None
    constraints = _find_extension(extensions, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise UntrustedPeer(
            "is_ca", "a CA certificate cannot be used as a device certificate"
        )
    usage = _find_extension(extensions, x509.ExtendedKeyUsage)
    if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise UntrustedPeer(
            "not_client_cert",
            "certificate is not for TLS client authentication (no clientAuth "
            "extended key usage)",
        )
    return device_identity(certificate)


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """Return the lowercase hex SHA-256 fingerprint of *certificate*'s DER encoding."""
    return certificate.fingerprint(hashes.SHA256()).hex()


# ---------------------------------------------------------------------------
# Private helpers


@dataclass(frozen=True, slots=True)
class _Request:
    # What a CSR says, decoded once; every part is still untrusted.
    common_names: tuple[str, ...]
    other_subject: tuple[str, ...]
    extensions: tuple[x509.Extension[x509.ExtensionType], ...]
    attribute_oids: tuple[x509.ObjectIdentifier, ...]


def _require_aware(now: datetime) -> None:
    # A naive datetime would be compared as if it were UTC by some code paths and
    # raise TypeError in others; refuse it up front with a clear message.
    if now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime (UTC)")


def _validity(now: datetime, lifetime: timedelta) -> tuple[datetime, datetime]:
    _require_aware(now)
    if lifetime <= timedelta(0):
        raise ValueError(f"certificate lifetime must be positive, got {lifetime}")
    # X.509 times have whole seconds. Truncating here, rather than letting the
    # encoder do it, makes not_after exactly now + lifetime for whole-second
    # lifetimes, as the caller asked.
    start = now.astimezone(UTC).replace(microsecond=0)
    not_after = (start + lifetime).replace(microsecond=0)
    return start - _CLOCK_SKEW, not_after


def _device_subject(device_id: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])


def _device_alt_name(device_id: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]
    )


def _is_device_uri(uri: str) -> bool:
    # URN schemes and namespace ids are case-insensitive (RFC 8141 §3.1), so
    # "URN:Relay:Device:x" is a device claim too and must not slip past the
    # "one device per certificate" checks.
    return uri[: len(DEVICE_URI_PREFIX)].casefold() == DEVICE_URI_PREFIX


def _leaf_builder(
    ca: CertificateAuthority,
    *,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    # The part of the profile shared by device and server certificates; the
    # callers add ExtendedKeyUsage and SubjectAlternativeName.
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(_authority_key_identifier(ca), critical=False)
    )


def _authority_key_identifier(ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
    # RFC 5280 §4.2.1.1: the keyIdentifier is the issuer's subjectKeyIdentifier.
    # Copy it when the CA has one (a CA made elsewhere may use another method
    # than SHA-1 of the key, and path building matches these bytes); derive it
    # from the key only for a CA without one.
    identifier = _find_extension(ca.certificate.extensions, x509.SubjectKeyIdentifier)
    if identifier is None:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(identifier)


def _find_extension(
    extensions: x509.Extensions, kind: type[_ExtensionT]
) -> _ExtensionT | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as error:
        # InvalidVersion (a version other than v1) is not a ValueError.
        raise CertificateRequestError(
            "malformed", f"not a PEM or DER certificate request: {error}"
        ) from None


def _accepted_public_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as error:
        raise CertificateRequestError(
            "weak_key", f"the request's key type is not supported: {error}"
        ) from None
    if (
        isinstance(key, ec.EllipticCurvePublicKey)
        and key.curve.name in _ACCEPTED_CURVES
    ):
        return key
    if (
        isinstance(key, rsa.RSAPublicKey)
        and _MIN_RSA_BITS <= key.key_size <= _MAX_RSA_BITS
    ):
        return key
    raise CertificateRequestError(
        "weak_key",
        f"{_key_description(key)} keys are not accepted; use ECDSA P-256 "
        f"(P-384, P-521 and RSA of {_MIN_RSA_BITS} to {_MAX_RSA_BITS} bits are "
        "also accepted)",
    )


def _key_description(key: CertificatePublicKeyTypes) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} ({key.curve.key_size} bits)"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA-{key.key_size}"
    # The remaining members of CertificatePublicKeyTypes all have a fixed size.
    return next(label for kind, label in _FIXED_SIZE_KEYS if isinstance(key, kind))


def _read_request(csr: x509.CertificateSigningRequest) -> _Request:
    # cryptography decodes names, extensions and attributes lazily, so a request
    # whose outer structure parsed can still fail here.
    try:
        subject = list(csr.subject)
    except UserWarning as warning:
        # See _DECODE_ERRORS. In the subject, the usual cause is an over-long
        # device id (CN), which gets this same code when the warning is merely
        # printed: validate_device_id refuses it then.
        raise CertificateRequestError(
            "bad_device_id", f"the request subject has an invalid attribute: {warning}"
        ) from None
    except _DECODE_ERRORS as error:
        raise CertificateRequestError(
            "malformed", f"certificate request subject does not parse: {error}"
        ) from None
    try:
        extensions = tuple(csr.extensions)
        attribute_oids = tuple(attribute.oid for attribute in csr.attributes)
    except _DECODE_ERRORS as error:
        raise CertificateRequestError(
            "malformed", f"certificate request content does not parse: {error}"
        ) from None
    return _Request(
        common_names=tuple(
            str(attribute.value)
            for attribute in subject
            if attribute.oid == NameOID.COMMON_NAME
        ),
        other_subject=tuple(
            _printable(attribute.rfc4514_string())
            for attribute in subject
            if attribute.oid != NameOID.COMMON_NAME
        ),
        extensions=extensions,
        attribute_oids=attribute_oids,
    )


def _requested_device_id(common_names: tuple[str, ...]) -> str:
    if len(common_names) != 1:
        raise CertificateRequestError(
            "bad_device_id",
            f"the request subject has {len(common_names)} commonName attributes; "
            "it needs exactly one, CN=<device id>",
        )
    try:
        return validate_device_id(common_names[0])
    except ValueError as error:
        raise CertificateRequestError("bad_device_id", str(error)) from None


def _ignored_in_extension(
    extension: x509.Extension[x509.ExtensionType], device_id: str
) -> Iterator[str]:
    value = extension.value
    if isinstance(value, x509.SubjectAlternativeName):
        for name in value:
            if isinstance(name, x509.UniformResourceIdentifier) and _is_device_uri(
                name.value
            ):
                claimed = name.value[len(DEVICE_URI_PREFIX) :]
                if claimed != device_id:
                    # Example: CN=pump-7 with SAN urn:relay:device:pump-8. One
                    # of them is a lie; refuse rather than pick one.
                    raise CertificateRequestError(
                        "bad_device_id",
                        f"the request names device {device_id!r} in its subject "
                        f"but '{_printable(claimed)}' in its subjectAltName",
                    )
                continue  # The one name we do grant.
            yield f"subjectAltName {_general_name_description(name)}"
    elif isinstance(value, x509.BasicConstraints):
        if value.ca:
            pathlen = (
                "" if value.path_length is None else f", pathlen:{value.path_length}"
            )
            yield f"basicConstraints CA:TRUE{pathlen}"
    elif isinstance(value, x509.ExtendedKeyUsage):
        yield from (
            f"extendedKeyUsage {_oid_name(usage, _EKU_NAMES)}"
            for usage in value
            if usage != ExtendedKeyUsageOID.CLIENT_AUTH
        )
    elif isinstance(value, x509.KeyUsage):
        yield from (f"keyUsage {bit}" for bit in _key_usage_bits(value))
    else:
        critical = " (critical)" if extension.critical else ""
        yield f"extension {_oid_name(extension.oid, _EXTENSION_NAMES)}{critical}"


def _key_usage_bits(usage: x509.KeyUsage) -> Iterator[str]:
    # Every bit except digitalSignature, which the profile grants anyway.
    # encipher_only/decipher_only raise unless keyAgreement is set, hence the
    # nesting.
    flags = (
        ("nonRepudiation", usage.content_commitment),
        ("keyEncipherment", usage.key_encipherment),
        ("dataEncipherment", usage.data_encipherment),
        ("keyAgreement", usage.key_agreement),
        ("keyCertSign", usage.key_cert_sign),
        ("cRLSign", usage.crl_sign),
    )
    yield from (name for name, is_set in flags if is_set)
    if usage.key_agreement:
        yield from (
            name
            for name, is_set in (
                ("encipherOnly", usage.encipher_only),
                ("decipherOnly", usage.decipher_only),
            )
            if is_set
        )


def _general_name_description(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        text = f"DNS:{name.value}"
    elif isinstance(name, x509.IPAddress):
        text = f"IP:{name.value}"
    elif isinstance(name, x509.RFC822Name):
        text = f"email:{name.value}"
    elif isinstance(name, x509.UniformResourceIdentifier):
        text = f"URI:{name.value}"
    elif isinstance(name, x509.DirectoryName):
        text = f"dirName:{name.value.rfc4514_string()}"
    elif isinstance(name, x509.RegisteredID):
        text = f"RID:{name.value.dotted_string}"
    else:
        # In practice an OtherName (the only other type cryptography decodes); the
        # class name covers anything a future cryptography adds.
        text = (
            f"otherName:{name.type_id.dotted_string}"
            if isinstance(name, x509.OtherName)
            else type(name).__name__
        )
    return _printable(text)


def _oid_name(
    oid: x509.ObjectIdentifier, names: dict[x509.ObjectIdentifier, str]
) -> str:
    return names.get(oid, oid.dotted_string)


def _printable(text: str) -> str:
    # Names in a CSR are attacker-chosen and end up in logs, audit events and
    # terminal output. Escape everything that is not printable (newlines, ANSI
    # escapes, bidi overrides) and bound the length, so a request cannot forge
    # log lines or hide what it asked for.
    escaped = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text[: _MAX_DESCRIPTION_CHARS + 1]
    )
    if len(escaped) > _MAX_DESCRIPTION_CHARS:
        return escaped[:_MAX_DESCRIPTION_CHARS] + "..."
    return escaped
