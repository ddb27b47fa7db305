"""Tests for auth.tokens: session tokens, their shape, hash and lifetime."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import pickle
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

import auth
import auth.tokens
from auth import (
    TOKEN_BYTES,
    TOKEN_CHARS,
    AuthError,
    InvalidToken,
    SessionLifetime,
    new_token,
    session_expiry,
    token_hash,
    verify_session_times,
    verify_token_format,
)

# A fixed, canonical token (43 characters, last one 'A').
TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123-_A"  # noqa: S105 - a test input
LOGIN = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
LIFETIME = SessionLifetime()
MINUTE = timedelta(minutes=1)
# Characters whose base64 value is a multiple of 4: the only possible last ones.
CANONICAL_LAST = set("AEIMQUYcgkosw048")
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# Any text, lone surrogates included (valid in JSON, so possible in a request);
# Hypothesis leaves them out of st.text() by default.
ANY_TEXT = st.text(st.characters(exclude_categories=())) | st.text(
    st.characters(categories=["Cs"]) | st.characters(), min_size=1
)


def _malformed(token: str) -> None:
    with pytest.raises(InvalidToken) as info:
        verify_token_format(token)
    assert info.value.reason == "malformed"
    assert not token or token not in str(info.value)


# ---------------------------------------------------------------------------
# New tokens


def test_new_token_is_256_bits_of_base64url() -> None:
    """A new token is 43 base64url characters that decode to 32 random bytes."""
    token = new_token()
    assert (TOKEN_BYTES, TOKEN_CHARS) == (32, 43)
    assert len(token) == TOKEN_CHARS
    assert len(base64.urlsafe_b64decode(token + "=")) == TOKEN_BYTES


def test_new_tokens_differ_and_pass_the_format_check() -> None:
    """Every new token is different and is accepted by verify_token_format()."""
    tokens = [new_token() for _ in range(200)]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert verify_token_format(token) == token


# ---------------------------------------------------------------------------
# Shape


def test_well_formed_token_is_returned_unchanged() -> None:
    """verify_token_format() returns the token itself."""
    assert verify_token_format(TOKEN) is TOKEN


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param(TOKEN[:-1], id="42 characters"),
        pytest.param(TOKEN + "A", id="44 characters"),
        pytest.param(TOKEN + "=", id="padded"),
        pytest.param(TOKEN[:-2] + "+A", id="standard alphabet +"),
        pytest.param(TOKEN[:-2] + "/A", id="standard alphabet /"),
        pytest.param(TOKEN[:-2] + " A", id="space"),
        pytest.param(TOKEN[:-1] + "\n", id="trailing newline"),
        pytest.param(TOKEN[:-2] + "\u00e9A", id="non-ASCII"),
        pytest.param(TOKEN[:-2] + "\u0661A", id="non-ASCII digit"),
        pytest.param(TOKEN[:-1] + "B", id="non-canonical last character"),
        pytest.param("Bearer " + TOKEN, id="with scheme"),
        pytest.param(token_hash(TOKEN), id="the hash instead of the token"),
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    """Anything but 43 canonical base64url characters is 'malformed'."""
    _malformed(token)


def test_exactly_the_canonical_last_characters_are_accepted() -> None:
    """Of 64 possible last characters, the 16 with zero unused bits pass."""
    accepted = set()
    for last in BASE64URL:
        try:
            verify_token_format(TOKEN[:-1] + last)
        except InvalidToken:
            continue
        accepted.add(last)
    assert accepted == CANONICAL_LAST


def test_huge_token_is_refused_before_any_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1 MB header is refused by its length alone; the pattern never runs."""

    class Untouchable:
        def fullmatch(self, text: str) -> None:
            raise AssertionError("pattern used on an over-long token")

    monkeypatch.setattr(auth.tokens, "_TOKEN", Untouchable())
    _malformed("A" * 1_000_000)


@settings(database=None, max_examples=500)
@given(
    token=st.one_of(
        ANY_TEXT,
        st.text(alphabet=BASE64URL, min_size=43, max_size=43),
    )
)
def test_any_text_is_returned_or_refused_as_malformed(token: str) -> None:
    """Any text is returned unchanged or raises InvalidToken('malformed'), nothing else."""
    try:
        result = verify_token_format(token)
    except InvalidToken as error:
        outcome = error.reason
    else:
        assert result == token
        outcome = "accepted"
    expected = (
        "accepted"
        if re.fullmatch(r"[A-Za-z0-9_-]{43}", token) and token[-1] in CANONICAL_LAST
        else "malformed"
    )
    assert outcome == expected


# ---------------------------------------------------------------------------
# Hash


def test_token_hash_is_sha256_hex_of_the_token() -> None:
    """The stored form is the SHA-256 of the token's ASCII, as lowercase hex."""
    digest = token_hash(TOKEN)
    assert digest == hashlib.sha256(TOKEN.encode("ascii")).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert TOKEN not in digest


def test_different_tokens_have_different_hashes() -> None:
    """Hashes of different tokens differ (one character is enough)."""
    assert token_hash(TOKEN) != token_hash("E" + TOKEN[1:])


def test_token_hash_refuses_malformed_tokens() -> None:
    """token_hash() checks the shape first, so junk never reaches the store lookup."""
    with pytest.raises(InvalidToken) as info:
        token_hash("x" * 10_000)
    assert info.value.reason == "malformed"


# ---------------------------------------------------------------------------
# Lifetime


def test_default_lifetime_is_15_minutes_idle_and_12_hours_absolute() -> None:
    """Defaults: 15 min idle, 12 h absolute."""
    assert LIFETIME.idle == timedelta(minutes=15)
    assert LIFETIME.absolute == timedelta(hours=12)


def test_lifetime_is_frozen_and_keyword_only() -> None:
    """SessionLifetime cannot be changed after creation and takes keywords only."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIFETIME.idle = timedelta(hours=1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        SessionLifetime(MINUTE, MINUTE)  # type: ignore[call-arg]
    custom = SessionLifetime(idle=MINUTE, absolute=timedelta(hours=1))
    assert (custom.idle, custom.absolute) == (MINUTE, timedelta(hours=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"idle": timedelta(0)},
        {"idle": -MINUTE},
        {"absolute": timedelta(0)},
        {"absolute": -MINUTE},
    ],
)
def test_lifetime_must_be_positive(kwargs: dict[str, timedelta]) -> None:
    """Zero or negative durations are refused."""
    with pytest.raises(ValueError, match="must be positive"):
        SessionLifetime(**kwargs)


def test_expiry_of_an_active_session_is_idle_bound() -> None:
    """A session used an hour after login ends 15 minutes after that use."""
    used = LOGIN + timedelta(hours=1)
    expiry = session_expiry(created_at=LOGIN, last_used_at=used, lifetime=LIFETIME)
    assert expiry == used + 15 * MINUTE


def test_expiry_of_an_old_session_is_absolute_bound() -> None:
    """A session used 11 h 55 min after login still ends at 12 h."""
    used = LOGIN + timedelta(hours=11, minutes=55)
    expiry = session_expiry(created_at=LOGIN, last_used_at=used, lifetime=LIFETIME)
    assert expiry == LOGIN + timedelta(hours=12)


def test_session_is_valid_until_just_before_the_idle_timeout() -> None:
    """Up to one microsecond before idle expiry, the session is alive."""
    verify_session_times(
        created_at=LOGIN,
        last_used_at=LOGIN,
        now=LOGIN + 15 * MINUTE - timedelta(microseconds=1),
        lifetime=LIFETIME,
    )


@pytest.mark.parametrize(
    ("last_used_after_login", "now_after_login"),
    [
        pytest.param(timedelta(0), 15 * MINUTE, id="idle: at the instant"),
        pytest.param(timedelta(0), 16 * MINUTE, id="idle: after"),
        pytest.param(
            timedelta(hours=3), timedelta(hours=3, minutes=15), id="idle later"
        ),
        pytest.param(
            timedelta(hours=11, minutes=59), timedelta(hours=12), id="absolute: at"
        ),
        pytest.param(
            timedelta(hours=11, minutes=59),
            timedelta(hours=12, seconds=1),
            id="absolute: busy session",
        ),
    ],
)
def test_session_is_expired_from_its_expiry_instant_on(
    last_used_after_login: timedelta, now_after_login: timedelta
) -> None:
    """At or after expiry (idle or absolute, whichever is first), 'expired' is raised."""
    with pytest.raises(InvalidToken) as info:
        verify_session_times(
            created_at=LOGIN,
            last_used_at=LOGIN + last_used_after_login,
            now=LOGIN + now_after_login,
            lifetime=LIFETIME,
        )
    assert info.value.reason == "expired"


def test_busy_session_is_alive_until_the_absolute_timeout() -> None:
    """A session used every minute stays alive for the full 12 hours, no longer."""
    for minutes in range(1, 12 * 60):
        now = LOGIN + minutes * MINUTE
        verify_session_times(
            created_at=LOGIN, last_used_at=now - MINUTE, now=now, lifetime=LIFETIME
        )
    with pytest.raises(InvalidToken):
        verify_session_times(
            created_at=LOGIN,
            last_used_at=LOGIN + timedelta(hours=12) - MINUTE,
            now=LOGIN + timedelta(hours=12),
            lifetime=LIFETIME,
        )


def test_configured_lifetime_is_used() -> None:
    """A shorter configured idle timeout applies."""
    short = SessionLifetime(idle=MINUTE, absolute=timedelta(hours=1))
    with pytest.raises(InvalidToken):
        verify_session_times(
            created_at=LOGIN, last_used_at=LOGIN, now=LOGIN + MINUTE, lifetime=short
        )


def test_time_zones_mix_freely() -> None:
    """Aware datetimes in different zones compare as instants."""
    plus_two = timezone(timedelta(hours=2))
    created = LOGIN.astimezone(plus_two)
    expiry = session_expiry(created_at=created, last_used_at=LOGIN, lifetime=LIFETIME)
    assert expiry == LOGIN + 15 * MINUTE
    verify_session_times(
        created_at=created,
        last_used_at=LOGIN,
        now=(LOGIN + 14 * MINUTE).astimezone(plus_two),
        lifetime=LIFETIME,
    )


@pytest.mark.parametrize("naive", ["created_at", "last_used_at", "now"])
def test_naive_datetimes_are_value_errors(naive: str) -> None:
    """Each datetime must be timezone-aware; the error names the argument."""
    moments = {"created_at": LOGIN, "last_used_at": LOGIN, "now": LOGIN + MINUTE}
    moments[naive] = moments[naive].replace(tzinfo=None)
    with pytest.raises(ValueError, match=f"{naive} must be a timezone-aware"):
        verify_session_times(**moments, lifetime=LIFETIME)


# ---------------------------------------------------------------------------
# The exception


@pytest.mark.parametrize("reason", ["malformed", "unknown", "expired", "revoked"])
def test_invalid_token_has_one_text_and_pickles(reason: str) -> None:
    """Every reason shares one safe text, and the reason survives pickling."""
    error = InvalidToken(reason)
    assert str(error) == "invalid or expired session token"
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert isinstance(copy, InvalidToken)
    assert issubclass(InvalidToken, AuthError)
    assert (copy.reason, str(copy)) == (reason, str(error))


# CSRF tokens


def test_csrf_token_is_per_session_and_not_the_stored_hash() -> None:
    """43 url-safe characters, stable for one session, different for another,
    and neither the token nor its stored hash."""
    token = auth.tokens.new_token()
    csrf = auth.tokens.csrf_token(token)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", csrf)
    assert csrf == auth.tokens.csrf_token(token)
    assert csrf != auth.tokens.csrf_token(auth.tokens.new_token())
    stored = auth.tokens.token_hash(token)
    assert csrf not in (token, stored)
    assert base64.urlsafe_b64decode(csrf + "=").hex() != stored


def test_csrf_token_of_a_malformed_token_is_refused() -> None:
    with pytest.raises(auth.InvalidToken):
        auth.tokens.csrf_token("not a token")


@pytest.mark.parametrize(
    ("presented", "matches"),
    [(None, False), ("", False), ("x" * 43, False), ("é" * 43, False)],
)
def test_csrf_matches_only_the_exact_value(
    presented: str | None, matches: bool
) -> None:
    expected = auth.tokens.csrf_token(auth.tokens.new_token())
    assert auth.tokens.csrf_matches(expected, presented) is matches
    assert auth.tokens.csrf_matches(expected, expected)
