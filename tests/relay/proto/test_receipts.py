"""Grant and end receipts: canonical encoding, signing, verification (relay/proto/receipts.py)."""

from __future__ import annotations

import base64
import copy
import json
import pickle
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import NameOID
from hypothesis import given, settings, strategies as st

from auth import (
    DEVICE_URI_PREFIX,
    build_device_csr,
    create_ca,
    sign_device_csr,
)
from relay.proto.receipts import (
    END_DOMAIN,
    END_REASONS,
    GRANT_DOMAIN,
    MAX_PAYLOAD_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_WIRE_RECEIPT_CHARS,
    MAX_WIRE_SIGNATURE_CHARS,
    DevicePrivateKey,
    EndReceipt,
    GrantReceipt,
    Receipt,
    ReceiptError,
    SignedReceipt,
    decode,
    encode,
    sign_end,
    sign_grant,
    verify_end,
    verify_grant,
)

NOW: Final = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MAX_INT: Final = 2**53 - 1  # largest integer a receipt carries

DEVICE_ID: Final = "dev-0001"
OTHER_DEVICE_ID: Final = "dev-0002"
SESSION_ID: Final = "0123456789abcdef" * 2
OTHER_SESSION_ID: Final = "fedcba9876543210" * 2


def b64url(data: bytes) -> str:
    """Unpadded base64url text of *data*."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


NONCE: Final = b64url(bytes(range(32)))
OTHER_NONCE: Final = b64url(bytes(range(1, 33)))
OFFERED_CHANNELS: Final = ("shell", "tcp:22", "tcp:443")

GRANT: Final = GrantReceipt(
    session_id=SESSION_ID,
    device_id=DEVICE_ID,
    nonce=NONCE,
    engineer="alice",
    channels=("shell", "tcp:22"),
    max_seconds=1800,
    granted_at_ms=1_780_000_000_000,
    decided_by="touchscreen",
)
END: Final = EndReceipt(
    session_id=SESSION_ID,
    device_id=DEVICE_ID,
    nonce=NONCE,
    reason="onsite",
    ended_at_ms=1_780_000_600_000,
    bytes_to_device=1234,
    bytes_from_device=56789,
    streams_opened=2,
)


# Devices: real device certificates from our own CA (auth.pki)
# ============================================================

CA: Final = create_ca(common_name="Test device CA", now=NOW, lifetime=timedelta(days=1))


@dataclass(frozen=True)
class Device:
    """A device key and the certificate the CA issued for it."""

    key: DevicePrivateKey
    certificate: x509.Certificate


def enroll(key: DevicePrivateKey, device_id: str = DEVICE_ID) -> Device:
    """Enroll *key* as *device_id* the way a real device is: CSR, then CA signature."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        csr = build_device_csr(key, device_id)
    else:
        # build_device_csr takes EC keys only; an RSA device (an HSM that only
        # does RSA) builds the same request itself.
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
    signed = sign_device_csr(
        CA, csr, now=NOW, lifetime=timedelta(days=1), max_csr_bytes=16 * 1024
    )
    return Device(key=key, certificate=signed.certificate)


def certificate_for(
    public_key: CertificatePublicKeyTypes,
    signer: CertificateIssuerPrivateKeyTypes = CA.key,
) -> x509.Certificate:
    """A bare certificate for *public_key*, for key types the PKI never issues."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    return builder.sign(signer, hashes.SHA256())


P256: Final = enroll(ec.generate_private_key(ec.SECP256R1()))
P384: Final = enroll(ec.generate_private_key(ec.SECP384R1()))
P521: Final = enroll(ec.generate_private_key(ec.SECP521R1()))
RSA2048: Final = enroll(rsa.generate_private_key(public_exponent=65537, key_size=2048))
# Another enrolled device, and a second certificate for our id with another key.
OTHER_DEVICE: Final = enroll(
    ec.generate_private_key(ec.SECP256R1()), device_id=OTHER_DEVICE_ID
)
SAME_ID_OTHER_KEY: Final = enroll(ec.generate_private_key(ec.SECP256R1()))

DEVICES: Final = [
    pytest.param(P256, id="ec-p256"),
    pytest.param(P384, id="ec-p384"),
    pytest.param(P521, id="ec-p521"),
    pytest.param(RSA2048, id="rsa-2048"),
]

# Keys the receipts refuse: Ed25519 (not in the PKI's policy), RSA below 2048
# bits, a curve other than the three NIST ones.
ED25519_KEY: Final = ed25519.Ed25519PrivateKey.generate()
RSA1024_KEY: Final = rsa.generate_private_key(
    public_exponent=65537,
    key_size=1024,  # noqa: S505 - weak on purpose: receipts must refuse it
)
SECP256K1_KEY: Final = ec.generate_private_key(ec.SECP256K1())


def expected_grant(**changes: Any) -> dict[str, Any]:
    """The keyword arguments of verify_grant for the offer GRANT answers."""
    expected: dict[str, Any] = {
        "session_id": SESSION_ID,
        "device_id": DEVICE_ID,
        "nonce": NONCE,
        "engineer": "alice",
        "offered_channels": OFFERED_CHANNELS,
        "offered_max_seconds": 3600,
    }
    expected.update(changes)
    return expected


def expected_end(**changes: Any) -> dict[str, str]:
    """The keyword arguments of verify_end for the session END closes."""
    expected = {"session_id": SESSION_ID, "device_id": DEVICE_ID, "nonce": NONCE}
    expected.update(changes)
    return expected


def signed_raw(payload: bytes) -> SignedReceipt:
    """*payload*, whatever it is, with a valid signature of P256's key."""
    assert isinstance(P256.key, ec.EllipticCurvePrivateKey)
    signature = P256.key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return SignedReceipt(payload=payload, signature=signature)


def reason_of(excinfo: pytest.ExceptionInfo[ReceiptError]) -> str:
    """The reason code of a caught ReceiptError."""
    return excinfo.value.reason


def body_of(receipt: Receipt, **changes: Any) -> dict[str, Any]:
    """The JSON object of *receipt* with *changes* applied."""
    domain = GRANT_DOMAIN if isinstance(receipt, GrantReceipt) else END_DOMAIN
    body: dict[str, Any] = json.loads(encode(receipt)[len(domain) :])
    body.update(changes)
    return body


def canonical(domain: bytes, body: object) -> bytes:
    """*body* written the canonical way, after *domain*."""
    return domain + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# Canonical encoding
# ==================


def test_encode_grant_wire_format() -> None:
    """A grant payload is its prefix, then compact JSON with sorted keys."""
    assert encode(GRANT) == (
        b"relay-grant-receipt-v1\n"
        b'{"channels":["shell","tcp:22"],"decided_by":"touchscreen",'
        b'"device_id":"dev-0001","engineer":"alice","granted_at_ms":1780000000000,'
        b'"max_seconds":1800,"nonce":"' + NONCE.encode() + b'",'
        b'"session_id":"0123456789abcdef0123456789abcdef"}'
    )


def test_encode_end_wire_format() -> None:
    """An end payload is its own prefix, then compact JSON with sorted keys."""
    assert encode(END) == (
        b"relay-end-receipt-v1\n"
        b'{"bytes_from_device":56789,"bytes_to_device":1234,'
        b'"device_id":"dev-0001","ended_at_ms":1780000600000,"nonce":"'
        + NONCE.encode()
        + b'","reason":"onsite","session_id":"0123456789abcdef0123456789abcdef",'
        b'"streams_opened":2}'
    )


def test_domains() -> None:
    """The two domain prefixes, and neither is a prefix of the other."""
    assert GRANT_DOMAIN == b"relay-grant-receipt-v1\n"
    assert END_DOMAIN == b"relay-end-receipt-v1\n"
    assert not GRANT_DOMAIN.startswith(END_DOMAIN)
    assert not END_DOMAIN.startswith(GRANT_DOMAIN)


def test_encode_escapes_non_ascii() -> None:
    """Non-ASCII text is written as lowercase \\u escapes; the payload is ASCII."""
    receipt = replace(GRANT, decided_by="Gerät \u2028 😀")
    payload = encode(receipt)
    assert payload.isascii()
    assert b'"decided_by":"Ger\\u00e4t \\u2028 \\ud83d\\ude00"' in payload
    assert decode(payload) == receipt


@pytest.mark.parametrize(
    "receipt",
    [
        pytest.param(GRANT, id="grant"),
        pytest.param(END, id="end"),
        pytest.param(
            replace(
                GRANT,
                channels=("tcp:1",),
                max_seconds=1,
                granted_at_ms=0,
                decided_by="",
            ),
            id="grant-min",
        ),
        pytest.param(
            replace(
                GRANT,
                channels=("tcp:65535", "shell", *(f"tcp:{p}" for p in range(1, 7))),
                max_seconds=3600,
                granted_at_ms=MAX_INT,
                decided_by="é" * 64,
            ),
            id="grant-max",
        ),
        pytest.param(
            replace(
                END,
                ended_at_ms=0,
                bytes_to_device=0,
                bytes_from_device=0,
                streams_opened=0,
            ),
            id="end-zero",
        ),
        pytest.param(
            replace(
                END,
                ended_at_ms=MAX_INT,
                bytes_to_device=MAX_INT,
                bytes_from_device=MAX_INT,
                streams_opened=MAX_INT,
            ),
            id="end-max",
        ),
    ],
)
def test_decode_inverts_encode(receipt: Receipt) -> None:
    """decode(encode(r)) is r, of the same class."""
    decoded = decode(encode(receipt))
    assert decoded == receipt
    assert type(decoded) is type(receipt)


@pytest.mark.parametrize("reason", sorted(END_REASONS))
def test_every_end_reason_round_trips(reason: str) -> None:
    """Each end reason of the shared vocabulary is accepted."""
    receipt = replace(END, reason=reason)
    assert decode(encode(receipt)) == receipt


def test_end_reason_vocabulary() -> None:
    """The end reasons are exactly the shared vocabulary; "busy" is not one."""
    assert sorted(END_REASONS) == sorted(
        [
            "engineer",
            "onsite",
            "device_shutdown",
            "time_cap",
            "admin",
            "device_disconnect",
            "engineer_disconnect",
            "revoked",
            "policy_revoked",
            "login_ended",
            "broker_shutdown",
            "broker_crash",
            "audit_failure",
            "denied",
            "grant_timeout",
            "cancelled",
        ]
    )
    assert "busy" not in END_REASONS


def test_largest_receipt_fits_the_cap_with_room() -> None:
    """The largest valid receipt is far below the 4 KiB payload cap."""
    largest = GrantReceipt(
        session_id="f" * 32,
        device_id="d" * 64,
        nonce=NONCE,
        engineer="e" * 64,
        channels=tuple(f"tcp:{p}" for p in range(65528, 65536)),
        max_seconds=3600,
        granted_at_ms=MAX_INT,
        decided_by="\U0001f600" * 64,  # 12 bytes each as two \u escapes
    )
    assert len(encode(largest)) < MAX_PAYLOAD_BYTES // 2


# Construction: a receipt object is always valid (Rule 2)

BAD_GRANT_FIELDS: Final = [
    ("session_id", "0123456789ABCDEF" * 2),
    ("session_id", "0" * 31),
    ("session_id", "0" * 33),
    ("session_id", "g" * 32),
    ("session_id", "0" * 32 + "\n"),
    ("session_id", 0),
    ("device_id", ""),
    ("device_id", "-dev"),
    ("device_id", "d" * 65),
    ("device_id", "dev/1"),
    ("device_id", "gerät"),
    ("device_id", None),
    ("nonce", NONCE[:-1]),
    ("nonce", NONCE + "A"),
    ("nonce", NONCE[:-1] + "="),
    ("nonce", "+" + NONCE[1:]),
    ("nonce", NONCE[:-1] + "B"),  # non-zero unused bits: not a canonical spelling
    ("nonce", b64url(bytes(32)).encode()),
    ("engineer", ""),
    ("engineer", "Alice"),
    ("engineer", "a" * 65),
    ("engineer", "al ice"),
    ("engineer", ["alice"]),
    ("channels", ()),
    ("channels", ["shell"]),
    ("channels", "shell"),
    ("channels", tuple(f"tcp:{p}" for p in range(1, 10))),
    ("channels", ("shell", "shell")),
    ("channels", ("tcp:0",)),
    ("channels", ("tcp:65536",)),
    ("channels", ("tcp:99999",)),
    ("channels", ("tcp:022",)),
    ("channels", ("tcp:",)),
    ("channels", ("TCP:22",)),
    ("channels", ("udp:53",)),
    ("channels", ("shell ",)),
    ("channels", ("tcp:\uff12\uff12",)),  # fullwidth digits are not ASCII digits
    ("channels", (22,)),
    ("max_seconds", 0),
    ("max_seconds", 3601),
    ("max_seconds", -1),
    ("max_seconds", True),
    ("max_seconds", 60.0),
    ("max_seconds", "60"),
    ("granted_at_ms", -1),
    ("granted_at_ms", MAX_INT + 1),
    ("granted_at_ms", None),
    ("decided_by", "x" * 65),
    ("decided_by", "line\nbreak"),
    ("decided_by", "\x00"),
    ("decided_by", "\x7f"),
    ("decided_by", "\x85"),
    ("decided_by", "\ud800"),
    ("decided_by", None),
]


@pytest.mark.parametrize(
    ("name", "value"),
    [pytest.param(n, v, id=f"{n}-{i}") for i, (n, v) in enumerate(BAD_GRANT_FIELDS)],
)
def test_grant_refuses_bad_field(name: str, value: Any) -> None:
    """A grant receipt cannot be built with a bad field value."""
    with pytest.raises(ValueError, match=name):
        replace(GRANT, **{name: value})


BAD_END_FIELDS: Final = [
    ("session_id", "x"),
    ("device_id", ".dev"),
    ("nonce", ""),
    ("reason", "busy"),
    ("reason", "ONSITE"),
    ("reason", ""),
    ("reason", None),
    ("ended_at_ms", -1),
    ("ended_at_ms", MAX_INT + 1),
    ("bytes_to_device", -1),
    ("bytes_to_device", 2**64),
    ("bytes_from_device", False),
    ("bytes_from_device", 1.5),
    ("streams_opened", "2"),
]


@pytest.mark.parametrize(
    ("name", "value"),
    [pytest.param(n, v, id=f"{n}-{i}") for i, (n, v) in enumerate(BAD_END_FIELDS)],
)
def test_end_refuses_bad_field(name: str, value: Any) -> None:
    """An end receipt cannot be built with a bad field value."""
    with pytest.raises(ValueError, match=name):
        replace(END, **{name: value})


def test_bad_field_error_quotes_briefly() -> None:
    """The error for a bad value quotes at most 40 characters of it."""
    with pytest.raises(ValueError, match=r"decided_by: bad value .*\.\.\.") as excinfo:
        replace(GRANT, decided_by="x" * 10_000)
    assert len(str(excinfo.value)) < 100


# Decoding: strict, one byte form per receipt (Rule 1)


def grant_json(**changes: Any) -> bytes:
    """GRANT's body, canonically written, with *changes*."""
    return canonical(GRANT_DOMAIN, body_of(GRANT, **changes))


GRANT_BODY: Final = encode(GRANT)[len(GRANT_DOMAIN) :]
END_BODY: Final = encode(END)[len(END_DOMAIN) :]

NON_CANONICAL: Final = [
    # Prefixes.
    pytest.param(b"", id="empty"),
    pytest.param(GRANT_DOMAIN, id="prefix-only"),
    pytest.param(GRANT_BODY, id="no-prefix"),
    pytest.param(b"relay-grant-receipt-v2\n" + GRANT_BODY, id="prefix-v2"),
    pytest.param(b"relay-grant-receipt-v1" + GRANT_BODY, id="prefix-no-newline"),
    pytest.param(b"relay-grant-receipt-v1\r\n" + GRANT_BODY, id="prefix-crlf"),
    pytest.param(b"RELAY-GRANT-RECEIPT-V1\n" + GRANT_BODY, id="prefix-upper"),
    pytest.param(END_DOMAIN + GRANT_BODY, id="grant-body-end-prefix"),
    pytest.param(GRANT_DOMAIN + END_BODY, id="end-body-grant-prefix"),
    # Whitespace and layout.
    pytest.param(
        GRANT_DOMAIN + json.dumps(body_of(GRANT), sort_keys=True).encode(),
        id="spaces",
    ),
    pytest.param(
        GRANT_DOMAIN + json.dumps(body_of(GRANT), sort_keys=True, indent=1).encode(),
        id="indented",
    ),
    pytest.param(encode(GRANT) + b"\n", id="trailing-newline"),
    pytest.param(encode(GRANT) + b" ", id="trailing-space"),
    pytest.param(GRANT_DOMAIN + b" " + GRANT_BODY, id="leading-space"),
    pytest.param(encode(GRANT) + b"\x00", id="trailing-nul"),
    # Key order and repeated keys.
    pytest.param(
        GRANT_DOMAIN
        + json.dumps(asdict(GRANT), separators=(",", ":")).encode(),  # field order
        id="unsorted-keys",
    ),
    pytest.param(
        GRANT_DOMAIN
        + json.dumps(
            dict(sorted(body_of(GRANT).items(), reverse=True)), separators=(",", ":")
        ).encode(),
        id="reverse-sorted-keys",
    ),
    pytest.param(
        GRANT_DOMAIN + b'{"channels":["shell"],' + GRANT_BODY[1:],
        id="duplicate-key",
    ),
    # Spellings of the same text or number.
    pytest.param(
        encode(replace(GRANT, decided_by="é")).replace(b"\\u00e9", b"\\u00E9"),
        id="uppercase-escape",
    ),
    pytest.param(
        encode(replace(GRANT, decided_by="é")).replace(b"\\u00e9", "é".encode()),
        id="raw-utf8",
    ),
    pytest.param(
        encode(GRANT).replace(b'"alice"', b'"\\u0061lice"'), id="escaped-ascii"
    ),
    pytest.param(
        encode(replace(GRANT, decided_by="a/b")).replace(b"a/b", b"a\\/b"),
        id="escaped-slash",
    ),
    pytest.param(
        encode(GRANT).replace(b'"max_seconds":1800', b'"max_seconds":1800.0'),
        id="float-spelling",
    ),
    pytest.param(
        encode(GRANT).replace(b'"max_seconds":1800', b'"max_seconds":1.8e3'),
        id="exponent-spelling",
    ),
    pytest.param(
        encode(GRANT).replace(b'"max_seconds":1800', b'"max_seconds":01800'),
        id="leading-zero",
    ),
    pytest.param(
        encode(END).replace(b'"streams_opened":2', b'"streams_opened":-0'),
        id="minus-zero",
    ),
    pytest.param(
        encode(replace(END, streams_opened=0)).replace(
            b'"streams_opened":0', b'"streams_opened":-0'
        ),
        id="minus-zero-for-zero",
    ),
]


@pytest.mark.parametrize("payload", NON_CANONICAL)
def test_decode_refuses_non_canonical_bytes(payload: bytes) -> None:
    """Anything but the one canonical byte form is malformed, even if it means the same."""
    with pytest.raises(ReceiptError) as excinfo:
        decode(payload)
    assert reason_of(excinfo) == "malformed"


MALFORMED: Final = [
    pytest.param(GRANT_DOMAIN + b"not json", id="not-json"),
    pytest.param(encode(GRANT)[:-1], id="truncated"),
    pytest.param(GRANT_DOMAIN + GRANT_BODY + GRANT_BODY, id="two-objects"),
    pytest.param(GRANT_DOMAIN + b"[]", id="array"),
    pytest.param(GRANT_DOMAIN + b"null", id="null"),
    pytest.param(GRANT_DOMAIN + b'"grant"', id="string"),
    pytest.param(GRANT_DOMAIN + b"{}", id="empty-object"),
    pytest.param(GRANT_DOMAIN + b"[" * 4000, id="deep-nesting"),
    pytest.param(GRANT_DOMAIN + b'{"a":' * 800, id="deep-objects"),
    pytest.param(GRANT_DOMAIN + b"\xff\xfe", id="not-ascii"),
    pytest.param(grant_json(extra=1), id="extra-field"),
    pytest.param(grant_json(**{"x" * 1000: 1}), id="long-extra-field"),
    pytest.param(
        canonical(
            GRANT_DOMAIN,
            {k: v for k, v in body_of(GRANT).items() if k != "nonce"},
        ),
        id="missing-field",
    ),
    pytest.param(
        canonical(
            END_DOMAIN,
            {k: v for k, v in body_of(END).items() if k != "streams_opened"},
        ),
        id="end-missing-field",
    ),
    pytest.param(grant_json(channels="shell"), id="channels-string"),
    pytest.param(grant_json(channels=[]), id="channels-empty"),
    pytest.param(grant_json(channels=["shell", "shell"]), id="channels-duplicate"),
    pytest.param(grant_json(channels=[["shell"]]), id="channels-nested"),
    pytest.param(grant_json(channels={"shell": 1}), id="channels-object"),
    pytest.param(grant_json(max_seconds="1800"), id="str-for-int"),
    pytest.param(grant_json(max_seconds=True), id="bool-for-int"),
    pytest.param(grant_json(max_seconds=None), id="null-for-int"),
    pytest.param(grant_json(max_seconds=3601), id="cap-over-3600"),
    pytest.param(grant_json(granted_at_ms=2**53), id="int-2**53"),
    pytest.param(grant_json(granted_at_ms=2**64), id="int-2**64"),
    pytest.param(grant_json(granted_at_ms=1.5), id="float"),
    pytest.param(
        encode(GRANT).replace(b'"granted_at_ms":1780000000000', b'"granted_at_ms":NaN'),
        id="nan",
    ),
    pytest.param(
        encode(GRANT).replace(
            b'"granted_at_ms":1780000000000', b'"granted_at_ms":Infinity'
        ),
        id="infinity",
    ),
    pytest.param(grant_json(session_id=SESSION_ID.upper()), id="session-upper"),
    pytest.param(grant_json(engineer="Alice"), id="engineer-upper"),
    pytest.param(grant_json(decided_by="\ud800"), id="lone-surrogate"),
    pytest.param(grant_json(decided_by="a\nb"), id="control-char"),
    pytest.param(
        canonical(END_DOMAIN, body_of(END, reason="busy")), id="end-reason-busy"
    ),
    pytest.param(
        canonical(END_DOMAIN, body_of(END, bytes_to_device=-1)), id="end-negative"
    ),
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_decode_refuses_malformed(payload: bytes) -> None:
    """Not JSON, not an object, wrong field set or a bad value: malformed."""
    with pytest.raises(ReceiptError) as excinfo:
        decode(payload)
    assert reason_of(excinfo) == "malformed"


def test_decode_error_quotes_peer_data_briefly() -> None:
    """A refused payload's message quotes at most a few dozen characters of it."""
    with pytest.raises(ReceiptError) as excinfo:
        decode(grant_json(**{"y" * 10_000: 1}))
    assert len(str(excinfo.value)) < 300


def test_decode_refuses_oversized_payload() -> None:
    """More than 4 KiB is too_large before anything is parsed."""
    payload = encode(GRANT) + b" " * (MAX_PAYLOAD_BYTES + 1 - len(encode(GRANT)))
    assert len(payload) == MAX_PAYLOAD_BYTES + 1
    with pytest.raises(ReceiptError) as excinfo:
        decode(payload)
    assert reason_of(excinfo) == "too_large"


def test_decode_payload_of_exactly_max_size_is_not_too_large() -> None:
    """Exactly 4 KiB is within the cap (and here merely malformed)."""
    payload = encode(GRANT) + b" " * (MAX_PAYLOAD_BYTES - len(encode(GRANT)))
    with pytest.raises(ReceiptError) as excinfo:
        decode(payload)
    assert reason_of(excinfo) == "malformed"


def test_size_caps() -> None:
    """Payloads up to 4 KiB, signatures up to 1 KiB; the wire caps match."""
    assert MAX_PAYLOAD_BYTES == 4096
    assert MAX_SIGNATURE_BYTES == 1024
    assert MAX_WIRE_RECEIPT_CHARS == len(b64url(bytes(MAX_PAYLOAD_BYTES))) == 5462
    assert MAX_WIRE_SIGNATURE_CHARS == len(b64url(bytes(MAX_SIGNATURE_BYTES))) == 1366


# Signing and verification
# ========================


@pytest.mark.parametrize("device", DEVICES)
def test_grant_sign_verify_round_trip(device: Device) -> None:
    """A grant signed with the device key verifies against its certificate."""
    signed = sign_grant(device.key, GRANT)
    assert signed.payload == encode(GRANT)
    assert len(signed.signature) <= MAX_SIGNATURE_BYTES
    assert verify_grant(device.certificate, signed, **expected_grant()) == GRANT


@pytest.mark.parametrize("device", DEVICES)
def test_end_sign_verify_round_trip(device: Device) -> None:
    """An end receipt signed with the device key verifies against its certificate."""
    signed = sign_end(device.key, END)
    assert signed.payload == encode(END)
    assert verify_end(device.certificate, signed, **expected_end()) == END


@pytest.mark.parametrize("device", DEVICES)
def test_signature_travels_through_the_wire_form(device: Device) -> None:
    """to_wire, then from_wire, then verify: the control channel's path."""
    receipt, signature = sign_grant(device.key, GRANT).to_wire()
    signed = SignedReceipt.from_wire(receipt, signature)
    assert verify_grant(device.certificate, signed, **expected_grant()) == GRANT


@pytest.mark.parametrize(
    ("device", "algorithm"),
    [
        pytest.param(P256, hashes.SHA256(), id="p256-sha256"),
        pytest.param(P384, hashes.SHA384(), id="p384-sha384"),
        pytest.param(P521, hashes.SHA512(), id="p521-sha512"),
    ],
)
def test_ecdsa_hash_matches_the_curve(
    device: Device, algorithm: hashes.HashAlgorithm
) -> None:
    """ECDSA signatures use SHA-256, -384 and -512 for P-256, P-384 and P-521."""
    signed = sign_grant(device.key, GRANT)
    public_key = device.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signed.signature, signed.payload, ec.ECDSA(algorithm))


def test_rsa_uses_pss_sha256_with_32_byte_salt() -> None:
    """RSA signatures are PSS, MGF1-SHA-256, SHA-256, salt of 32 bytes."""
    signed = sign_grant(RSA2048.key, GRANT)
    public_key = RSA2048.certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(
        signed.signature,
        signed.payload,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )


def test_p384_signature_with_sha256_is_refused() -> None:
    """A P-384 signature over SHA-256 (not the curve's hash) does not verify."""
    assert isinstance(P384.key, ec.EllipticCurvePrivateKey)
    payload = encode(GRANT)
    signed = SignedReceipt(
        payload=payload, signature=P384.key.sign(payload, ec.ECDSA(hashes.SHA256()))
    )
    with pytest.raises(ReceiptError) as excinfo:
        verify_grant(P384.certificate, signed, **expected_grant())
    assert reason_of(excinfo) == "bad_signature"


@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param(
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=0),
            id="pss-salt-0",
        ),
        pytest.param(
            padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH
            ),
            id="pss-salt-max",
        ),
        pytest.param(padding.PKCS1v15(), id="pkcs1v15"),
    ],
)
def test_rsa_signature_in_another_scheme_is_refused(
    scheme: padding.AsymmetricPadding,
) -> None:
    """Only PSS with a 32-byte salt is accepted: PKCS#1 v1.5 and other salts are not."""
    assert isinstance(RSA2048.key, rsa.RSAPrivateKey)
    payload = encode(GRANT)
    signed = SignedReceipt(
        payload=payload, signature=RSA2048.key.sign(payload, scheme, hashes.SHA256())
    )
    with pytest.raises(ReceiptError) as excinfo:
        verify_grant(RSA2048.certificate, signed, **expected_grant())
    assert reason_of(excinfo) == "bad_signature"


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(ED25519_KEY, id="ed25519"),
        pytest.param(RSA1024_KEY, id="rsa-1024"),
        pytest.param(SECP256K1_KEY, id="secp256k1"),
        pytest.param(x25519.X25519PrivateKey.generate(), id="x25519"),
    ],
)
def test_sign_refuses_unsupported_key(key: object) -> None:
    """Signing with a key the receipts do not accept is the caller's ValueError."""
    with pytest.raises(ValueError, match="unsupported device key"):
        sign_grant(key, GRANT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported device key"):
        sign_end(key, END)  # type: ignore[arg-type]


# E3: forged, replayed and mismatched receipts.


def flip_bit(data: bytes, index: int) -> bytes:
    """*data* with the lowest bit of byte *index* flipped."""
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def refusal(
    certificate: x509.Certificate, signed: SignedReceipt, **changes: Any
) -> str:
    """The reason verify_grant refuses *signed* with, for the (changed) offer."""
    with pytest.raises(ReceiptError) as excinfo:
        verify_grant(certificate, signed, **expected_grant(**changes))
    return reason_of(excinfo)


def end_refusal(
    certificate: x509.Certificate, signed: SignedReceipt, **changes: Any
) -> str:
    """The reason verify_end refuses *signed* with."""
    with pytest.raises(ReceiptError) as excinfo:
        verify_end(certificate, signed, **expected_end(**changes))
    return reason_of(excinfo)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_payload_bit_flip_is_bad_signature(device: Device, where: str) -> None:
    """One flipped bit anywhere in the payload breaks the signature."""
    signed = sign_grant(device.key, GRANT)
    index = {"first": 0, "middle": len(signed.payload) // 2, "last": -1}[where]
    index %= len(signed.payload)
    altered = SignedReceipt(
        payload=flip_bit(signed.payload, index), signature=signed.signature
    )
    assert refusal(device.certificate, altered) == "bad_signature"


@pytest.mark.parametrize("device", DEVICES)
def test_signature_bit_flip_is_bad_signature(device: Device) -> None:
    """A flipped bit in the signature is a forgery."""
    signed = sign_grant(device.key, GRANT)
    forged = replace(
        signed, signature=flip_bit(signed.signature, len(signed.signature) // 2)
    )
    assert refusal(device.certificate, forged) == "bad_signature"


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00" * 64, id="zeros"),
        pytest.param(b"0\x06\x02\x01\x01\x02\x01\x01", id="der-r1-s1"),
        pytest.param(bytes(MAX_SIGNATURE_BYTES), id="max-size-zeros"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_made_up_signature_is_bad_signature(device: Device, signature: bytes) -> None:
    """Empty, zero or made-up signatures are forgeries."""
    signed = SignedReceipt(payload=encode(GRANT), signature=signature)
    assert refusal(device.certificate, signed) == "bad_signature"


def test_another_devices_key_is_bad_signature() -> None:
    """A receipt naming our device but signed by another device's key is refused."""
    signed = sign_grant(OTHER_DEVICE.key, GRANT)
    assert refusal(P256.certificate, signed) == "bad_signature"


def test_another_key_for_the_same_id_is_bad_signature() -> None:
    """Only the key of the authenticated certificate counts, not any key of the id."""
    signed = sign_grant(SAME_ID_OTHER_KEY.key, GRANT)
    assert refusal(P256.certificate, signed) == "bad_signature"


def test_ca_key_signature_is_bad_signature() -> None:
    """Not even the CA can sign a grant for a device."""
    signed = sign_grant(CA.key, GRANT)
    assert refusal(P256.certificate, signed) == "bad_signature"


def test_receipt_for_another_device_is_wrong_device() -> None:
    """A device signing a grant in another device's name is refused (wrong_device)."""
    signed = sign_grant(P256.key, replace(GRANT, device_id=OTHER_DEVICE_ID))
    assert refusal(P256.certificate, signed) == "wrong_device"


def test_replayed_grant_for_another_session_is_wrong_session() -> None:
    """An old valid grant presented for another session is refused."""
    signed = sign_grant(P256.key, GRANT)
    assert refusal(P256.certificate, signed, session_id=OTHER_SESSION_ID) == (
        "wrong_session"
    )


def test_replayed_grant_for_another_offer_is_wrong_nonce() -> None:
    """An old valid grant for the same session id but another offer is refused."""
    signed = sign_grant(P256.key, GRANT)
    assert refusal(P256.certificate, signed, nonce=OTHER_NONCE) == "wrong_nonce"


def test_grant_for_another_engineer_is_wrong_engineer() -> None:
    """A grant that names someone else than the offer's engineer is refused."""
    signed = sign_grant(P256.key, GRANT)
    assert refusal(P256.certificate, signed, engineer="mallory") == "wrong_engineer"


def test_binding_checks_run_in_documented_order() -> None:
    """Session, then device, then nonce, then engineer, channels, cap."""
    signed = sign_grant(P256.key, GRANT)
    everything_wrong = {
        "session_id": OTHER_SESSION_ID,
        "device_id": OTHER_DEVICE_ID,
        "nonce": OTHER_NONCE,
        "engineer": "mallory",
        "offered_channels": ("tcp:80",),
        "offered_max_seconds": 60,
    }
    order = [
        "wrong_session",
        "wrong_device",
        "wrong_nonce",
        "wrong_engineer",
        "channels_not_offered",
        "cap_exceeded",
    ]
    for name, reason in zip(list(everything_wrong), order, strict=True):
        assert refusal(P256.certificate, signed, **everything_wrong) == reason
        del everything_wrong[name]
    assert verify_grant(P256.certificate, signed, **expected_grant()) == GRANT


def test_forged_signature_is_reported_before_any_binding() -> None:
    """An unverified payload is not interpreted: a forgery for another session is bad_signature (Rule 3)."""
    forged = SignedReceipt(payload=encode(GRANT), signature=b"forged")
    assert refusal(P256.certificate, forged, session_id=OTHER_SESSION_ID) == (
        "bad_signature"
    )


@pytest.mark.parametrize(
    ("granted", "offered"),
    [
        pytest.param(("tcp:80",), ("shell", "tcp:22"), id="never-offered"),
        pytest.param(("shell", "tcp:22"), ("shell",), id="extra"),
        pytest.param(("tcp:22", "shell"), ("shell", "tcp:22"), id="reordered"),
        pytest.param(
            ("tcp:443", "tcp:22"), ("shell", "tcp:22", "tcp:443"), id="reordered-subset"
        ),
        pytest.param(("shell",), (), id="nothing-offered"),
    ],
)
def test_channels_not_offered(
    granted: tuple[str, ...], offered: tuple[str, ...]
) -> None:
    """Granted channels must be offered ones, in the offer's order."""
    signed = sign_grant(P256.key, replace(GRANT, channels=granted))
    assert refusal(P256.certificate, signed, offered_channels=offered) == (
        "channels_not_offered"
    )


@pytest.mark.parametrize(
    ("granted", "offered"),
    [
        pytest.param(("shell", "tcp:22"), ("shell", "tcp:22"), id="all"),
        pytest.param(("tcp:22",), ("shell", "tcp:22", "tcp:443"), id="one"),
        pytest.param(("shell", "tcp:443"), ("shell", "tcp:22", "tcp:443"), id="gap"),
        pytest.param(("tcp:443",), ["shell", "tcp:443"], id="offered-as-list"),
    ],
)
def test_granted_subset_in_offer_order_is_accepted(
    granted: tuple[str, ...], offered: tuple[str, ...]
) -> None:
    """The person may grant fewer channels than offered; the grant's list counts."""
    receipt = replace(GRANT, channels=granted)
    signed = sign_grant(P256.key, receipt)
    assert (
        verify_grant(
            P256.certificate, signed, **expected_grant(offered_channels=offered)
        )
        == receipt
    )


@pytest.mark.parametrize(
    ("granted", "offered", "accepted"),
    [
        pytest.param(3600, 1800, False, id="above"),
        pytest.param(1801, 1800, False, id="one-above"),
        pytest.param(1800, 1800, True, id="equal"),
        pytest.param(60, 3600, True, id="lower"),
    ],
)
def test_cap_above_the_offer_is_refused(
    granted: int, offered: int, accepted: bool
) -> None:
    """The person may shorten the session, never lengthen it."""
    receipt = replace(GRANT, max_seconds=granted)
    signed = sign_grant(P256.key, receipt)
    if accepted:
        assert (
            verify_grant(
                P256.certificate, signed, **expected_grant(offered_max_seconds=offered)
            )
            == receipt
        )
    else:
        assert refusal(P256.certificate, signed, offered_max_seconds=offered) == (
            "cap_exceeded"
        )


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            GRANT_DOMAIN + json.dumps(body_of(GRANT), sort_keys=True).encode(),
            id="extra-whitespace",
        ),
        pytest.param(
            GRANT_DOMAIN + json.dumps(asdict(GRANT), separators=(",", ":")).encode(),
            id="reordered-keys",
        ),
        pytest.param(grant_json(extra="x"), id="extra-field"),
        pytest.param(GRANT_BODY, id="no-domain"),
        pytest.param(END_DOMAIN + GRANT_BODY, id="end-domain"),
    ],
)
def test_signed_non_canonical_payload_is_malformed(payload: bytes) -> None:
    """A correctly signed payload that is not canonical is still refused."""
    assert refusal(P256.certificate, signed_raw(payload)) == "malformed"


def test_end_receipt_is_not_a_grant() -> None:
    """A valid end receipt presented as a grant is malformed (domain separation)."""
    assert refusal(P256.certificate, sign_end(P256.key, END)) == "malformed"


def test_grant_is_not_an_end_receipt() -> None:
    """A valid grant presented as an end receipt is malformed."""
    assert end_refusal(P256.certificate, sign_grant(P256.key, GRANT)) == "malformed"


def test_oversized_payload_is_too_large_even_if_signed() -> None:
    """A payload over 4 KiB is refused before its signature is checked."""
    payload = encode(GRANT) + b" " * MAX_PAYLOAD_BYTES
    assert refusal(P256.certificate, signed_raw(payload)) == "too_large"
    forged = SignedReceipt(payload=payload, signature=b"x")
    assert refusal(P256.certificate, forged) == "too_large"
    assert end_refusal(P256.certificate, forged) == "too_large"


def test_oversized_signature_is_too_large() -> None:
    """A signature over 1 KiB is refused before any verification."""
    signed = sign_grant(P256.key, GRANT)
    padded = replace(signed, signature=signed.signature + bytes(MAX_SIGNATURE_BYTES))
    assert refusal(P256.certificate, padded) == "too_large"


@pytest.mark.parametrize(
    "certificate",
    [
        pytest.param(certificate_for(ED25519_KEY.public_key()), id="ed25519"),
        pytest.param(
            certificate_for(RSA1024_KEY.public_key(), RSA1024_KEY), id="rsa-1024"
        ),
        pytest.param(
            certificate_for(SECP256K1_KEY.public_key(), SECP256K1_KEY), id="secp256k1"
        ),
        pytest.param(
            certificate_for(x25519.X25519PrivateKey.generate().public_key()),
            id="x25519",
        ),
    ],
)
def test_certificate_with_unsupported_key_is_refused(
    certificate: x509.Certificate,
) -> None:
    """A certificate whose key the receipts do not accept: unsupported_key."""
    signed = sign_grant(P256.key, GRANT)
    assert refusal(certificate, signed) == "unsupported_key"
    assert end_refusal(certificate, sign_end(P256.key, END)) == "unsupported_key"


# End receipts


def test_replayed_end_receipt_is_refused() -> None:
    """An end receipt of another session or offer, or from another device, is refused."""
    signed = sign_end(P256.key, END)
    assert end_refusal(P256.certificate, signed, session_id=OTHER_SESSION_ID) == (
        "wrong_session"
    )
    assert end_refusal(P256.certificate, signed, device_id=OTHER_DEVICE_ID) == (
        "wrong_device"
    )
    assert end_refusal(P256.certificate, signed, nonce=OTHER_NONCE) == "wrong_nonce"
    assert end_refusal(OTHER_DEVICE.certificate, signed) == "bad_signature"


def test_end_receipt_payload_bit_flip_is_bad_signature() -> None:
    """Changing the byte counts after signing breaks the signature."""
    signed = sign_end(P256.key, END)
    altered = replace(
        signed,
        payload=signed.payload.replace(
            b'"bytes_to_device":1234', b'"bytes_to_device":1235'
        ),
    )
    assert end_refusal(P256.certificate, altered) == "bad_signature"


# The wire form
# =============


def test_to_wire_is_unpadded_base64url() -> None:
    """Both fields are unpadded base64url of the bytes."""
    signed = SignedReceipt(payload=b"\xfb\xff", signature=b"\xfe")
    assert signed.to_wire() == ("-_8", "_g")


@pytest.mark.parametrize(
    ("receipt", "signature"),
    [
        pytest.param("AQ==", "AQ", id="padding"),
        pytest.param("AQ=", "AQ", id="partial-padding"),
        pytest.param("AQ", "AQ==", id="signature-padding"),
        pytest.param("+_8", "AQ", id="plus"),
        pytest.param("-/8", "AQ", id="slash"),
        pytest.param("AQ ", "AQ", id="space"),
        pytest.param("A Q", "AQ", id="inner-space"),
        pytest.param("AQ\n", "AQ", id="newline"),
        pytest.param("AQé", "AQ", id="non-ascii"),
        pytest.param("A", "AQ", id="length-1-mod-4"),
        pytest.param("AQIDB", "AQ", id="length-5"),
        pytest.param("AR", "AQ", id="unused-bits-set-2"),
        pytest.param("AQJ", "AQ", id="unused-bits-set-3"),
        pytest.param("AQ", "A*", id="signature-bad-char"),
    ],
)
def test_from_wire_refuses_bad_base64url(receipt: str, signature: str) -> None:
    """Only canonical unpadded base64url is accepted: anything else is malformed."""
    with pytest.raises(ReceiptError) as excinfo:
        SignedReceipt.from_wire(receipt, signature)
    assert reason_of(excinfo) == "malformed"


@pytest.mark.parametrize(
    ("text", "data"),
    [
        pytest.param("AQ", b"\x01", id="tail-2"),
        pytest.param("AQI", b"\x01\x02", id="tail-3"),
        pytest.param("AQID", b"\x01\x02\x03", id="whole-group"),
        pytest.param("-_8", b"\xfb\xff", id="url-alphabet"),
    ],
)
def test_from_wire_accepts_canonical_text(text: str, data: bytes) -> None:
    """Canonical unpadded base64url of every length class decodes."""
    assert SignedReceipt.from_wire(text, text) == SignedReceipt(
        payload=data, signature=data
    )


def test_from_wire_accepts_empty_fields() -> None:
    """Empty text is empty bytes; verification refuses it later."""
    signed = SignedReceipt.from_wire("", "")
    assert signed == SignedReceipt(payload=b"", signature=b"")
    assert refusal(P256.certificate, signed) == "bad_signature"


def test_from_wire_length_caps() -> None:
    """Text up to the caps is accepted; one character more is too_large."""
    signed = SignedReceipt.from_wire(
        "A" * MAX_WIRE_RECEIPT_CHARS, "A" * MAX_WIRE_SIGNATURE_CHARS
    )
    assert len(signed.payload) == MAX_PAYLOAD_BYTES
    assert len(signed.signature) == MAX_SIGNATURE_BYTES
    for receipt, signature in [
        ("A" * (MAX_WIRE_RECEIPT_CHARS + 2), "AA"),
        ("AA", "A" * (MAX_WIRE_SIGNATURE_CHARS + 2)),
        ("A" * 1_000_000, "AA"),
    ]:
        with pytest.raises(ReceiptError) as excinfo:
            SignedReceipt.from_wire(receipt, signature)
        assert reason_of(excinfo) == "too_large"


# ReceiptError


def test_receipt_error_pickles_and_copies() -> None:
    """A ReceiptError keeps its reason across pickle and copy (other processes, logs)."""
    error = ReceiptError("wrong_nonce", "receipt carries another offer's nonce")
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):  # noqa: S301 - our own bytes
        assert isinstance(clone, ReceiptError)
        assert clone.reason == "wrong_nonce"
        assert str(clone) == str(error)
    assert repr(error) == (
        "ReceiptError('wrong_nonce', \"receipt carries another offer's nonce\")"
    )


# Properties
# ==========

HEX: Final = "0123456789abcdef"
SESSION_IDS: Final = st.text(HEX, min_size=32, max_size=32)
DEVICE_IDS: Final = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
USERNAMES: Final = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
NONCES: Final = st.binary(min_size=32, max_size=32).map(b64url)
CHANNELS: Final = st.just("shell") | st.integers(1, 65535).map(lambda p: f"tcp:{p}")
LABELS: Final = st.text(st.characters(exclude_categories=["Cc", "Cs"]), max_size=64)
COUNTS: Final = st.integers(0, MAX_INT)

GRANTS: Final = st.builds(
    GrantReceipt,
    session_id=SESSION_IDS,
    device_id=DEVICE_IDS,
    nonce=NONCES,
    engineer=USERNAMES,
    channels=st.lists(CHANNELS, min_size=1, max_size=8, unique=True).map(tuple),
    max_seconds=st.integers(1, 3600),
    granted_at_ms=COUNTS,
    decided_by=LABELS,
)
ENDS: Final = st.builds(
    EndReceipt,
    session_id=SESSION_IDS,
    device_id=DEVICE_IDS,
    nonce=NONCES,
    reason=st.sampled_from(sorted(END_REASONS)),
    ended_at_ms=COUNTS,
    bytes_to_device=COUNTS,
    bytes_from_device=COUNTS,
    streams_opened=COUNTS,
)
RECEIPTS: Final = GRANTS | ENDS

ANY_CHAR: Final = st.characters()
JSON_SCALARS: Final = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(ANY_CHAR, max_size=70)
)
JSON_VALUES: Final[st.SearchStrategy[object]] = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(ANY_CHAR, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(RECEIPTS)
def test_decode_encode_round_trip(receipt: Receipt) -> None:
    """decode(encode(r)) == r for every valid receipt; the payload is ASCII and small."""
    payload = encode(receipt)
    assert payload.isascii()
    assert len(payload) <= MAX_PAYLOAD_BYTES
    assert decode(payload) == receipt


@st.composite
def receipt_like_payloads(draw: st.DrawFn) -> bytes:
    """Canonically written bodies of valid receipts with a few fields replaced."""
    receipt = draw(RECEIPTS)
    domain = draw(st.sampled_from([GRANT_DOMAIN, END_DOMAIN]))
    body = body_of(receipt)
    for key in draw(st.lists(st.sampled_from(sorted(body)) | st.text(max_size=4))):
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(JSON_VALUES)
    return canonical(domain, body)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid payload with a random slice replaced by random bytes."""
    data = encode(draw(RECEIPTS))
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, len(data)))
    return data[:start] + draw(st.binary(max_size=8)) + data[end:]


@given(
    st.binary(max_size=512)
    | st.binary(max_size=256).map(lambda b: GRANT_DOMAIN + b)
    | st.binary(max_size=256).map(lambda b: END_DOMAIN + b)
    | mutated_payloads()
    | receipt_like_payloads()
)
def test_decode_arbitrary_bytes_returns_receipt_or_raises_receipt_error(
    payload: bytes,
) -> None:
    """decode() of any bytes returns a receipt or raises ReceiptError, nothing else.

    An accepted payload is exactly the canonical encoding of what it decoded to.
    """
    try:
        receipt = decode(payload)
    except ReceiptError as exc:
        reason = exc.reason
    else:
        assert encode(receipt) == payload
        return
    assert reason in ("malformed", "too_large")


@given(st.text(max_size=64), st.text(max_size=64))
def test_from_wire_arbitrary_text_returns_or_raises_receipt_error(
    receipt: str, signature: str
) -> None:
    """from_wire() of any text gives bytes that re-encode to it, or ReceiptError."""
    try:
        signed = SignedReceipt.from_wire(receipt, signature)
    except ReceiptError as exc:
        reason = exc.reason
    else:
        assert signed.to_wire() == (receipt, signature)
        return
    assert reason == "malformed"


@given(st.binary(max_size=MAX_PAYLOAD_BYTES), st.binary(max_size=MAX_SIGNATURE_BYTES))
def test_wire_form_round_trip(payload: bytes, signature: bytes) -> None:
    """from_wire(*to_wire(s)) == s for any bytes within the caps."""
    signed = SignedReceipt(payload=payload, signature=signature)
    assert SignedReceipt.from_wire(*signed.to_wire()) == signed


@settings(max_examples=25)
@given(GRANTS)
def test_any_grant_signs_and_verifies(receipt: GrantReceipt) -> None:
    """Every valid grant verifies against the offer it answers, and only that one."""
    signed = sign_grant(P256.key, receipt)
    assert (
        verify_grant(
            P256.certificate,
            signed,
            session_id=receipt.session_id,
            device_id=receipt.device_id,
            nonce=receipt.nonce,
            engineer=receipt.engineer,
            offered_channels=receipt.channels,
            offered_max_seconds=receipt.max_seconds,
        )
        == receipt
    )
    with pytest.raises(ReceiptError):
        verify_grant(
            P256.certificate,
            signed,
            session_id=receipt.session_id,
            device_id=receipt.device_id,
            nonce=NONCE if receipt.nonce != NONCE else OTHER_NONCE,
            engineer=receipt.engineer,
            offered_channels=receipt.channels,
            offered_max_seconds=receipt.max_seconds,
        )


@settings(max_examples=25)
@given(ENDS)
def test_any_end_receipt_signs_and_verifies(receipt: EndReceipt) -> None:
    """Every valid end receipt verifies against its session."""
    signed = sign_end(P256.key, receipt)
    assert (
        verify_end(
            P256.certificate,
            signed,
            session_id=receipt.session_id,
            device_id=receipt.device_id,
            nonce=receipt.nonce,
        )
        == receipt
    )


def test_end_receipt_with_a_non_string_reason_is_malformed_not_a_crash() -> None:
    """A reason that is not even a string (an object, from a decoded payload) is
    refused like any bad field (found by hypothesis: {} is not hashable)."""
    with pytest.raises(ValueError, match="reason"):
        EndReceipt(
            session_id="0" * 32,
            device_id="0",
            nonce="A" * 43,
            reason={},  # type: ignore[arg-type]
            ended_at_ms=0,
            bytes_to_device=0,
            bytes_from_device=0,
            streams_opened=0,
        )
