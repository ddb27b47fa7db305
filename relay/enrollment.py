"""Signing a device's request and putting the result on record (Annex 1, step 2).

Shared by ``relay ca sign`` and the demo. The certificate is written to a
temporary file next to its destination *before* the store records it, and renamed
into place after: a destination that cannot be written fails before anything is
recorded, and a refused record (revoked device) leaves no certificate behind.

The destination is checked first, before the CA is even loaded: a certificate never
replaces a private key, the broker's own key directories, or any other file that is
not a certificate (a typo in ``--out`` must not cost the store or a key).
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path

import auth
from relay import store as store_module
from relay.config import BrokerConfig
from relay.pki_files import DataDir, load_ca

# A device certificate is about 1 KiB; an existing file larger than this is not one.
_MAX_REPLACED_BYTES = 64 * 1024
_CERTIFICATE_PEM = b"-----BEGIN CERTIFICATE-----"


class UnsafeDestination(Exception):
    """The certificate would replace a file that must not be replaced."""


def check_destination(config: BrokerConfig, out: Path) -> None:
    """Refuse *out* as the place for a new certificate unless replacing it is safe.

    Refused: a path inside the data dir's ``ca/`` or ``tls/`` (after resolving
    symlinks), an existing path that is not a regular file, and an existing
    non-empty file that contains a private key, is not a PEM certificate, or is
    larger than a certificate would be. A missing file or an older certificate is
    fine (re-signing replaces it).

    Not checked: that the directory is writable (the temporary file finds out).

    Raises:
        UnsafeDestination: The message names the file and the reason.
    """
    data_dir = DataDir(config.data_dir)
    protected_dirs = (data_dir.ca_cert.parent, data_dir.listener_cert.parent)
    try:
        resolved = out.resolve()
        protected_resolved = [directory.resolve() for directory in protected_dirs]
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise UnsafeDestination(f"cannot check {out}: {exc}") from None
    for protected, real in zip(protected_dirs, protected_resolved, strict=True):
        if resolved.is_relative_to(real):
            raise UnsafeDestination(
                f"{out} is inside {protected}, which holds the broker's keys; "
                "write device certificates somewhere else"
            )
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafeDestination(f"cannot check {out}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UnsafeDestination(f"{out} exists and is not a regular file")
    try:
        with out.open("rb") as handle:
            head = handle.read(_MAX_REPLACED_BYTES + 1)
    except OSError as exc:
        raise UnsafeDestination(f"cannot check {out}: {exc.strerror}") from None
    if b"PRIVATE KEY" in head:
        raise UnsafeDestination(
            f"{out} contains a private key; refusing to overwrite it"
        )
    if head.strip() and not head.lstrip().startswith(_CERTIFICATE_PEM):
        raise UnsafeDestination(
            f"{out} exists and is not a PEM certificate; refusing to overwrite it"
        )
    if len(head) > _MAX_REPLACED_BYTES:
        raise UnsafeDestination(
            f"{out} is larger than a device certificate; refusing to overwrite it"
        )


def sign_and_record(
    config: BrokerConfig, csr: bytes, out: Path, *, now: datetime
) -> auth.SignedDevice:
    """Sign *csr* with the device profile, record it, and write the certificate to *out*.

    Raises:
        UnsafeDestination: *out* must not be replaced (see check_destination);
            checked before anything else.
        auth.CertificateRequestError: The request was refused (reason in ``.reason``).
        relay.store.DeviceRevoked: The device id is revoked; ids are never reused.
        CAError: No usable CA in the data dir (MissingCA, IncompleteCA, or a
            file that does not parse).
        OSError: *out* cannot be written.
    """
    check_destination(config, out)
    ca = load_ca(DataDir(config.data_dir))
    with warnings.catch_warnings():
        # cryptography warns (rather than fails) on some malformed subjects; auth
        # turns those into refusals, so the warning itself is noise on stderr.
        warnings.simplefilter("ignore")
        signed = auth.sign_device_csr(
            ca,
            csr,
            now=now,
            lifetime=timedelta(days=config.pki.device_cert_lifetime_days),
            max_csr_bytes=config.pki.max_csr_bytes,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, never an existing file: "<out>.tmp" could be somebody's key.
    fd, tmp_name = tempfile.mkstemp(
        dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # a certificate is public
            handle.write(signed.certificate_pem())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        identity = signed.identity
        with closing(store_module.Store.open(config.effective_database_url)) as store:
            record_certificate(store, identity, issued_at=now)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return signed


def record_certificate(
    store: store_module.Store,
    identity: auth.DeviceIdentity,
    *,
    issued_at: datetime,
    new_device_only: bool = False,
) -> None:
    """Record a certificate the CA just signed (``relay ca sign``, the
    enrollment API, a renewal): :meth:`relay.store.Store.record_enrollment` with
    the fields of its verified *identity*.

    Raises:
        As :meth:`~relay.store.Store.record_enrollment`.
    """
    store.record_enrollment(
        device_id=identity.device_id,
        serial_hex=identity.serial_hex,
        fingerprint_sha256=identity.fingerprint_sha256,
        not_before=identity.not_before,
        not_after=identity.not_after,
        issued_at=issued_at,
        new_device_only=new_device_only,
    )
