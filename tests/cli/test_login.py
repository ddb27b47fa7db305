"""``relay login`` against a real ``relay serve``: the README's engineer journey.

A user is added with ``relay user add --json``, a code is computed from the
printed otpauth URI (as an authenticator app would), and ``relay login`` reads
the password and the code from stdin (getpass falls back to stdin without a
terminal). The token lands in a 0600 file and works as a bearer token.
"""

from __future__ import annotations

import json
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

from tests.cli.test_serve import (
    START_TIMEOUT_S,
    Broker,
    broker,
    data_dir,
    relay_env,
    run_relay,
)

__all__ = ["broker", "data_dir"]  # fixtures used by name below

PASSWORD = "correct horse battery staple"  # noqa: S105 - a test account


def _add_user(data_dir: Path, name: str) -> pyotp.TOTP:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "user",
            "add",
            name,
            "--role",
            "engineer",
            "--password-stdin",
            "--json",
        ],
        env=relay_env(data_dir),
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    uri = json.loads(result.stdout)["otpauth_uri"]
    return pyotp.TOTP(parse_qs(urlsplit(uri).query)["secret"][0])


def _login(
    data_dir: Path, port: int, config_home: Path, stdin: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "login",
            "--broker",
            f"https://localhost:{port}",
            "--ca-file",
            str(data_dir / "ca" / "ca.crt"),
            "--username",
            "alice",
        ],
        env={**relay_env(data_dir), "XDG_CONFIG_HOME": str(config_home)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,  # no controlling terminal: getpass reads stdin
    )


@pytest.mark.slow
def test_login_stores_a_working_token(
    data_dir: Path, broker: Broker, tmp_path: Path
) -> None:
    """`relay login` with password and TOTP stores a 0600 token that /api/v1/me accepts."""
    totp = _add_user(data_dir, "alice")
    started = broker.wait_for_event("broker.started", START_TIMEOUT_S)
    port = started["engineer_port"]
    config_home = tmp_path / "config"
    result = _login(data_dir, port, config_home, f"{PASSWORD}\n{totp.now()}\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    token_file = config_home / "relay" / "credentials.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    saved = json.loads(token_file.read_text())
    assert saved["username"] == "alice"
    assert saved["broker"] == f"https://localhost:{port}"
    context = ssl.create_default_context(cafile=str(data_dir / "ca" / "ca.crt"))
    request = urllib.request.Request(
        f"https://localhost:{port}/api/v1/me",
        headers={"Authorization": f"Bearer {saved['token']}"},
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310 - https to the test broker
        me = json.loads(response.read())
    assert (me["username"], me["role"]) == ("alice", "engineer")
    assert saved["token"] not in result.stdout + result.stderr
    assert "csrf_token" not in saved  # a bearer client needs none


@pytest.mark.slow
def test_login_with_a_wrong_code_fails_cleanly(
    data_dir: Path, broker: Broker, tmp_path: Path
) -> None:
    """A wrong code exits 1 with the broker's uniform message and stores nothing."""
    _add_user(data_dir, "alice")
    started = broker.wait_for_event("broker.started", START_TIMEOUT_S)
    config_home = tmp_path / "config"
    result = _login(
        data_dir, started["engineer_port"], config_home, f"{PASSWORD}\n000000\n"
    )
    assert result.returncode == 1
    assert (
        "relay: error: login failed: invalid username, password or code"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (config_home / "relay" / "credentials.json").exists()


def test_login_needs_an_https_broker(tmp_path: Path) -> None:
    """`relay login --broker http://...` is bad usage (exit 2), before any prompt."""
    result = run_relay(tmp_path / "data", "login", "--broker", "http://localhost:9443")
    assert result.returncode == 2
    assert "https://HOST:PORT" in result.stderr
