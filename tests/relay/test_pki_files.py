"""Keys and certificates on disk: modes, no overwrites, dev listener certificates."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

import auth
from relay.pki_files import (
    CAError,
    DataDir,
    IncompleteCA,
    KeyExists,
    MissingCA,
    ensure_listener_certificate,
    init_ca,
    load_ca,
    load_ca_certificate,
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


def test_missing_and_incomplete_ca_are_ca_errors() -> None:
    """MissingCA and IncompleteCA are CAErrors, so one except clause covers every unusable CA."""
    assert issubclass(MissingCA, CAError)
    assert issubclass(IncompleteCA, CAError)


def test_ca_certificate_loads_without_the_key(tmp_path: Path) -> None:
    """load_ca_certificate returns the CA certificate, and needs no CA key."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    expected = load_ca(data_dir).certificate
    data_dir.ca_key.unlink()

    assert load_ca_certificate(data_dir) == expected


def test_ca_certificate_missing(tmp_path: Path) -> None:
    """load_ca_certificate on an empty data dir raises MissingCA pointing at `relay ca init`."""
    with pytest.raises(MissingCA, match="relay ca init"):
        load_ca_certificate(DataDir(tmp_path))


def test_ca_certificate_missing_next_to_a_key(tmp_path: Path) -> None:
    """load_ca_certificate with only ca.key present raises IncompleteCA."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    data_dir.ca_cert.unlink()

    with pytest.raises(IncompleteCA):
        load_ca_certificate(data_dir)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "garbage", "bad-base64", "truncated-der"],
)
def test_corrupt_ca_certificate_is_a_ca_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    """A ca.crt that does not parse makes load_ca and load_ca_certificate raise CAError naming ca.crt."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    data_dir.ca_cert.write_bytes(content)

    with pytest.raises(
        CAError, match=r"ca\.crt is not a valid PEM certificate"
    ) as cert:
        load_ca_certificate(data_dir)
    with pytest.raises(CAError, match=r"ca\.crt is not a valid PEM certificate"):
        load_ca(data_dir)
    assert str(data_dir.ca_cert) in str(cert.value)
    assert "https://" not in str(cert.value)


def test_non_ca_certificate_as_ca_is_a_ca_error(tmp_path: Path) -> None:
    """A ca.crt without BasicConstraints CA:TRUE is refused with CAError."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    ensure_listener_certificate(data_dir, names=("localhost",), now=NOW, lifetime=YEAR)
    data_dir.ca_cert.write_bytes(data_dir.listener_cert.read_bytes())

    with pytest.raises(CAError, match="not a CA certificate"):
        load_ca_certificate(data_dir)
    with pytest.raises(CAError, match="not a CA certificate"):
        load_ca(data_dir)


def test_corrupt_ca_key_is_a_ca_error_naming_the_file(tmp_path: Path) -> None:
    """A ca.key that does not parse makes load_ca raise CAError naming ca.key."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    data_dir.ca_key.write_bytes(b"garbage\n")

    with pytest.raises(CAError, match="cannot use the CA key") as error:
        load_ca(data_dir)
    assert str(data_dir.ca_key) in str(error.value)


def test_ca_key_of_another_ca_is_a_ca_error(tmp_path: Path) -> None:
    """A ca.key that does not belong to ca.crt makes load_ca raise CAError."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    data_dir.ca_key.write_bytes(auth.private_key_pem(auth.generate_private_key()))

    with pytest.raises(CAError, match="does not match"):
        load_ca(data_dir)


def test_unreadable_ca_file_is_a_ca_error(tmp_path: Path) -> None:
    """A ca.crt that cannot be read (here: a directory) makes load_ca_certificate raise CAError."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR)
    data_dir.ca_cert.unlink()
    data_dir.ca_cert.mkdir()

    with pytest.raises(CAError, match="cannot read"):
        load_ca_certificate(data_dir)


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


def test_corrupt_listener_certificate_is_reissued(tmp_path: Path) -> None:
    """A dev listener certificate that does not parse is replaced, with a new key."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR * 10)
    lifetime = timedelta(days=90)
    ensure_listener_certificate(
        data_dir, names=("localhost",), now=NOW, lifetime=lifetime
    )
    old_key = data_dir.listener_key.read_bytes()
    data_dir.listener_cert.write_text("garbage\n")

    assert ensure_listener_certificate(
        data_dir, names=("localhost",), now=NOW, lifetime=lifetime
    )
    x509.load_pem_x509_certificate(data_dir.listener_cert.read_bytes())
    assert data_dir.listener_key.read_bytes() != old_key
    assert stat.S_IMODE(data_dir.listener_key.stat().st_mode) == 0o600


def test_sealing_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    """Without a configured key, one is created in its own 0600 file and reused."""
    from relay.pki_files import load_or_create_sealing_key

    data_dir = DataDir(tmp_path)
    key, source = load_or_create_sealing_key(data_dir, None)
    assert len(key) == 32
    assert source == str(data_dir.totp_sealing_key)
    assert stat.S_IMODE(data_dir.totp_sealing_key.stat().st_mode) == 0o600
    assert data_dir.totp_sealing_key.parent != (tmp_path / "relay.sqlite3").parent
    again, _ = load_or_create_sealing_key(data_dir, None)
    assert again == key


def test_configured_sealing_key_wins_and_writes_nothing(tmp_path: Path) -> None:
    """A configured key is used as given and no key file is created."""
    import base64

    from relay.pki_files import load_or_create_sealing_key

    configured = base64.b64encode(bytes(range(32))).decode()
    key, source = load_or_create_sealing_key(DataDir(tmp_path), configured)
    assert key == bytes(range(32))
    assert source == "configuration"
    assert not DataDir(tmp_path).totp_sealing_key.exists()
