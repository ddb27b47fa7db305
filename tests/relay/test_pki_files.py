"""Keys and certificates on disk: modes, no overwrites, dev listener certificates."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from relay.pki_files import (
    DataDir,
    IncompleteCA,
    KeyExists,
    MissingCA,
    ensure_listener_certificate,
    init_ca,
    load_ca,
    write_private,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


def test_private_files_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    """write_private creates the file with mode 0600 and refuses an existing path."""
    path = tmp_path / "keys" / "k.pem"
    write_private(path, b"secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(KeyExists):
        write_private(path, b"other")
    assert path.read_bytes() == b"secret"


def test_ca_init_is_idempotent(tmp_path: Path) -> None:
    """A second init keeps the first CA byte for byte."""
    data_dir = DataDir(tmp_path)
    assert init_ca(data_dir, now=NOW, lifetime=YEAR)
    before = data_dir.ca_key.read_bytes(), data_dir.ca_cert.read_bytes()
    assert not init_ca(data_dir, now=NOW, lifetime=YEAR)
    assert (data_dir.ca_key.read_bytes(), data_dir.ca_cert.read_bytes()) == before
    assert load_ca(data_dir).certificate.subject == load_ca(data_dir).certificate.issuer


@pytest.mark.parametrize("leftover", ["key", "cert"])
def test_half_a_ca_is_reported_not_repaired(tmp_path: Path, leftover: str) -> None:
    """With only the key or only the certificate, init and load refuse and change nothing."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    (data_dir.ca_cert if leftover == "key" else data_dir.ca_key).unlink()
    with pytest.raises(IncompleteCA):
        init_ca(data_dir, now=NOW, lifetime=YEAR)
    with pytest.raises(IncompleteCA):
        load_ca(data_dir)


def test_missing_ca(tmp_path: Path) -> None:
    """Loading a CA from an empty data dir says to run `relay ca init`."""
    with pytest.raises(MissingCA, match="relay ca init"):
        load_ca(DataDir(tmp_path))


def test_listener_certificate_is_issued_once_and_renewed_when_needed(
    tmp_path: Path,
) -> None:
    """A dev certificate is issued when missing, kept while fresh, reissued for new names or near expiry."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR * 10)
    lifetime = timedelta(days=90)
    assert ensure_listener_certificate(
        data_dir, names=("localhost", "127.0.0.1"), now=NOW, lifetime=lifetime
    )
    assert stat.S_IMODE(data_dir.listener_key.stat().st_mode) == 0o600
    assert not ensure_listener_certificate(
        data_dir, names=("localhost",), now=NOW, lifetime=lifetime
    )
    assert ensure_listener_certificate(
        data_dir, names=("localhost", "relay.example"), now=NOW, lifetime=lifetime
    )
    certificate = x509.load_pem_x509_certificate(data_dir.listener_cert.read_bytes())
    san = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert "relay.example" in san.get_values_for_type(x509.DNSName)
    later = NOW + timedelta(days=70)  # less than a third of the lifetime left
    assert ensure_listener_certificate(
        data_dir, names=("localhost",), now=later, lifetime=lifetime
    )
