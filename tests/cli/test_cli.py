"""The ``relay`` command line, run as a real subprocess on a temporary data dir.

Each test runs ``python -m relay ...`` with ``RELAY_DATA_DIR`` pointing into
``tmp_path`` and checks the exit code and what the command printed (stdout for what
a script parses, stderr for people and for the JSON log lines). Every run also
checks that no private key material and no Python traceback was printed: a failure
is always one ``relay: error: ...`` line and an exit code.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import auth
from tests.cli.listen import ALL_ON_PORT_ZERO

DEVICE_ID = "pump-7"


@dataclass(frozen=True)
class Relay:
    """Runs the ``relay`` command line against one data dir."""

    workdir: Path

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def ca_key(self) -> Path:
        return self.data_dir / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "ca" / "ca.crt"

    def __call__(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """Run ``relay ARGS`` and return the finished process.

        Fails the test if stdout or stderr carries private key material, or stderr
        a Python traceback (bad input and failures get a message, not a crash).
        """
        result = subprocess.run(
            [sys.executable, "-m", "relay", *(str(arg) for arg in args)],
            env={**os.environ, "RELAY_DATA_DIR": str(self.data_dir)},
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "PRIVATE KEY" not in result.stdout, result.stdout
        assert "PRIVATE KEY" not in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        return result


@pytest.fixture
def relay(tmp_path: Path) -> Relay:
    """The command line on a fresh, not yet created data dir."""
    return Relay(tmp_path)


@pytest.fixture
def ca(relay: Relay) -> Relay:
    """The command line on a data dir with a device CA."""
    result = relay("ca", "init")
    assert result.returncode == 0, result.stderr
    return relay


@pytest.fixture
def agent_dir(ca: Relay) -> Path:
    """An agent directory enrolled as DEVICE_ID (key and CSR, not signed yet)."""
    directory = ca.workdir / "agent"
    result = ca("agent", "enroll", "--device-id", DEVICE_ID, "--dir", directory)
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture
def signed(ca: Relay, agent_dir: Path) -> Path:
    """DEVICE_ID enrolled and signed; returns the issued certificate's path."""
    out = agent_dir / "device.crt"
    result = ca("ca", "sign", agent_dir / "device.csr", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def json_logs(stderr: str) -> list[dict[str, Any]]:
    """The structured log lines in *stderr* (JSON objects), in order."""
    events: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            value = json.loads(line)
            assert isinstance(value, dict)
            events.append(value)
    return events


def device_rows(relay: Relay) -> dict[str, dict[str, Any]]:
    """``relay device list --json`` as a dict keyed by device id."""
    result = relay("device", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return {row["device_id"]: row for row in rows}


def load_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate at *path*."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def write_csr(
    path: Path,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    device_id: str,
    extensions: list[x509.ExtensionType] | None = None,
) -> Path:
    """Write a PEM CSR with CN=*device_id* and *extensions* to *path*.

    The CN is not validated, so that a test can build a request with an over-long
    one (cryptography then warns instead of raising; the warning is silenced).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, device_id, _validate=False)]
        )
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        for extension in extensions or []:
            builder = builder.add_extension(extension, critical=False)
        csr = builder.sign(key, hashes.SHA256())
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


# ca init / ca cert ------------------------------------------------------------------


def test_ca_init_creates_private_key_and_certificate(relay: Relay) -> None:
    """`relay ca init` creates ca/ca.key with mode 0600 and ca/ca.crt, a CA certificate."""
    result = relay("ca", "init")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "created device CA" in result.stderr
    assert stat.S_IMODE(relay.ca_key.stat().st_mode) == 0o600
    certificate = load_certificate(relay.ca_cert)
    constraints = certificate.extensions.get_extension_for_class(
        x509.BasicConstraints
    ).value
    assert constraints.ca


def test_ca_init_twice_keeps_the_existing_ca(ca: Relay) -> None:
    """A second `relay ca init` exits 0, says the CA exists, and changes no byte."""
    key_before = ca.ca_key.read_bytes()
    cert_before = ca.ca_cert.read_bytes()

    result = ca("ca", "init")

    assert result.returncode == 0, result.stderr
    assert "already exists" in result.stderr
    assert ca.ca_key.read_bytes() == key_before
    assert ca.ca_cert.read_bytes() == cert_before


def test_ca_cert_prints_exactly_the_ca_pem(ca: Relay) -> None:
    """`relay ca cert` prints the CA certificate PEM on stdout and nothing else."""
    result = ca("ca", "cert")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ca.ca_cert.read_text()
    assert result.stdout.startswith("-----BEGIN CERTIFICATE-----")


def test_ca_cert_without_ca_is_an_error(relay: Relay) -> None:
    """`relay ca cert` without a CA exits 1 and tells the operator to run `relay ca init`."""
    result = relay("ca", "cert")

    assert result.returncode == 1
    assert result.stdout == ""
    assert "relay: error:" in result.stderr
    assert "relay ca init" in result.stderr


# agent enroll ---------------------------------------------------------------------------


def test_agent_enroll_writes_key_and_csr(relay: Relay) -> None:
    """`relay agent enroll` writes device.key (0600) and a PEM CSR with CN=<device id>."""
    directory = relay.workdir / "agent"

    result = relay("agent", "enroll", "--device-id", DEVICE_ID, "--dir", directory)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "relay ca sign" in result.stderr
    assert stat.S_IMODE((directory / "device.key").stat().st_mode) == 0o600
    csr_pem = (directory / "device.csr").read_bytes()
    assert csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [name.value for name in common_names] == [DEVICE_ID]


def test_agent_enroll_twice_keeps_the_key(agent_dir: Path, ca: Relay) -> None:
    """A second `relay agent enroll` in the same dir fails and leaves key and CSR as they were."""
    key_before = (agent_dir / "device.key").read_bytes()
    csr_before = (agent_dir / "device.csr").read_bytes()

    result = ca("agent", "enroll", "--device-id", DEVICE_ID, "--dir", agent_dir)

    assert result.returncode != 0
    assert "relay: error:" in result.stderr
    assert "device.key" in result.stderr
    assert (agent_dir / "device.key").read_bytes() == key_before
    assert (agent_dir / "device.csr").read_bytes() == csr_before


@pytest.mark.parametrize("device_id", ["bad/id", "x" * 65])
def test_agent_enroll_refuses_an_invalid_device_id(
    relay: Relay, device_id: str
) -> None:
    """`relay agent enroll` with an invalid device id exits 2 and writes nothing."""
    directory = relay.workdir / "agent"

    result = relay("agent", "enroll", "--device-id", device_id, "--dir", directory)

    assert result.returncode == 2
    assert "relay: error: invalid device id" in result.stderr
    assert not (directory / "device.key").exists()
    assert not (directory / "device.csr").exists()


# ca sign and device list ----------------------------------------------------------------


def test_ca_sign_issues_a_device_client_certificate(ca: Relay, agent_dir: Path) -> None:
    """`relay ca sign` writes a certificate that verifies against the CA, CA:FALSE and clientAuth."""
    out = agent_dir / "device.crt"

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", out)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert f"signed device {DEVICE_ID}" in result.stderr
    certificate = load_certificate(out)
    identity = auth.verify_device_certificate(
        load_certificate(ca.ca_cert), certificate, now=datetime.now(UTC)
    )
    assert identity.device_id == DEVICE_ID
    constraints = certificate.extensions.get_extension_for_class(
        x509.BasicConstraints
    ).value
    assert not constraints.ca
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_device_list_json_shows_a_signed_device(ca: Relay, signed: Path) -> None:
    """After `relay ca sign`, `relay device list --json` lists the device, not revoked, offline."""
    row = device_rows(ca)[DEVICE_ID]

    assert row["revoked"] is False
    assert row["online"] is False
    assert row["revoked_at"] is None


def test_device_list_plain_shows_header_and_id(ca: Relay, signed: Path) -> None:
    """The plain `relay device list` prints a header line and a row with the device id."""
    result = ca("device", "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "ONLINE", "REVOKED"]
    assert [line.split()[0] for line in lines[1:]] == [DEVICE_ID]


def test_device_list_on_an_empty_data_dir_has_no_devices(relay: Relay) -> None:
    """`relay device list --json` on a fresh data dir prints an empty JSON list."""
    result = relay("device", "list", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_ca_sign_logs_an_audit_event(ca: Relay, agent_dir: Path) -> None:
    """`relay ca sign` logs a JSON `pki.device_signed` event with audit true on stderr."""
    result = ca(
        "ca", "sign", agent_dir / "device.csr", "--out", agent_dir / "device.crt"
    )

    assert result.returncode == 0, result.stderr
    signed_events = [
        event
        for event in json_logs(result.stderr)
        if event.get("event") == "pki.device_signed"
    ]
    assert len(signed_events) == 1
    assert signed_events[0]["audit"] is True
    assert signed_events[0]["device_id"] == DEVICE_ID


def test_no_command_prints_private_key_material(relay: Relay) -> None:
    """No command of the enrollment flow prints private key material on stdout or stderr."""
    directory = relay.workdir / "agent"
    results = [
        relay("ca", "init"),
        relay("ca", "init"),
        relay("ca", "cert"),
        relay("agent", "enroll", "--device-id", DEVICE_ID, "--dir", directory),
        relay("agent", "enroll", "--device-id", DEVICE_ID, "--dir", directory),
        relay(
            "ca", "sign", directory / "device.csr", "--out", directory / "device.crt"
        ),
        relay("device", "list"),
        relay("device", "list", "--json"),
        relay("device", "revoke", DEVICE_ID),
    ]

    assert [result.returncode for result in results] == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    for result in results:
        output = result.stdout + result.stderr
        assert "PRIVATE KEY" not in output
        assert "BEGIN EC" not in output


# bad CSRs --------------------------------------------------------------------------------


def test_ca_sign_refuses_a_garbage_file(ca: Relay) -> None:
    """`relay ca sign` on a file that is no CSR exits 2 and names the reason `malformed`."""
    garbage = ca.workdir / "garbage.csr"
    garbage.write_bytes(b"this is not a certificate request\n")
    out = ca.workdir / "out.crt"

    result = ca("ca", "sign", garbage, "--out", out)

    assert result.returncode == 2
    assert "relay: error: certificate request refused (malformed)" in result.stderr
    assert not out.exists()
    refusals = [
        event
        for event in json_logs(result.stderr)
        if event.get("event") == "pki.csr_refused"
    ]
    assert [(event["reason"], event["audit"]) for event in refusals] == [
        ("malformed", True)
    ]


def test_ca_sign_refuses_a_huge_file_quickly(ca: Relay) -> None:
    """`relay ca sign` on a 1 MiB file exits 2 with `too_large`, without parsing it."""
    huge = ca.workdir / "huge.csr"
    huge.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * (1024 * 1024))
    out = ca.workdir / "out.crt"

    started = time.monotonic()
    result = ca("ca", "sign", huge, "--out", out)
    elapsed = time.monotonic() - started

    assert result.returncode == 2
    assert "relay: error: certificate request refused (too_large)" in result.stderr
    assert not out.exists()
    # Generous: interpreter start-up dominates; a parse of the whole file is not
    # needed to see this, but a hang or a quadratic scan would show.
    assert elapsed < 20


def test_ca_sign_refuses_a_weak_rsa_key(ca: Relay) -> None:
    """`relay ca sign` on a CSR with an RSA-1024 key exits 2 with `weak_key`."""
    # A weak key is the point of this test.
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    csr = write_csr(ca.workdir / "weak.csr", key, DEVICE_ID)
    out = ca.workdir / "out.crt"

    result = ca("ca", "sign", csr, "--out", out)

    assert result.returncode == 2
    assert "relay: error: certificate request refused (weak_key)" in result.stderr
    assert "RSA-1024" in result.stderr
    assert not out.exists()
    assert DEVICE_ID not in device_rows(ca)


@pytest.mark.parametrize(
    ("device_id", "shown"),
    [("bad/id", "'bad/id'"), ("a\nb", "'a\\nb'"), ("x" * 65, "'" + "x" * 65 + "'")],
)
def test_ca_sign_refuses_an_invalid_device_id(
    ca: Relay, device_id: str, shown: str
) -> None:
    """`relay ca sign` on a CSR whose CN is not a valid device id exits 2 with `bad_device_id`, the id escaped."""
    csr = write_csr(
        ca.workdir / "bad.csr", ec.generate_private_key(ec.SECP256R1()), device_id
    )
    out = ca.workdir / "out.crt"

    result = ca("ca", "sign", csr, "--out", out)

    assert result.returncode == 2
    assert (
        f"relay: error: certificate request refused (bad_device_id): invalid device id {shown}"
        in result.stderr
    )
    assert not out.exists()
    assert device_rows(ca) == {}


def test_ca_sign_ignores_what_the_profile_does_not_grant(ca: Relay) -> None:
    """A CSR asking CA:TRUE, serverAuth and a DNS SAN still gets the fixed device profile, with warnings."""
    csr = write_csr(
        ca.workdir / "greedy.csr",
        ec.generate_private_key(ec.SECP256R1()),
        DEVICE_ID,
        [
            x509.BasicConstraints(ca=True, path_length=None),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            x509.SubjectAlternativeName([x509.DNSName("evil.example")]),
        ],
    )
    out = ca.workdir / "greedy.crt"

    result = ca("ca", "sign", csr, "--out", out)

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 3, result.stderr
    assert any("basicConstraints CA:TRUE" in line for line in warnings)
    assert any("extendedKeyUsage serverAuth" in line for line in warnings)
    assert any("subjectAltName DNS:evil.example" in line for line in warnings)
    certificate = load_certificate(out)
    extensions = certificate.extensions
    assert not extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert list(
        extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ) == [x509.UniformResourceIdentifier(f"urn:relay:device:{DEVICE_ID}")]


def test_ca_sign_with_a_missing_csr_file_is_a_usage_error(ca: Relay) -> None:
    """`relay ca sign` on a path that does not exist exits 2 and names the path."""
    missing = ca.workdir / "nowhere.csr"
    out = ca.workdir / "out.crt"

    result = ca("ca", "sign", missing, "--out", out)

    assert result.returncode == 2
    assert f"relay: error: cannot read {missing}" in result.stderr
    assert not out.exists()


def test_ca_sign_without_ca_is_an_error(relay: Relay) -> None:
    """`relay ca sign` without a CA exits 1, points at `relay ca init` and writes nothing."""
    directory = relay.workdir / "agent"
    enroll = relay("agent", "enroll", "--device-id", DEVICE_ID, "--dir", directory)
    out = directory / "device.crt"

    result = relay("ca", "sign", directory / "device.csr", "--out", out)

    assert enroll.returncode == 0, enroll.stderr
    assert result.returncode == 1
    assert "relay: error:" in result.stderr
    assert "relay ca init" in result.stderr
    assert not out.exists()
    assert not relay.ca_key.exists()


# revocation -------------------------------------------------------------------------------


def test_device_revoke_marks_the_device_revoked(ca: Relay, signed: Path) -> None:
    """`relay device revoke ID` exits 0 and `device list --json` then shows revoked true."""
    result = ca("device", "revoke", DEVICE_ID)

    assert result.returncode == 0, result.stderr
    assert f"revoked device {DEVICE_ID}" in result.stderr
    row = device_rows(ca)[DEVICE_ID]
    assert row["revoked"] is True
    assert row["revoked_at"] is not None


def test_device_revoke_twice_says_already_revoked(ca: Relay, signed: Path) -> None:
    """Revoking a revoked device again exits 0 and says it was already revoked."""
    first = ca("device", "revoke", DEVICE_ID)
    revoked_at = device_rows(ca)[DEVICE_ID]["revoked_at"]

    second = ca("device", "revoke", DEVICE_ID)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "already revoked" in second.stderr
    assert device_rows(ca)[DEVICE_ID]["revoked_at"] == revoked_at


def test_device_revoke_unknown_device_is_an_error(ca: Relay) -> None:
    """`relay device revoke` of an id never enrolled exits 1 with `unknown device`."""
    result = ca("device", "revoke", "no-such-device")

    assert result.returncode == 1
    assert "relay: error: unknown device 'no-such-device'" in result.stderr


def test_ca_sign_refuses_a_revoked_device_id(ca: Relay, signed: Path) -> None:
    """Signing a new CSR for a revoked device id exits 1: revoked ids are not reused."""
    revoke = ca("device", "revoke", DEVICE_ID)
    replacement = ca.workdir / "replacement"
    enroll = ca("agent", "enroll", "--device-id", DEVICE_ID, "--dir", replacement)
    out = replacement / "device.crt"

    result = ca("ca", "sign", replacement / "device.csr", "--out", out)

    assert revoke.returncode == 0, revoke.stderr
    assert enroll.returncode == 0, enroll.stderr
    assert result.returncode == 1
    assert "relay: error:" in result.stderr
    assert "revoked device ids are not reused" in result.stderr
    assert not out.exists()


# agent run --------------------------------------------------------------------------------


def test_agent_run_refuses_a_non_wss_broker_url(ca: Relay, signed: Path) -> None:
    """`relay agent run --broker http://x` exits 2 without connecting anywhere."""
    result = ca(
        "agent",
        "run",
        "--broker",
        "http://x",
        "--dir",
        signed.parent,
        "--ca-file",
        ca.ca_cert,
    )

    assert result.returncode == 2
    assert "relay: error:" in result.stderr
    assert "wss://" in result.stderr


# revoke --reason ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    ["x" * 201, "first line\nsecond line", "bell\a", "tab\there", "", "   "],
    ids=["201-chars", "newline", "control", "tab", "empty", "blank"],
)
def test_device_revoke_refuses_a_bad_reason(
    ca: Relay, signed: Path, reason: str
) -> None:
    """`relay device revoke --reason` that is too long, empty or not printable exits 2 and revokes nothing."""
    result = ca("device", "revoke", DEVICE_ID, "--reason", reason)

    assert result.returncode == 2
    assert "relay: error: argument --reason:" in result.stderr
    assert device_rows(ca)[DEVICE_ID]["revoked"] is False


def test_device_revoke_says_why_a_long_reason_is_refused(
    ca: Relay, signed: Path
) -> None:
    """A 300-character `--reason` is refused with exit 2, naming the 200-character limit."""
    result = ca("device", "revoke", DEVICE_ID, "--reason", "x" * 300)

    assert result.returncode == 2
    assert "at most 200 characters, got 300" in result.stderr


def test_device_revoke_keeps_a_200_character_reason(ca: Relay, signed: Path) -> None:
    """A printable `--reason` of exactly 200 characters is accepted and logged verbatim."""
    reason = "ticket 4711: " + "é" * 187

    result = ca("device", "revoke", DEVICE_ID, "--reason", reason)

    assert result.returncode == 0, result.stderr
    events = [
        event
        for event in json_logs(result.stderr)
        if event.get("event") == "device.revoked"
    ]
    assert [event["reason"] for event in events] == [reason]
    assert device_rows(ca)[DEVICE_ID]["revoked"] is True


# unusable data dir, CA or store ------------------------------------------------------------


def test_ca_sign_with_a_corrupt_ca_certificate_is_an_error(
    ca: Relay, agent_dir: Path
) -> None:
    """`relay ca sign` with a ca/ca.crt that does not parse exits 1 naming the file, and records nothing."""
    ca.ca_cert.write_text("not a certificate\n")
    out = agent_dir / "device.crt"

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", out)

    assert result.returncode == 1
    assert f"relay: error: {ca.ca_cert} is not a valid PEM certificate" in result.stderr
    assert not out.exists()
    assert device_rows(ca) == {}


def test_ca_sign_with_a_corrupt_ca_key_is_an_error(ca: Relay, agent_dir: Path) -> None:
    """`relay ca sign` with a ca/ca.key that does not parse exits 1 naming the key file."""
    ca.ca_key.write_text("garbage\n")
    out = agent_dir / "device.crt"

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", out)

    assert result.returncode == 1
    assert "relay: error: cannot use the CA key" in result.stderr
    assert "ca.key" in result.stderr
    assert not out.exists()


def test_ca_sign_with_a_non_ca_certificate_as_ca_is_an_error(
    ca: Relay, signed: Path, agent_dir: Path
) -> None:
    """A device certificate copied over ca/ca.crt is refused: exit 1, "not a CA certificate"."""
    ca.ca_cert.write_bytes(signed.read_bytes())
    out = ca.workdir / "other.crt"

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", out)

    assert result.returncode == 1
    assert "is not a CA certificate" in result.stderr
    assert "ca.crt" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [("device", "list"), ("device", "revoke", DEVICE_ID), ("ca", "init")],
    ids=["device-list", "device-revoke", "ca-init"],
)
def test_a_data_dir_that_is_a_file_is_an_error(
    relay: Relay, args: tuple[str, ...]
) -> None:
    """With RELAY_DATA_DIR pointing at a file, commands exit 1 saying it is not a directory."""
    relay.data_dir.write_text("not a directory\n")

    result = relay(*args)

    assert result.returncode == 1
    assert "relay: error: RELAY_DATA_DIR" in result.stderr
    assert "is not a directory" in result.stderr


def test_a_store_that_cannot_be_opened_is_an_error(ca: Relay) -> None:
    """With relay.sqlite3 being a directory, `relay device list` exits 1 with a store message."""
    (ca.data_dir / "relay.sqlite3").mkdir()

    result = ca("device", "list")

    assert result.returncode == 1
    assert "relay: error: cannot use the store:" in result.stderr
    assert result.stdout == ""


def test_device_revoke_while_the_database_is_locked_is_an_error(
    ca: Relay, signed: Path
) -> None:
    """`relay device revoke` while another process holds the SQLite write lock exits 1 within 15 s."""
    connection = sqlite3.connect(ca.data_dir / "relay.sqlite3", isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        result = ca("device", "revoke", DEVICE_ID)
        elapsed = time.monotonic() - started
    finally:
        connection.close()

    assert result.returncode == 1
    assert "relay: error: cannot use the store: database is locked" in result.stderr
    assert elapsed < 15
    assert device_rows(ca)[DEVICE_ID]["revoked"] is False


# ca sign --out never replaces a key --------------------------------------------------------


def test_ca_sign_refuses_to_overwrite_a_private_key(ca: Relay, agent_dir: Path) -> None:
    """`relay ca sign --out device.key` exits 2, leaves the key as it was and records nothing."""
    key = agent_dir / "device.key"
    before = key.read_bytes()

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", key)

    assert result.returncode == 2
    assert "relay: error: --out refused:" in result.stderr
    assert "contains a private key" in result.stderr
    assert key.read_bytes() == before
    assert device_rows(ca) == {}


@pytest.mark.parametrize(
    "target",
    ["ca/ca.crt", "ca/ca.key", "ca/device.crt", "tls/device.crt"],
)
def test_ca_sign_refuses_the_broker_key_directories(
    ca: Relay, agent_dir: Path, target: str
) -> None:
    """`relay ca sign --out` into $RELAY_DATA_DIR/ca or /tls exits 2, writes there nothing and records nothing."""
    out = ca.data_dir / target
    ca_files = {path: path.read_bytes() for path in (ca.ca_key, ca.ca_cert)}

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", out)

    assert result.returncode == 2
    assert "relay: error: --out refused:" in result.stderr
    assert "holds the broker's keys" in result.stderr
    assert {path: path.read_bytes() for path in ca_files} == ca_files
    assert not (ca.data_dir / "ca" / "device.crt").exists()
    assert not (ca.data_dir / "tls" / "device.crt").exists()
    assert device_rows(ca) == {}


def test_ca_sign_refuses_a_symlink_into_the_ca_directory(
    ca: Relay, agent_dir: Path
) -> None:
    """An `--out` path that resolves into $RELAY_DATA_DIR/ca through a symlink is refused with exit 2."""
    link = ca.workdir / "innocent.crt"
    link.symlink_to(ca.ca_cert)
    before = ca.ca_cert.read_bytes()

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", link)

    assert result.returncode == 2
    assert "holds the broker's keys" in result.stderr
    assert ca.ca_cert.read_bytes() == before
    assert device_rows(ca) == {}


def test_ca_sign_refuses_to_overwrite_a_file_that_is_no_certificate(
    ca: Relay, signed: Path, agent_dir: Path
) -> None:
    """`relay ca sign --out` onto an existing non-certificate file (the store) exits 2 and keeps it."""
    store_file = ca.data_dir / "relay.sqlite3"
    before = store_file.read_bytes()

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", store_file)

    assert result.returncode == 2
    assert "is not a PEM certificate" in result.stderr
    assert store_file.read_bytes() == before
    assert list(device_rows(ca)) == [DEVICE_ID]


def test_ca_sign_refuses_a_directory_as_out(ca: Relay, agent_dir: Path) -> None:
    """`relay ca sign --out DIR` exits 2 before anything is recorded."""
    result = ca("ca", "sign", agent_dir / "device.csr", "--out", agent_dir)

    assert result.returncode == 2
    assert "is not a regular file" in result.stderr
    assert device_rows(ca) == {}


def test_ca_sign_replaces_an_older_certificate(
    ca: Relay, signed: Path, agent_dir: Path
) -> None:
    """Signing again onto an existing certificate replaces it (renewal) and leaves no temporary file."""
    before = load_certificate(signed).serial_number

    result = ca("ca", "sign", agent_dir / "device.csr", "--out", signed)

    assert result.returncode == 0, result.stderr
    assert load_certificate(signed).serial_number != before
    assert sorted(path.name for path in agent_dir.iterdir()) == [
        "device.crt",
        "device.csr",
        "device.key",
    ]


# demo with a revoked demo device -------------------------------------------------------------


@pytest.fixture
def revoked_demo_device(ca: Relay) -> Path:
    """The state `relay demo` leaves, with demo-0001 then revoked; returns its directory."""
    directory = ca.data_dir / "demo-device"
    steps = [
        ca("agent", "enroll", "--device-id", "demo-0001", "--dir", directory),
        ca("ca", "sign", directory / "device.csr", "--out", directory / "device.crt"),
        ca("device", "revoke", "demo-0001"),
    ]
    assert [step.returncode for step in steps] == [0, 0, 0], steps
    return directory


def test_demo_with_a_revoked_device_and_no_certificate_is_an_error(
    ca: Relay, revoked_demo_device: Path
) -> None:
    """`relay demo` after demo-0001 was revoked and its device.crt removed exits 1: use a fresh data dir."""
    (revoked_demo_device / "device.crt").unlink()

    result = ca("demo", *ALL_ON_PORT_ZERO)

    assert result.returncode == 1
    assert "relay: error: the demo device demo-0001 is revoked" in result.stderr
    assert "use a fresh RELAY_DATA_DIR" in result.stderr
    assert not (revoked_demo_device / "device.crt").exists()


def test_demo_with_a_revoked_device_is_an_error(
    ca: Relay, revoked_demo_device: Path
) -> None:
    """`relay demo` with demo-0001 revoked (certificate still there) exits 1 instead of never connecting."""
    result = ca("demo", *ALL_ON_PORT_ZERO)

    assert result.returncode == 1
    assert "relay: error: the demo device demo-0001 is revoked" in result.stderr
    assert "use a fresh RELAY_DATA_DIR" in result.stderr


# --- engineer session commands ------------------------------------------------


@pytest.mark.parametrize("ports", ["22", "x:22", "22:0", "70000:22", "1:65536", ":22"])
def test_forward_with_bad_ports_is_a_usage_error(relay: Relay, ports: str) -> None:
    """LPORT:DPORT must be 0..65535 and 1..65535: exit 2, before anything else."""
    result = relay("forward", "dev-1", ports, "--reason", "ticket 1")
    assert result.returncode == 2
    assert "expected LPORT:DPORT" in result.stderr


@pytest.mark.parametrize("command", [("shell", "dev-1"), ("forward", "dev-1", "0:22")])
def test_session_commands_need_a_login(
    relay: Relay,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    """Without `relay login` first: one clear line, exit 1."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    result = relay(*command, "--reason", "ticket 1")
    assert result.returncode == 1
    assert "not logged in: run `relay login --broker URL` first" in result.stderr


def test_session_commands_need_a_reason(relay: Relay) -> None:
    """The reason is shown to the person at the instrument: it is required."""
    result = relay("shell", "dev-1")
    assert result.returncode == 2
    assert "--reason" in result.stderr
