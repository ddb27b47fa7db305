"""Sealing small secrets (TOTP secrets) for storage, with a key kept apart from the data.

A copy of the database alone then reveals no TOTP secret: the sealing key comes
from config or the environment (production), or from its own 0600 file (dev); the
caller does that I/O and hands the key in as bytes.
"""

# Theory of operation
# ===================
# seal() encrypts with AES-256-GCM under a fresh random 96-bit nonce and returns
# ASCII text: "v1:" + base64url(nonce || ciphertext || tag), without padding.
# The *context* (for example "totp:alice") is GCM's associated data: it is not
# stored, but unsealing with any other context fails. So a sealed value copied
# into another user's row does not open there.
#
# Rule 1: every way unseal() can fail raises SealedValueError. Which of "wrong
#         key", "wrong context" or "tampered" it was cannot be told apart (they
#         are all a failed GCM tag check), and is not needed.
# Rule 2: the text form is parsed strictly (a length cap first, then the exact
#         alphabet, then canonical base64), so one sealed value has exactly one
#         text form.
# Rule 3: the version prefix leaves room for a future key rotation ("v2:" with
#         a key id); "v1" values name no key.
#
# Random 96-bit nonces stay safe up to about 2**32 seals per key (NIST SP
# 800-38D §8.3); one seal per TOTP enrolment is far below that.

from __future__ import annotations

import base64
import re
import secrets
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import SealedValueError

__all__ = [
    "MAX_SEALED_PLAINTEXT_BYTES",
    "SEALED_KEY_BYTES",
    "SecretSealer",
    "generate_sealing_key",
    "key_from_text",
    "key_to_text",
]

#: Sealing key length in bytes (AES-256).
SEALED_KEY_BYTES: Final = 32
#: Longest plaintext :meth:`SecretSealer.seal` accepts, in bytes of UTF-8. This is
#: for short secrets; it also bounds what :meth:`SecretSealer.unseal` reads.
MAX_SEALED_PLAINTEXT_BYTES: Final = 1024

_VERSION: Final = "v1"
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_MIN_BLOB_BYTES: Final = _NONCE_BYTES + _TAG_BYTES
_MAX_BLOB_BYTES: Final = _MIN_BLOB_BYTES + MAX_SEALED_PLAINTEXT_BYTES
# Unpadded base64 of n bytes is ceil(4n / 3) characters.
_MAX_SEALED_CHARS: Final = len(_VERSION) + 1 + -(-4 * _MAX_BLOB_BYTES // 3)
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]+")
_VERSION_NAME: Final = re.compile(r"v[0-9]+")

# A key as text: 32 bytes in base64, standard or URL-safe alphabet, with or
# without its one padding character.
_KEY_TEXT: Final = re.compile(r"[A-Za-z0-9+/_-]{43}=?")
_URLSAFE_TO_STANDARD: Final = str.maketrans("-_", "+/")


def generate_sealing_key() -> bytes:
    """Make a new random sealing key (32 bytes from the OS's CSPRNG).

    The key is a secret: keep it out of the database, out of logs and out of
    images. :func:`key_to_text` gives a form for config files and env variables.
    """
    return secrets.token_bytes(SEALED_KEY_BYTES)


def key_to_text(key: bytes) -> str:
    """Encode a sealing key as standard padded base64 (44 characters).

    That is the form ``openssl rand -base64 32`` prints, and what
    :func:`key_from_text` reads.

    Raises:
        ValueError: *key* is not 32 bytes long.
    """
    _check_key_length(key)
    return base64.b64encode(key).decode("ascii")


def key_from_text(text: str) -> bytes:
    """Decode a sealing key from config or the environment.

    Accepts base64 of exactly 32 bytes, in the standard or the URL-safe alphabet,
    with or without the trailing ``=``. Surrounding whitespace (a newline at the
    end of a key file) is ignored.

    Raises:
        ValueError: *text* is not base64 of 32 bytes. The message never contains
            the text, which may be (a mistyped copy of) the key.
    """
    text = text.strip()
    if _KEY_TEXT.fullmatch(text) is None:
        raise ValueError(
            f"sealing key must be {SEALED_KEY_BYTES} bytes in base64 (43 or 44 "
            f"characters, e.g. from 'openssl rand -base64 {SEALED_KEY_BYTES}'); "
            f"got {len(text)} characters or characters outside base64"
        )
    return base64.b64decode(text.rstrip("=").translate(_URLSAFE_TO_STANDARD) + "=")


class SecretSealer:
    """Seal and unseal short secrets with one AES-256-GCM key.

    Args:
        key: The 32-byte sealing key.

    Raises:
        ValueError: *key* is not 32 bytes long.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        _check_key_length(key)
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        # The key never appears in a repr, a log line or a traceback.
        return "SecretSealer(<key hidden>)"

    def seal(self, plaintext: str, *, context: str) -> str:
        """Encrypt *plaintext*, bound to *context*.

        Each call uses a fresh nonce, so sealing the same plaintext twice gives
        two different values.

        Args:
            plaintext: The secret, at most :data:`MAX_SEALED_PLAINTEXT_BYTES`
                bytes as UTF-8.
            context: What the value belongs to, for example ``"totp:alice"``;
                the same text must be given to :meth:`unseal`.

        Returns:
            ASCII text, ``"v1:"`` followed by unpadded base64url.

        Raises:
            ValueError: *plaintext* is too long or not encodable as UTF-8, or
                *context* is empty.
        """
        data = plaintext.encode("utf-8")
        if len(data) > MAX_SEALED_PLAINTEXT_BYTES:
            raise ValueError(
                f"plaintext is {len(data)} bytes; at most "
                f"{MAX_SEALED_PLAINTEXT_BYTES} can be sealed"
            )
        nonce = secrets.token_bytes(_NONCE_BYTES)
        blob = nonce + self._aead.encrypt(nonce, data, _associated_data(context))
        return f"{_VERSION}:{_b64url_encode(blob)}"

    def unseal(self, sealed: str, *, context: str) -> str:
        """Decrypt a value made by :meth:`seal` with the same key and *context*.

        Args:
            sealed: The stored text.
            context: The context given to :meth:`seal`.

        Returns:
            The plaintext.

        Raises:
            SealedValueError: ``reason='malformed'`` if *sealed* is not in the
                text form :meth:`seal` produces; ``'unsupported_version'`` if it
                is a later format; ``'not_authentic'`` if the key, the context
                or the value is not the one sealed (see the class's note).
            ValueError: *context* is empty (a programming error).
        """
        associated_data = _associated_data(context)
        # The length cap comes first: a huge value costs nothing further.
        if len(sealed) > _MAX_SEALED_CHARS:
            raise SealedValueError("malformed", "sealed value is too long")
        version, colon, encoded = sealed.partition(":")
        if not colon:
            raise SealedValueError("malformed", "sealed value has no version prefix")
        if version != _VERSION:
            if _VERSION_NAME.fullmatch(version) is not None:
                raise SealedValueError(
                    "unsupported_version",
                    f"sealed value has version {version!r}; this code reads "
                    f"{_VERSION!r} only",
                )
            raise SealedValueError("malformed", "sealed value has no version prefix")
        blob = _b64url_decode(encoded)
        if len(blob) < _MIN_BLOB_BYTES:
            raise SealedValueError("malformed", "sealed value is too short")
        nonce, ciphertext = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        try:
            data = self._aead.decrypt(nonce, ciphertext, associated_data)
        except InvalidTag:
            raise SealedValueError(
                "not_authentic",
                "sealed value does not open with this key and context "
                "(another key, another context, or altered)",
            ) from None
        # Only seal() with this key can have made an authentic value, and it
        # sealed UTF-8; decode() cannot fail here.
        return data.decode("utf-8")


def _check_key_length(key: bytes) -> None:
    if len(key) != SEALED_KEY_BYTES:
        raise ValueError(
            f"sealing key must be {SEALED_KEY_BYTES} bytes, got {len(key)}"
        )


def _associated_data(context: str) -> bytes:
    # An empty context would bind the value to nothing, which is always a bug.
    if not context:
        raise ValueError("context must be a non-empty string")
    return context.encode("utf-8")


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    # base64's decoders skip characters outside the alphabet and accept non-zero
    # unused bits; both would give one value several text forms (Rule 2). So the
    # alphabet is checked first and the result is re-encoded and compared.
    if _BASE64URL.fullmatch(text) is None or len(text) % 4 == 1:
        raise SealedValueError("malformed", "sealed value is not base64url")
    # Cannot fail now: the alphabet is right and the length is possible.
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url_encode(data) != text:
        raise SealedValueError("malformed", "sealed value is not canonical base64url")
    return data
