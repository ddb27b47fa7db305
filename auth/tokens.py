"""Engineer session tokens: making them, checking their shape, and their lifetime.

Pure: the store (not this module) keeps one row per session, keyed by
:func:`token_hash`, and the caller passes the current time in.
"""

# Theory of operation
# ===================
# A token is 256 random bits, as unpadded base64url (43 characters). The client
# holds the token; the store holds only its SHA-256. A plain hash (no key, no
# salt, no slow hash) is enough because the token is uniformly random and far
# too long to guess: a stolen copy of the store gives hashes that cannot be
# turned back into tokens. Looking a session up by hash also means the lookup's
# timing reveals at most something about the hash, not about the token.
#
# A session ends at the earlier of: idle timeout after its last use, absolute
# timeout after its creation (SessionLifetime). Revocation (logout, user
# disabled) is a store matter: the row goes, or is marked revoked.
#
# Rule 1: a presented token is checked for shape before anything else, with a
#         length check first, so a megabyte of header costs one len().
# Rule 2: a token never appears in a log or an error message; its hash may.

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from .errors import InvalidToken

__all__ = [
    "TOKEN_BYTES",
    "TOKEN_CHARS",
    "SessionLifetime",
    "new_token",
    "session_expiry",
    "token_hash",
    "verify_session_times",
    "verify_token_format",
]

#: Random bytes per token (256 bits).
TOKEN_BYTES: Final = 32
#: Length of a token as text: unpadded base64url of TOKEN_BYTES bytes.
TOKEN_CHARS: Final = 43

# 43 characters carry 258 bits, so the last character's two low bits are unused
# and always zero in what secrets.token_urlsafe makes: it is one of the 16
# characters whose alphabet index is a multiple of 4. Requiring that gives each
# token exactly one spelling.
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")


def new_token() -> str:
    """Make a new session token: 256 random bits as 43 base64url characters.

    Make a new one at every login (never reuse a token across logins) so that a
    token planted before login is worthless after it.
    """
    return secrets.token_urlsafe(TOKEN_BYTES)


def verify_token_format(token: str) -> str:
    """Check that *token* has the shape of a token :func:`new_token` makes.

    Only the shape is checked, not whether a session has this token.

    Returns:
        *token*, unchanged.

    Raises:
        InvalidToken: ``reason='malformed'``: wrong length, characters outside
            base64url, or a non-canonical last character.
    """
    if len(token) != TOKEN_CHARS or _TOKEN.fullmatch(token) is None:
        raise InvalidToken("malformed")
    return token


def token_hash(token: str) -> str:
    """Return the SHA-256 of *token* as 64 lowercase hex digits.

    This is what the store keeps and looks sessions up by, and what logs and
    audit events may show in place of the token.

    Raises:
        InvalidToken: ``reason='malformed'``: *token* fails
            :func:`verify_token_format` (checked first, so the hash is only ever
            computed for something that could be a token).
    """
    return hashlib.sha256(verify_token_format(token).encode("ascii")).hexdigest()


_CSRF_DOMAIN: Final = b"relay csrf v1\x00"


def csrf_token(token: str) -> str:
    """Return the anti-CSRF token that goes with session *token*.

    A browser page sends it back in a header on every state-changing request
    made with the session cookie; a page of another origin cannot read it (no
    CORS), so it cannot forge such a request. It is a domain-separated SHA-256
    of the session token: stateless, different for every session, and not
    derivable from :func:`token_hash` (what the store keeps).

    Raises:
        InvalidToken: ``reason='malformed'``: *token* is not a session token.
    """
    raw = verify_token_format(token).encode("ascii")
    digest = hashlib.sha256(_CSRF_DOMAIN + raw).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def csrf_matches(expected: str, presented: str | None) -> bool:
    """Whether *presented* (a request header, maybe absent) is *expected*, in
    constant time."""
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode("ascii"), presented.encode("utf-8"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionLifetime:
    """How long a session lives.

    Attributes:
        idle: A session not used for this long ends.
        absolute: A session ends this long after login, however busy.

    Raises:
        ValueError: A duration is not positive.
    """

    idle: timedelta = timedelta(minutes=15)
    absolute: timedelta = timedelta(hours=12)

    def __post_init__(self) -> None:
        for name in ("idle", "absolute"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"session {name} lifetime must be positive")


def session_expiry(
    *, created_at: datetime, last_used_at: datetime, lifetime: SessionLifetime
) -> datetime:
    """Return when a session ends: idle timeout or absolute timeout, whichever is first.

    Args:
        created_at: When the session was made (login), timezone-aware.
        last_used_at: When the session was last used, timezone-aware.
        lifetime: The configured lifetimes.

    Raises:
        ValueError: A datetime is naive.
    """
    _check_aware(created_at=created_at, last_used_at=last_used_at)
    return min(last_used_at + lifetime.idle, created_at + lifetime.absolute)


def verify_session_times(
    *,
    created_at: datetime,
    last_used_at: datetime,
    now: datetime,
    lifetime: SessionLifetime,
) -> None:
    """Check that a session has not timed out at *now*.

    The session is over from the instant of :func:`session_expiry` on (that
    instant included). Not checked: revocation, and whether the user is still
    enabled (both store lookups).

    Raises:
        InvalidToken: ``reason='expired'``.
        ValueError: A datetime is naive.
    """
    _check_aware(now=now)
    expiry = session_expiry(
        created_at=created_at, last_used_at=last_used_at, lifetime=lifetime
    )
    if now >= expiry:
        raise InvalidToken("expired")


def _check_aware(**moments: datetime) -> None:
    # Comparing naive and aware datetimes raises TypeError, and a naive one from
    # the store would be read in the server's local zone: refuse it outright.
    for name, moment in moments.items():
        if moment.utcoffset() is None:
            raise ValueError(f"{name} must be a timezone-aware datetime")
