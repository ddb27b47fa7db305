"""Where keys and certificates live on disk, for the broker and the agent.

``auth.pki`` does the cryptography on bytes; this module is the thin file shell
around it. Layout of the broker's data dir::

    $RELAY_DATA_DIR/ca/ca.key          device CA key (0600)
    $RELAY_DATA_DIR/ca/ca.crt          device CA certificate (what `relay ca cert` prints)
    $RELAY_DATA_DIR/tls/listener.key   dev-mode listener key (0600)
    $RELAY_DATA_DIR/tls/listener.crt   dev-mode listener certificate, issued by the CA
    $RELAY_DATA_DIR/relay.sqlite3      the embedded store

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


class MissingCA(Exception):
    """The data dir has no CA yet (run ``relay ca init``)."""


class IncompleteCA(Exception):
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
    """Load the device CA.

    Raises:
        MissingCA: There is no CA in the data dir.
    """
    if not data_dir.ca_key.exists() or not data_dir.ca_cert.exists():
        if data_dir.ca_key.exists() or data_dir.ca_cert.exists():
            raise IncompleteCA(
                f"incomplete CA in {data_dir.root / 'ca'}; see `relay ca init`"
            )
        raise MissingCA(f"no CA in {data_dir.root}; run `relay ca init` first")
    return auth.load_ca(
        key_pem=data_dir.ca_key.read_bytes(),
        certificate_pem=data_dir.ca_cert.read_bytes(),
    )


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

    Returns:
        True when a certificate was issued.
    """
    if data_dir.listener_cert.exists() and data_dir.listener_key.exists():
        current = x509.load_pem_x509_certificate(data_dir.listener_cert.read_bytes())
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
