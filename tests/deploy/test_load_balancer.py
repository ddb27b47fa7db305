"""deploy/haproxy/haproxy.cfg: a valid HAProxy configuration in TCP mode (TLS
passes through to the brokers), balancing the device and engineer ports over
every broker node of compose.yaml, with health checks on /readyz."""

from __future__ import annotations

import re

from relay.config import BrokerConfig
from tests.deploy.deploy_files import DEPLOY, required_binary, run
from tests.deploy.test_compose import broker_nodes, services

HAPROXY = DEPLOY / "haproxy"
CONFIG = HAPROXY / "haproxy.cfg"
DEFAULTS = BrokerConfig()
WHY = "Debian package haproxy; .ci/run must install it"


def sections() -> dict[str, list[list[str]]]:
    """'kind name' (or 'kind') -> the section's lines as words, comments dropped."""
    found: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in CONFIG.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            current = found.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return found


def directive(section: str, *words: str) -> list[list[str]]:
    return [line for line in sections()[section] if line[: len(words)] == list(words)]


def test_haproxy_accepts_the_config() -> None:
    """`haproxy -c` finds no error; its only warnings are the broker names it
    cannot resolve outside compose's network."""
    haproxy = required_binary("haproxy", WHY)
    result = run(haproxy, "-c", "-f", str(CONFIG), cwd=HAPROXY)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "[WARNING]" in line or "[ALERT]" in line
    ]
    for warning in warnings:
        assert "could not resolve address" in warning, warning


def test_tcp_mode_tls_passes_through() -> None:
    """TCP mode everywhere, and no bind or server line holds a certificate:
    HAProxy never terminates TLS (the device's client certificate must reach
    the broker)."""
    assert directive("defaults", "mode") == [["mode", "tcp"]]
    text = CONFIG.read_text()
    assert not re.search(r"^\s*mode\s+http", text, re.MULTILINE)
    for name, lines in sections().items():
        for line in lines:
            if line[0] in {"bind", "server", "default-server"}:
                assert "ssl" not in line, (name, line)
                assert "crt" not in line, (name, line)


def test_frontends_are_the_public_ports() -> None:
    binds = {
        name: [line[1] for line in directive(name, "bind")]
        for name in sections()
        if name.startswith("frontend ")
    }
    assert binds == {
        "frontend devices": [f":{DEFAULTS.device_listen.port}"],
        "frontend engineers": [f":{DEFAULTS.engineer_listen.port}"],
    }
    published = services()["haproxy"]["ports"]
    assert sorted(published) == sorted(
        f"{port}:{port}"
        for port in (DEFAULTS.device_listen.port, DEFAULTS.engineer_listen.port)
    )


def test_every_node_in_both_backends() -> None:
    """Each backend names every broker node of compose.yaml once, on the
    node's device or engineer port, health-checked on its metrics port."""
    nodes = sorted(broker_nodes())
    for backend, port in [
        ("backend broker_devices", DEFAULTS.device_listen.port),
        ("backend broker_engineers", DEFAULTS.engineer_listen.port),
    ]:
        servers = {line[1]: line[2] for line in directive(backend, "server")}
        assert sorted(servers) == nodes, backend
        assert servers == {name: f"{name}:{port}" for name in nodes}, backend
        (defaults,) = directive(backend, "default-server")
        assert "check" in defaults
        assert defaults[defaults.index("port") + 1] == str(DEFAULTS.metrics_listen.port)
        assert ["http-check", "send", "meth", "GET", "uri", "/readyz"] in sections()[
            backend
        ]


def test_balancing() -> None:
    """Devices by least connections; engineers by client address, so that the
    attach socket reaches the node that holds the engineer's session."""
    assert directive("backend broker_devices", "balance") == [["balance", "leastconn"]]
    assert directive("backend broker_engineers", "balance") == [["balance", "source"]]
    assert directive("backend broker_engineers", "hash-type") == [
        ["hash-type", "consistent"]
    ]


def test_per_node_device_ports_bypass_the_load_balancer() -> None:
    """8501-8503 go straight to each node (compose.yaml), never through here."""
    text = CONFIG.read_text()
    for port in (8501, 8502, 8503):
        assert f":{port}" not in text
