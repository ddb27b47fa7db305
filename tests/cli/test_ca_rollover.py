"""``relay ca rollover`` and ``relay ca retire-previous`` as processes: the files
they leave, their refusals and exit codes, and their audit records. What the
broker does with the files is tested in tests/e2e/test_certificates.py."""

from __future__ import annotations

from pathlib import Path

from relay.audit_reader import read_records
from relay.pki_files import DataDir
from tests.cli.test_serve import run_relay


def events(data_dir: Path) -> list[str]:
    return [str(r["event"]) for r in read_records(DataDir(data_dir).audit_dir)]


def test_rollover_then_retire(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_relay(data_dir, "ca", "init").returncode == 0
    ca_dir = data_dir / "ca"
    old_cert = (ca_dir / "ca.crt").read_bytes()

    rolled = run_relay(data_dir, "ca", "rollover")
    assert rolled.returncode == 0, rolled.stderr
    assert (
        "the previous one is trusted until `relay ca retire-previous`" in rolled.stderr
    )
    assert (ca_dir / "previous" / "ca.crt").read_bytes() == old_cert
    assert (ca_dir / "ca.crt").read_bytes() != old_cert
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600

    # One transition at a time.
    again = run_relay(data_dir, "ca", "rollover")
    assert again.returncode == 1
    assert "a previous CA is still trusted" in again.stderr
    assert (ca_dir / "previous" / "ca.crt").read_bytes() == old_cert

    retired = run_relay(data_dir, "ca", "retire-previous")
    assert retired.returncode == 0, retired.stderr
    assert "previous device CA retired" in retired.stderr
    assert not (ca_dir / "previous").exists()
    nothing = run_relay(data_dir, "ca", "retire-previous")
    assert nothing.returncode == 0
    assert "no previous device CA" in nothing.stderr

    recorded = events(data_dir)
    assert recorded.count("pki.ca_rollover") == 1
    assert recorded.count("pki.ca_previous_retired") == 1
    assert recorded.index("pki.ca_rollover") < recorded.index("pki.ca_previous_retired")
    verified = run_relay(data_dir, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_rollover_without_a_ca_is_an_error(tmp_path: Path) -> None:
    result = run_relay(tmp_path / "data", "ca", "rollover")
    assert result.returncode == 1
    assert result.stderr.startswith("relay: error:")
