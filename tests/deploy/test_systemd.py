"""deploy/systemd: hardened units for the broker and the agent."""

from __future__ import annotations

import configparser
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from bench.world import BROKER_PRELOAD
from tests.deploy.deploy_files import DEPLOY, relay_config_check, run

SYSTEMD = DEPLOY / "systemd"
BROKER = SYSTEMD / "relay-broker.service"
AGENT = SYSTEMD / "relay-agent.service"

#: Directives both units must set, with their values.
COMMON = {
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "15",
    "Restart": "on-failure",
}


def service(path: Path) -> dict[str, list[str]]:
    """The [Service] section, every value of a repeated key in order."""
    values: dict[str, list[str]] = {}
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    section = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[Service]" and stripped and not stripped.startswith("#"):
            key, _, value = stripped.partition("=")
            values.setdefault(key, []).append(value)
    # The file as a whole parses as an ini file (sections, key=value lines).
    parser.read_string(path.read_text())
    assert parser.has_section("Unit")
    assert parser.has_section("Install")
    return values


@pytest.mark.parametrize("path", [BROKER, AGENT], ids=lambda p: p.name)
def test_common_hardening(path: Path) -> None:
    unit = service(path)
    for key, value in COMMON.items():
        assert value in unit[key], (key, unit.get(key))
    families = unit["RestrictAddressFamilies"][-1].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    assert not set(families) - {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert "root" not in unit.get("User", [])


def test_broker_is_fully_sandboxed() -> None:
    unit = service(BROKER)
    assert unit["DynamicUser"] == ["yes"]
    assert unit["StateDirectory"] == ["relay"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectHome"] == ["yes"]
    assert unit["PrivateDevices"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "RELAY_DATA_DIR=/var/lib/relay" in unit["Environment"]
    assert shlex.split(unit["ExecStart"][0])[1:] == ["serve"]
    # Secrets come from root-only files, not from the unit.
    assert not any("SEALING" in value for value in unit.get("Environment", []))
    assert unit["EnvironmentFile"] == ["/etc/relay/relay-broker.env"]


def test_broker_runs_on_the_malloc_the_soak_measures() -> None:
    """jemalloc, preloaded as bench.world starts the broker (reliability/README)."""
    assert f"LD_PRELOAD={BROKER_PRELOAD}" in service(BROKER)["Environment"]


def test_agent_keeps_what_the_remote_shell_needs() -> None:
    """The shell channel runs on a PTY as the agent's user: a real account, the
    PTY and instrument devices reachable, no strict read-only root."""
    unit = service(AGENT)
    assert unit["User"] == ["relay-agent"]
    assert "DynamicUser" not in unit
    assert unit["PrivateDevices"] == ["no"]
    assert unit["ProtectSystem"] == ["full"]
    assert unit["StateDirectory"] == ["relay-agent"]
    assert "DevicePolicy" not in unit or unit["DevicePolicy"] == ["auto"]


def test_agent_exec_start_uses_the_cli_flags() -> None:
    """ExecStart is a valid `relay agent run` command line (argparse accepts it)."""
    from relay.cli import build_parser

    args = shlex.split(service(AGENT)["ExecStart"][0])
    assert args[0] == "/opt/relay/bin/relay"
    argv = [
        a.replace("${AGENT_BROKER_URL}", "wss://relay.example.com:8443")
        for a in args[1:]
    ]
    parsed = build_parser().parse_args(argv)
    assert parsed.dir == Path("/var/lib/relay-agent")
    assert parsed.ca_file == Path("/etc/relay-agent/broker-ca.crt")


def test_broker_config_example_passes_config_check(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text((SYSTEMD / "relay-broker.toml.example").read_text())
    out = relay_config_check(config)
    assert "/run/credentials/relay-broker.service/tls.crt" in out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds no unknown key or bad value in either unit
    (ExecStart pointed at this venv's relay, since /opt/relay is not installed).
    Needs systemd-analyze (Debian package systemd, installed by .ci/run)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    relay = Path(sys.executable).parent / "relay"
    units = []
    for path in (BROKER, AGENT):
        unit = tmp_path / path.name
        unit.write_text(path.read_text().replace("/opt/relay/bin/relay", str(relay)))
        units.append(str(unit))
    result = run(
        analyze, "verify", "--man=no", "--recursive-errors=no", *units, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) not in result.stderr, result.stderr
