"""Signing a device's request and putting the result on record (Annex 1, step 2).

Shared by ``relay ca sign`` and the demo. The certificate is written to a
temporary file next to its destination *before* the store records it, and renamed
into place after: a destination that cannot be written fails before anything is
recorded, and a refused record (revoked device) leaves no certificate behind.
"""

from __future__ import annotations

import os
import warnings
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path

import auth
from relay.config import BrokerConfig
from relay.pki_files import DataDir, load_ca
from relay.store import Store


def sign_and_record(
    config: BrokerConfig, csr: bytes, out: Path, *, now: datetime
) -> auth.SignedDevice:
    """Sign *csr* with the device profile, record it, and write the certificate to *out*.

    Raises:
        auth.CertificateRequestError: The request was refused (reason in ``.reason``).
        relay.store.DeviceRevoked: The device id is revoked; ids are never reused.
        MissingCA, IncompleteCA: No usable CA in the data dir.
        OSError: *out* cannot be written.
    """
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
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(signed.certificate_pem())
    try:
        identity = signed.identity
        with closing(Store.open(config.effective_database_url)) as store:
            store.record_enrollment(
                device_id=identity.device_id,
                serial_hex=identity.serial_hex,
                fingerprint_sha256=identity.fingerprint_sha256,
                not_before=identity.not_before,
                not_after=identity.not_after,
                issued_at=now,
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return signed
