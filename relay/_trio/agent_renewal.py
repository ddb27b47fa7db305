"""Certificate renewal, agent side: when to renew, the request, the file swap.

Theory of operation
===================
:class:`CertificateRenewal` outlives the control-channel attempts. On each open
channel its :meth:`~CertificateRenewal.run` task looks at our certificate at
once and then every ``renew_check_s``: when less than ``renew_before_days``
remain, or the broker sent ``renewal_advised`` (a CA rollover), it makes a new
key of the enrollment type (ECDSA P-256) and a CSR for our device id, sends
``renew_request`` and waits up to ``renew_timeout_s`` for the answer. A refusal
or no answer means another try after ``renew_retry_s``. Renewals wait while an
offer or a session is live: the reconnect that follows a renewal would end it.

With ``renew_result`` the new certificate is checked (our device id, the new
key's public key, valid now), written crash-safely by :func:`install_renewed`
and the channel is closed (1000, "certificate renewed"); the next attempt
connects with the new certificate, which makes the broker supersede the old one.

The swap (every write fsynced, then the directory):

1. ``broker-ca.crt`` (the CA bundle from the broker, if any), atomically.
2. ``device.key.new`` (0600) and ``device.crt.new``.
3. rename ``device.key.new`` -> ``device.key``.
4. rename ``device.crt.new`` -> ``device.crt``.

:func:`finish_pending_swap` runs before every attempt. Both ``.new`` files
present and belonging together: the crash was after 2, roll forward (3, 4).
Only ``device.crt.new``, matching ``device.key``: the crash was after 3, do 4.
Anything else (a half-written ``.new`` file, a pair that does not match):
the ``.new`` files are removed and the old pair, untouched, stays in use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import auth
from relay.config import AgentConfig
from relay.pki_files import AgentDir, fsync_directory
from relay.proto import control
from relay.proto.close import CloseCode

#: The control messages the agent hands to :meth:`CertificateRenewal.handle`.
RENEWAL_EVENTS = (control.RenewResult, control.RenewRefused, control.RenewalAdvised)

ControlSender = Callable[[control.Event], Awaitable[None]]


class RenewalFailed(Exception):
    """A renewed certificate that cannot be used; the message says why."""


def renewal_due(
    certificate: x509.Certificate, *, now: datetime, renew_before: timedelta
) -> bool:
    """Whether *certificate* ends within *renew_before* of *now*."""
    return certificate.not_valid_after_utc - now <= renew_before


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def _pair_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    try:
        key = auth.load_private_key(key_pem)
        certificate = x509.load_pem_x509_certificate(cert_pem)
        return _public_der(certificate.public_key()) == _public_der(key.public_key())
    except (ValueError, TypeError, x509.InvalidVersion):
        return False


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    """Create or truncate *path* with *mode* and write *data*, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def install_renewed(
    files: AgentDir, *, key_pem: bytes, cert_pem: bytes, ca_bundle: bytes
) -> None:
    """Put a renewed key and certificate in place; see the module docstring.

    Raises:
        OSError: A write failed; :func:`finish_pending_swap` sorts out the
            files at the next attempt.
    """
    if ca_bundle:
        tmp = files.trust.with_name(files.trust.name + ".tmp")
        _write_synced(tmp, ca_bundle, 0o644)
        os.replace(tmp, files.trust)
    _write_synced(files.key_new, key_pem, 0o600)
    _write_synced(files.cert_new, cert_pem, 0o644)
    fsync_directory(files.root)
    os.replace(files.key_new, files.key)
    os.replace(files.cert_new, files.cert)
    fsync_directory(files.root)


def finish_pending_swap(files: AgentDir) -> str | None:
    """Complete or undo a swap a crash interrupted; see the module docstring.

    Returns:
        ``"completed"``, ``"discarded"``, or None when there was nothing to do.
    """
    key_new, cert_new = files.key_new.exists(), files.cert_new.exists()
    if not key_new and not cert_new:
        return None
    try:
        if key_new and cert_new:
            if _pair_matches(files.key_new.read_bytes(), files.cert_new.read_bytes()):
                os.replace(files.key_new, files.key)
                os.replace(files.cert_new, files.cert)
                fsync_directory(files.root)
                return "completed"
        elif cert_new and _pair_matches(
            files.key.read_bytes(), files.cert_new.read_bytes()
        ):
            os.replace(files.cert_new, files.cert)
            fsync_directory(files.root)
            return "completed"
    except FileNotFoundError:
        pass
    for path in (files.key_new, files.cert_new):
        path.unlink(missing_ok=True)
    fsync_directory(files.root)
    return "discarded"


def _new_request(files: AgentDir) -> tuple[bytes, str, x509.Certificate]:
    """(new key PEM, CSR PEM, current certificate); blocking."""
    certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
    device_id = auth.device_identity(certificate).device_id
    key = auth.generate_private_key()
    csr = auth.build_device_csr(key, device_id).decode("ascii")
    return auth.private_key_pem(key), csr, certificate


def _check_result(
    result: control.RenewResult, key_pem: bytes, device_id: str, now: datetime
) -> auth.DeviceIdentity:
    try:
        certificate = x509.load_pem_x509_certificate(result.certificate.encode())
        identity = auth.device_identity(certificate)
    except (ValueError, x509.InvalidVersion, auth.UntrustedPeer) as exc:
        raise RenewalFailed(f"the renewed certificate does not parse: {exc}") from None
    if identity.device_id != device_id:
        raise RenewalFailed(f"the renewed certificate is for {identity.device_id!r}")
    if not _pair_matches(key_pem, result.certificate.encode()):
        raise RenewalFailed("the renewed certificate is not for the new key")
    if not identity.not_before <= now <= identity.not_after:
        raise RenewalFailed("the renewed certificate is not valid now")
    if result.ca_bundle:
        try:
            x509.load_pem_x509_certificates(result.ca_bundle.encode())
        except ValueError as exc:
            raise RenewalFailed(f"the CA bundle does not parse: {exc}") from None
    return identity


class CertificateRenewal:
    """The agent's renewals; one per agent, shared by its attempts.

    Args:
        files: The agent's directory.
        config: ``renew_before_days``, ``renew_check_s``, ``renew_timeout_s``,
            ``renew_retry_s``.
        log: Structured logger.
        wall_clock: The current time, timezone-aware.
        busy: True while an offer or a session is live (no renewal then).
    """

    def __init__(
        self,
        files: AgentDir,
        config: AgentConfig,
        *,
        log: Any,
        wall_clock: Callable[[], datetime],
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._files = files
        self._config = config
        self._log = log
        self._wall_clock = wall_clock
        self._busy = busy
        self._advised = False
        self._not_before = 0.0  # trio time of the next allowed try
        self._answer: trio.MemorySendChannel[control.Event] | None = None
        self._wake = trio.Event()
        #: Renewals installed by this agent (tests and the demo watch it).
        self.renewed = 0

    def handle(self, event: control.Event) -> None:
        """A renewal message from the broker (one of :data:`RENEWAL_EVENTS`)."""
        if isinstance(event, control.RenewalAdvised):
            self._log.info("agent.renewal_advised", reason=event.reason)
            self._advised = True
            self._not_before = 0.0
            self._wake.set()
        elif self._answer is not None:
            # A second answer to one request is dropped (the buffer holds one).
            with contextlib.suppress(trio.WouldBlock):
                self._answer.send_nowait(event)
        else:
            self._log.warning("agent.renewal_unexpected", message=event.TYPE)

    async def run(
        self, send: ControlSender, close: Callable[[], Awaitable[None]]
    ) -> None:
        """Renew while the channel is open; *close* ends it after a renewal.

        Cancellation: cancelled with the channel; a swap in progress finishes
        in its worker thread (and :func:`finish_pending_swap` covers a crash).
        """
        while True:
            ready = trio.current_time() >= self._not_before and not self._busy()
            if ready and await self._due() and await self._renew(send):
                await close()
                return
            self._wake = trio.Event()
            with trio.move_on_after(self._config.renew_check_s):
                await self._wake.wait()

    async def _due(self) -> bool:
        if self._advised:
            return True
        try:
            certificate = await trio.to_thread.run_sync(
                lambda: x509.load_pem_x509_certificate(self._files.cert.read_bytes())
            )
        except (OSError, ValueError):
            return False  # the attempt's own certificate check reports it
        return renewal_due(
            certificate,
            now=self._wall_clock(),
            renew_before=timedelta(days=self._config.renew_before_days),
        )

    async def _renew(self, send: ControlSender) -> bool:
        """One renewal; True when the new certificate is installed."""
        self._not_before = trio.current_time() + self._config.renew_retry_s
        try:
            key_pem, csr, current = await trio.to_thread.run_sync(
                _new_request, self._files
            )
        except (OSError, ValueError, auth.UntrustedPeer) as exc:
            self._log.error("agent.renewal_failed", detail=f"cannot make a CSR: {exc}")
            return False
        device_id = auth.device_identity(current).device_id
        answer_in, answer_out = trio.open_memory_channel[control.Event](1)
        self._answer = answer_in
        try:
            self._log.info(
                "agent.renewal_requested",
                device_id=device_id,
                not_after=current.not_valid_after_utc.isoformat(),
                advised=self._advised,
            )
            await send(control.RenewRequest(csr=csr))
            answer: control.Event | None = None
            with trio.move_on_after(self._config.renew_timeout_s):
                answer = await answer_out.receive()
        finally:
            self._answer = None
        if answer is None:
            self._log.warning(
                "agent.renewal_failed", detail="no answer from the broker"
            )
            return False
        if isinstance(answer, control.RenewRefused):
            self._log.warning(
                "agent.renewal_refused", reason=answer.reason, detail=answer.detail
            )
            return False
        assert isinstance(answer, control.RenewResult)  # noqa: S101 - handle() passes only answers
        try:
            identity = _check_result(answer, key_pem, device_id, self._wall_clock())
            await trio.to_thread.run_sync(
                lambda: install_renewed(
                    self._files,
                    key_pem=key_pem,
                    cert_pem=answer.certificate.encode(),
                    ca_bundle=answer.ca_bundle.encode(),
                )
            )
        except (RenewalFailed, OSError) as exc:
            self._log.error("agent.renewal_failed", detail=str(exc))
            return False
        self._advised = False
        self._not_before = 0.0
        self.renewed += 1
        self._log.info(
            "agent.certificate_renewed",
            device_id=device_id,
            serial=identity.serial_hex,
            not_after=identity.not_after.isoformat(),
            trust_bundle=bool(answer.ca_bundle),
        )
        return True


async def close_renewed(ws: Any) -> None:
    """Close the control channel after a renewal (the agent reconnects)."""
    await ws.aclose(CloseCode.NORMAL, "certificate renewed")
