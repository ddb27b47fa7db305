"""The agent's certificate swap (relay/_trio/agent_renewal.py): crash-safe order."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

import auth
from relay._trio.agent_renewal import (
    finish_pending_swap,
    install_renewed,
    renewal_due,
)
from relay.pki_files import AgentDir

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def _pair(
    ca: auth.CertificateAuthority, device_id: str = "dev-1"
) -> tuple[bytes, bytes]:
    key = auth.generate_private_key()
    signed = auth.sign_device_csr(
        ca,
        auth.build_device_csr(key, device_id),
        now=NOW,
        lifetime=timedelta(days=365),
        max_csr_bytes=16384,
    )
    return auth.private_key_pem(key), signed.certificate_pem()


@pytest.fixture
def ca() -> auth.CertificateAuthority:
    return auth.create_ca(common_name="test CA", now=NOW, lifetime=timedelta(days=3650))


@pytest.fixture
def files(tmp_path: Path, ca: auth.CertificateAuthority) -> AgentDir:
    agent = AgentDir(tmp_path)
    key, cert = _pair(ca)
    agent.key.write_bytes(key)
    agent.cert.write_bytes(cert)
    return agent


def test_install_replaces_the_pair_and_writes_the_trust_bundle(
    files: AgentDir, ca: auth.CertificateAuthority
) -> None:
    """A completed swap leaves the new pair, the bundle, and no .new files."""
    key, cert = _pair(ca)
    install_renewed(files, key_pem=key, cert_pem=cert, ca_bundle=ca.certificate_pem())
    assert files.key.read_bytes() == key
    assert files.cert.read_bytes() == cert
    assert files.trust.read_bytes() == ca.certificate_pem()
    assert os.stat(files.key).st_mode & 0o777 == 0o600
    assert not files.key_new.exists()
    assert not files.cert_new.exists()
    assert finish_pending_swap(files) is None


def test_crash_after_the_new_files_were_written_rolls_forward(
    files: AgentDir, ca: auth.CertificateAuthority
) -> None:
    """Both .new files, matching: the next start completes the swap."""
    key, cert = _pair(ca)
    files.key_new.write_bytes(key)
    files.cert_new.write_bytes(cert)
    assert finish_pending_swap(files) == "completed"
    assert (files.key.read_bytes(), files.cert.read_bytes()) == (key, cert)


def test_crash_between_the_renames_rolls_forward(
    files: AgentDir, ca: auth.CertificateAuthority
) -> None:
    """Key renamed, certificate not yet: the next start renames the certificate."""
    key, cert = _pair(ca)
    files.key_new.write_bytes(key)
    files.cert_new.write_bytes(cert)
    os.replace(files.key_new, files.key)  # step 3 done, then the crash
    assert finish_pending_swap(files) == "completed"
    assert (files.key.read_bytes(), files.cert.read_bytes()) == (key, cert)
    assert not files.cert_new.exists()


def test_half_written_new_files_are_discarded(
    files: AgentDir, ca: auth.CertificateAuthority
) -> None:
    """A torn .new certificate: the .new files go, the old pair stays."""
    old = (files.key.read_bytes(), files.cert.read_bytes())
    key, cert = _pair(ca)
    files.key_new.write_bytes(key)
    files.cert_new.write_bytes(cert[: len(cert) // 2])
    assert finish_pending_swap(files) == "discarded"
    assert (files.key.read_bytes(), files.cert.read_bytes()) == old
    assert not files.key_new.exists()
    assert not files.cert_new.exists()


def test_a_stray_new_certificate_for_another_key_is_discarded(
    files: AgentDir, ca: auth.CertificateAuthority
) -> None:
    """device.crt.new that fits no key present is dropped, not installed."""
    old_cert = files.cert.read_bytes()
    files.cert_new.write_bytes(_pair(ca)[1])
    assert finish_pending_swap(files) == "discarded"
    assert files.cert.read_bytes() == old_cert


def test_renewal_is_due_inside_the_window_only(ca: auth.CertificateAuthority) -> None:
    """30 days before the end of a 365-day certificate, not before."""
    certificate = x509.load_pem_x509_certificate(_pair(ca)[1])
    end = certificate.not_valid_after_utc
    window = timedelta(days=30)
    assert not renewal_due(
        certificate, now=end - timedelta(days=31), renew_before=window
    )
    assert renewal_due(certificate, now=end - timedelta(days=29), renew_before=window)
