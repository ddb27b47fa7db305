"""Grant and end receipts: what the device signs, and how the broker checks it.

Theory of operation
===================
When the person at the instrument allows a session, the agent signs a
:class:`GrantReceipt` with the device's private key (the key of its client
certificate); when a granted session ends, it signs an :class:`EndReceipt` with
the byte counts it saw. The broker checks each one against the certificate it
authenticated on the control channel before it acts on it: no session byte
flows before a grant verifies (Invariant 1), and the end receipt is what the
audit log reconciles against.

A receipt travels as a :class:`SignedReceipt`: the canonical payload bytes and a
signature over exactly those bytes. On the control channel both are unpadded
base64url text (:meth:`SignedReceipt.to_wire`, :meth:`SignedReceipt.from_wire`).

Canonical encoding
------------------
``payload = DOMAIN + JSON``, where *DOMAIN* is ``b"relay-grant-receipt-v1\\n"``
or ``b"relay-end-receipt-v1\\n"`` (so a grant can never be read as an end receipt,
nor either as anything else the device key signs), and *JSON* is one object
holding every field of the receipt and nothing else, with keys sorted, no
whitespace (``,`` and ``:`` separators), ASCII only (other characters as
lowercase ``\\uXXXX`` escapes, as :func:`json.dumps` writes them), integers in
0..2**53-1 written in plain decimal, no floats, ``channels`` as an array of
strings. Example (the prefix ends in a newline; the JSON is one line, wrapped
here)::

    relay-grant-receipt-v1
    {"channels":["shell","tcp:22"],"decided_by":"touchscreen","device_id":"dev-1",
    "engineer":"alice","granted_at_ms":1700000000000,"max_seconds":3600,
    "nonce":"<43 chars>","session_id":"<32 hex>"}

Signatures: ECDSA (DER-encoded) with the hash that matches the curve: SHA-256
for P-256, SHA-384 for P-384, SHA-512 for P-521; RSA (2048 to 8192 bits) with
PSS, MGF1-SHA-256, SHA-256 and a 32-byte salt. These are the device keys that
``auth.pki`` accepts in a CSR (RSA above 8192 bits would not fit the signature
cap). Signatures are not unique (ECDSA is randomised, and (r, s) and (r, n - s)
both verify), so nothing may use signature bytes as an identifier; the payload
identifies a receipt.

Rule 1: one receipt has exactly one byte form. :func:`decode` re-encodes what it
parsed and refuses the payload unless the bytes are identical, so whitespace, key
order, duplicate keys, escapes and number spellings cannot vary, and the bytes the
signature covers are the bytes that are interpreted.
Rule 2: a receipt object is always valid: the dataclasses check every field when
they are built, so :func:`encode` never makes a payload :func:`decode` refuses.
Rule 3: checks run cheapest first, and nothing in a payload is interpreted before
its signature verifies: size caps, key policy, signature, decoding, then the
binding to the offer (session, device, nonce, engineer, channels, cap).
Rule 4: every refusal raises :class:`ReceiptError` with a stable ``reason`` code
for metrics and audit; nothing returns a bool for a security decision.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from relay.proto.session import (
    DEVICE_ID_FORM,
    SESSION_ID_FORM,
    USERNAME_FORM,
    EndReason,
    parse_channel,
)

if TYPE_CHECKING:
    # Only the type is needed. Importing cryptography.x509 at run time would pull
    # in email.utils and with it socket, and relay.proto must import without
    # socket (tests/test_layering.py).
    from cryptography import x509

__all__ = [
    "END_DOMAIN",
    "END_REASONS",
    "GRANT_DOMAIN",
    "MAX_PAYLOAD_BYTES",
    "MAX_SIGNATURE_BYTES",
    "MAX_WIRE_RECEIPT_CHARS",
    "MAX_WIRE_SIGNATURE_CHARS",
    "DevicePrivateKey",
    "EndReceipt",
    "GrantReceipt",
    "Receipt",
    "ReceiptError",
    "ReceiptErrorReason",
    "SignedReceipt",
    "decode",
    "encode",
    "sign_end",
    "sign_grant",
    "verify_end",
    "verify_grant",
]

#: Domain-separation prefixes: the first bytes of every payload of each kind.
GRANT_DOMAIN: Final = b"relay-grant-receipt-v1\n"
END_DOMAIN: Final = b"relay-end-receipt-v1\n"

#: Size caps, checked before anything is parsed or verified. The largest valid
#: receipt is well under 1 KiB; an RSA-8192 signature is exactly 1 KiB.
MAX_PAYLOAD_BYTES: Final = 4096
MAX_SIGNATURE_BYTES: Final = 1024


def _base64_chars(size: int) -> int:
    # Length of unpadded base64 text for *size* bytes.
    return (4 * size + 2) // 3


#: The same caps as lengths of the unpadded base64url wire text (5462 and 1366).
MAX_WIRE_RECEIPT_CHARS: Final = _base64_chars(MAX_PAYLOAD_BYTES)
MAX_WIRE_SIGNATURE_CHARS: Final = _base64_chars(MAX_SIGNATURE_BYTES)

#: How a session ends; an end receipt names exactly one of these.
END_REASONS: Final = frozenset(reason.value for reason in EndReason)

ReceiptErrorReason: TypeAlias = Literal[
    "too_large",
    "unsupported_key",
    "bad_signature",
    "malformed",
    "wrong_session",
    "wrong_device",
    "wrong_nonce",
    "wrong_engineer",
    "channels_not_offered",
    "cap_exceeded",
]

DevicePrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_MAX_SECONDS: Final = 3600  # Invariant 2: no session is ever longer
_MAX_CHANNELS: Final = 8
_MAX_DECIDED_BY_CHARS: Final = 64
_MAX_INT: Final = 2**53 - 1  # JSON-safe integers only

# Forms of the fixed fields, matched with fullmatch (relay.proto.session keeps
# the shared ones).
_SESSION_ID: Final = SESSION_ID_FORM
_DEVICE_ID: Final = DEVICE_ID_FORM
_USERNAME: Final = USERNAME_FORM
# 32 bytes as unpadded base64url: 43 characters, and the last one carries only 2
# data bits (its low 4 bits are zero), so one nonce has one spelling.
_NONCE: Final = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")

_EC_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_MIN_RSA_BITS: Final = 2048
_MAX_RSA_BITS: Final = 8 * MAX_SIGNATURE_BYTES
# PSS with a salt as long as the hash (32 bytes); verification insists on the
# same length rather than accepting any (PSS.AUTO).
_PSS: Final = padding.PSS(
    mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
)


class ReceiptError(Exception):
    """A receipt was refused.

    Attributes:
        reason: A short machine code for metrics and audit:
            ``'too_large'`` (payload over 4 KiB or signature over 1 KiB),
            ``'unsupported_key'`` (the certificate's key is not ECDSA
            P-256/P-384/P-521 or RSA 2048-8192 bits),
            ``'bad_signature'`` (forged, altered, or signed by another key),
            ``'malformed'`` (not the canonical encoding of a valid receipt of the
            expected kind, or bad base64url on the wire),
            ``'wrong_session'``, ``'wrong_device'``, ``'wrong_nonce'`` (signed,
            but for another offer: a replay or a mix-up),
            ``'wrong_engineer'``, ``'channels_not_offered'`` (a channel that was
            not offered, or the offered ones in another order),
            ``'cap_exceeded'`` (more time than the offer's cap).

    ``str(error)`` is a human-readable explanation; it quotes no more than a
    few dozen characters of the peer's data.
    """

    reason: ReceiptErrorReason

    def __init__(self, reason: ReceiptErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ReceiptError], tuple[str, str]]:
        # Exceptions pickle as cls(*self.args) and args holds only the message.
        return (type(self), (self.reason, str(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {str(self)!r})"


# ---------------------------------------------------------------------------
# Receipts


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantReceipt:
    """The on-site person allowed this offer: signed by the device.

    Attributes:
        session_id: The offer's session id (32 lowercase hex characters).
        device_id: The device's own id (as in its certificate).
        nonce: The offer's nonce (43 base64url characters). It binds the grant to
            this one offer, so an old grant cannot answer a new offer.
        engineer: The engineer's user name, from the offer.
        channels: The channels granted: 1 to 8 distinct channels (``"shell"`` or
            ``"tcp:PORT"``), a subset of the offer's in the offer's order.
        max_seconds: The granted cap, 1..3600 and at most the offer's.
        granted_at_ms: When the person decided, device clock (ms since the epoch).
            Informational: the broker times the session by its own clock.
        decided_by: A label of who or what decided (the person or the UI), at most
            64 characters, no control characters; may be empty.

    Raises:
        ValueError: A field has the wrong type or form (Rule 2).
    """

    session_id: str
    device_id: str
    nonce: str
    engineer: str
    channels: tuple[str, ...]
    max_seconds: int
    granted_at_ms: int
    decided_by: str

    def __post_init__(self) -> None:
        _check_binding_fields(self.session_id, self.device_id, self.nonce)
        _require("engineer", self.engineer, _matches(self.engineer, _USERNAME))
        _require("channels", self.channels, _is_channel_list(self.channels))
        _require(
            "max_seconds", self.max_seconds, _is_int(self.max_seconds, 1, _MAX_SECONDS)
        )
        _require("granted_at_ms", self.granted_at_ms, _is_int(self.granted_at_ms))
        _require("decided_by", self.decided_by, _is_label(self.decided_by))


@dataclass(frozen=True, slots=True, kw_only=True)
class EndReceipt:
    """A granted session ended: signed by the device, with what it counted.

    Attributes:
        session_id: The session's id.
        device_id: The device's own id.
        nonce: The nonce of the offer the session was granted on.
        reason: Why the session ended, one of :data:`END_REASONS`.
        ended_at_ms: When it ended, device clock (ms since the epoch).
        bytes_to_device: Stream payload bytes the device received.
        bytes_from_device: Stream payload bytes the device sent.
        streams_opened: Streams the device opened for this session.

    Raises:
        ValueError: A field has the wrong type or form (Rule 2).
    """

    session_id: str
    device_id: str
    nonce: str
    reason: str
    ended_at_ms: int
    bytes_to_device: int
    bytes_from_device: int
    streams_opened: int

    def __post_init__(self) -> None:
        _check_binding_fields(self.session_id, self.device_id, self.nonce)
        _require("reason", self.reason, _is_end_reason(self.reason))
        for name in (
            "ended_at_ms",
            "bytes_to_device",
            "bytes_from_device",
            "streams_opened",
        ):
            value = getattr(self, name)
            _require(name, value, _is_int(value))


Receipt: TypeAlias = GrantReceipt | EndReceipt
_R = TypeVar("_R", GrantReceipt, EndReceipt)

_KINDS: Final[tuple[tuple[type[Receipt], bytes], ...]] = (
    (GrantReceipt, GRANT_DOMAIN),
    (EndReceipt, END_DOMAIN),
)


def _check_binding_fields(session_id: object, device_id: object, nonce: object) -> None:
    _require("session_id", session_id, _matches(session_id, _SESSION_ID))
    _require("device_id", device_id, _matches(device_id, _DEVICE_ID))
    _require("nonce", nonce, _matches(nonce, _NONCE))


def _require(name: str, value: object, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{name}: bad value {_shorten(value)}")


def _matches(value: object, pattern: re.Pattern[str]) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _is_int(value: object, low: int = 0, high: int = _MAX_INT) -> bool:
    # bool is an int subclass; True is not a byte count.
    return (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    )


def _is_end_reason(value: object) -> bool:
    # A decoded payload may hold any JSON value here, unhashable ones too.
    return isinstance(value, str) and value in END_REASONS


def _is_channel(value: object) -> bool:
    try:
        parse_channel(value)
    except ValueError:
        return False
    return True


def _is_channel_list(value: object) -> bool:
    return (
        isinstance(value, tuple)
        and 1 <= len(value) <= _MAX_CHANNELS
        and all(_is_channel(item) for item in value)
        and len(set(value)) == len(value)
    )


def _is_label(value: object) -> bool:
    # Free text for people (audit views, the auditor console): no control
    # characters, which could fake line breaks in logs, and no lone surrogates,
    # which cannot be stored as UTF-8.
    return (
        isinstance(value, str)
        and len(value) <= _MAX_DECIDED_BY_CHARS
        and not any(
            ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 or 0xD800 <= ord(char) < 0xE000
            for char in value
        )
    )


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------
# Canonical encoding


def encode(receipt: Receipt) -> bytes:
    """Return the canonical payload of *receipt*: its domain prefix, then JSON.

    See the module docstring for the exact form.
    """
    body = {item.name: getattr(receipt, item.name) for item in fields(receipt)}
    text = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return _domain_of(receipt) + text.encode("ascii")


def _domain_of(receipt: Receipt) -> bytes:
    return GRANT_DOMAIN if isinstance(receipt, GrantReceipt) else END_DOMAIN


def decode(payload: bytes) -> Receipt:
    """Parse a canonical payload into the receipt it encodes.

    This checks only the encoding; it does not verify any signature.

    Raises:
        ReceiptError: ``'too_large'`` over :data:`MAX_PAYLOAD_BYTES`, else
            ``'malformed'``: an unknown prefix, not JSON, unknown, missing or
            ill-typed fields, or bytes that are not exactly what :func:`encode`
            makes of the receipt they describe (Rule 1).
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ReceiptError(
            "too_large",
            f"receipt is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}",
        )
    kind, domain = _kind_of(payload)
    try:
        body = json.loads(payload[len(domain) :].decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # Valid receipts are ASCII and flat; RecursionError means deep nesting.
        raise ReceiptError("malformed", "receipt body is not ASCII JSON") from None
    if not isinstance(body, dict):
        raise ReceiptError("malformed", "receipt body is not a JSON object")
    names = {item.name for item in fields(kind)}
    if set(body) != names:
        missing = sorted(names - set(body))
        extra = [_shorten(name) for name in sorted(set(body) - names)]
        raise ReceiptError(
            "malformed", f"receipt: missing fields {missing}, unknown fields {extra}"
        )
    body = _with_tuples(body)
    try:
        receipt = kind(**body)
    except ValueError as exc:
        raise ReceiptError("malformed", f"receipt {exc}") from None
    if encode(receipt) != payload:
        raise ReceiptError("malformed", "receipt is not in canonical form")
    return receipt


def _kind_of(payload: bytes) -> tuple[type[Receipt], bytes]:
    for kind, domain in _KINDS:
        if payload.startswith(domain):
            return kind, domain
    raise ReceiptError("malformed", "not a receipt (unknown prefix)")


def _with_tuples(body: dict[str, Any]) -> dict[str, Any]:
    # JSON arrays arrive as lists; the receipt holds tuples (hashable, frozen).
    return {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in body.items()
    }


# ---------------------------------------------------------------------------
# Signing and the wire form


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    """A canonical receipt payload and the device's signature over it.

    Attributes:
        payload: The bytes :func:`encode` made (or, from a peer, claims to have).
        signature: The signature over exactly *payload*.
    """

    payload: bytes
    signature: bytes

    def to_wire(self) -> tuple[str, str]:
        """Return ``(receipt, signature)`` as unpadded base64url text."""
        return _base64url(self.payload), _base64url(self.signature)

    @classmethod
    def from_wire(cls, receipt: str, signature: str) -> SignedReceipt:
        """Build a signed receipt from its two wire fields.

        Nothing is verified here except the text form; see :func:`verify_grant`.

        Raises:
            ReceiptError: ``'too_large'`` (longer than
                :data:`MAX_WIRE_RECEIPT_CHARS` or :data:`MAX_WIRE_SIGNATURE_CHARS`)
                or ``'malformed'`` (not canonical unpadded base64url: padding,
                characters outside ``A-Z a-z 0-9 - _``, a length that no byte
                string has, or non-zero unused bits in the last character).
        """
        return cls(
            payload=_from_base64url("receipt", receipt, MAX_WIRE_RECEIPT_CHARS),
            signature=_from_base64url("signature", signature, MAX_WIRE_SIGNATURE_CHARS),
        )


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _from_base64url(name: str, text: str, max_chars: int) -> bytes:
    if len(text) > max_chars:
        raise ReceiptError(
            "too_large", f"{name} is {len(text)} characters; the limit is {max_chars}"
        )
    try:
        # urlsafe_b64decode skips characters outside the alphabet and accepts
        # '+' and '/'; the comparison below refuses all of that.
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:  # binascii.Error, or a str that is not ASCII
        raise ReceiptError("malformed", f"{name} is not base64url") from None
    if _base64url(data) != text:
        raise ReceiptError("malformed", f"{name} is not canonical unpadded base64url")
    return data


def sign_grant(private_key: DevicePrivateKey, receipt: GrantReceipt) -> SignedReceipt:
    """Sign *receipt* with the device key (the agent's side of a grant).

    Raises:
        ValueError: *private_key* is not ECDSA P-256/P-384/P-521 or RSA of 2048
            to 8192 bits.
    """
    return _sign(private_key, receipt)


def sign_end(private_key: DevicePrivateKey, receipt: EndReceipt) -> SignedReceipt:
    """Sign *receipt* with the device key (the agent's side of an end).

    Raises:
        ValueError: As :func:`sign_grant`.
    """
    return _sign(private_key, receipt)


def _sign(private_key: DevicePrivateKey, receipt: Receipt) -> SignedReceipt:
    payload = encode(receipt)
    # Checked at run time too: callers outside mypy's view (and tests) may pass
    # any key, and an Ed25519 key must fail here, not at the broker.
    key: object = private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = _EC_HASHES.get(key.curve.name)
        if algorithm is not None:
            signature = key.sign(payload, ec.ECDSA(algorithm()))
            return SignedReceipt(payload=payload, signature=signature)
    elif (
        isinstance(key, rsa.RSAPrivateKey)
        and _MIN_RSA_BITS <= key.key_size <= _MAX_RSA_BITS
    ):
        signature = key.sign(payload, _PSS, hashes.SHA256())
        return SignedReceipt(payload=payload, signature=signature)
    raise ValueError(f"unsupported device key for receipts: {_key_description(key)}")


def _key_description(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    return type(key).__name__


# ---------------------------------------------------------------------------
# Verification


def verify_grant(
    certificate: x509.Certificate,
    signed: SignedReceipt,
    *,
    session_id: str,
    device_id: str,
    nonce: str,
    engineer: str,
    offered_channels: Sequence[str],
    offered_max_seconds: int,
) -> GrantReceipt:
    """Verify a grant receipt against the device certificate and the offer.

    Args:
        certificate: The device certificate authenticated on the control channel.
        signed: The receipt as received.
        session_id: The offer's session id.
        device_id: The device id from the verified certificate (Invariant 6: never
            one taken from a message).
        nonce: The offer's nonce.
        engineer: The offer's engineer user name.
        offered_channels: The offer's channels, in the offer's order.
        offered_max_seconds: The offer's cap.

    Returns:
        The verified grant. Its channels and cap, not the offer's, are what the
        session may use.

    Raises:
        ReceiptError: In the order checked: ``'too_large'``,
            ``'unsupported_key'``, ``'bad_signature'``, ``'malformed'`` (also an
            end receipt where a grant was expected), ``'wrong_session'``,
            ``'wrong_device'``, ``'wrong_nonce'``, ``'wrong_engineer'``,
            ``'channels_not_offered'``, ``'cap_exceeded'``.

    Not checked: the certificate's chain, validity period and revocation (the
    shell checked them when the control channel was authenticated, and watches
    revocation since); that *device_id* belongs to *certificate*; whether the
    offer is still pending or its grant deadline has passed (the session state
    machine and the broker's clock decide that, as they decide whether this
    session was granted before); ``granted_at_ms`` (the device clock).
    """
    receipt = _verified(certificate, signed, GrantReceipt)
    _check_binding(receipt, session_id=session_id, device_id=device_id, nonce=nonce)
    if receipt.engineer != engineer:
        raise ReceiptError(
            "wrong_engineer",
            f"grant names engineer {receipt.engineer!r}, the offer {_shorten(engineer)}",
        )
    if not _is_ordered_subset(receipt.channels, offered_channels):
        raise ReceiptError(
            "channels_not_offered",
            f"granted channels {list(receipt.channels)} are not a subset of the "
            f"offered {_shorten(list(offered_channels))} in the same order",
        )
    if receipt.max_seconds > offered_max_seconds:
        raise ReceiptError(
            "cap_exceeded",
            f"grant allows {receipt.max_seconds} s; the offer's cap is "
            f"{offered_max_seconds} s",
        )
    return receipt


def verify_end(
    certificate: x509.Certificate,
    signed: SignedReceipt,
    *,
    session_id: str,
    device_id: str,
    nonce: str,
) -> EndReceipt:
    """Verify an end receipt against the device certificate and the session.

    Args:
        certificate: The device certificate authenticated on the control channel.
        signed: The receipt as received.
        session_id: The session's id.
        device_id: The device id from the verified certificate.
        nonce: The nonce of the offer the session was granted on.

    Returns:
        The verified end receipt.

    Raises:
        ReceiptError: In the order checked: ``'too_large'``,
            ``'unsupported_key'``, ``'bad_signature'``, ``'malformed'`` (also a
            grant where an end receipt was expected), ``'wrong_session'``,
            ``'wrong_device'``, ``'wrong_nonce'``.

    Not checked: as :func:`verify_grant`; also whether the reason or the byte
    counts agree with the broker's own view (reconciling them is the caller's
    job, and a mismatch is evidence for the audit log, not a refusal).
    """
    receipt = _verified(certificate, signed, EndReceipt)
    _check_binding(receipt, session_id=session_id, device_id=device_id, nonce=nonce)
    return receipt


def _verified(
    certificate: x509.Certificate, signed: SignedReceipt, kind: type[_R]
) -> _R:
    if (
        len(signed.payload) > MAX_PAYLOAD_BYTES
        or len(signed.signature) > MAX_SIGNATURE_BYTES
    ):
        raise ReceiptError(
            "too_large",
            f"receipt of {len(signed.payload)} bytes with a signature of "
            f"{len(signed.signature)} bytes; the limits are {MAX_PAYLOAD_BYTES} "
            f"and {MAX_SIGNATURE_BYTES}",
        )
    _verify_signature(certificate, signed)
    receipt = decode(signed.payload)
    if not isinstance(receipt, kind):
        raise ReceiptError(
            "malformed", f"expected a {kind.__name__}, got a {type(receipt).__name__}"
        )
    return receipt


def _verify_signature(certificate: x509.Certificate, signed: SignedReceipt) -> None:
    public_key = certificate.public_key()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            algorithm = _EC_HASHES.get(public_key.curve.name)
            if algorithm is not None:
                public_key.verify(
                    signed.signature, signed.payload, ec.ECDSA(algorithm())
                )
                return
        elif (
            isinstance(public_key, rsa.RSAPublicKey)
            and _MIN_RSA_BITS <= public_key.key_size <= _MAX_RSA_BITS
        ):
            public_key.verify(signed.signature, signed.payload, _PSS, hashes.SHA256())
            return
    except InvalidSignature:
        raise ReceiptError(
            "bad_signature", "receipt signature does not verify with the device key"
        ) from None
    raise ReceiptError(
        "unsupported_key",
        f"device certificate key is {_key_description(public_key)}; receipts "
        "need ECDSA P-256/P-384/P-521 or RSA 2048-8192",
    )


def _check_binding(
    receipt: Receipt, *, session_id: str, device_id: str, nonce: str
) -> None:
    # The nonce is not a secret (the broker sent it in the clear to the device),
    # so a plain comparison is fine; the signature is what cannot be forged.
    if receipt.session_id != session_id:
        raise ReceiptError(
            "wrong_session",
            f"receipt is for session {receipt.session_id}, not {_shorten(session_id)}",
        )
    if receipt.device_id != device_id:
        raise ReceiptError(
            "wrong_device",
            f"receipt names device {receipt.device_id!r}, not {_shorten(device_id)}",
        )
    if receipt.nonce != nonce:
        raise ReceiptError(
            "wrong_nonce", "receipt carries another offer's nonce (a replay?)"
        )


def _is_ordered_subset(granted: Sequence[str], offered: Sequence[str]) -> bool:
    # Is *granted* a subsequence of *offered*? Both are duplicate-free, so each
    # granted channel must come after the previous one in the offer.
    # Example: offered (shell, tcp:22, tcp:443): (shell, tcp:443) yes,
    # (tcp:443, shell) no (reordered), (tcp:80,) no (never offered).
    remaining = iter(offered)
    return all(channel in remaining for channel in granted)
