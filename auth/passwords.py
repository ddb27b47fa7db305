"""Password hashing for engineer accounts: argon2id with explicit parameters.

Pure: strings in, strings out, or an :class:`~auth.errors.InvalidCredentials`. The
argon2 work is CPU- and memory-bound (64 MiB and tens of milliseconds per call with
the defaults); a trio caller runs it in a worker thread
(``trio.to_thread.run_sync``) so it does not stall the event loop.
"""

# Theory of operation
# ===================
# A login must cost the same whether the user exists or not, or the answer time
# tells an attacker which user names are real. So every login attempt runs
# exactly one argon2 verification: against the user's stored hash, or, for an
# unknown user, against a dummy hash made once at construction with the same
# parameters (verify_unknown_user).
#
# Rule 1: the parameters are spelled out here, not taken from argon2-cffi's
#         defaults, so that upgrading the library never silently changes how new
#         hashes are made. needs_rehash() tells the caller when a stored hash was
#         made with other parameters (rehash it after a successful login).
# Rule 2: a password is turned into bytes in exactly one place (_password_bytes),
#         for hashing and verifying alike.
# Rule 3: a wrong password raises; nothing here returns a bool for "it matched".

from __future__ import annotations

import contextlib
import secrets
import unicodedata
from typing import Final, NoReturn

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .errors import InvalidCredentials

__all__ = [
    "DEFAULT_MEMORY_COST",
    "DEFAULT_PARALLELISM",
    "DEFAULT_TIME_COST",
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "PasswordHasher",
    "validate_new_password",
]

#: argon2id iterations. With the two values below this is RFC 9106 §4's
#: "second recommended option" (for memory-constrained machines).
DEFAULT_TIME_COST: Final = 3
#: argon2id memory per hash, in KiB (64 MiB).
DEFAULT_MEMORY_COST: Final = 65536
#: argon2id lanes.
DEFAULT_PARALLELISM: Final = 4

#: Shortest acceptable new password, in characters. PCI DSS v4.0 requirement
#: 8.3.6: "A minimum length of 12 characters".
MIN_PASSWORD_CHARS: Final = 12
#: Longest acceptable new password, in characters. Long enough for any pass
#: phrase or password manager; short enough that hashing it is cheap.
MAX_PASSWORD_CHARS: Final = 256

# Salt and tag sizes: argon2-cffi's current values, written down for Rule 1.
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32


def validate_new_password(password: str) -> str:
    """Check that *password* is acceptable as a new password and return it unchanged.

    Only the length is checked (12 to 256 characters), following NIST SP 800-63B-4
    §3.1.1.2: no composition rules. Not checked here: PCI DSS 8.3.6's other
    clause (letters *and* digits), breach lists, and equality with the user name.

    Raises:
        ValueError: *password* is too short, too long, or contains a lone
            surrogate (which no keyboard produces, and which cannot be encoded as
            UTF-8). The message never contains the password.
    """
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(
            f"password is too short: use at least {MIN_PASSWORD_CHARS} characters"
        )
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(
            f"password is too long: use at most {MAX_PASSWORD_CHARS} characters"
        )
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "password contains invalid characters (unpaired UTF-16 surrogates)"
        ) from None
    return password


class PasswordHasher:
    """Hash and verify passwords with argon2id.

    Constructing one computes one hash (the dummy used by
    :meth:`verify_unknown_user`), so it costs as much as one login; make one per
    process and share it. Instances hold no secret and may be used from several
    threads at once.

    Args:
        time_cost: argon2 iterations (at least 1).
        memory_cost: argon2 memory per hash in KiB (at least 8 per lane).
        parallelism: argon2 lanes (at least 1).

    Raises:
        ValueError: A parameter is out of range.
    """

    __slots__ = ("_dummy_hash", "_hasher")

    def __init__(
        self,
        *,
        time_cost: int = DEFAULT_TIME_COST,
        memory_cost: int = DEFAULT_MEMORY_COST,
        parallelism: int = DEFAULT_PARALLELISM,
    ) -> None:
        # argon2 itself would only complain at the first hash, with a HashingError;
        # checking here gives a ValueError that names the parameter.
        if time_cost < 1:
            raise ValueError(f"time_cost must be at least 1, got {time_cost}")
        if parallelism < 1:
            raise ValueError(f"parallelism must be at least 1, got {parallelism}")
        if memory_cost < 8 * parallelism:
            raise ValueError(
                f"memory_cost must be at least 8 KiB per lane ({8 * parallelism} "
                f"KiB for parallelism={parallelism}), got {memory_cost}"
            )
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=_HASH_BYTES,
            salt_len=_SALT_BYTES,
            type=argon2.Type.ID,
        )
        # The dummy's password is random and forgotten at once: even if the caller
        # ignored the exception, nobody could "log in" as an unknown user.
        self._dummy_hash = self.hash(secrets.token_urlsafe(32))

    def __repr__(self) -> str:
        hasher = self._hasher
        return (
            f"PasswordHasher(time_cost={hasher.time_cost}, "
            f"memory_cost={hasher.memory_cost}, parallelism={hasher.parallelism})"
        )

    def hash(self, password: str) -> str:
        """Hash *password* with a fresh random salt.

        Validate a new password with :func:`validate_new_password` first; this
        method hashes any string.

        Returns:
            The encoded hash (``$argon2id$v=19$m=...,t=...,p=...$salt$tag``), ASCII,
            which is what the store keeps.
        """
        return self._hasher.hash(_password_bytes(password))

    def verify(self, stored_hash: str, password: str) -> None:
        """Check *password* against *stored_hash*; return only if it matches.

        Hashes made with other argon2 parameters, or with argon2i/argon2d, verify
        too (the parameters are in the hash); :meth:`needs_rehash` then says so.
        Not checked: whether the account is enabled, locked or rate-limited.

        Raises:
            InvalidCredentials: ``reason='bad_password'``: the password is wrong.
            ValueError: *stored_hash* is not an argon2 hash at all. That is a
                broken store row, not a login failure: log it and answer the
                login like any failure.
        """
        # argon2's C code reads the hash as a NUL-terminated string, so anything
        # after a NUL would be ignored; such a value did not come from hash().
        if not stored_hash.isascii() or "\0" in stored_hash:
            raise ValueError("stored password hash is not an argon2 hash")
        try:
            self._hasher.verify(stored_hash, _password_bytes(password))
        except VerifyMismatchError:
            raise InvalidCredentials("bad_password") from None
        except (InvalidHashError, VerificationError):
            raise ValueError("stored password hash is not an argon2 hash") from None

    def needs_rehash(self, stored_hash: str) -> bool:
        """Tell whether *stored_hash* was made with other parameters than this hasher's.

        Call it after a successful :meth:`verify`, while the password is at hand,
        and store ``hash(password)`` when it returns ``True``.

        Raises:
            ValueError: *stored_hash* is not an argon2 hash.
        """
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            raise ValueError("stored password hash is not an argon2 hash") from None

    def verify_unknown_user(self, password: str) -> NoReturn:
        """Spend the time of one password check, then refuse: the user does not exist.

        Call this where a login names a user that is not in the store (or is
        disabled, if that must not show either), so that the answer takes as long
        as for a wrong password. It verifies *password* against a dummy hash made
        at construction with this hasher's parameters.

        Not covered: stored hashes made with other parameters (before a rehash)
        take their own time, and the store lookup itself may differ in time.

        Raises:
            InvalidCredentials: Always, with ``reason='unknown_user'``.
        """
        with contextlib.suppress(VerifyMismatchError):
            self._hasher.verify(self._dummy_hash, _password_bytes(password))
        raise InvalidCredentials("unknown_user")


def _password_bytes(password: str) -> bytes:
    # NIST SP 800-63B §3.1.1.2: Unicode passwords "SHOULD" be normalised (NFKC or
    # NFKD) before hashing, so that the same password typed on another system
    # (for example a decomposed "é" from macOS) still matches.
    #
    # Normalisation is skipped above MAX_PASSWORD_CHARS: unicodedata reorders
    # combining marks in quadratic time (40,000 of them take about 2 s), so an
    # attacker's long input must not reach it; pyotp caps its comparisons for the
    # same reason (CVE-2026-3276). No valid password is that long, so this changes
    # no real login.
    #
    # 'surrogatepass' lets a lone surrogate (valid in JSON, "\ud800") through as
    # bytes instead of raising: the attempt then costs a full argon2 run and fails
    # like any wrong password. For every other string it gives plain UTF-8.
    if len(password) <= MAX_PASSWORD_CHARS:
        password = unicodedata.normalize("NFKC", password)
    return password.encode("utf-8", "surrogatepass")
