"""Device certificate renewal over the control channel, broker side.

Theory of operation
===================
A connected device sends :class:`~relay.proto.control.RenewRequest` with a CSR
for a new key. :meth:`Renewer.renew` answers with
:class:`~relay.proto.control.RenewResult` or
:class:`~relay.proto.control.RenewRefused`; the channel stays up either way.
Checks, in order (the first failure is the answer):

1. The channel's certificate is still valid (``refused_expired``; a channel
   normally ends when it expires, so this is a race guard).
2. This broker holds the CA key (``unavailable``).
3. The store: the channel's certificate is on record, neither it nor the device
   is revoked (``refused_revoked``), it is not superseded (``refused_superseded``),
   and the device's newest certificate was issued at least
   ``pki.renewal_min_interval_s`` ago (``rate_limited``).
4. The CSR, with the enrollment profile and size limit (``bad_csr``), and the
   device id it asks for equals the channel's, which came from the verified
   certificate (``id_mismatch``; Invariant 6).
5. The new certificate is recorded (a device revoked meanwhile:
   ``refused_revoked``) and only then answered.

Every outcome is counted in ``relay_device_certificate_renewals_total{outcome}``
and is an audit event: ``device.certificate_renewed`` or
``device.certificate_renewal_refused``. Signing shares the enrollment API's
pool size (``pki.max_concurrent_signings``), with a limiter of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

import auth
from relay.config import PKIConfig
from relay.enrollment import record_certificate
from relay.metrics import RelayMetrics
from relay.proto import control
from relay.store import DeviceRevoked, Store, StoreError

if TYPE_CHECKING:
    from relay._trio.broker_pki import BrokerPKI


class _Refusal(Exception):
    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome


class Renewer:
    """Signs renewal requests from live control channels; one per broker.

    Args:
        pki: The broker's certificates (the signing CA and the agents' CA
            bundle are read from its current snapshot at each request).
        store: The relay store (called in worker threads).
        config: The device certificate profile and the renewal rate limit.
        metrics: Where outcomes are counted.
        log: Structured logger for audit events.
        wall_clock: The current time, timezone-aware.
    """

    def __init__(
        self,
        *,
        pki: BrokerPKI,
        store: Store,
        config: PKIConfig,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._pki = pki
        self._store = store
        self._config = config
        self._metrics = metrics
        self._log = log
        self._wall_clock = wall_clock
        self._limiter = trio.CapacityLimiter(config.max_concurrent_signings)

    async def renew(
        self, identity: auth.DeviceIdentity, request: control.RenewRequest
    ) -> control.RenewResult | control.RenewRefused:
        """Answer *request* from the channel authenticated as *identity*.

        Not checked here: that *identity* is the channel's verified identity
        (the caller passes the one from the handshake, never a message field).
        """
        try:
            return await self._renew(identity, request)
        except _Refusal as refusal:
            self._metrics.certificate_renewals.labels(refusal.outcome).inc()
            self._log.warning(
                "device.certificate_renewal_refused",
                device_id=identity.device_id,
                serial=identity.serial_hex,
                fingerprint=identity.fingerprint_sha256,
                reason=refusal.outcome,
                detail=str(refusal)[:200],
                audit=True,
            )
            return control.RenewRefused(
                reason=refusal.outcome, detail=str(refusal)[:200]
            )

    async def _renew(
        self, identity: auth.DeviceIdentity, request: control.RenewRequest
    ) -> control.RenewResult:
        now = self._wall_clock()
        if now > identity.not_after:
            raise _Refusal("refused_expired", "the current certificate has expired")
        snapshot = self._pki.current
        ca = snapshot.signing_ca
        if ca is None:
            raise _Refusal("unavailable", "this broker holds no CA key")
        await self._check_store(identity, now)
        csr = request.csr.encode("ascii")
        try:
            async with self._limiter:
                signed = await trio.to_thread.run_sync(
                    self._sign, ca, csr, now, abandon_on_cancel=True
                )
        except auth.CertificateRequestError as exc:
            raise _Refusal("bad_csr", f"{exc.reason}: {exc}") from None
        new = signed.identity
        if new.device_id != identity.device_id:
            # Signed, but never recorded or answered: the certificate is dropped.
            raise _Refusal(
                "id_mismatch",
                f"the request names device {new.device_id!r}, not this channel's",
            )
        try:
            await trio.to_thread.run_sync(
                partial(record_certificate, self._store, new, issued_at=now)
            )
        except DeviceRevoked:
            raise _Refusal("refused_revoked", "the device is revoked") from None
        except StoreError as exc:
            self._metrics.store_errors.labels("record_renewal").inc()
            raise _Refusal("store_error", f"store failed: {exc}") from None
        self._metrics.certificate_renewals.labels("signed").inc()
        self._log.info(
            "device.certificate_renewed",
            device_id=new.device_id,
            old_serial=identity.serial_hex,
            old_fingerprint=identity.fingerprint_sha256,
            new_serial=new.serial_hex,
            new_fingerprint=new.fingerprint_sha256,
            not_after=new.not_after.isoformat(),
            issuer=auth.certificate_fingerprint(ca.certificate),
            ignored_requests=list(signed.ignored_requests),
            audit=True,
        )
        return control.RenewResult(
            certificate=signed.certificate_pem().decode("ascii"),
            ca_bundle=snapshot.agent_ca_bundle,
        )

    async def _check_store(self, identity: auth.DeviceIdentity, now: datetime) -> None:
        try:
            record = await trio.to_thread.run_sync(
                self._store.lookup_certificate,
                identity.serial_hex,
                abandon_on_cancel=True,
            )
            newest = await trio.to_thread.run_sync(
                self._store.newest_certificate_issued_at,
                identity.device_id,
                abandon_on_cancel=True,
            )
        except StoreError as exc:
            self._metrics.store_errors.labels("renewal_check").inc()
            raise _Refusal("store_error", f"store failed: {exc}") from None
        if record is None or record.revoked:
            raise _Refusal("refused_revoked", "the certificate or device is revoked")
        if record.superseded:
            raise _Refusal(
                "refused_superseded", "the certificate was replaced by a newer one"
            )
        interval = timedelta(seconds=self._config.renewal_min_interval_s)
        if newest is not None and now - newest < interval:
            wait = interval - (now - newest)
            raise _Refusal(
                "rate_limited",
                f"a certificate was issued {int((now - newest).total_seconds())} s "
                f"ago; ask again in {int(wait.total_seconds()) + 1} s",
            )

    def _sign(
        self, ca: auth.CertificateAuthority, csr: bytes, now: datetime
    ) -> auth.SignedDevice:
        with warnings.catch_warnings():
            # As relay ca sign: cryptography warns on some malformed subjects,
            # which auth turns into refusals.
            warnings.simplefilter("ignore")
            return auth.sign_device_csr(
                ca,
                csr,
                now=now,
                lifetime=timedelta(days=self._config.device_cert_lifetime_days),
                max_csr_bytes=self._config.max_csr_bytes,
            )
