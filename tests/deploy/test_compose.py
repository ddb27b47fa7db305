"""deploy/compose.yaml: the broker publishes its two public ports only, secrets
come from files, and the examples pass `relay config check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from relay.config import BrokerConfig
from tests.deploy.deploy_files import DEPLOY, relay_config_check

COMPOSE = DEPLOY / "compose.yaml"
METRICS_PORT = BrokerConfig().metrics_listen.port


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def published(service: dict[str, Any]) -> list[str]:
    return [str(port) for port in service.get("ports", [])]


def test_services() -> None:
    assert {"broker", "broker-init", "postgres", "redis", "prometheus"} <= compose()[
        "services"
    ].keys()


def test_broker_publishes_the_public_ports_only() -> None:
    defaults = BrokerConfig()
    broker = compose()["services"]["broker"]
    assert sorted(published(broker)) == [
        f"{defaults.device_listen.port}:{defaults.device_listen.port}",
        f"{defaults.engineer_listen.port}:{defaults.engineer_listen.port}",
    ]
    for name, service in compose()["services"].items():
        for port in published(service):
            assert str(METRICS_PORT) not in port, name
    assert broker["build"] == {"context": "..", "dockerfile": "Containerfile"}
    assert (COMPOSE.parent / broker["build"]["context"] / "Containerfile").is_file()


def test_metrics_reach_prometheus_on_the_internal_network_only() -> None:
    services = compose()["services"]
    networks = compose()["networks"]
    assert networks["internal"]["internal"] is True
    assert "internal" in services["broker"]["networks"]
    assert "internal" in services["prometheus"]["networks"]
    for name in ("postgres", "redis"):
        assert services[name]["networks"] == ["internal"]
        assert not published(services[name])
    assert services["broker"]["environment"]["RELAY_METRICS_LISTEN"] == (
        f"0.0.0.0:{METRICS_PORT}"
    )
    prometheus = "\n".join(services["prometheus"]["volumes"])
    assert "./prometheus/prometheus.yml:" in prometheus
    assert "./prometheus/rules.yml:" in prometheus


def test_broker_does_not_use_postgres_yet() -> None:
    """The store is SQLite until the multi-node stage (issue 11)."""
    broker = compose()["services"]["broker"]
    assert "RELAY_DATABASE_URL" not in broker["environment"]
    assert set(broker["depends_on"]) == {"broker-init"}


def test_secrets_are_files_never_inline_values() -> None:
    document = compose()
    for secret in document["secrets"].values():
        assert set(secret) == {"file"}
    for name, service in document["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN", "SEALING")):
                assert str(value).startswith("/run/secrets/"), (name, key)
    broker = document["services"]["broker"]
    assert broker["env_file"] == ["relay.env"]
    assert broker["read_only"] is True
    assert broker["cap_drop"] == ["ALL"]


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value for key, value in pairs}


def test_env_file_example_passes_config_check(tmp_path: Path) -> None:
    """relay.env.example holds no value for the sealing key, and its settings,
    with the compose file's environment, pass `relay config check`."""
    example = env_file(DEPLOY / "relay.env.example")
    assert example["RELAY_TOTP_SEALING_KEY"] == ""
    config = tmp_path / "empty.toml"
    config.write_text("")
    environment = {
        key: str(value)
        for key, value in compose()["services"]["broker"]["environment"].items()
    }
    out = relay_config_check(config, {**environment, **example})
    assert f'metrics_listen = "0.0.0.0:{METRICS_PORT}"' in out
