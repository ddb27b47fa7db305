"""Where keys and certificates live on disk, for the broker and the agent.

``auth.pki`` does the cryptography on bytes; this module is the thin file shell
around it. Layout of the broker's data dir::

    $RELAY_DATA_DIR/ca/ca.key          device CA key (0600)
    $RELAY_DATA_DIR/ca/ca.crt          device CA certificate (what `relay ca cert` prints)
    $RELAY_DATA_DIR/ca/previous/       the CA before `relay ca rollover` (ca.key,
                                       ca.crt), trusted until `relay ca retire-previous`
    $RELAY_DATA_DIR/tls/listener.key   dev-mode listener key (0600)
    $RELAY_DATA_DIR/tls/listener.crt   dev-mode listener certificate, issued by the CA
    $RELAY_DATA_DIR/relay.sqlite3      the embedded store
    $RELAY_DATA_DIR/secrets/           TOTP sealing key, audit signing key (0600)
    $RELAY_DATA_DIR/audit/             the audit log (relay/audit_log.py)
    $RELAY_DATA_DIR/recordings/ID/     each session's recordings and receipts

and of an agent's directory: ``device.key`` (0600), ``device.csr``, ``device.crt``,
and after a renewal ``broker-ca.crt`` (the CA bundle the broker sent; trusted
beside ``--ca-file``) and, only while a renewal is being installed,
``device.key.new`` and ``device.crt.new`` (docs/certificates.md).
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
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
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
    def previous_ca_key(self) -> Path:
        return self.root / "ca" / "previous" / "ca.key"

    @property
    def previous_ca_cert(self) -> Path:
        return self.root / "ca" / "previous" / "ca.crt"

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

    @property
    def key_new(self) -> Path:
        return self.root / "device.key.new"

    @property
    def cert_new(self) -> Path:
        return self.root / "device.crt.new"

    @property
    def trust(self) -> Path:
        return self.root / "broker-ca.crt"


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
    third of *lifetime*, when it does not cover every name in *names*, or when it
    was not issued by the CA that should issue it: the previous CA while a
    rollover is in progress (agents that have not renewed yet trust only that
    one), the current CA otherwise (so ``relay ca retire-previous`` leads to a
    new one).

    A certificate that does not parse is replaced too: it is a dev certificate this
    function made, with a key nobody else uses, so there is nothing to keep.

    Returns:
        True when a certificate was issued.

    Raises:
        MissingCA, IncompleteCA, CAError: A certificate is needed and the CA
            cannot be used.
    """
    ca: auth.CertificateAuthority | None = None
    if data_dir.listener_cert.exists() and data_dir.listener_key.exists():
        current = _load_listener_certificate(data_dir.listener_cert)
        if current is not None:
            fresh = current.not_valid_after_utc - now > lifetime / 3
            if fresh and set(names) <= _certificate_names(current):
                try:
                    ca = listener_issuer(data_dir)
                except CAError:
                    # No usable CA key (kept offline): the certificate stays.
                    return False
                if issued_by(current, ca.certificate):
                    return False
    if ca is None:
        ca = listener_issuer(data_dir)
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


def listener_issuer(data_dir: DataDir) -> auth.CertificateAuthority:
    """The CA that issues the dev-mode listener certificate: the previous CA while
    a rollover is in progress (its key is kept until retirement), else the CA.

    Raises:
        MissingCA, IncompleteCA, CAError: That CA cannot be used.
    """
    if data_dir.previous_ca_cert.exists() and data_dir.previous_ca_key.exists():
        return _load_ca_pair(data_dir.previous_ca_key, data_dir.previous_ca_cert)
    return load_ca(data_dir)


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when *issuer*'s key signed *certificate* (signature only, no dates)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _load_ca_pair(key_path: Path, cert_path: Path) -> auth.CertificateAuthority:
    certificate = _parse_ca_certificate(cert_path)
    try:
        return auth.load_ca(
            key_pem=_read_ca_file(key_path),
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        )
    except ValueError as exc:
        raise CAError(f"cannot use the CA in {key_path.parent}: {exc}") from None


def load_previous_ca_certificate(data_dir: DataDir) -> x509.Certificate | None:
    """The previous device CA's certificate while a rollover is in progress.

    Raises:
        CAError: ``ca/previous/ca.crt`` exists but is not a CA certificate.
    """
    if not data_dir.previous_ca_cert.exists():
        return None
    return _parse_ca_certificate(data_dir.previous_ca_cert)


def rollover_ca(
    data_dir: DataDir, *, now: datetime, lifetime: timedelta
) -> tuple[x509.Certificate, x509.Certificate]:
    """Make a new device CA and keep the current one as the previous CA.

    Order (each step a rename inside ``ca/``): the new key and certificate are
    written as ``ca/next.key``/``ca/next.crt`` first; then ``ca.key`` and
    ``ca.crt`` move to ``ca/previous/``; then ``next.*`` become ``ca.*``. A
    crash in between leaves an incomplete CA that the broker refuses to load
    (it keeps the CAs it has) and that ``relay ca init`` reports; the files
    are all there to finish by hand (docs/certificates.md).

    Returns:
        (the previous CA certificate, the new CA certificate).

    Raises:
        CAError: No usable CA, or a previous CA is still trusted (retire it
            first: only one rollover at a time).
    """
    old = load_ca(data_dir)
    if data_dir.previous_ca_cert.exists() or data_dir.previous_ca_key.exists():
        raise CAError(
            f"a previous CA is still trusted ({data_dir.previous_ca_cert.parent}); "
            "run `relay ca retire-previous` first"
        )
    new = auth.create_ca(
        # A distinct name per generation: clients pick the issuer by name first.
        common_name=f"Remote Care device CA {now:%Y-%m-%d %H%M%S}",
        now=now,
        lifetime=lifetime,
    )
    ca_dir = data_dir.ca_cert.parent
    next_key, next_cert = ca_dir / "next.key", ca_dir / "next.crt"
    for leftover in (next_key, next_cert):
        leftover.unlink(missing_ok=True)
    write_private(next_key, new.key_pem())
    write_public(next_cert, new.certificate_pem())
    data_dir.previous_ca_cert.parent.mkdir(mode=0o700, exist_ok=True)
    os.replace(data_dir.ca_key, data_dir.previous_ca_key)
    os.replace(data_dir.ca_cert, data_dir.previous_ca_cert)
    os.replace(next_key, data_dir.ca_key)
    os.replace(next_cert, data_dir.ca_cert)
    fsync_directory(ca_dir)
    return old.certificate, new.certificate


def retire_previous_ca(data_dir: DataDir) -> x509.Certificate | None:
    """Stop trusting the previous CA: remove ``ca/previous/``.

    Returns:
        The retired CA certificate, or None when there was none.

    Raises:
        CAError: ``ca/previous/ca.crt`` does not parse; nothing is removed
            then (a person must look).
    """
    previous = load_previous_ca_certificate(data_dir)
    for path in (data_dir.previous_ca_key, data_dir.previous_ca_cert):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        data_dir.previous_ca_cert.parent.rmdir()
    return previous


def fsync_directory(path: Path) -> None:
    """Make the entries of directory *path* durable: files created, renamed or
    removed in it survive a crash (Linux/POSIX)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
