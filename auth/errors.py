"""Exceptions raised by :mod:`auth`.

Every refusal carries a short, stable ``reason`` code for metrics labels and audit
events, and a human-readable message (``str(error)``) for logs and CLI output. The
codes are part of the API: dashboards and alert rules match on them, so add new
ones rather than renaming old ones.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "CertificateRequestError",
    "InvalidCredentials",
    "InvalidToken",
    "SealedValueError",
    "UntrustedPeer",
]


class AuthError(Exception):
    """Base class for every refusal raised by :mod:`auth`.

    Callers that only need "allowed or not" catch this one class; a security
    decision never comes back as a ``bool``.
    """


class _ReasonedError(AuthError):
    # Shared plumbing: ``str(error)`` is the human text only, so it can go to a
    # user as-is, while ``reason`` stays machine-readable.

    reason: str

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[_ReasonedError], tuple[str, str]]:
        # BaseException pickles as ``cls(*self.args)``, and ``args`` holds only
        # the message; without this the copy in another process (or a
        # ``copy.copy``) would fail to rebuild.
        return (type(self), (self.reason, str(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {str(self)!r})"


class CertificateRequestError(_ReasonedError):
    """A certificate signing request (CSR) was refused.

    Attributes:
        reason: A short machine code for metrics and audit, one of
            ``'too_large'``, ``'malformed'``, ``'bad_signature'``, ``'weak_key'``
            or ``'bad_device_id'``.

    ``str(error)`` is a human-readable explanation that names what was wrong
    (for example the key type and size for ``'weak_key'``).
    """


class UntrustedPeer(_ReasonedError):
    """A presented certificate is not acceptable.

    Attributes:
        reason: A short machine code for metrics and audit, one of
            ``'not_signed_by_ca'``, ``'expired'``, ``'not_yet_valid'``,
            ``'not_client_cert'``, ``'is_ca'``, ``'no_device_id'``,
            ``'bad_device_id'`` or ``'id_mismatch'``.

    ``str(error)`` is a human-readable explanation.
    """


class InvalidCredentials(_ReasonedError):
    """A login attempt failed: one class for every cause.

    Attributes:
        reason: A short machine code for metrics and audit, one of
            ``'unknown_user'``, ``'bad_password'``, ``'bad_totp'``,
            ``'totp_reused'`` or ``'totp_reset'``; the shell adds its own
            (``'user_disabled'``, ``'password_hash_unreadable'`` ...).

    The login answer (HTTP status, body, timing) must not depend on ``reason``:
    telling the caller which factor failed would let an attacker find valid user
    names, or confirm a guessed password before guessing the code. ``reason`` is
    for counters and audit events only. ``str(error)`` defaults to the same text
    for every cause, so it is safe to show.
    """

    def __init__(
        self, reason: str, message: str = "invalid username, password or code"
    ) -> None:
        super().__init__(reason, message)


class InvalidToken(_ReasonedError):
    """A session token is not acceptable.

    Attributes:
        reason: A short machine code for metrics and audit, one of
            ``'malformed'`` (not a token this relay could have issued),
            ``'unknown'`` (well-formed, but no session has it), ``'expired'``
            (idle or absolute lifetime over) or ``'revoked'`` (logout, or the
            user was disabled).

    ``str(error)`` defaults to one text for every cause; it never contains the
    token.
    """

    def __init__(
        self, reason: str, message: str = "invalid or expired session token"
    ) -> None:
        super().__init__(reason, message)


class SealedValueError(_ReasonedError):
    """A sealed (encrypted at rest) value cannot be opened.

    Attributes:
        reason: A short machine code for metrics and audit, one of
            ``'malformed'`` (not the text form :meth:`auth.SecretSealer.seal`
            produces), ``'unsupported_version'`` (a format version this code does
            not know) or ``'not_authentic'`` (the authentication tag does not
            match: the value was changed, was sealed with another key, or belongs
            to another context such as another user's row; AES-GCM cannot tell
            these apart, by design).

    ``str(error)`` is a human-readable explanation; it never contains the sealed
    value or the key.
    """
