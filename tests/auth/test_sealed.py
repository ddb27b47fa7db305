"""Tests for auth.sealed: AES-256-GCM sealing of TOTP secrets, keys as text."""

from __future__ import annotations

import base64
import pickle
import re
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

from auth import (
    MAX_SEALED_PLAINTEXT_BYTES,
    SEALED_KEY_BYTES,
    AuthError,
    SealedValueError,
    SecretSealer,
    generate_sealing_key,
    key_from_text,
    key_to_text,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # noqa: S105 - a test vector, not a credential
CONTEXT = "totp:alice"
SEALED_FORM = re.compile(r"v1:[A-Za-z0-9_-]+")

# Any text, lone surrogates included (valid in JSON, so possible in a request);
# Hypothesis leaves them out of st.text() by default.
ANY_TEXT = st.text(st.characters(exclude_categories=())) | st.text(
    st.characters(categories=["Cs"]) | st.characters(), min_size=1
)


@pytest.fixture(scope="module")
def sealer() -> SecretSealer:
    return SecretSealer(KEY)


@pytest.fixture(scope="module")
def sealed(sealer: SecretSealer) -> str:
    return sealer.seal(SECRET, context=CONTEXT)


def _blob(sealed: str) -> bytes:
    body = sealed.removeprefix("v1:")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _text(blob: bytes) -> str:
    return "v1:" + base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


def _refusal(sealer: SecretSealer, sealed: str, context: str = CONTEXT) -> str:
    with pytest.raises(SealedValueError) as info:
        sealer.unseal(sealed, context=context)
    assert sealed not in str(info.value) or not sealed
    return info.value.reason


# ---------------------------------------------------------------------------
# Round trips


def test_sealed_value_opens_with_the_same_key_and_context(
    sealer: SecretSealer, sealed: str
) -> None:
    """unseal(seal(x)) is x for the same key and context."""
    assert sealer.unseal(sealed, context=CONTEXT) == SECRET


def test_sealed_value_is_versioned_ascii_base64url(sealed: str) -> None:
    """The stored form is "v1:" + unpadded base64url: safe in any text column."""
    assert SEALED_FORM.fullmatch(sealed)
    assert SECRET not in sealed


def test_sealed_value_layout_is_nonce_ciphertext_tag(sealed: str) -> None:
    """The blob is a 12-byte nonce, then the ciphertext with its 16-byte GCM tag."""
    blob = _blob(sealed)
    assert len(blob) == 12 + len(SECRET) + 16
    nonce, ciphertext = blob[:12], blob[12:]
    plain = AESGCM(KEY).decrypt(nonce, ciphertext, CONTEXT.encode())
    assert plain == SECRET.encode()


def test_another_sealer_with_the_same_key_opens_it(sealed: str) -> None:
    """Nothing but the key is needed: a new process with the key can unseal."""
    assert SecretSealer(bytes(KEY)).unseal(sealed, context=CONTEXT) == SECRET


def test_sealing_twice_gives_different_values(sealer: SecretSealer) -> None:
    """Each seal uses a fresh random nonce, so equal secrets do not look equal."""
    first = sealer.seal(SECRET, context=CONTEXT)
    second = sealer.seal(SECRET, context=CONTEXT)
    assert first != second
    assert _blob(first)[:12] != _blob(second)[:12]
    assert sealer.unseal(first, context=CONTEXT) == sealer.unseal(
        second, context=CONTEXT
    )


@pytest.mark.parametrize(
    "plaintext",
    ["", "x", "\u00e9\u20ac\U0001f511", "a" * MAX_SEALED_PLAINTEXT_BYTES],
    ids=["empty", "one", "non-ASCII", "largest"],
)
def test_any_short_text_round_trips(sealer: SecretSealer, plaintext: str) -> None:
    """Empty, non-ASCII and maximum-size plaintexts round-trip."""
    assert sealer.unseal(sealer.seal(plaintext, context="c"), context="c") == plaintext


@settings(database=None, max_examples=100)
@given(plaintext=st.text(max_size=200), context=st.text(min_size=1, max_size=50))
def test_round_trip_property(
    sealer: SecretSealer, plaintext: str, context: str
) -> None:
    """Any text under any non-empty context round-trips."""
    assert sealer.unseal(sealer.seal(plaintext, context=context), context=context) == (
        plaintext
    )


# ---------------------------------------------------------------------------
# Refusals: not authentic


def test_wrong_context_is_refused(sealer: SecretSealer, sealed: str) -> None:
    """A value sealed for alice, copied into bob's row, does not open there."""
    assert _refusal(sealer, sealed, context="totp:bob") == "not_authentic"


def test_wrong_key_is_refused(sealed: str) -> None:
    """A value sealed under one key does not open under another."""
    assert _refusal(SecretSealer(OTHER_KEY), sealed) == "not_authentic"


@pytest.mark.parametrize("index", [0, 11, 12, 12 + len(SECRET) - 1, -16, -1])
def test_any_flipped_bit_is_refused(
    sealer: SecretSealer, sealed: str, index: int
) -> None:
    """A flipped bit in the nonce, ciphertext or tag makes the value not authentic."""
    blob = bytearray(_blob(sealed))
    blob[index] ^= 0x01
    assert _refusal(sealer, _text(bytes(blob))) == "not_authentic"


def test_truncated_tag_is_refused(sealer: SecretSealer, sealed: str) -> None:
    """Dropping tag bytes (but keeping a possible length) is not authentic."""
    assert _refusal(sealer, _text(_blob(sealed)[:-1])) == "not_authentic"


def test_shortest_possible_blob_is_checked_not_parsed_away(
    sealer: SecretSealer,
) -> None:
    """28 bytes (nonce and tag, empty ciphertext) is well-formed but not authentic."""
    assert _refusal(sealer, _text(bytes(28))) == "not_authentic"


# ---------------------------------------------------------------------------
# Refusals: malformed or unknown version


def _non_canonical(sealed: str) -> str:
    # A 31-byte blob leaves 4 unused bits in the last character; set one.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return sealed[:-1] + alphabet[alphabet.index(sealed[-1]) + 1]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("v1", id="no colon"),
        pytest.param("v1:", id="no body"),
        pytest.param(":abcd", id="no version"),
        pytest.param("x1:abcd", id="bad version"),
        pytest.param("V1:abcd", id="upper-case version"),
        pytest.param("v\u0661:abcd", id="non-ASCII version digit"),
        pytest.param("v1:abc!", id="outside alphabet"),
        pytest.param("v1:ab+/", id="standard alphabet"),
        pytest.param("v1:abcd==", id="padding"),
        pytest.param("v1:abcde", id="impossible length"),
        pytest.param("v1: abc", id="space"),
        pytest.param("v1:abc\n", id="trailing newline"),
        pytest.param("v1:" + "A" * 36, id="27 bytes"),
        pytest.param("v1:" + "A" * 2000, id="too long"),
        pytest.param("v1:\ud800\udc00", id="surrogates"),
    ],
)
def test_malformed_values_are_refused(sealer: SecretSealer, text: str) -> None:
    """Anything not in the exact text form seal() makes is 'malformed'."""
    assert _refusal(sealer, text) == "malformed"


def test_non_canonical_base64_is_refused(sealer: SecretSealer) -> None:
    """Unused bits set in the last character: same bytes, but not our spelling."""
    sealed = sealer.seal("abc", context=CONTEXT)
    assert len(_blob(sealed)) == 31
    other_spelling = _non_canonical(sealed)
    assert _blob(other_spelling) == _blob(sealed)
    assert _refusal(sealer, other_spelling) == "malformed"


@pytest.mark.parametrize("version", ["v2", "v0", "v10"])
def test_other_versions_are_unsupported(
    sealer: SecretSealer, sealed: str, version: str
) -> None:
    """A well-formed value of another version says so (room for key rotation)."""
    text = version + sealed.removeprefix("v1")
    with pytest.raises(SealedValueError, match=f"version '{version}'") as info:
        sealer.unseal(text, context=CONTEXT)
    assert info.value.reason == "unsupported_version"


def test_longest_valid_value_is_within_the_length_cap(sealer: SecretSealer) -> None:
    """The cap sits just above the longest sealed value; one more character is refused."""
    longest = sealer.seal("a" * MAX_SEALED_PLAINTEXT_BYTES, context=CONTEXT)
    assert sealer.unseal(longest, context=CONTEXT) == "a" * MAX_SEALED_PLAINTEXT_BYTES
    with pytest.raises(SealedValueError, match="too long"):
        sealer.unseal(longest + "A", context=CONTEXT)


@settings(database=None, max_examples=500)
@given(text=ANY_TEXT)
def test_arbitrary_text_only_ever_raises_sealed_value_error(
    sealer: SecretSealer, text: str
) -> None:
    """unseal() of any string raises SealedValueError and nothing else."""
    with pytest.raises(SealedValueError):
        sealer.unseal(text, context=CONTEXT)


@settings(database=None, max_examples=300)
@given(data=st.data())
def test_edited_values_open_only_if_unchanged(
    sealer: SecretSealer, sealed: str, data: st.DataObject
) -> None:
    """Any character-level edit of a sealed value raises SealedValueError."""
    position = data.draw(st.integers(min_value=0, max_value=len(sealed)))
    insert = data.draw(st.text(max_size=3))
    delete = data.draw(st.integers(min_value=0, max_value=3))
    edited = sealed[:position] + insert + sealed[position + delete :]
    if edited == sealed:
        assert sealer.unseal(edited, context=CONTEXT) == SECRET
    else:
        with pytest.raises(SealedValueError):
            sealer.unseal(edited, context=CONTEXT)


# ---------------------------------------------------------------------------
# Caller errors


def test_too_long_plaintext_is_a_value_error(sealer: SecretSealer) -> None:
    """Plaintexts over 1024 UTF-8 bytes are refused (this is for short secrets)."""
    with pytest.raises(ValueError, match="1025 bytes; at most 1024"):
        sealer.seal("a" * (MAX_SEALED_PLAINTEXT_BYTES + 1), context=CONTEXT)
    with pytest.raises(ValueError, match="1026 bytes"):
        sealer.seal("\u00e9" * 513, context=CONTEXT)


def test_unencodable_plaintext_is_a_value_error(sealer: SecretSealer) -> None:
    """A lone surrogate cannot be sealed (it is not UTF-8)."""
    with pytest.raises(ValueError, match="surrogate"):
        sealer.seal("\ud800", context=CONTEXT)


def test_empty_context_is_a_value_error(sealer: SecretSealer, sealed: str) -> None:
    """An empty context binds to nothing, so both seal and unseal refuse it."""
    with pytest.raises(ValueError, match="context"):
        sealer.seal(SECRET, context="")
    with pytest.raises(ValueError, match="context") as info:
        sealer.unseal(sealed, context="")
    assert not isinstance(info.value, AuthError)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_key_of_wrong_length_is_a_value_error(length: int) -> None:
    """Only 32-byte keys (AES-256) are accepted, also by key_to_text."""
    with pytest.raises(ValueError, match=f"32 bytes, got {length}"):
        SecretSealer(bytes(length))
    with pytest.raises(ValueError, match=f"32 bytes, got {length}"):
        key_to_text(bytes(length))


def test_repr_hides_the_key() -> None:
    """The key appears in no repr, in any encoding."""
    text = repr(SecretSealer(KEY))
    assert text == "SecretSealer(<key hidden>)"
    assert key_to_text(KEY) not in text
    assert KEY.hex() not in text


# ---------------------------------------------------------------------------
# Keys


def test_generated_keys_are_32_random_bytes() -> None:
    """generate_sealing_key() gives 32 bytes, different each time."""
    keys = {generate_sealing_key() for _ in range(10)}
    assert len(keys) == 10
    assert all(len(key) == SEALED_KEY_BYTES == 32 for key in keys)


def test_key_text_is_padded_standard_base64() -> None:
    """key_to_text() gives 44 characters, like `openssl rand -base64 32`."""
    text = key_to_text(KEY)
    assert len(text) == 44
    assert text.endswith("=")
    assert base64.b64decode(text, validate=True) == KEY


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda key: base64.b64encode(key).decode(), id="standard"),
        pytest.param(
            lambda key: base64.b64encode(key).decode().rstrip("="), id="unpadded"
        ),
        pytest.param(lambda key: base64.urlsafe_b64encode(key).decode(), id="url-safe"),
        pytest.param(
            lambda key: base64.urlsafe_b64encode(key).decode().rstrip("="),
            id="url-safe unpadded",
        ),
        pytest.param(lambda key: base64.b64encode(key).decode() + "\n", id="newline"),
        pytest.param(
            lambda key: "  " + base64.b64encode(key).decode() + " \r\n", id="spaces"
        ),
    ],
)
def test_key_text_forms_are_accepted(encode: Callable[[bytes], str]) -> None:
    """Standard and URL-safe base64, padded or not, with surrounding whitespace."""
    key = b"\xfb\xff\xbe" * 10 + b"\xfb\xef"  # many '+', '/', '-' and '_' characters
    assert key_from_text(encode(key)) == key


@settings(database=None, max_examples=100)
@given(key=st.binary(min_size=32, max_size=32))
def test_key_text_round_trips(key: bytes) -> None:
    """key_from_text(key_to_text(k)) == k for every key."""
    assert key_from_text(key_to_text(key)) == key


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(base64.b64encode(bytes(16)).decode(), id="16 bytes"),
        pytest.param(base64.b64encode(bytes(31)).decode(), id="31 bytes"),
        pytest.param(base64.b64encode(bytes(33)).decode(), id="33 bytes"),
        pytest.param("A" * 44, id="44 characters without padding"),
        pytest.param("A" * 43 + "==", id="double padding"),
        pytest.param("A" * 42 + "!", id="outside alphabet"),
        pytest.param("A" * 20 + " " + "A" * 22, id="space inside"),
        pytest.param(bytes(32).hex(), id="hex"),
        pytest.param("\u00c0" * 43, id="non-ASCII"),
    ],
)
def test_bad_key_text_is_a_value_error_that_hides_the_text(text: str) -> None:
    """Anything but base64 of 32 bytes is refused; the message never shows the text."""
    with pytest.raises(ValueError, match="32 bytes in base64") as info:
        key_from_text(text)
    assert not text.strip() or text.strip() not in str(info.value)


@settings(database=None, max_examples=300)
@given(text=ANY_TEXT)
def test_key_from_text_returns_32_bytes_or_raises_value_error(text: str) -> None:
    """Any text gives a 32-byte key or a ValueError, nothing else."""
    try:
        key = key_from_text(text)
    except ValueError:
        return
    assert len(key) == 32


# ---------------------------------------------------------------------------
# The exception


def test_sealed_value_error_is_an_auth_error_and_pickles() -> None:
    """SealedValueError is an AuthError and keeps reason and text through pickle."""
    error = SealedValueError("not_authentic", "does not open")
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert isinstance(copy, SealedValueError)
    assert issubclass(SealedValueError, AuthError)
    assert (copy.reason, str(copy)) == ("not_authentic", "does not open")
