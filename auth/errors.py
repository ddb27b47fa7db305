"""Exceptions raised by :mod:`auth`.

Every refusal carries a short, stable ``reason`` code for metrics labels and audit
events, and a human-readable message (``str(error)``) for logs and CLI output. The
codes are part of the API: dashboards and alert rules match on them, so add new
ones rather than renaming old ones.
"""

from __future__ import annotations

__all__ = ["AuthError", "CertificateRequestError", "UntrustedPeer"]


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
