"""TOTP second factor (RFC 6238): secrets, provisioning URIs, code checks.

Pure: the caller passes the current time and the user's last accepted time step,
and stores the step this module returns. pyotp computes the codes; the window,
the reuse rule and the input checks are ours. Step length, digits and window come
from a :class:`TotpPolicy` (default: 30 s, 6 digits, steps t-1..t).
"""

# Theory of operation
# ===================
# A code belongs to a time step: step = floor(unix_time / step_s), step_s being
# 30 s unless the policy says 60. At server step t a code is accepted for step t
# or t-1 only (t only with past_steps=0). RFC 6238 §5.2: "We RECOMMEND that at
# most one time step is allowed as the network delay"; we allow it backwards
# only (a code typed just before the step changed), never forwards, so a client
# clock ahead of the server's is refused (see the tests for exact cases).
# Step numbers depend on step_s: a stored last step means nothing under another
# step length, so a secret keeps the policy it was provisioned with (the caller
# re-provisions every secret when its policy changes).
#
# Rule 1: a code is single-use. verify_totp() refuses any code whose step is not
#         greater than the user's last accepted step, and returns the step it
#         accepted. The caller must store it with an atomic compare-and-set
#         (UPDATE ... SET last_step = :step WHERE last_step < :step, success only
#         if one row changed), so that two logins racing with one code cannot
#         both win. pyotp alone accepts a code any number of times in its window.
# Rule 2: the code is checked for shape (exactly `digits` ASCII digits) before any
#         comparison. pyotp NFKC-normalises both sides before comparing, so its
#         own verify() would accept full-width digits (U+FF11 U+FF12 ... for
#         "12..."); we never give it the chance.
# Rule 3: comparisons are constant-time (hmac.compare_digest), and every window
#         step is always compared, so the time taken does not depend on which
#         step (if any) matched.
# Nothing here is stateful. How many codes one client may try is the login
# throttle's business (auth/limits.py): a login request carries one code, and
# after five failures in a row from one address each further try waits.

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import pyotp

from .errors import InvalidCredentials

__all__ = [
    "TOTP_DIGITS",
    "TOTP_ISSUER",
    "TOTP_STEP_S",
    "TotpPolicy",
    "generate_secret",
    "provisioning_uri",
    "verify_totp",
]

#: Default length of a TOTP time step, in seconds (RFC 6238's default; what every
#: authenticator app assumes when the URI does not say otherwise).
TOTP_STEP_S: Final = 30
#: Default digits per code.
TOTP_DIGITS: Final = 6
#: Default issuer shown in authenticator apps.
TOTP_ISSUER: Final = "Remote Care relay"

# What authenticator apps support (Google Authenticator: 30 or 60 s, 6 or 8
# digits); anything else would provision secrets that apps silently get wrong.
_STEP_CHOICES: Final = (30, 60)
_DIGIT_CHOICES: Final = (6, 8)
_MAX_PAST_STEPS: Final = 1
# pyotp.random_base32's default: 32 base32 characters = 160 bits, the HMAC-SHA1
# key length RFC 4226 §4 recommends.
_SECRET_CHARS: Final = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class TotpPolicy:
    """How codes are made and which steps are accepted.

    Attributes:
        step_s: Length of a time step in seconds: 30 or 60.
        digits: Digits per code: 6 or 8.
        past_steps: Steps before the current one that are still accepted: 0
            (step t only) or 1 (t-1 and t). Never future steps.

    Raises:
        ValueError: A value is out of range (at construction).
    """

    step_s: int = TOTP_STEP_S
    digits: int = TOTP_DIGITS
    past_steps: int = 1

    def __post_init__(self) -> None:
        # type() is checked: bool is an int subclass, and 30.0 would slip through.
        if type(self.step_s) is not int or self.step_s not in _STEP_CHOICES:
            raise ValueError(f"step_s must be 30 or 60, got {self.step_s!r}")
        if type(self.digits) is not int or self.digits not in _DIGIT_CHOICES:
            raise ValueError(f"digits must be 6 or 8, got {self.digits!r}")
        if type(self.past_steps) is not int or not (
            0 <= self.past_steps <= _MAX_PAST_STEPS
        ):
            raise ValueError(
                f"past_steps must be in 0..{_MAX_PAST_STEPS}, got {self.past_steps!r}"
            )


_DEFAULT_POLICY: Final = TotpPolicy()


def generate_secret() -> str:
    """Make a new random TOTP secret.

    Returns:
        32 base32 characters (160 bits from :class:`secrets.SystemRandom`). It is
        a secret: store it sealed (:class:`auth.SecretSealer`), show it only in
        the provisioning URI, never log it.
    """
    return pyotp.random_base32(_SECRET_CHARS)


def provisioning_uri(
    secret: str,
    *,
    username: str,
    issuer: str = TOTP_ISSUER,
    policy: TotpPolicy = _DEFAULT_POLICY,
) -> str:
    """Build the ``otpauth://totp/...`` URI an authenticator app scans.

    The URI states SHA-1 implicitly, and 6 digits and 30 s implicitly too (the
    Key URI Format's defaults) unless *policy* says otherwise: then it carries
    ``digits=`` and ``period=``. It contains the secret: show it to the new user
    once, never log it.

    Args:
        secret: The user's base32 secret.
        username: The account name shown in the app.
        issuer: The issuer shown in the app.
        policy: Step length and digits the codes will be checked with.

    Raises:
        ValueError: *secret* is not base32 of at least 112 bits, or *username* or
            *issuer* is empty or contains ``:`` (the Key URI Format uses ``:`` to
            separate them in the label).
    """
    for what, value in (("username", username), ("issuer", issuer)):
        if not value or ":" in value:
            raise ValueError(f"TOTP {what} must be non-empty and contain no ':'")
    return _totp(secret, policy).provisioning_uri(name=username, issuer_name=issuer)


def verify_totp(
    secret: str,
    code: str,
    *,
    now: datetime,
    last_accepted_step: int | None,
    policy: TotpPolicy = _DEFAULT_POLICY,
) -> int:
    """Check a TOTP *code* and return the time step it was accepted for.

    A code is accepted if it is ``policy.digits`` ASCII digits (default six),
    matches step t or t-1 (where t = floor(now / policy.step_s); t only when
    ``policy.past_steps`` is 0), and that step is greater than
    *last_accepted_step*. If it matches several steps (possible only by chance),
    the newest step that is still unused wins.

    Not checked: how many codes this client already tried (the login
    throttle's job, auth/limits.py), and races between logins (the caller's
    compare-and-set on the returned step, see the module's theory of operation).

    Args:
        secret: The user's base32 secret (unsealed).
        code: The code as the user typed it; no spaces are stripped.
        now: The current time, timezone-aware.
        last_accepted_step: The step stored at the user's last successful login,
            or ``None`` if there was none. Counted in ``policy.step_s`` steps.
        policy: Step length, digits and window; the one the secret was
            provisioned with.

    Returns:
        The accepted step; store it as the user's new last accepted step.

    Raises:
        InvalidCredentials: ``reason='bad_totp'`` if the code is malformed or
            matches neither step; ``reason='totp_reused'`` if it matches, but only
            for a step at or before *last_accepted_step*.
        ValueError: *now* is naive or before the oldest accepted step would
            start (1970-01-01 00:00:30 UTC by default), or *secret* is not a
            usable base32 secret (a store problem, not a login failure).
    """
    if now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    step = math.floor(now.timestamp()) // policy.step_s
    if step - policy.past_steps < 0:
        earliest = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
            seconds=policy.step_s * policy.past_steps
        )
        raise ValueError(
            f"now must be at or after {earliest.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )
    # Built before the shape check, so that a broken secret is reported the same
    # way whatever code was typed.
    totp = _totp(secret, policy)
    if len(code) != policy.digits or not (code.isascii() and code.isdigit()):
        raise InvalidCredentials("bad_totp")

    candidate = code.encode("ascii")
    # A list, not a generator with any(): every step is compared (Rule 3).
    matched = [
        step - back
        for back in range(policy.past_steps, -1, -1)
        if hmac.compare_digest(candidate, totp.generate_otp(step - back).encode())
    ]
    if not matched:
        raise InvalidCredentials("bad_totp")
    unused = [
        s for s in matched if last_accepted_step is None or s > last_accepted_step
    ]
    if not unused:
        raise InvalidCredentials("totp_reused")
    return max(unused)


def _totp(secret: str, policy: TotpPolicy) -> pyotp.TOTP:
    # pyotp checks the secret here: base32 (case-insensitive, padding optional)
    # and at least 112 bits (NIST SP 800-63B-4 §3.1.4.1). Both kinds of failure
    # become one ValueError (binascii.Error is already a subclass).
    try:
        return pyotp.TOTP(secret, digits=policy.digits, interval=policy.step_s)
    except ValueError:
        raise ValueError(
            "TOTP secret is not a base32 secret of 112 bits or more"
        ) from None
