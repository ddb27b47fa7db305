"""The broker's certificates at run time: the listener pair and the device CAs.

Theory of operation
===================
:class:`BrokerPKI` holds one :class:`PKISnapshot`: the listener certificate and
key (both TLS listeners serve them), the device CA, the previous device CA while a
rollover is in progress, the CA key that signs (None when it is kept offline),
and the device listener's TLS context built from all of them. A snapshot is
loaded and checked as a whole in a worker thread; nothing changes unless every
part of it loaded.

:meth:`BrokerPKI.watch` looks at the files every ``pki.tls_reload_poll_s``
(:meth:`BrokerPKI.reload_now` does the same at once; the broker calls it on
SIGHUP too). In dev mode it first re-issues the listener certificate when it is
due (:func:`relay.pki_files.ensure_listener_certificate`, the same function the
start uses). Then it hashes the files; when the hash differs from the snapshot
in use (and from the last refused one, so a broken file is reported once, not at
every poll), it loads a new snapshot:

- The device listener gets a new TLS context object: it reads
  ``DeviceListener.ssl_context`` for every new connection, so the new certificate
  and trust apply to new handshakes and live connections carry on. A new object
  is needed because trust anchors cannot be taken out of an ``SSLContext``.
- Hypercorn holds the engineer listener's context for its whole life, so that
  one is changed in place with ``load_cert_chain``, from copies of the checked
  bytes in a private temporary directory (never from the watched paths, which
  may have changed again since they were checked: a failed ``load_cert_chain``
  could leave the live context with a certificate and no key).
- The enrollment API and renewals sign with the new CA key.
- When a CA left the trust set (``relay ca retire-previous``), live control
  channels whose certificate no CA in the set verifies are closed (4001).

A set that does not load (a key that does not match the certificate, bad PEM, a
half-written file, an incomplete CA) is refused: ``tls.reload_refused`` (an
audit event) and ``relay_tls_reloads_total{outcome="refused"}``, and the
snapshot in use stays. The expiry gauges are set at every look.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import auth
from relay.config import BrokerConfig
from relay.metrics import RelayMetrics
from relay.pki_files import (
    CAError,
    DataDir,
    default_server_names,
    ensure_listener_certificate,
    issued_by,
    load_ca,
    load_ca_certificate,
    load_previous_ca_certificate,
)
from relay.tls import device_listener_context

if TYPE_CHECKING:
    from relay._trio.device_listener import DeviceListener
    from relay._trio.enrollment_api import Enroller


class ReloadRefused(Exception):
    """A certificate set that cannot be used; the message says why."""


#: What a refused reload can fail with (all reported, none raised to the loop).
_LOAD_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    ssl.SSLError,
    CAError,
    TypeError,
    ReloadRefused,
)


@dataclass(frozen=True, slots=True)
class PKISnapshot:
    """One checked set of the broker's certificates.

    Attributes:
        listener_digest: SHA-256 over the listener certificate and key files.
        ca_digest: SHA-256 over the CA files.
        listener_certificate: The leaf the listeners serve.
        ca_certificate: The device CA (signs new certificates).
        previous_ca_certificate: The CA before a rollover, still trusted.
        signing_ca: The device CA with its key; None without ``ca/ca.key``.
        device_context: The device listener's context for this set.
        agent_ca_bundle: PEM of the CAs agents should trust for the listener
            (the device CAs in dev mode, where they issue it; "" otherwise).
        staged: A private directory holding copies of the listener pair
            (``listener.crt``, ``listener.key``), removed once applied.
    """

    listener_digest: str
    ca_digest: str
    listener_certificate: x509.Certificate
    ca_certificate: x509.Certificate
    previous_ca_certificate: x509.Certificate | None
    signing_ca: auth.CertificateAuthority | None
    device_context: ssl.SSLContext
    agent_ca_bundle: str
    staged: Path

    @property
    def trusted(self) -> tuple[x509.Certificate, ...]:
        """The device CAs, current first."""
        if self.previous_ca_certificate is None:
            return (self.ca_certificate,)
        return (self.ca_certificate, self.previous_ca_certificate)


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "big"))
        hasher.update(part)
    return hasher.hexdigest()


def _read_optional(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


@dataclass(frozen=True, slots=True)
class _Files:
    cert_file: Path
    key_file: Path
    dev_mode: bool


def _file_digests(data_dir: DataDir, files: _Files) -> tuple[str, str]:
    listener = _digest(files.cert_file.read_bytes(), files.key_file.read_bytes())
    ca = _digest(
        _read_optional(data_dir.ca_cert),
        _read_optional(data_dir.ca_key),
        _read_optional(data_dir.previous_ca_cert),
    )
    return listener, ca


def _check_pair(cert_pem: bytes, key_pem: bytes) -> x509.Certificate:
    """The leaf of *cert_pem*, checked to belong to *key_pem*."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ReloadRefused(f"listener certificate is not PEM: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ReloadRefused(f"listener key does not load: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if chain[0].public_key().public_bytes(der, spki) != key.public_key().public_bytes(
        der, spki
    ):
        raise ReloadRefused("listener key does not match the listener certificate")
    return chain[0]


# Reads of a dev-mode set that raced a CA change before the last read is used.
_CONSISTENT_READ_ATTEMPTS = 3


def load_snapshot(
    config: BrokerConfig,
    files: _Files,
    *,
    now: datetime,
    skip: frozenset[tuple[str, str]] = frozenset(),
) -> PKISnapshot | tuple[str, str]:
    """Load and check the broker's certificates (blocking; a worker thread).

    In dev mode the listener certificate is (re-)issued first when due.

    Returns:
        The snapshot, or just the digests when they are in *skip* (unchanged).

    Raises:
        ReloadRefused, OSError, ValueError, ssl.SSLError, CAError: The set does
            not load; nothing is changed.
    """
    data_dir = DataDir(config.data_dir)
    for attempt in range(1, _CONSISTENT_READ_ATTEMPTS + 1):
        if files.dev_mode:
            ensure_listener_certificate(
                data_dir,
                names=default_server_names(config.server_names),
                now=now,
                lifetime=timedelta(days=config.pki.server_cert_lifetime_days),
            )
        digests = _file_digests(data_dir, files)
        if digests in skip:
            return digests
        cert_pem = files.cert_file.read_bytes()
        key_pem = files.key_file.read_bytes()
        leaf = _check_pair(cert_pem, key_pem)
        ca_certificate = load_ca_certificate(data_dir)
        previous = load_previous_ca_certificate(data_dir)
        # In dev mode the CA files may change between the listener check and
        # these reads (`relay ca retire-previous` running now): a set that
        # trusts only the new CA must not serve a listener the old one issued,
        # or agents that renewed refuse it. Such a set is read again. (With the
        # CA key kept offline no new listener can be issued: the last read is
        # used as it is.)
        if (
            not files.dev_mode
            or issued_by(leaf, previous or ca_certificate)
            or attempt == _CONSISTENT_READ_ATTEMPTS
        ):
            break
    signing_ca = load_ca(data_dir) if data_dir.ca_key.exists() else None
    trusted = [ca_certificate] if previous is None else [ca_certificate, previous]
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in trusted)
    staged = Path(tempfile.mkdtemp(prefix="relay-tls-reload-"))
    try:
        (staged / "listener.crt").write_bytes(cert_pem)
        staged_key = staged / "listener.key"
        staged_key.touch(mode=0o600)
        staged_key.write_bytes(key_pem)
        (staged / "device-ca.crt").write_bytes(bundle)
        # OpenSSL's own check of the pair and the trust bundle.
        context = device_listener_context(
            cert_file=staged / "listener.crt",
            key_file=staged_key,
            device_ca_file=staged / "device-ca.crt",
        )
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return PKISnapshot(
        listener_digest=digests[0],
        ca_digest=digests[1],
        listener_certificate=leaf,
        ca_certificate=ca_certificate,
        previous_ca_certificate=previous,
        signing_ca=signing_ca,
        device_context=context,
        agent_ca_bundle=bundle.decode("ascii") if files.dev_mode else "",
        staged=staged,
    )


class BrokerPKI:
    """The broker's certificates, reloaded from disk; see the module docstring.

    Args:
        config: The broker's configuration (data dir, PKI settings).
        cert_file: The listener certificate chain (operator's or dev-mode).
        key_file: Its key.
        dev_mode: The listener certificate is issued from the data dir's CA.
        metrics: Expiry gauges and reload counts go here.
        log: Structured logger (audit events).
        wall_clock: The current time, timezone-aware.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        cert_file: Path,
        key_file: Path,
        dev_mode: bool,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._config = config
        self._files = _Files(cert_file, key_file, dev_mode)
        self._metrics = metrics
        self._log = log
        self._wall_clock = wall_clock
        self._refused: tuple[str, str] | None = None
        self._current: PKISnapshot | None = None
        self.engineer_context: ssl.SSLContext | None = None
        self.listener: DeviceListener | None = None
        self.enroller: Enroller | None = None

    @property
    def cert_file(self) -> Path:
        return self._files.cert_file

    @property
    def key_file(self) -> Path:
        return self._files.key_file

    @property
    def current(self) -> PKISnapshot:
        """The snapshot in use.

        Raises:
            RuntimeError: Before :meth:`load_initial`.
        """
        if self._current is None:
            raise RuntimeError("BrokerPKI.load_initial was not called")
        return self._current

    def load_initial(self, now: datetime) -> None:
        """Load the first snapshot (blocking; the broker's start, in a thread).

        Raises:
            ReloadRefused, OSError, ValueError, ssl.SSLError, CAError: The
                broker cannot start with these files.
        """
        snapshot = load_snapshot(self._config, self._files, now=now)
        assert isinstance(snapshot, PKISnapshot)  # noqa: S101 - nothing skipped
        shutil.rmtree(snapshot.staged, ignore_errors=True)
        self._current = snapshot

    def update_gauges(self) -> None:
        """Set the expiry gauges from the snapshot in use, and the expiring count."""
        snapshot = self.current
        expiry = self._metrics.certificate_expiry
        expiry.labels("listener").set(
            snapshot.listener_certificate.not_valid_after_utc.timestamp()
        )
        expiry.labels("device_ca").set(
            snapshot.ca_certificate.not_valid_after_utc.timestamp()
        )
        if snapshot.previous_ca_certificate is not None:
            expiry.labels("device_ca_previous").set(
                snapshot.previous_ca_certificate.not_valid_after_utc.timestamp()
            )
        else:
            with contextlib.suppress(KeyError):
                expiry.remove("device_ca_previous")
        if self.listener is not None:
            window = timedelta(days=self._config.pki.renew_before_days)
            self._metrics.device_certificates_expiring_soon.set(
                self.listener.count_expiring_before(self._wall_clock() + window)
            )

    async def watch(self) -> None:
        """Look at the files every ``pki.tls_reload_poll_s`` until cancelled."""
        while True:
            await trio.sleep(self._config.pki.tls_reload_poll_s)
            await self.reload_now()

    async def reload_now(self) -> bool:
        """Look at the files now; load a changed set. True when one was loaded."""
        current = self.current
        skip = {(current.listener_digest, current.ca_digest)}
        if self._refused is not None:
            skip.add(self._refused)
        try:
            loaded = await trio.to_thread.run_sync(
                lambda: load_snapshot(
                    self._config,
                    self._files,
                    now=self._wall_clock(),
                    skip=frozenset(skip),
                )
            )
        except _LOAD_ERRORS as exc:
            self._refuse(str(exc))
            self.update_gauges()
            return False
        if not isinstance(loaded, PKISnapshot):
            self.update_gauges()
            return False
        try:
            self._apply(loaded)
        except (
            ssl.SSLError
        ) as exc:  # pragma: no cover - the same bytes loaded in the thread
            self._refuse(f"engineer listener refused the pair: {exc}")
            return False
        finally:
            await trio.to_thread.run_sync(
                lambda: shutil.rmtree(loaded.staged, ignore_errors=True)
            )
        self._refused = None
        self.update_gauges()
        return True

    def _refuse(self, detail: str) -> None:
        try:
            self._refused = _file_digests(DataDir(self._config.data_dir), self._files)
        except OSError:
            self._refused = None
        self._metrics.tls_reloads.labels("refused").inc()
        self._log.error(
            "tls.reload_refused",
            detail=detail[:200],
            cert_file=str(self._files.cert_file),
            hint="the certificates in use stay; fix the files (they are looked at "
            "again when they change)",
            audit=True,
        )

    def _apply(self, snapshot: PKISnapshot) -> None:
        old = self.current
        listener_changed = snapshot.listener_digest != old.listener_digest
        if listener_changed and self.engineer_context is not None:
            # In place: Hypercorn holds this object. New handshakes only.
            self.engineer_context.load_cert_chain(
                certfile=str(snapshot.staged / "listener.crt"),
                keyfile=str(snapshot.staged / "listener.key"),
            )
        self._current = snapshot
        if self.enroller is not None:
            self.enroller.set_ca(snapshot.signing_ca)
        retired = [
            ca for ca in old.trusted if ca not in snapshot.trusted
        ]  # x509.Certificate compares by DER
        if self.listener is not None:
            self.listener.set_trust(
                snapshot.device_context,
                snapshot.ca_certificate,
                ()
                if snapshot.previous_ca_certificate is None
                else (snapshot.previous_ca_certificate,),
            )
            if retired:
                self.listener.close_untrusted()
        self._metrics.tls_reloads.labels("reloaded").inc()
        self._log.warning(
            "tls.reloaded",
            listener_changed=listener_changed,
            listener_serial=format(snapshot.listener_certificate.serial_number, "x"),
            listener_not_after=snapshot.listener_certificate.not_valid_after_utc.isoformat(),
            device_ca=auth.certificate_fingerprint(snapshot.ca_certificate),
            previous_ca=None
            if snapshot.previous_ca_certificate is None
            else auth.certificate_fingerprint(snapshot.previous_ca_certificate),
            retired_cas=[auth.certificate_fingerprint(ca) for ca in retired],
            audit=True,
        )
