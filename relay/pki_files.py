"""Where keys and certificates live on disk, for the broker and the agent.

``auth.pki`` does the cryptography on bytes; this module is the thin file shell
around it. Layout of the broker's data dir::

    $RELAY_DATA_DIR/ca/ca.key          device CA key (0600)
    $RELAY_DATA_DIR/ca/ca.crt          device CA certificate (what `relay ca cert` prints)
    $RELAY_DATA_DIR/tls/listener.key   dev-mode listener key (0600)
    $RELAY_DATA_DIR/tls/listener.crt   dev-mode listener certificate, issued by the CA
    $RELAY_DATA_DIR/relay.sqlite3      the embedded store
    $RELAY_DATA_DIR/secrets/           TOTP sealing key, audit signing key (0600)
    $RELAY_DATA_DIR/audit/             the audit log (relay/audit_log.py)
    $RELAY_DATA_DIR/recordings/ID/     each session's recordings and receipts

and of an agent's directory: ``device.key`` (0600), ``device.csr``, ``device.crt``.
Private keys are written with mode 0600 from the start (never chmod'ed after the
fact) and never overwritten: replacing a key is a deliberate operator action.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import auth


class KeyExists(Exception):
    """A private key is already at the path; it is never overwritten."""


class CAError(Exception):
    """The device CA in the data dir cannot be used; the message says why and where.

    Raised as is when a CA file cannot be read or parsed, or the key and the
    certificate do not belong together; the subclasses name the states that have a
    standard remedy.
    """


class MissingCA(CAError):
    """The data dir has no CA yet (run ``relay ca init``)."""


class IncompleteCA(CAError):
    """Only one of the CA's key and certificate exists; a person must look."""


@dataclass(frozen=True, slots=True)
class DataDir:
    """Paths inside the broker's data dir."""

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def listener_key(self) -> Path:
        return self.root / "tls" / "listener.key"

    @property
    def listener_cert(self) -> Path:
        return self.root / "tls" / "listener.crt"

    @property
    def totp_sealing_key(self) -> Path:
        # Its own directory, away from the database file: a copy of the database
        # alone (a backup, a support bundle) does not unseal the TOTP secrets.
        return self.root / "secrets" / "totp-sealing.key"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def audit_key(self) -> Path:
        # Beside the sealing key, away from the log it signs checkpoints of.
        return self.root / "secrets" / "audit-signing.key"

    @property
    def audit_public_key(self) -> Path:
        return self.audit_dir / "audit-key.pem"

    @property
    def recordings(self) -> Path:
        return self.root / "recordings"


@dataclass(frozen=True, slots=True)
class AgentDir:
    """Paths inside an agent's directory."""

    root: Path

    @property
    def key(self) -> Path:
        return self.root / "device.key"

    @property
    def csr(self) -> Path:
        return self.root / "device.csr"

    @property
    def cert(self) -> Path:
        return self.root / "device.crt"


def write_private(path: Path, data: bytes) -> None:
    """Create *path* with mode 0600 and write *data*; refuse to replace a file.

    Raises:
        KeyExists: *path* already exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyExists(f"{path} exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or request atomically (readable by all)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def init_ca(data_dir: DataDir, *, now: datetime, lifetime: timedelta) -> bool:
    """Create the device CA unless one exists.

    Returns:
        True when a CA was created, False when one was already there (kept as is).

    Raises:
        IncompleteCA: Only the key or only the certificate exists (an interrupted
            init, or a restore gone wrong). Nothing is overwritten or completed
            automatically: a CA key is not something to guess about.
    """
    key_exists, cert_exists = data_dir.ca_key.exists(), data_dir.ca_cert.exists()
    if key_exists and cert_exists:
        return False
    if key_exists or cert_exists:
        present, missing = (
            (data_dir.ca_key, data_dir.ca_cert)
            if key_exists
            else (data_dir.ca_cert, data_dir.ca_key)
        )
        raise IncompleteCA(
            f"incomplete CA: {present} exists but {missing} does not; restore the missing "
            "file, or move the directory away to create a new CA"
        )
    ca = auth.create_ca(common_name="Remote Care device CA", now=now, lifetime=lifetime)
    write_private(data_dir.ca_key, ca.key_pem())
    write_public(data_dir.ca_cert, ca.certificate_pem())
    return True


def load_ca(data_dir: DataDir) -> auth.CertificateAuthority:
    """Load the device CA (key and certificate).

    Raises:
        MissingCA: There is no CA in the data dir.
        IncompleteCA: Only the key or only the certificate exists.
        CAError: A CA file cannot be read or parsed, the certificate is not a CA
            certificate, or the key does not belong to it. The message names the
            file.
    """
    _check_ca_present(data_dir)
    certificate = _parse_ca_certificate(data_dir.ca_cert)
    key_pem = _read_ca_file(data_dir.ca_key)
    try:
        auth.load_private_key(key_pem)
    except ValueError as exc:
        raise CAError(
            f"cannot use the CA key {data_dir.ca_key}: {_detail(exc)}"
        ) from None
    try:
        return auth.load_ca(
            key_pem=key_pem,
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        )
    except ValueError as exc:
        raise CAError(f"cannot use the CA in {data_dir.ca_key.parent}: {exc}") from None


def load_ca_certificate(data_dir: DataDir) -> x509.Certificate:
    """Load the device CA certificate only (what the broker verifies devices with).

    Not checked: the CA key (a broker with an operator-provided listener
    certificate never signs anything) and the certificate's validity period.

    Raises:
        MissingCA: There is no CA in the data dir.
        IncompleteCA: The key exists but the certificate does not.
        CAError: ``ca/ca.crt`` cannot be read, is not a PEM certificate, or is not
            a CA certificate (BasicConstraints CA:TRUE). The message names the file.
    """
    if not data_dir.ca_cert.exists():
        _check_ca_present(data_dir)
    return _parse_ca_certificate(data_dir.ca_cert)


def _check_ca_present(data_dir: DataDir) -> None:
    """Raise MissingCA or IncompleteCA unless both CA files exist."""
    key_exists, cert_exists = data_dir.ca_key.exists(), data_dir.ca_cert.exists()
    if key_exists and cert_exists:
        return
    if key_exists or cert_exists:
        raise IncompleteCA(
            f"incomplete CA in {data_dir.root / 'ca'}; see `relay ca init`"
        )
    raise MissingCA(f"no CA in {data_dir.root}; run `relay ca init` first")


def _read_ca_file(path: Path) -> bytes:
    """The bytes of a CA file; CAError naming *path* when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse_ca_certificate(path: Path) -> x509.Certificate:
    """The CA certificate at *path*, checked to be a CA certificate.

    Raises:
        CAError: *path* cannot be read or parsed, or is no CA certificate.
    """
    data = _read_ca_file(path)
    try:
        certificate = x509.load_pem_x509_certificate(data)
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        raise CAError(
            f"{path} is not a CA certificate (no BasicConstraints CA:TRUE)"
        ) from None
    except (
        ValueError,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        # cryptography raises ValueError for anything that is not a well-formed PEM
        # certificate and the others for an unknown version or malformed
        # extensions; the detail is kept for whoever restores the file.
        raise CAError(
            f"{path} is not a valid PEM certificate: {_detail(exc)}"
        ) from None
    if not constraints.ca:
        raise CAError(f"{path} is not a CA certificate (no BasicConstraints CA:TRUE)")
    return certificate


def _detail(exc: Exception) -> str:
    """cryptography's message for *exc*, without its FAQ link for unparsable PEM.

    Example: "Unable to load PEM file. See https://cryptography.io/... for more
    details. MalformedFraming" becomes "no well-formed PEM block (MalformedFraming)".
    """
    text = str(exc)
    if text.startswith("Unable to load PEM file"):
        reason = text.rpartition("for more details.")[2].strip()
        return f"no well-formed PEM block ({reason})" if reason else "no PEM block"
    return text


def default_server_names(extra: tuple[str, ...]) -> tuple[str, ...]:
    """Names for a dev listener certificate: loopback, this host, and *extra*."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]
    return tuple(dict.fromkeys(name for name in names if name))


def ensure_listener_certificate(
    data_dir: DataDir, *, names: tuple[str, ...], now: datetime, lifetime: timedelta
) -> bool:
    """Issue a dev-mode listener certificate from the local CA when needed.

    A new one is issued when there is none, when the present one expires within a
    third of *lifetime*, or when it does not cover every name in *names*.

    A certificate that does not parse is replaced too: it is a dev certificate this
    function made, with a key nobody else uses, so there is nothing to keep.

    Returns:
        True when a certificate was issued.

    Raises:
        MissingCA, IncompleteCA, CAError: A certificate is needed and the CA
            cannot be used.
    """
    if data_dir.listener_cert.exists() and data_dir.listener_key.exists():
        current = _load_listener_certificate(data_dir.listener_cert)
        if current is not None:
            fresh = current.not_valid_after_utc - now > lifetime / 3
            if fresh and set(names) <= _certificate_names(current):
                return False
    ca = load_ca(data_dir)
    key, certificate = auth.issue_server_certificate(
        ca, names=names, now=now, lifetime=lifetime
    )
    with contextlib.suppress(FileNotFoundError):
        data_dir.listener_key.unlink()
    write_private(data_dir.listener_key, auth.private_key_pem(key))
    write_public(
        data_dir.listener_cert, certificate.public_bytes(serialization.Encoding.PEM)
    )
    return True


def _load_listener_certificate(path: Path) -> x509.Certificate | None:
    """The certificate at *path*, or None when it does not parse."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, x509.InvalidVersion):
        return None


def listener_certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses of the listener certificate at *path*, sorted.

    Raises:
        OSError: The file cannot be read.
        ValueError: It is not a PEM certificate.
    """
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return sorted(_certificate_names(certificate))


def _certificate_names(certificate: x509.Certificate) -> set[str]:
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(name) for name in san.get_values_for_type(x509.DNSName)}
    names |= {str(address) for address in san.get_values_for_type(x509.IPAddress)}
    return names


def enroll_agent(agent_dir: AgentDir, device_id: str) -> None:
    """Generate the device key and CSR (datasheet Annex 1, step 1).

    Raises:
        KeyExists: The directory already holds a device key.
        ValueError: *device_id* is not a valid device id.
    """
    auth.validate_device_id(device_id)
    if agent_dir.key.exists():
        raise KeyExists(f"{agent_dir.key} exists; refusing to overwrite a device key")
    key = auth.generate_private_key()
    write_private(agent_dir.key, auth.private_key_pem(key))
    write_public(agent_dir.csr, auth.build_device_csr(key, device_id))


def load_or_create_sealing_key(
    data_dir: DataDir, configured: str | None
) -> tuple[bytes, str]:
    """The key that seals TOTP secrets in the store, and where it came from.

    Production passes the key from config or ``RELAY_TOTP_SEALING_KEY``
    (*configured*, base64 of 32 bytes). Otherwise the key lives in its own 0600
    file in the data dir, created on first use; the caller logs which it was.

    Raises:
        ValueError: The configured or stored key is not base64 of 32 bytes.
    """
    if configured:
        return auth.key_from_text(configured), "configuration"
    path = data_dir.totp_sealing_key
    if not path.exists():
        # Another process may create it first; then theirs is used.
        with contextlib.suppress(KeyExists):
            write_private(
                path, auth.key_to_text(auth.generate_sealing_key()).encode() + b"\n"
            )
    return auth.key_from_text(path.read_text()), str(path)
