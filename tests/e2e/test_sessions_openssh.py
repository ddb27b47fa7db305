"""A real OpenSSH client through `relay forward` to a real sshd on the instrument.

The point of port forwarding is that the engineer's own tools work through the
tunnel unchanged; OpenSSH is the tool a service engineer reaches for first. The
sshd runs as a test server on a free loopback port with its own host key and one
authorized key; the client is the system's `ssh` in batch mode.
"""

from __future__ import annotations

import getpass
import io
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from relay._trio.engineer_session import run_session
from tests.e2e.conftest import LOOPBACK, PKI
from tests.e2e.test_engineer_cli_session import engineer_credentials, forward_to
from tests.e2e.test_sessions_broker import harness
from tests.e2e.test_sessions_end_to_end import DEVICE_ID, instrument

pytestmark = pytest.mark.slow

SSHD = shutil.which("sshd") or (
    "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None
)
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")


def _keygen(path: Path) -> None:
    assert SSH_KEYGEN is not None
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _sshd_config(tmp: Path, port: int, host_key: Path, client_key: Path) -> Path:
    authorized = tmp / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    config = tmp / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {LOOPBACK}",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {tmp / 'sshd.pid'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "",
            ]
        )
    )
    return config


def _prepare_sshd(tmp: Path) -> tuple[Path, Path, int]:
    """Keys, authorized_keys and sshd_config; returns (config, client key, port)."""
    host_key, client_key = tmp / "host_key", tmp / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    port = _free_port()
    config = _sshd_config(tmp, port, host_key, client_key)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation dir
    return config, client_key, port


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.skipif(
    SSHD is None or SSH is None or SSH_KEYGEN is None,
    reason="OpenSSH (sshd, ssh, ssh-keygen) is not installed; .ci/run installs openssh-server",
)
async def test_openssh_client_through_relay_forward_to_sshd(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`ssh -p LPORT` through the forward runs a command on the instrument's sshd."""
    assert SSHD is not None
    assert SSH is not None
    config, client_key, sshd_port = _prepare_sshd(tmp_path)
    sshd = await trio.lowlevel.open_process(
        [SSHD, "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = io.StringIO()
        async with (
            harness(pki, nursery, allowed_channels=("shell", f"tcp:{sshd_port}")) as h,
            instrument(h, nursery, sshd_port) as device,
        ):
            ports: list[int] = []
            answers: list[bytes] = []

            async def engineer_runs_ssh() -> None:
                offer = await device.wait_for_offer()
                await device.press("grant", offer["session_id"])
                with trio.fail_after(10):
                    while not ports:  # noqa: ASYNC110 - set by the forward
                        await trio.sleep(0.02)
                result = await trio.run_process(
                    [
                        SSH,
                        "-p",
                        str(ports[0]),
                        "-i",
                        str(client_key),
                        "-o",
                        "BatchMode=yes",
                        "-o",
                        "StrictHostKeyChecking=no",
                        "-o",
                        "UserKnownHostsFile=/dev/null",
                        "-o",
                        "LogLevel=ERROR",
                        f"{getpass.getuser()}@{LOOPBACK}",
                        "echo via-ssh-$((6*7))",
                    ],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                answers.append(result.stdout + result.stderr)
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C ends `relay forward`

            nursery.start_soon(engineer_runs_ssh)
            with trio.fail_after(60):
                outcome = await run_session(
                    engineer_credentials(h),
                    device_id=DEVICE_ID,
                    reason="ticket 4716: check the instrument's logs",
                    channels=[f"tcp:{sshd_port}"],
                    work=forward_to(sshd_port, ports),
                    out=out,
                )
            assert b"via-ssh-42" in answers[0], answers[0]
            assert (outcome.end_reason, outcome.exit_code) == ("engineer", 0)
            await h.assert_clean()
    finally:
        sshd.terminate()
        with trio.CancelScope(shield=True):
            await sshd.wait()
