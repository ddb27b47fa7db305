"""Device enrollment over the engineer API (datasheet Annex 1, step 4: "by using
service tools").

Theory of operation
===================
``POST /api/v1/enrollments`` takes ``{"csr": "<PEM text>"}`` and answers the
signed device certificate with the CA certificate. The route is registered in
:func:`relay._trio.engineer_api.api_routes` through its ``guarded`` wrapper, so
the session and the role (:data:`relay.api_contract.ROUTE_ROLES`: engineer and
admin) are checked before :meth:`Enroller.enroll` runs; an auditor gets 403
there, counted and audited as ``auth.forbidden``. :meth:`Enroller.enroll` then
checks, in this order:

1. the enroll permission: an admin always has it; an engineer's ``can_enroll``
   is read from the store on every request, so that withdrawing it
   (``relay user set NAME --can-enroll no``) takes effect at once -> 403;
2. a CA key on this broker, loaded at startup (without one the broker logs
   ``enrollment.api_disabled`` once and this route answers 503);
3. the body: ``application/json`` (else 415), at most
   :data:`~relay.api_contract.MAX_ENROLLMENT_BODY_BYTES`, checked on
   Content-Length and again while the body streams in (else 413), a JSON object
   with exactly the key ``csr`` holding a non-empty string (else 400);
4. the request itself, by :func:`auth.sign_device_csr` with the same profile,
   lifetime and size cap as ``relay ca sign``: 400 naming the reason (too large,
   malformed, bad signature, weak key, bad device id);
5. the store's record of the new certificate, which refuses a revoked device id
   (409), and for an engineer a device id that already has a certificate (409:
   re-keying an enrolled instrument would hand its identity to whoever holds the
   new key, so only an admin may); such a certificate is thrown away, never
   answered.

Rule 1: no certificate rule lives here; the profile is ``auth.pki``'s.
Rule 2: CSR parsing, signing and store calls run in worker threads; at most
        ``PKIConfig.max_concurrent_signings`` requests are parsed and signed at
        once, so a burst of enrollments cannot take every worker thread.
Rule 3: every request that reaches :meth:`Enroller.enroll` is counted once in
        ``relay_enrollments_total{outcome}`` and is one audit event,
        ``enrollment.signed`` or ``enrollment.refused``. The CSR itself is never
        logged; text that came from it is escaped and shortened by ``auth``, and
        the detail of a refusal is cut to :data:`MAX_DETAIL_CHARS`.

A store failure is counted (``store_error``) and audited here, then re-raised to
the listener's handler, which answers 503 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Final

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import auth
from relay._trio.login_service import Principal
from relay._trio.request_body import BadBody, read_json_body
from relay.api_contract import MAX_ENROLLMENT_BODY_BYTES
from relay.config import PKIConfig
from relay.enrollment import record_certificate
from relay.metrics import RelayMetrics
from relay.store import DeviceAlreadyEnrolled, DeviceRevoked, Store, StoreError

__all__ = ["MAX_DETAIL_CHARS", "MAX_WARNINGS", "Enroller"]

#: Longest refusal detail in an answer or an audit event.
MAX_DETAIL_CHARS: Final = 300
#: Most "not granted" warnings answered and logged for one request; a request
#: asking for more gets a last line with the count of the rest.
MAX_WARNINGS: Final = 32

_UNAVAILABLE: Final = "enrollment is not available on this broker"
_NOT_PERMITTED: Final = (
    "forbidden: this account may not enroll devices (an admin can grant it "
    "with `relay user set NAME --can-enroll yes`)"
)
_BODY_ERRORS: Final[dict[str, Callable[[int], str]]] = {
    "unsupported_media_type": lambda _: "unsupported media type: send application/json",
    "body_too_large": lambda cap: f"request body too large: at most {cap} bytes",
    "bad_json": lambda _: "bad request: the body is not valid JSON",
}
_BAD_SHAPE: Final = (
    'bad request: the body must be a JSON object with exactly one key, "csr", '
    "holding the PEM certificate request as a non-empty string"
)


class _Refused(Exception):
    """One refusal: the answer, its counter label and its audit reason."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        outcome: str,
        reason: str,
        device_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message[:MAX_DETAIL_CHARS]
        self.outcome = outcome
        self.reason = reason
        self.device_id = device_id


def _source(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


async def _read_csr(request: Request, max_bytes: int) -> bytes:
    """The ``csr`` field of the JSON body, as bytes for ``auth``.

    Raises:
        _Refused: 415, 413 or 400 (see the module docstring, step 3).
    """
    try:
        data = await read_json_body(request, max_bytes)
    except BadBody as bad:
        raise _Refused(
            bad.status,
            _BODY_ERRORS[bad.reason](max_bytes),
            outcome="bad_request",
            reason=bad.reason,
        ) from None
    if (
        not isinstance(data, dict)
        or set(data) != {"csr"}
        or not isinstance(data["csr"], str)
        or not data["csr"]
    ):
        raise _Refused(400, _BAD_SHAPE, outcome="bad_request", reason="bad_shape")
    text: str = data["csr"]
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        # PEM is ASCII; this also refuses lone surrogates ("\ud800"), which JSON
        # allows and no encoding can carry.
        raise _Refused(
            400,
            "certificate request refused (malformed): a PEM certificate request "
            "is ASCII text",
            outcome="bad_csr",
            reason="malformed",
        ) from None


def _warnings(ignored: tuple[str, ...]) -> list[str]:
    """Sentences for what the request asked but was not granted, at most MAX_WARNINGS."""
    shown = [
        f"the request asked for {item}; not granted (fixed device profile)"
        for item in ignored[:MAX_WARNINGS]
    ]
    if len(ignored) > MAX_WARNINGS:
        shown.append(f"... and {len(ignored) - MAX_WARNINGS} more not granted")
    return shown


class Enroller:
    """Signs device CSRs for the engineer API; one per broker process.

    Args:
        ca: The device CA with its key, or ``None`` when this broker has no CA
            key (then every enrollment answers 503).
        store: The relay store (called in worker threads).
        config: The device certificate profile's settings, as ``relay ca sign``
            uses them.
        metrics: Where outcomes are counted.
        log: Structured logger for audit events.
        wall_clock: The current time, timezone-aware.
    """

    def __init__(
        self,
        *,
        ca: auth.CertificateAuthority | None,
        store: Store,
        config: PKIConfig,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._ca = ca
        self._ca_pem = None if ca is None else ca.certificate_pem().decode("ascii")
        self._store = store
        self._lifetime = timedelta(days=config.device_cert_lifetime_days)
        self._max_csr_bytes = config.max_csr_bytes
        self._metrics = metrics
        self._log = log
        self._wall_clock = wall_clock
        self._limiter = trio.CapacityLimiter(config.max_concurrent_signings)

    def set_ca(self, ca: auth.CertificateAuthority | None) -> None:
        """Sign with *ca* from now on (a CA rollover the broker reloaded)."""
        self._ca = ca
        self._ca_pem = None if ca is None else ca.certificate_pem().decode("ascii")

    async def enroll(self, request: Request, principal: Principal) -> Response:
        """Handle ``POST /api/v1/enrollments`` for an authenticated *principal*.

        Resource handling:
            The body is read up to the cap and no further; at most
            ``max_concurrent_signings`` requests hold a signing slot.

        Raises:
            StoreError: The store failed (counted and audited first); the
                listener answers 503.
        """
        source = _source(request)
        try:
            return await self._enroll(request, principal, source)
        except _Refused as refused:
            self._refused(
                principal,
                source,
                outcome=refused.outcome,
                reason=refused.reason,
                detail=refused.message,
                device_id=refused.device_id,
            )
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        except StoreError as exc:
            self._refused(
                principal,
                source,
                outcome="store_error",
                reason="store_error",
                detail=str(exc),
            )
            raise

    async def _enroll(
        self, request: Request, principal: Principal, source: str
    ) -> Response:
        if not await self._may_enroll(principal):
            raise _Refused(
                403, _NOT_PERMITTED, outcome="forbidden", reason="not_permitted"
            )
        ca, ca_pem = self._ca, self._ca_pem
        if ca is None or ca_pem is None:
            raise _Refused(503, _UNAVAILABLE, outcome="unavailable", reason="no_ca_key")
        csr = await _read_csr(request, MAX_ENROLLMENT_BODY_BYTES)
        now = self._wall_clock()
        try:
            async with self._limiter:
                signed = await trio.to_thread.run_sync(
                    partial(
                        auth.sign_device_csr,
                        ca,
                        csr,
                        now=now,
                        lifetime=self._lifetime,
                        max_csr_bytes=self._max_csr_bytes,
                    )
                )
        except auth.CertificateRequestError as exc:
            raise _Refused(
                400,
                f"certificate request refused ({exc.reason}): {exc}",
                outcome="bad_csr",
                reason=exc.reason,
            ) from None
        identity = signed.identity
        try:
            await trio.to_thread.run_sync(
                partial(
                    record_certificate,
                    self._store,
                    identity,
                    issued_at=now,
                    # An engineer may enroll new instruments, never give an
                    # enrolled one a key of their choosing.
                    new_device_only=principal.role != "admin",
                )
            )
        except DeviceAlreadyEnrolled:
            raise _Refused(
                409,
                f"device {identity.device_id} is already enrolled; only an admin "
                "may enroll it again (a new key for an existing instrument)",
                outcome="already_enrolled",
                reason="device_already_enrolled",
                device_id=identity.device_id,
            ) from None
        except DeviceRevoked:
            raise _Refused(
                409,
                f"device {identity.device_id} is revoked; revoked device ids are "
                "never enrolled again (enroll the replacement under a new id)",
                outcome="revoked",
                reason="device_revoked",
                device_id=identity.device_id,
            ) from None
        warnings = _warnings(signed.ignored_requests)
        self._metrics.enrollments.labels("signed").inc()
        self._log.info(
            "enrollment.signed",
            username=principal.username,
            role=principal.role,
            device_id=identity.device_id,
            serial=identity.serial_hex,
            fingerprint=identity.fingerprint_sha256,
            not_after=identity.not_after.isoformat(),
            source=source,
            warnings=warnings,
            audit=True,
        )
        return JSONResponse(
            {
                "device_id": identity.device_id,
                "serial": identity.serial_hex,
                "fingerprint_sha256": identity.fingerprint_sha256,
                "not_after": identity.not_after.isoformat(),
                "certificate": signed.certificate_pem().decode("ascii"),
                "ca_certificate": ca_pem,
                "warnings": warnings,
            },
            status_code=201,
        )

    async def _may_enroll(self, principal: Principal) -> bool:
        """Admins always; engineers while their stored ``can_enroll`` is true."""
        if principal.role == "admin":
            return True
        if principal.role != "engineer":
            # ROUTE_ROLES stops every other role before this handler; a role
            # added later is refused here too until someone decides otherwise.
            return False
        user = await trio.to_thread.run_sync(self._store.get_user, principal.username)
        return user is not None and user.disabled_at is None and user.can_enroll

    def _refused(
        self,
        principal: Principal,
        source: str,
        *,
        outcome: str,
        reason: str,
        detail: str,
        device_id: str | None = None,
    ) -> None:
        self._metrics.enrollments.labels(outcome).inc()
        fields: dict[str, Any] = {}
        if device_id is not None:
            fields["device_id"] = device_id
        self._log.warning(
            "enrollment.refused",
            username=principal.username,
            role=principal.role,
            reason=reason,
            source=source,
            detail=detail[:MAX_DETAIL_CHARS],
            **fields,
            audit=True,
        )
