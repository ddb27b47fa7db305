"""``relay config example|check`` and ``--config`` / ``$RELAY_CONFIG`` as processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_serve import START_TIMEOUT_S, Broker

TIMEOUT_S = 60


def relay(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``relay ARGS`` in *tmp_path*, with no RELAY_* variables but *env*."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={**base, "RELAY_DATA_DIR": str(tmp_path / "data"), **env},
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_example_checks_ok(tmp_path: Path) -> None:
    """`relay config example > FILE; relay config check FILE` exits 0, nothing changed."""
    example = relay(tmp_path, "config", "example")
    assert example.returncode == 0, example.stderr
    assert "[sessions]\n" in example.stdout
    (tmp_path / "relay.toml").write_text(example.stdout)
    # Without RELAY_DATA_DIR the example's data_dir is the default one.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    check = subprocess.run(
        [sys.executable, "-m", "relay", "config", "check", "relay.toml"],
        env=base,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout == "ok\n"


def test_check_prints_the_changed_values(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text("[sessions]\nmax_session_seconds = 600\n")
    result = relay(
        tmp_path,
        "config",
        "check",
        "relay.toml",
        RELAY_AUDIT__RECORD_INPUT="true",
        RELAY_TOTP_SEALING_KEY="c2VjcmV0",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ok"
    assert "sessions.max_session_seconds = 600" in lines
    assert "audit.record_input = true" in lines
    assert "engineer_auth.totp_sealing_key = (set)" in lines
    assert "c2VjcmV0" not in result.stdout + result.stderr


def test_check_refuses_a_bad_file_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[sessions]\nmax_session_seconds = 3601\n")
    result = relay(tmp_path, "config", "check", "bad.toml")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "relay: error: bad.toml: sessions.max_session_seconds must be in 1..3600, "
        "got 3601: a session never lasts more than 3600 s"
    ]


def test_check_loads_the_policy_directory_it_names(tmp_path: Path) -> None:
    """A policy.dir that would stop the broker fails the check (exit 2, file,
    rule and key); one that loads is ok."""
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "a.toml").write_text('[[rule]]\nname = "r"\nchannels = ["shell"]\n')
    (tmp_path / "relay.toml").write_text(f'[policy]\ndir = "{policy}"\n')
    good = relay(tmp_path, "config", "check", "relay.toml")
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[0] == "ok"
    (policy / "a.toml").write_text(
        '[[rule]]\nname = "r"\nchannels = ["shell"]\ngrant_timeout_s = 0\n'
    )
    bad = relay(tmp_path, "config", "check", "relay.toml")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"relay: error: relay.toml: policy.dir {policy}: a.toml: rule r: "
        "grant_timeout_s: must be a number in 1..600, got 0"
    ]


def test_check_takes_only_totp_steps_apps_support(tmp_path: Path) -> None:
    """engineer_auth.totp_step_s = 45 is refused naming the key and the allowed
    values (exit 2); 60 is accepted."""
    (tmp_path / "bad.toml").write_text("[engineer_auth]\ntotp_step_s = 45\n")
    result = relay(tmp_path, "config", "check", "bad.toml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "relay: error: bad.toml: engineer_auth.totp_step_s must be 30 or 60, got 45"
    ]
    (tmp_path / "relay.toml").write_text(
        "[engineer_auth]\ntotp_step_s = 60\ntotp_digits = 8\n"
    )
    result = relay(tmp_path, "config", "check", "relay.toml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "engineer_auth.totp_step_s = 60" in lines
    assert "engineer_auth.totp_digits = 8" in lines


def test_check_gives_the_toml_line(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('data_dir = "x"\n[sessions\n')
    result = relay(tmp_path, "config", "check", "bad.toml")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("relay: error: bad.toml: not valid TOML: ")
    assert "line 2" in line


def test_check_refuses_an_unknown_override(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text("")
    result = relay(tmp_path, "config", "check", "relay.toml", RELAY_SESSIONS__CAP="1")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "relay: error: RELAY_SESSIONS__CAP: unknown override"
    )


def test_serve_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[sessions]\nmax_session_secondz = 60\n")
    result = relay(tmp_path, "serve", "--config", "bad.toml")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        "relay: error: bad.toml: sessions.max_session_secondz: unknown key"
    )
    assert not (tmp_path / "data").exists()


def test_serve_takes_the_config_from_relay_config(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[websocket]\nping_interval_s = 0\n")
    result = relay(tmp_path, "serve", RELAY_CONFIG="bad.toml")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "relay: error: bad.toml: websocket.ping_interval_s: must be > 0, got 0.0"
    )


def test_commands_use_the_data_dir_of_relay_config(tmp_path: Path) -> None:
    """Every command reads $RELAY_CONFIG: `relay ca init` puts the CA in its data_dir."""
    (tmp_path / "relay.toml").write_text('data_dir = "from-file"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "ca", "init"],
        env={**base, "RELAY_CONFIG": "relay.toml"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-file").is_dir()
    # RELAY_DATA_DIR beats the file.
    result = relay(tmp_path, "ca", "init", RELAY_CONFIG="relay.toml")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data").is_dir()


@pytest.mark.slow
def test_serve_runs_on_the_config_file(tmp_path: Path) -> None:
    """`relay serve --config FILE`: data dir, listeners and a table value from the file."""
    (tmp_path / "relay.toml").write_text(
        'data_dir = "from-file"\n'
        'device_listen = "127.0.0.1:0"\n'
        'engineer_listen = "127.0.0.1:0"\n'
        'metrics_listen = "127.0.0.1:0"\n'
        "[audit]\n"
        "stdout = false\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env = {**base, "RELAY_CONFIG": "relay.toml"}
    init = subprocess.run(
        [sys.executable, "-m", "relay", "ca", "init"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", "relay.toml"],
        env=base,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    broker = Broker(process=process)
    broker.start_reading()
    try:
        started = broker.wait_for_event("broker.started", START_TIMEOUT_S)
        assert started["data_dir"] == "from-file"
        assert started["device_port"] != 0
        assert started["engineer_port"] != 0
        assert broker.stop(signal.SIGTERM) == 0
        assert process.stdout is not None
        assert process.stdout.read() == ""  # [audit] stdout = false
    finally:
        broker.kill()
        if process.stdout is not None:
            process.stdout.close()


def test_agent_file_example_check_and_errors(tmp_path: Path) -> None:
    """`relay config example --agent` checks ok with `--agent`; a bad agent file
    exits 2 naming the key, also from `relay agent run --config`."""
    example = relay(tmp_path, "config", "example", "--agent")
    assert example.returncode == 0, example.stderr
    assert "\nbackoff_cap_s = 60.0\n" in example.stdout
    (tmp_path / "agent.toml").write_text(example.stdout)
    check = relay(tmp_path, "config", "check", "--agent", "agent.toml")
    assert (check.returncode, check.stdout) == (0, "ok\n"), check.stderr
    (tmp_path / "bad.toml").write_text("shutdown_grace_s = 30\n")
    bad = relay(tmp_path, "config", "check", "--agent", "bad.toml")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "relay: error: bad.toml: shutdown_grace_s must be in 0..9.0, got 30.0"
    )
    run = relay(
        tmp_path,
        "agent",
        "run",
        "--broker",
        "wss://127.0.0.1:1",
        "--dir",
        str(tmp_path),
        "--ca-file",
        str(tmp_path / "ca.crt"),
        "--config",
        "bad.toml",
    )
    assert run.returncode == 2
    assert "shutdown_grace_s must be in 0..9.0" in run.stderr
