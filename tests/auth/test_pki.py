"""Tests for auth.pki: the device CA, enrollment (CSR signing) and certificate checks."""

from __future__ import annotations

import ast
import copy
import ipaddress
import pickle
import ssl
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
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
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509 import verification
from cryptography.x509.oid import (
    AttributeOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
)
from hypothesis import given, settings, strategies as st

import auth
from auth import (
    DEVICE_ID_PATTERN,
    DEVICE_URI_PREFIX,
    AuthError,
    CertificateAuthority,
    CertificateRequestError,
    SignedDevice,
    UntrustedPeer,
    build_device_csr,
    certificate_fingerprint,
    create_ca,
    device_identity,
    generate_private_key,
    issue_server_certificate,
    load_ca,
    load_private_key,
    private_key_pem,
    sign_device_csr,
    validate_device_id,
    verify_device_certificate,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
CA_LIFETIME = timedelta(days=3650)
LIFETIME = timedelta(days=365)
MAX_CSR_BYTES = 16 * 1024
AUTH_DIR = Path(auth.__file__).parent

# What sign_device_csr may do with any input: sign it, or refuse with a known code.
CSR_OUTCOMES = {
    "signed",
    "too_large",
    "malformed",
    "bad_signature",
    "weak_key",
    "bad_device_id",
}

# What the device certificate checks may do with any certificate.
CERTIFICATE_VERDICTS = {
    "accepted",
    "not_signed_by_ca",
    "expired",
    "not_yet_valid",
    "not_client_cert",
    "is_ca",
    "no_device_id",
    "bad_device_id",
    "id_mismatch",
}

# Byte-level edits for the fuzzing properties: (operation, index, byte).
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["set", "insert", "delete"]),
        st.integers(min_value=0),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=6,
)

# ecdsa-with-SHA256 AlgorithmIdentifier, for re-signing hand-edited requests.
ECDSA_SHA256_DER = bytes.fromhex("300a06082a8648ce3d040302")


# ---------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return create_ca(common_name="Relay Device CA", now=NOW, lifetime=CA_LIFETIME)


@pytest.fixture(scope="module")
def foreign_ca() -> CertificateAuthority:
    return create_ca(common_name="Someone Else's CA", now=NOW, lifetime=CA_LIFETIME)


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _cn(*values: str) -> x509.Name:
    return _name(*((NameOID.COMMON_NAME, value) for value in values))


def _long_cn(length: int) -> x509.Name:
    # cryptography refuses a CN over 64 characters unless told not to validate,
    # and then it warns; the warning is expected and silenced here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        attribute = x509.NameAttribute(
            NameOID.COMMON_NAME, "a" * length, _validate=False
        )
    return x509.Name([attribute])


def _device_uri(device_id: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)


def _csr(
    key: CertificateIssuerPrivateKeyTypes,
    *,
    subject: x509.Name | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    attributes: Sequence[tuple[x509.ObjectIdentifier, bytes]] = (),
    encoding: serialization.Encoding = serialization.Encoding.DER,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        _cn("pump-7") if subject is None else subject
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    for oid, value in attributes:
        builder = builder.add_attribute(oid, value)
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, algorithm).public_bytes(encoding)


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        header = bytes([length])
    else:
        size = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + header + content


def _der_content(element: bytes) -> bytes:
    """The content of one DER element (its header stripped)."""
    first_length_byte = element[1]
    header = 2 + (first_length_byte & 0x7F if first_length_byte & 0x80 else 0)
    return element[header:]


def _resign(tbs: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Wrap (possibly hand-edited) CertificationRequestInfo bytes in a valid signature."""
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + ECDSA_SHA256_DER + _der(0x03, b"\x00" + signature))


def _sign(
    ca: CertificateAuthority,
    data: bytes,
    *,
    now: datetime = NOW,
    lifetime: timedelta = LIFETIME,
    max_csr_bytes: int = MAX_CSR_BYTES,
) -> SignedDevice:
    return sign_device_csr(
        ca, data, now=now, lifetime=lifetime, max_csr_bytes=max_csr_bytes
    )


def _refusal(ca: CertificateAuthority, data: bytes) -> CertificateRequestError:
    with pytest.raises(CertificateRequestError) as info:
        _sign(ca, data)
    return info.value


def _mutate(data: bytes, mutations: Sequence[tuple[str, int, int]]) -> bytes:
    """Apply (operation, index, byte) edits; indexes wrap around the data."""
    edited = bytearray(data)
    for operation, index, value in mutations:
        position = index % (len(edited) + 1)
        if operation == "insert":
            edited.insert(position, value)
        elif position < len(edited):
            if operation == "set":
                edited[position] = value
            else:
                del edited[position]
    return bytes(edited)


def _verdict(check: Callable[[], object]) -> str:
    """Run a certificate check; return the refusal reason, or "accepted"."""
    try:
        check()
    except UntrustedPeer as error:
        return error.reason
    return "accepted"


def _outcome(ca: CertificateAuthority, data: bytes) -> str:
    """Sign *data*; return the refusal reason, or "signed"."""
    try:
        _sign(ca, data)
    except CertificateRequestError as error:
        return error.reason
    return "signed"


def _issue(
    ca: CertificateAuthority,
    *,
    subject: x509.Name,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
    not_before: datetime = NOW - SKEW,
    not_after: datetime = NOW + LIFETIME,
) -> x509.Certificate:
    """Sign an arbitrary certificate with the CA key, bypassing the profile."""
    key = generate_private_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(ca.key, hashes.SHA256())


def _device_like(
    *names: x509.GeneralName,
) -> list[tuple[x509.ExtensionType, bool]]:
    """Extensions of a client certificate with the given SAN entries."""
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        (x509.SubjectAlternativeName(list(names)), False),
    ]


def _untrusted(check: Callable[[], object]) -> UntrustedPeer:
    with pytest.raises(UntrustedPeer) as info:
        check()
    return info.value


def _enrolled(ca: CertificateAuthority, device_id: str = "pump-7") -> SignedDevice:
    return _sign(ca, build_device_csr(generate_private_key(), device_id))


def _swap_key_oid(der: bytes, old: str, new: str) -> bytes:
    """Replace the SubjectPublicKeyInfo algorithm OID (same encoded length).

    The SPKI comes before the signature algorithm, so the first match is the key's.
    """
    old_bytes, new_bytes = bytes.fromhex(old), bytes.fromhex(new)
    assert len(old_bytes) == len(new_bytes)
    assert old_bytes in der
    return der.replace(old_bytes, new_bytes, 1)


# ---------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("kind", [CertificateRequestError, UntrustedPeer])
def test_errors_keep_reason_and_human_message(
    kind: type[CertificateRequestError | UntrustedPeer],
) -> None:
    """An auth error carries a machine reason, and str() is only the human text."""
    error = kind("weak_key", "RSA-1024 keys are not accepted")
    assert isinstance(error, AuthError)
    assert error.reason == "weak_key"
    assert str(error) == "RSA-1024 keys are not accepted"
    assert (
        repr(error) == f"{kind.__name__}('weak_key', 'RSA-1024 keys are not accepted')"
    )


@pytest.mark.parametrize("kind", [CertificateRequestError, UntrustedPeer])
def test_errors_survive_pickle_and_copy(
    kind: type[CertificateRequestError | UntrustedPeer],
) -> None:
    """An auth error can be pickled and copied without losing its reason."""
    error = kind("expired", "certificate expired")
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):  # noqa: S301 - our own bytes
        assert type(clone) is kind
        assert (clone.reason, str(clone)) == ("expired", "certificate expired")


# ---------------------------------------------------------------------------
# Purity


def _auth_sources() -> list[Path]:
    return sorted(AUTH_DIR.rglob("*.py"))


@pytest.mark.parametrize("path", _auth_sources(), ids=lambda path: path.name)
def test_auth_sources_do_no_io_and_read_no_clock(path: Path) -> None:
    """No auth module imports I/O, TLS or clock modules, opens files, or calls now()."""
    forbidden_modules = {"trio", "socket", "ssl", "time", "os", "io", "pathlib"}
    forbidden_calls = {"open", "now", "utcnow", "today"}
    imported: set[str] = set()
    called: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            called.add(node.func.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called.add(node.func.id)
    assert not imported & forbidden_modules
    assert not called & forbidden_calls


@pytest.mark.parametrize("forbidden", ["trio", "ssl"])
def test_auth_imports_without_trio_or_ssl(forbidden: str) -> None:
    """auth imports with trio or ssl unavailable.

    ``socket`` is not in this list: cryptography.x509 imports email.utils, which
    imports socket, so only the source check above can hold auth to it.
    """
    code = f"import sys; sys.modules[{forbidden!r}] = None; import auth"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# Device ids


@pytest.mark.parametrize(
    "text", ["a", "0", "pump-7", "LAB.42_unit-3", "A" * 64, "a" + "-" * 63]
)
def test_valid_device_ids_are_returned_unchanged(text: str) -> None:
    """A well-formed device id is returned as-is."""
    assert validate_device_id(text) == text
    assert DEVICE_ID_PATTERN.fullmatch(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-pump",
        ".pump",
        "_pump",
        "a/b",
        "../etc",
        "a:b",
        "a b",
        "a" * 65,
        "pump\n",
        "pümp",
        "pump\x1b[31m",
    ],
)
def test_invalid_device_ids_are_refused(text: str) -> None:
    """A device id with a bad character, a bad start or a bad length is a ValueError."""
    with pytest.raises(ValueError, match="invalid device id") as info:
        validate_device_id(text)
    # Control characters in the input are escaped in the message.
    assert "\x1b" not in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# Keys


def test_private_key_pem_round_trip() -> None:
    """A generated key is P-256 and survives PEM serialisation."""
    key = generate_private_key()
    assert isinstance(key.curve, ec.SECP256R1)
    pem = private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_private_key(pem).private_numbers() == key.private_numbers()


def test_load_private_key_refuses_non_ec_keys() -> None:
    """An RSA key is not accepted where an EC key is required."""
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="elliptic-curve"):
        load_private_key(rsa_pem)


def test_load_private_key_refuses_encrypted_keys_with_value_error() -> None:
    """An encrypted key is a ValueError (cryptography itself raises TypeError)."""
    pem = generate_private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="cannot load private key"):
        load_private_key(pem)


def test_load_private_key_refuses_garbage() -> None:
    """Bytes that are not a PEM key are a ValueError."""
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's own message
        load_private_key(b"not a key")


# ---------------------------------------------------------------------------
# The CA


def test_create_ca_profile(ca: CertificateAuthority) -> None:
    """The CA is self-signed, CA:TRUE pathlen 0, keyCertSign+cRLSign, with an SKI."""
    certificate = ca.certificate
    assert certificate.subject == _cn("Relay Device CA")
    assert certificate.issuer == certificate.subject
    certificate.verify_directly_issued_by(certificate)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert certificate.public_key() == ca.key.public_key()
    assert certificate.signature_hash_algorithm is not None
    assert certificate.signature_hash_algorithm.name == "sha256"
    assert certificate.serial_number.bit_length() > 64

    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)

    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature

    ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    assert {extension.oid for extension in certificate.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    }

    assert certificate.not_valid_before_utc == NOW - SKEW
    assert certificate.not_valid_after_utc == NOW + CA_LIFETIME


def test_create_ca_serials_are_random() -> None:
    """Two CAs never share a serial number."""
    first = create_ca(common_name="a", now=NOW, lifetime=LIFETIME)
    second = create_ca(common_name="a", now=NOW, lifetime=LIFETIME)
    assert first.certificate.serial_number != second.certificate.serial_number


def test_validity_is_whole_seconds_in_utc() -> None:
    """Sub-second and non-UTC times give whole-second UTC validity, now + lifetime."""
    paris = datetime(2026, 6, 1, 14, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=2)))
    authority = create_ca(common_name="a", now=paris, lifetime=timedelta(days=1))
    assert authority.certificate.not_valid_before_utc == NOW - SKEW
    assert authority.certificate.not_valid_after_utc == NOW + timedelta(days=1)


@pytest.mark.parametrize(
    ("now", "lifetime", "match"),
    [
        (datetime(2026, 6, 1), LIFETIME, "timezone-aware"),
        (NOW, timedelta(0), "must be positive"),
        (NOW, timedelta(seconds=-1), "must be positive"),
    ],
)
def test_create_ca_refuses_bad_times(
    now: datetime, lifetime: timedelta, match: str
) -> None:
    """A naive now or a non-positive lifetime is the caller's error."""
    with pytest.raises(ValueError, match=match):
        create_ca(common_name="a", now=now, lifetime=lifetime)


def test_ca_pem_round_trip(ca: CertificateAuthority) -> None:
    """A CA written as PEM loads back identical."""
    assert ca.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_ca(key_pem=ca.key_pem(), certificate_pem=ca.certificate_pem())
    assert loaded.certificate == ca.certificate
    assert loaded.key.private_numbers() == ca.key.private_numbers()


def test_load_ca_refuses_mismatched_key(ca: CertificateAuthority) -> None:
    """A CA key that does not belong to the CA certificate is a ValueError."""
    other = private_key_pem(generate_private_key())
    with pytest.raises(ValueError, match="does not match"):
        load_ca(key_pem=other, certificate_pem=ca.certificate_pem())


def test_load_ca_refuses_garbage_certificate(ca: CertificateAuthority) -> None:
    """A CA certificate that is not PEM is a ValueError."""
    with pytest.raises(ValueError, match="cannot load CA certificate"):
        load_ca(key_pem=ca.key_pem(), certificate_pem=b"garbage")


@pytest.mark.parametrize(
    "constraints",
    [None, x509.BasicConstraints(ca=False, path_length=None)],
    ids=["no-basic-constraints", "ca-false"],
)
def test_load_ca_refuses_non_ca_certificates(
    constraints: x509.BasicConstraints | None,
) -> None:
    """A certificate without BasicConstraints CA:TRUE cannot be loaded as a CA."""
    key = generate_private_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_cn("not a CA"))
        .issuer_name(_cn("not a CA"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + LIFETIME)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    certificate = builder.sign(key, hashes.SHA256())
    with pytest.raises(ValueError, match="not a CA certificate"):
        load_ca(
            key_pem=private_key_pem(key),
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        )


# ---------------------------------------------------------------------------
# Enrollment: the happy path


def test_build_device_csr_profile() -> None:
    """The enrollment CSR names the device in the CN and one SAN URI, signed SHA-256."""
    key = generate_private_key()
    csr = x509.load_pem_x509_csr(build_device_csr(key, "pump-7"))
    assert csr.is_signature_valid
    assert csr.subject == _cn("pump-7")
    assert csr.public_key() == key.public_key()
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == "sha256"
    alt_name = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(alt_name.value) == [_device_uri("pump-7")]


def test_build_device_csr_refuses_invalid_device_id() -> None:
    """An enrollment CSR cannot be built for an invalid device id."""
    with pytest.raises(ValueError, match="invalid device id"):
        build_device_csr(generate_private_key(), "a/b")


def test_enrollment_round_trip(ca: CertificateAuthority) -> None:
    """create_ca -> build_device_csr -> sign_device_csr -> verify_device_certificate."""
    key = generate_private_key()
    signed = _sign(ca, build_device_csr(key, "pump-7"))
    assert signed.ignored_requests == ()
    assert signed.certificate.public_key() == key.public_key()

    identity = verify_device_certificate(ca.certificate, signed.certificate, now=NOW)
    assert identity == signed.identity
    assert identity.device_id == "pump-7"
    assert identity.serial_hex == format(signed.certificate.serial_number, "x")
    assert identity.serial_hex == identity.serial_hex.lower()
    assert identity.fingerprint_sha256 == certificate_fingerprint(signed.certificate)
    assert identity.fingerprint_sha256 == (
        signed.certificate.fingerprint(hashes.SHA256()).hex()
    )
    assert len(identity.fingerprint_sha256) == 64
    assert identity.not_before == NOW - SKEW
    assert identity.not_after == NOW + LIFETIME

    reloaded = x509.load_pem_x509_certificate(signed.certificate_pem())
    assert reloaded == signed.certificate


def test_sign_accepts_der_and_pem_with_leading_whitespace(
    ca: CertificateAuthority,
) -> None:
    """A CSR is accepted as DER or as PEM, even after leading blank lines."""
    key = generate_private_key()
    der = _csr(
        key, extensions=[(x509.SubjectAlternativeName([_device_uri("pump-7")]), False)]
    )
    pem = b"\n\n  " + _csr(key, encoding=serialization.Encoding.PEM)
    assert _sign(ca, der).identity.device_id == "pump-7"
    assert _sign(ca, pem).identity.device_id == "pump-7"


@pytest.mark.parametrize(
    "curve_or_rsa",
    [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1(), 2048],
    ids=["P-256", "P-384", "P-521", "RSA-2048"],
)
def test_sign_accepts_strong_keys(
    ca: CertificateAuthority, curve_or_rsa: ec.EllipticCurve | int
) -> None:
    """P-256, P-384, P-521 and RSA-2048 request keys are certified unchanged."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, curve_or_rsa)
        if isinstance(curve_or_rsa, int)
        else ec.generate_private_key(curve_or_rsa)
    )
    signed = _sign(ca, _csr(key))
    assert signed.certificate.public_key() == key.public_key()
    verify_device_certificate(ca.certificate, signed.certificate, now=NOW)


def test_cryptography_verifier_accepts_device_certificate(
    ca: CertificateAuthority,
) -> None:
    """cryptography's RFC 5280/CABF client verifier accepts the device profile."""
    signed = _enrolled(ca)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca.certificate]))
        .time(NOW)
        .build_client_verifier()
    )
    verified = verifier.verify(signed.certificate, [])
    assert verified.subjects == [_device_uri("pump-7")]


# ---------------------------------------------------------------------------
# Enrollment: the profile is fixed whatever the CSR asks


def test_hostile_csr_gets_the_fixed_profile(ca: CertificateAuthority) -> None:
    """A CSR asking for CA rights, server use and extra names gets only the profile.

    Everything it asked for beyond the profile is listed in ignored_requests.
    """
    key = generate_private_key()
    data = _csr(
        key,
        subject=_name(
            (NameOID.COMMON_NAME, "pump-7"), (NameOID.ORGANIZATION_NAME, "Evil Corp")
        ),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=3), True),
            (
                x509.ExtendedKeyUsage(
                    [
                        ExtendedKeyUsageOID.SERVER_AUTH,
                        ExtendedKeyUsageOID.CLIENT_AUTH,
                        ExtendedKeyUsageOID.CODE_SIGNING,
                        x509.ObjectIdentifier("1.2.3.4"),
                    ]
                ),
                False,
            ),
            (
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
                True,
            ),
            (
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("evil.example"),
                        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                        x509.RFC822Name("root@evil.example"),
                        x509.UniformResourceIdentifier("https://evil.example/"),
                        _device_uri("pump-7"),
                        x509.DirectoryName(_cn("x")),
                        x509.RegisteredID(x509.ObjectIdentifier("1.2.3.5")),
                        x509.OtherName(x509.ObjectIdentifier("1.2.3.6"), b"\x05\x00"),
                    ]
                ),
                False,
            ),
            (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
            (
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier("1.2.3.7"), b"\x05\x00"
                ),
                True,
            ),
        ],
        attributes=[
            (AttributeOID.CHALLENGE_PASSWORD, b"hunter2"),
            (x509.ObjectIdentifier("1.2.3.8"), b"x"),
        ],
    )
    signed = _sign(ca, data)

    assert signed.ignored_requests == (
        "subject O=Evil Corp",
        "basicConstraints CA:TRUE, pathlen:3",
        "extendedKeyUsage serverAuth",
        "extendedKeyUsage codeSigning",
        "extendedKeyUsage 1.2.3.4",
        "keyUsage keyCertSign",
        "keyUsage cRLSign",
        "subjectAltName DNS:evil.example",
        "subjectAltName IP:10.0.0.1",
        "subjectAltName email:root@evil.example",
        "subjectAltName URI:https://evil.example/",
        "subjectAltName dirName:CN=x",
        "subjectAltName RID:1.2.3.5",
        "subjectAltName otherName:1.2.3.6",
        "extension subjectKeyIdentifier",
        "extension 1.2.3.7 (critical)",
        # Attributes are a DER SET OF, sorted by encoding, so 1.2.3.8 comes first.
        "attribute 1.2.3.8",
        "attribute challengePassword",
    )
    # The challenge password is named, never echoed.
    assert not any("hunter2" in entry for entry in signed.ignored_requests)

    certificate = signed.certificate
    extensions = certificate.extensions
    assert certificate.subject == _cn("pump-7")
    assert certificate.issuer == ca.certificate.subject
    assert certificate.public_key() == key.public_key()
    assert certificate.signature_hash_algorithm is not None
    assert certificate.signature_hash_algorithm.name == "sha256"
    assert {extension.oid for extension in extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=False, path_length=None)
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value == x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    alt_name = extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not alt_name.critical
    assert list(alt_name.value) == [_device_uri("pump-7")]
    ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    ca_ski = ca.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    )
    assert aki.value.key_identifier == ca_ski.value.digest
    assert certificate.not_valid_before_utc == NOW - SKEW
    assert certificate.not_valid_after_utc == NOW + LIFETIME
    # And the result is still a good device certificate.
    verify_device_certificate(ca.certificate, certificate, now=NOW)


def _key_usage(**bits: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{name: bits.get(name, False) for name in names})


@pytest.mark.parametrize(
    ("extension", "expected"),
    [
        (
            x509.BasicConstraints(ca=True, path_length=None),
            ("basicConstraints CA:TRUE",),
        ),
        (x509.BasicConstraints(ca=False, path_length=None), ()),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), ()),
        (_key_usage(digital_signature=True), ()),
        (
            _key_usage(
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=True,
                encipher_only=True,
            ),
            (
                "keyUsage nonRepudiation",
                "keyUsage keyEncipherment",
                "keyUsage dataEncipherment",
                "keyUsage keyAgreement",
                "keyUsage encipherOnly",
            ),
        ),
        (
            _key_usage(key_agreement=True, decipher_only=True),
            ("keyUsage keyAgreement", "keyUsage decipherOnly"),
        ),
        (
            x509.SubjectAlternativeName([x509.DNSName("evil\nINFO forged log line")]),
            ("subjectAltName DNS:evil\\nINFO forged log line",),
        ),
        (
            x509.SubjectAlternativeName([x509.DirectoryName(_cn("ab\u202ecd"))]),
            ("subjectAltName dirName:CN=ab\\u202ecd",),
        ),
        (
            x509.SubjectAlternativeName([x509.DNSName("a" * 300)]),
            ("subjectAltName DNS:" + "a" * 196 + "...",),
        ),
        (
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("URN:Relay:Device:pump-7")]
            ),
            (),
        ),
    ],
    ids=[
        "ca-true-no-pathlen",
        "ca-false",
        "client-auth",
        "digital-signature",
        "key-usage-encipher-only",
        "key-usage-decipher-only",
        "newline-escaped",
        "bidi-escaped",
        "long-name-cut",
        "own-uri-any-case",
    ],
)
def test_ignored_requests_describe_what_was_not_granted(
    ca: CertificateAuthority, extension: x509.ExtensionType, expected: tuple[str, ...]
) -> None:
    """ignored_requests names each refused request once, escaped and bounded."""
    signed = _sign(ca, _csr(generate_private_key(), extensions=[(extension, False)]))
    assert signed.ignored_requests == expected
    assert all(len(entry) <= 220 for entry in signed.ignored_requests)


# ---------------------------------------------------------------------------
# Enrollment: refusals


def test_oversized_csr_is_refused_before_parsing(ca: CertificateAuthority) -> None:
    """A 1 MiB upload is 'too_large', not 'malformed': it is never parsed."""
    error = _refusal(ca, b"\x30" * (1024 * 1024))
    assert error.reason == "too_large"
    assert str(MAX_CSR_BYTES) in str(error)


def test_size_limit_applies_to_valid_requests_too(ca: CertificateAuthority) -> None:
    """A valid CSR one byte over the limit is refused; at the limit it is signed."""
    data = build_device_csr(generate_private_key(), "pump-7")
    with pytest.raises(CertificateRequestError) as info:
        _sign(ca, data, max_csr_bytes=len(data) - 1)
    assert info.value.reason == "too_large"
    assert _sign(ca, data, max_csr_bytes=len(data)).identity.device_id == "pump-7"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x30\x03\x02\x01\x00",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n",
    ],
    ids=["empty", "text", "der-junk", "pem-junk", "pem-unterminated"],
)
def test_garbage_is_malformed(ca: CertificateAuthority, data: bytes) -> None:
    """Bytes that are not a CSR are refused as 'malformed'."""
    assert _refusal(ca, data).reason == "malformed"


def test_truncated_csr_is_malformed(ca: CertificateAuthority) -> None:
    """A CSR cut short is 'malformed'."""
    data = _csr(generate_private_key())
    assert _refusal(ca, data[:-10]).reason == "malformed"


def test_certificate_is_not_a_csr(ca: CertificateAuthority) -> None:
    """A certificate uploaded instead of a request is 'malformed'."""
    assert _refusal(ca, ca.certificate_pem()).reason == "malformed"


def test_signed_csr_with_undecodable_extension_is_malformed(
    ca: CertificateAuthority,
) -> None:
    """A properly signed CSR whose SAN extension does not decode is 'malformed'."""
    broken = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"junk")
    data = _csr(generate_private_key(), extensions=[(broken, False)])
    error = _refusal(ca, data)
    assert error.reason == "malformed"
    assert "does not parse" in str(error)


def test_signed_csr_with_undecodable_subject_is_malformed(
    ca: CertificateAuthority,
) -> None:
    """A properly signed CSR whose CN is not valid UTF-8 is 'malformed'."""
    key = generate_private_key()
    csr = x509.load_der_x509_csr(_csr(key, subject=_cn("abcdef")))
    tbs = csr.tbs_certrequest_bytes.replace(b"abcdef", b"\xff\xfe\xfd\xfc\xfb\xfa")
    error = _refusal(ca, _resign(tbs, key))
    assert error.reason == "malformed"
    assert "subject does not parse" in str(error)


def test_csr_with_bad_signature_is_refused(ca: CertificateAuthority) -> None:
    """A CSR whose signature was altered still parses but is 'bad_signature'."""
    data = bytearray(_csr(generate_private_key()))
    # The last byte is inside the signature BIT STRING (the end of ECDSA's s).
    data[-1] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(data))
    assert csr.subject == _cn("pump-7")
    assert not csr.is_signature_valid
    assert _refusal(ca, bytes(data)).reason == "bad_signature"


def test_csr_for_someone_elses_key_is_refused(ca: CertificateAuthority) -> None:
    """A CSR carrying key B but signed by key A (no proof of possession) is refused."""
    key_a, key_b = generate_private_key(), generate_private_key()
    csr_b = x509.load_der_x509_csr(_csr(key_b))
    forged = _resign(csr_b.tbs_certrequest_bytes, key_a)
    assert _refusal(ca, forged).reason == "bad_signature"


def _p192_key() -> ec.EllipticCurvePrivateKey:
    try:
        return ec.generate_private_key(ec.SECP192R1())
    except UnsupportedAlgorithm:
        pytest.skip(
            "this OpenSSL cannot generate P-192 keys (UnsupportedAlgorithm); "
            "RSA-1024 still covers the weak-key path"
        )


@pytest.mark.parametrize(
    ("make_key", "named"),
    [
        (
            lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 - under test
            "RSA-1024",
        ),
        (_p192_key, "EC secp192r1 (192 bits)"),
        (lambda: ec.generate_private_key(ec.SECP224R1()), "EC secp224r1 (224 bits)"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "EC secp256k1 (256 bits)"),
        (
            lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
            "EC brainpoolP256r1 (256 bits)",
        ),
        (ed25519.Ed25519PrivateKey.generate, "Ed25519 (256 bits)"),
        (ed448.Ed448PrivateKey.generate, "Ed448 (456 bits)"),
        (lambda: dsa.generate_private_key(2048), "DSA-2048"),
    ],
    ids=[
        "RSA-1024",
        "P-192",
        "P-224",
        "secp256k1",
        "brainpool",
        "Ed25519",
        "Ed448",
        "DSA",
    ],
)
def test_weak_or_unsupported_keys_are_refused(
    ca: CertificateAuthority,
    make_key: Callable[[], CertificateIssuerPrivateKeyTypes],
    named: str,
) -> None:
    """Keys other than P-256/384/521 and RSA >= 2048 are 'weak_key', named in the message."""
    error = _refusal(ca, _csr(make_key()))
    assert error.reason == "weak_key"
    assert named in str(error)


@pytest.mark.parametrize(
    ("public_key", "named"),
    [
        (x25519.X25519PrivateKey.generate().public_key(), "X25519"),
        (x448.X448PrivateKey.generate().public_key(), "X448"),
    ],
    ids=["X25519", "X448"],
)
def test_key_agreement_keys_are_refused(
    ca: CertificateAuthority,
    public_key: x25519.X25519PublicKey | x448.X448PublicKey,
    named: str,
) -> None:
    """A CSR carrying an X25519/X448 key (which cannot sign) is 'weak_key'.

    No such CSR can be signed, so the key is planted in a P-256 request.
    """
    key = generate_private_key()
    tbs = x509.load_der_x509_csr(_csr(key)).tbs_certrequest_bytes
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    content = _der_content(tbs).replace(
        key.public_key().public_bytes(*spki), public_key.public_bytes(*spki)
    )
    error = _refusal(ca, _resign(_der(0x30, content), key))
    assert error.reason == "weak_key"
    assert named in str(error)


def test_unknown_key_algorithm_is_refused(ca: CertificateAuthority) -> None:
    """A CSR whose key algorithm cryptography does not know is 'weak_key'."""
    # id-ecPublicKey 1.2.840.10045.2.1 -> 1.2.840.10045.2.9 (unassigned).
    data = _swap_key_oid(
        _csr(generate_private_key()), "06072a8648ce3d0201", "06072a8648ce3d0209"
    )
    error = _refusal(ca, data)
    assert error.reason == "weak_key"
    assert "not supported" in str(error)


@pytest.mark.parametrize(
    ("subject", "match"),
    [
        (_cn("a/b"), "invalid device id"),
        (_cn("pump 7"), "invalid device id"),
        (_cn("pump:7"), "invalid device id"),
        (_name((NameOID.ORGANIZATION_NAME, "Lab")), "0 commonName"),
        (_cn("pump-7", "pump-8"), "2 commonName"),
    ],
    ids=["slash", "space", "colon", "no-cn", "two-cns"],
)
def test_bad_device_id_in_subject_is_refused(
    ca: CertificateAuthority, subject: x509.Name, match: str
) -> None:
    """The CN must be exactly one valid device id, else 'bad_device_id'."""
    error = _refusal(ca, _csr(generate_private_key(), subject=subject))
    assert error.reason == "bad_device_id"
    assert match in str(error)


@pytest.mark.parametrize("warnings_are_errors", [False, True])
def test_too_long_device_id_is_refused(
    ca: CertificateAuthority, warnings_are_errors: bool
) -> None:
    """A 65-character CN is 'bad_device_id' whether cryptography's warning is printed or raised.

    cryptography decodes an over-long CN with a UserWarning; under ``-W error``
    (this suite's setting) that warning is an exception inside the parser.
    """
    data = _csr(generate_private_key(), subject=_long_cn(65))
    with warnings.catch_warnings():
        warnings.simplefilter("error" if warnings_are_errors else "ignore", UserWarning)
        error = _refusal(ca, data)
    assert error.reason == "bad_device_id"


@pytest.mark.parametrize(
    "uri",
    ["urn:relay:device:pump-8", "URN:RELAY:DEVICE:pump-8", "urn:relay:device:"],
)
def test_csr_claiming_a_second_device_id_is_refused(
    ca: CertificateAuthority, uri: str
) -> None:
    """A SAN URI naming another device than the CN is 'bad_device_id'."""
    alt_name = x509.SubjectAlternativeName(
        [_device_uri("pump-7"), x509.UniformResourceIdentifier(uri)]
    )
    error = _refusal(ca, _csr(generate_private_key(), extensions=[(alt_name, False)]))
    assert error.reason == "bad_device_id"
    assert "subjectAltName" in str(error)


@pytest.mark.parametrize(
    ("now", "lifetime", "match"),
    [
        (NOW, timedelta(0), "must be positive"),
        (datetime(2026, 6, 1), LIFETIME, "timezone-aware"),
    ],
    ids=["zero-lifetime", "naive-now"],
)
def test_sign_refuses_caller_errors_with_value_error(
    ca: CertificateAuthority, now: datetime, lifetime: timedelta, match: str
) -> None:
    """A bad lifetime or clock from the caller is a ValueError, not a refused CSR.

    They are checked first, so even a garbage request gets the ValueError.
    """
    with pytest.raises(ValueError, match=match):
        _sign(ca, b"garbage", now=now, lifetime=lifetime)


def test_lifetime_is_exact_even_past_the_ca() -> None:
    """The lifetime is not clipped to the CA's: the caller decides (documented)."""
    short = create_ca(common_name="short", now=NOW, lifetime=timedelta(days=1))
    signed = _sign(short, build_device_csr(generate_private_key(), "pump-7"))
    assert signed.identity.not_after == NOW + LIFETIME
    assert signed.identity.not_after > short.certificate.not_valid_after_utc


@settings(database=None, max_examples=200)
@given(data=st.binary(max_size=4096))
def test_sign_never_fails_otherwise_on_arbitrary_bytes(
    ca: CertificateAuthority, data: bytes
) -> None:
    """Any bytes either get a certificate or a CertificateRequestError, nothing else."""
    assert _outcome(ca, data) in CSR_OUTCOMES


@pytest.fixture(scope="module")
def rich_request() -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A CSR exercising most decoders, as (CertificationRequestInfo DER, key)."""
    key = generate_private_key()
    data = _csr(
        key,
        subject=_name((NameOID.COMMON_NAME, "pump-7"), (NameOID.COUNTRY_NAME, "DE")),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=1), True),
            (_key_usage(digital_signature=True, key_agreement=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (
                x509.SubjectAlternativeName(
                    [
                        _device_uri("pump-7"),
                        x509.DNSName("a.example"),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                        x509.DirectoryName(_cn("x")),
                        x509.OtherName(x509.ObjectIdentifier("1.2.3"), b"\x05\x00"),
                    ]
                ),
                False,
            ),
        ],
        attributes=[(AttributeOID.CHALLENGE_PASSWORD, b"pw")],
    )
    return x509.load_der_x509_csr(data).tbs_certrequest_bytes, key


@settings(database=None, max_examples=300)
@given(mutations=MUTATIONS, resign=st.booleans())
def test_sign_never_fails_otherwise_on_mutated_requests(
    ca: CertificateAuthority,
    rich_request: tuple[bytes, ec.EllipticCurvePrivateKey],
    mutations: list[tuple[str, int, int]],
    resign: bool,
) -> None:
    """A mutated CSR, re-signed or not, gets a certificate or a CertificateRequestError.

    Re-signing gets the mutation past the signature check, into the decoders of
    names, extensions and attributes.
    """
    tbs, key = rich_request
    if resign:
        data = _resign(_mutate(tbs, mutations), key)
    else:
        data = _mutate(_resign(tbs, key), mutations)
    assert _outcome(ca, data) in CSR_OUTCOMES


def test_csr_with_unknown_version_is_malformed(ca: CertificateAuthority) -> None:
    """A CSR claiming a version other than v1 is 'malformed'.

    cryptography raises InvalidVersion here, which is not a ValueError.
    """
    data = _csr(generate_private_key())
    version = data.index(b"\x02\x01\x00")
    assert version < 10  # The version is the first field of the request info.
    edited = data[:version] + b"\x02\x01\x05" + data[version + 3 :]
    error = _refusal(ca, edited)
    assert error.reason == "malformed"


# ---------------------------------------------------------------------------
# Server certificates


def test_server_certificate_profile(ca: CertificateAuthority) -> None:
    """Server certificates: serverAuth only, CA:FALSE, IP and DNS SANs, CN = first name."""
    key, certificate = issue_server_certificate(
        ca,
        names=["relay.example", "127.0.0.1", "::1", "localhost"],
        now=NOW,
        lifetime=timedelta(days=90),
    )
    assert certificate.public_key() == key.public_key()
    assert isinstance(key.curve, ec.SECP256R1)
    certificate.verify_directly_issued_by(ca.certificate)
    assert certificate.subject == _cn("relay.example")
    extensions = certificate.extensions
    alt_name = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(alt_name) == [
        x509.DNSName("relay.example"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("localhost"),
    ]
    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value == _key_usage(digital_signature=True)
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    )
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == (
        x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()).digest
    )
    assert certificate.not_valid_before_utc == NOW - SKEW
    assert certificate.not_valid_after_utc == NOW + timedelta(days=90)


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("relay.example"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_cryptography_verifier_accepts_server_certificate(
    ca: CertificateAuthority, name: x509.DNSName | x509.IPAddress
) -> None:
    """cryptography's server verifier accepts the server profile for DNS and IP names."""
    _, certificate = issue_server_certificate(
        ca, names=["relay.example", "127.0.0.1", "::1"], now=NOW, lifetime=LIFETIME
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca.certificate]))
        .time(NOW)
        .build_server_verifier(name)
    )
    chain = verifier.verify(certificate, [])
    assert chain == [certificate, ca.certificate]


@pytest.mark.parametrize(
    ("names", "lifetime", "match"),
    [
        ([], LIFETIME, "at least one name"),
        (["relay.example", ""], LIFETIME, "must not be empty"),
        (["bücher.example"], LIFETIME, "A-label"),
        (["a" * 65 + ".example"], LIFETIME, "length"),
        (["relay.example"], timedelta(0), "must be positive"),
    ],
    ids=["none", "empty", "unicode", "cn-too-long", "zero-lifetime"],
)
def test_issue_server_certificate_refuses_bad_arguments(
    ca: CertificateAuthority, names: list[str], lifetime: timedelta, match: str
) -> None:
    """Bad names or lifetimes for a server certificate are a ValueError."""
    with pytest.raises(ValueError, match=match):
        issue_server_certificate(ca, names=names, now=NOW, lifetime=lifetime)


def test_authority_key_identifier_falls_back_to_the_ca_key() -> None:
    """A loaded CA without an SKI still gets an AKI, derived from its key."""
    key = generate_private_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_cn("Old CA"))
        .issuer_name(_cn("Old CA"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - SKEW)
        .not_valid_after(NOW + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    old_ca = load_ca(
        key_pem=private_key_pem(key),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
    )
    _, server = issue_server_certificate(
        old_ca, names=["relay.example"], now=NOW, lifetime=LIFETIME
    )
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


# ---------------------------------------------------------------------------
# Checking device certificates


def test_foreign_ca_is_not_trusted(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    """A device certificate from another CA is 'not_signed_by_ca'."""
    signed = _enrolled(foreign_ca)
    error = _untrusted(
        lambda: verify_device_certificate(ca.certificate, signed.certificate, now=NOW)
    )
    assert error.reason == "not_signed_by_ca"


def test_impostor_ca_with_the_same_name_is_not_trusted(
    ca: CertificateAuthority,
) -> None:
    """A CA with our CA's name but another key does not pass: the signature decides."""
    impostor = create_ca(common_name="Relay Device CA", now=NOW, lifetime=CA_LIFETIME)
    assert impostor.certificate.subject == ca.certificate.subject
    signed = _enrolled(impostor)
    error = _untrusted(
        lambda: verify_device_certificate(ca.certificate, signed.certificate, now=NOW)
    )
    assert error.reason == "not_signed_by_ca"


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (-SKEW - timedelta(seconds=1), "not_yet_valid"),
        (LIFETIME + timedelta(seconds=1), "expired"),
        (timedelta(days=36500), "expired"),
        (-timedelta(days=36500), "not_yet_valid"),
    ],
    ids=["just-before", "just-after", "far-after", "far-before"],
)
def test_validity_period_is_enforced(
    ca: CertificateAuthority, offset: timedelta, reason: str
) -> None:
    """A device certificate is refused outside [not_before, not_after]."""
    signed = _enrolled(ca)
    error = _untrusted(
        lambda: verify_device_certificate(
            ca.certificate, signed.certificate, now=NOW + offset
        )
    )
    assert error.reason == reason


@pytest.mark.parametrize("offset", [-SKEW, LIFETIME], ids=["not-before", "not-after"])
def test_validity_period_bounds_are_inclusive(
    ca: CertificateAuthority, offset: timedelta
) -> None:
    """A device certificate is valid at exactly not_before and at exactly not_after."""
    signed = _enrolled(ca)
    verify_device_certificate(ca.certificate, signed.certificate, now=NOW + offset)


def test_verify_refuses_naive_now(ca: CertificateAuthority) -> None:
    """verify_device_certificate needs an aware datetime."""
    signed = _enrolled(ca)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_device_certificate(
            ca.certificate,
            signed.certificate,
            now=datetime(2026, 6, 1),
        )


def test_server_certificate_is_not_a_device_certificate(
    ca: CertificateAuthority,
) -> None:
    """The broker's server certificate presented as a device is 'not_client_cert'."""
    _, server = issue_server_certificate(
        ca, names=["relay.example"], now=NOW, lifetime=LIFETIME
    )
    error = _untrusted(
        lambda: verify_device_certificate(ca.certificate, server, now=NOW)
    )
    assert error.reason == "not_client_cert"


def test_certificate_without_extended_key_usage_is_not_a_client_certificate(
    ca: CertificateAuthority,
) -> None:
    """A CA-signed certificate without any EKU is 'not_client_cert'."""
    certificate = _issue(
        ca,
        subject=_cn("pump-7"),
        extensions=[(x509.SubjectAlternativeName([_device_uri("pump-7")]), False)],
    )
    error = _untrusted(
        lambda: verify_device_certificate(ca.certificate, certificate, now=NOW)
    )
    assert error.reason == "not_client_cert"


def test_ca_certificate_is_not_a_device_certificate(ca: CertificateAuthority) -> None:
    """A CA:TRUE certificate with clientAuth and a device URI is 'is_ca'."""
    extensions = _device_like(_device_uri("pump-7"))
    extensions[0] = (x509.BasicConstraints(ca=True, path_length=None), True)
    certificate = _issue(ca, subject=_cn("pump-7"), extensions=extensions)
    error = _untrusted(
        lambda: verify_device_certificate(ca.certificate, certificate, now=NOW)
    )
    assert error.reason == "is_ca"


def test_certificate_without_basic_constraints_is_not_a_ca(
    ca: CertificateAuthority,
) -> None:
    """No BasicConstraints means not a CA (RFC 5280 §4.2.1.9), so it is accepted."""
    certificate = _issue(
        ca, subject=_cn("pump-7"), extensions=_device_like(_device_uri("pump-7"))[1:]
    )
    identity = verify_device_certificate(ca.certificate, certificate, now=NOW)
    assert identity.device_id == "pump-7"


def test_undecodable_extensions_are_not_trusted(ca: CertificateAuthority) -> None:
    """A CA-signed certificate whose SAN does not decode is refused, never a crash."""
    broken = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"junk")
    certificate = _issue(ca, subject=_cn("pump-7"), extensions=[(broken, False)])
    error = _untrusted(
        lambda: verify_device_certificate(ca.certificate, certificate, now=NOW)
    )
    assert error.reason == "not_client_cert"
    assert _untrusted(lambda: device_identity(certificate)).reason == "bad_device_id"


@pytest.mark.parametrize(
    ("subject", "names", "reason"),
    [
        (_cn("pump-7"), None, "no_device_id"),
        (_cn("pump-7"), [x509.DNSName("pump-7.example")], "no_device_id"),
        (
            _cn("pump-7"),
            [x509.UniformResourceIdentifier("urn:relay:other:pump-7")],
            "no_device_id",
        ),
        (
            _cn("pump-7"),
            [_device_uri("pump-7"), _device_uri("pump-8")],
            "bad_device_id",
        ),
        (
            _cn("pump-7"),
            [
                _device_uri("pump-7"),
                x509.UniformResourceIdentifier("URN:RELAY:DEVICE:pump-7"),
            ],
            "bad_device_id",
        ),
        (_cn("a/b"), [_device_uri("a/b")], "bad_device_id"),
        (_cn("x"), [_device_uri("")], "bad_device_id"),
        (_cn("pump-8"), [_device_uri("pump-7")], "id_mismatch"),
        (
            _name((NameOID.ORGANIZATION_NAME, "Lab")),
            [_device_uri("pump-7")],
            "id_mismatch",
        ),
        (_cn("pump-7", "pump-7"), [_device_uri("pump-7")], "id_mismatch"),
    ],
    ids=[
        "no-san",
        "dns-only",
        "other-urn",
        "two-devices",
        "same-device-twice",
        "invalid-id",
        "empty-id",
        "cn-differs",
        "no-cn",
        "two-cns",
    ],
)
def test_device_identity_refusals(
    ca: CertificateAuthority,
    subject: x509.Name,
    names: list[x509.GeneralName] | None,
    reason: str,
) -> None:
    """device_identity needs exactly one valid device URI, equal to the only CN."""
    extensions = _device_like(*(names or ()))
    if names is None:
        extensions.pop()  # No SubjectAlternativeName extension at all.
    certificate = _issue(ca, subject=subject, extensions=extensions)
    assert _untrusted(lambda: device_identity(certificate)).reason == reason
    # The full check reaches the same verdict once the chain and usage pass.
    error = _untrusted(
        lambda: verify_device_certificate(ca.certificate, certificate, now=NOW)
    )
    assert error.reason == reason


@pytest.mark.parametrize("warnings_are_errors", [False, True])
def test_device_identity_refuses_over_long_cn(
    ca: CertificateAuthority, warnings_are_errors: bool
) -> None:
    """A 65-character CN is 'id_mismatch' whether cryptography's warning is printed or raised."""
    certificate = _issue(
        ca, subject=_long_cn(65), extensions=_device_like(_device_uri("pump-7"))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error" if warnings_are_errors else "ignore", UserWarning)
        error = _untrusted(lambda: device_identity(certificate))
    assert error.reason == "id_mismatch"


def test_device_identity_ignores_other_san_entries(ca: CertificateAuthority) -> None:
    """Extra non-device SAN entries do not change the identity."""
    certificate = _issue(
        ca,
        subject=_cn("pump-7"),
        extensions=_device_like(x509.DNSName("pump-7.lab"), _device_uri("pump-7")),
    )
    assert device_identity(certificate).device_id == "pump-7"


@settings(database=None, max_examples=300)
@given(mutations=MUTATIONS)
def test_device_checks_never_fail_otherwise_on_mutated_certificates(
    ca: CertificateAuthority, mutations: list[tuple[str, int, int]]
) -> None:
    """A CA-signed certificate with mutated content is accepted or UntrustedPeer.

    The content is re-signed with the CA key, so the mutation reaches the
    decoders behind the signature check. Loading the DER is the caller's step
    and may refuse the bytes itself; those cases end the example early.
    """
    tbs = _enrolled(ca).certificate.tbs_certificate_bytes
    data = _resign(_mutate(tbs, mutations), ca.key)
    try:
        certificate = x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion, Warning):
        # Warning: cryptography warns (an error in this suite) about some
        # encodings it still loads, such as a negative serial number.
        return
    verdicts = {
        _verdict(lambda: device_identity(certificate)),
        _verdict(
            lambda: verify_device_certificate(ca.certificate, certificate, now=NOW)
        ),
    }
    assert verdicts <= CERTIFICATE_VERDICTS


# ---------------------------------------------------------------------------
# Real TLS (OpenSSL) accepts what we issue


def _handshake(
    client: ssl.SSLObject, server: ssl.SSLObject, pipes: list[ssl.MemoryBIO]
) -> None:
    client_in, client_out, server_in, server_out = pipes
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, endpoint in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    endpoint.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return
    pytest.fail("TLS handshake did not complete")


def test_openssl_mutual_tls_with_issued_certificates(tmp_path: Path) -> None:
    """OpenSSL (X509_STRICT) completes mutual TLS with our CA, server and device certs."""
    now = datetime.now(UTC)
    authority = create_ca(common_name="Relay Device CA", now=now, lifetime=CA_LIFETIME)
    server_key, server_cert = issue_server_certificate(
        authority, names=["relay.example", "127.0.0.1"], now=now, lifetime=LIFETIME
    )
    device_key = generate_private_key()
    device = sign_device_csr(
        authority,
        build_device_csr(device_key, "pump-7"),
        now=now,
        lifetime=LIFETIME,
        max_csr_bytes=MAX_CSR_BYTES,
    )
    files = {
        "server.key": private_key_pem(server_key),
        "server.pem": server_cert.public_bytes(serialization.Encoding.PEM),
        "device.key": private_key_pem(device_key),
        "device.pem": device.certificate_pem(),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    ca_pem = authority.certificate_pem().decode("ascii")

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_2
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.verify_flags |= ssl.VERIFY_X509_STRICT
    server_context.load_verify_locations(cadata=ca_pem)
    server_context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")

    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.minimum_version = ssl.TLSVersion.TLSv1_2
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    client_context.load_verify_locations(cadata=ca_pem)
    client_context.load_cert_chain(tmp_path / "device.pem", tmp_path / "device.key")

    pipes = [ssl.MemoryBIO() for _ in range(4)]
    client = client_context.wrap_bio(
        pipes[0], pipes[1], server_hostname="relay.example"
    )
    server = server_context.wrap_bio(pipes[2], pipes[3], server_side=True)
    _handshake(client, server, pipes)

    peer_der = server.getpeercert(binary_form=True)
    assert peer_der is not None
    peer = x509.load_der_x509_certificate(peer_der)
    identity = verify_device_certificate(authority.certificate, peer, now=now)
    assert identity == device.identity


def test_rsa_key_above_8192_bits_is_refused() -> None:
    """An RSA key whose signatures would not fit a grant receipt (1 KiB) is refused.

    Generating a 9216-bit key takes minutes, so the request is a stand-in that
    carries only the public key (the modulus need not be a product of primes for
    the size check).
    """
    from auth.pki import _accepted_public_key

    modulus = (1 << 9215) | 1
    big = rsa.RSAPublicNumbers(65537, modulus).public_key()

    class _Request:
        def public_key(self) -> rsa.RSAPublicKey:
            return big

    with pytest.raises(CertificateRequestError, match="RSA-9216") as refused:
        _accepted_public_key(_Request())  # type: ignore[arg-type]
    assert refused.value.reason == "weak_key"
