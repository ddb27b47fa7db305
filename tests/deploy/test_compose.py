"""deploy/compose.yaml: three broker nodes on one PostgreSQL and one Redis behind
a TCP load balancer; each node with its own id, data volume and advertised
device port, all with the same CA, sealing key and shared-state settings;
secrets from files; the examples pass `relay config check`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from relay.config import BrokerConfig
from tests.deploy.deploy_files import DEPLOY, relay_config_check

COMPOSE = DEPLOY / "compose.yaml"
DEFAULTS = BrokerConfig()
METRICS_PORT = DEFAULTS.metrics_listen.port
DEVICE_PORT = DEFAULTS.device_listen.port
ENGINEER_PORT = DEFAULTS.engineer_listen.port
NODES = ("broker-1", "broker-2", "broker-3")
#: What the operator puts in deploy/.env; the tests use the example's name.
PUBLIC_HOST = "relay.example.com"
DATA_DIR = "/var/lib/relay"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def broker_nodes() -> dict[str, dict[str, Any]]:
    """The services that run `relay serve`."""
    return {
        name: service
        for name, service in services().items()
        if service.get("command") == ["serve"]
    }


_VARIABLE = re.compile(
    r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op in (":?", "?"):
            raise AssertionError(f"compose would stop: {name}: {arg}")
        return arg if op in (":-", "-") else ""

    return _VARIABLE.sub(substitute, value).replace("$$", "$")


def node_environment(service: dict[str, Any]) -> dict[str, str]:
    return {
        key: interpolate(str(value), {"RELAY_PUBLIC_HOST": PUBLIC_HOST})
        for key, value in service["environment"].items()
    }


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value for key, value in pairs}


def example_env() -> dict[str, str]:
    return env_file(DEPLOY / "relay.env.example")


def published(service: dict[str, Any]) -> list[str]:
    return [str(port) for port in service.get("ports", [])]


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Target path -> the mount in long form, whichever syntax the file uses."""
    found: dict[str, dict[str, Any]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *options = volume.split(":")
            volume = {
                "type": "bind" if source.startswith((".", "/")) else "volume",
                "source": source,
                "target": target,
                "read_only": "ro" in options,
            }
        found[volume["target"]] = volume
    return found


def test_services() -> None:
    assert {
        "ca-init",
        *NODES,
        "haproxy",
        "postgres",
        "redis",
        "prometheus",
    } <= services().keys()


def test_three_broker_nodes_with_unique_node_ids() -> None:
    """Three nodes, each named by its own RELAY_CLUSTER__NODE_ID (and host name)."""
    nodes = broker_nodes()
    assert sorted(nodes) == list(NODES)
    ids = [node_environment(s)["RELAY_CLUSTER__NODE_ID"] for s in nodes.values()]
    assert len(set(ids)) == len(ids) == 3
    for name, service in nodes.items():
        assert node_environment(service)["RELAY_CLUSTER__NODE_ID"] == name
        assert service["hostname"] == name
        assert service["build"] == {"context": "..", "dockerfile": "Containerfile"}
    assert (COMPOSE.parent / ".." / "Containerfile").is_file()


def test_every_node_uses_the_shared_postgres_and_redis() -> None:
    """Every node reads relay.env, whose URLs name the postgres and redis
    services; no node overrides them; every node waits for both."""
    example = example_env()
    database = urlsplit(example["RELAY_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg"
    assert database.hostname == "postgres"
    assert database.path == "/" + services()["postgres"]["environment"]["POSTGRES_DB"]
    assert database.username == services()["postgres"]["environment"]["POSTGRES_USER"]
    redis = urlsplit(example["RELAY_CLUSTER__REDIS_URL"])
    assert redis.scheme == "redis"
    assert redis.hostname == "redis"
    for name, service in broker_nodes().items():
        assert service["env_file"] == ["relay.env"], name
        environment = node_environment(service)
        assert "RELAY_DATABASE_URL" not in environment, name
        assert "RELAY_CLUSTER__REDIS_URL" not in environment, name
        assert service["depends_on"] == {
            "ca-init": {"condition": "service_completed_successfully"},
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }, name
    for name in ("postgres", "redis"):
        assert services()[name]["healthcheck"]["test"], name


def test_same_device_ca_on_every_node_read_only() -> None:
    """ca-init creates the CA once on relay-ca (as its data dir, so the files
    land in relay-ca's ca/); every node mounts that ca/ read-only where the
    broker looks for it (DATA_DIR/ca), and nothing else writes it."""
    init = services()["ca-init"]
    assert init["command"] == ["ca", "init"]
    assert init["network_mode"] == "none"
    assert mounts(init)[DATA_DIR]["source"] == "relay-ca"
    for name, service in broker_nodes().items():
        ca = mounts(service)[f"{DATA_DIR}/ca"]
        assert ca == {
            "type": "volume",
            "source": "relay-ca",
            "target": f"{DATA_DIR}/ca",
            "read_only": True,
            "volume": {"subpath": "ca"},
        }, name
    writers = [
        name
        for name, service in services().items()
        for mount in mounts(service).values()
        if mount["source"] == "relay-ca" and not mount["read_only"]
    ]
    assert writers == ["ca-init"]


def test_each_node_has_its_own_data_volume() -> None:
    """Audit log, its signing key and recordings stay per node."""
    sources = []
    for name, service in broker_nodes().items():
        data = mounts(service)[DATA_DIR]
        assert data["type"] == "volume", name
        assert not data["read_only"], name
        assert node_environment(service)["RELAY_DATA_DIR"] == DATA_DIR
        sources.append(data["source"])
    assert len(set(sources)) == len(sources)
    assert set(sources) <= compose()["volumes"].keys()
    for name, service in services().items():
        if name not in broker_nodes():
            used = {m["source"] for m in mounts(service).values()}
            assert not used & set(sources), name


def test_same_sealing_key_and_listener_certificate_on_every_node() -> None:
    """The TOTP sealing key comes from the one env file, the listener
    certificate and key from the same secrets, on every node."""
    nodes = list(broker_nodes().values())
    assert "RELAY_TOTP_SEALING_KEY" in example_env()
    for service in nodes:
        assert "RELAY_TOTP_SEALING_KEY" not in service["environment"]
        assert service["secrets"] == nodes[0]["secrets"]
        environment = node_environment(service)
        for key in ("RELAY_TLS_CERT_FILE", "RELAY_TLS_KEY_FILE"):
            assert environment[key] == node_environment(nodes[0])[key]
            assert environment[key].startswith("/run/secrets/")


def test_public_ports_on_the_load_balancer_and_one_device_port_per_node() -> None:
    """HAProxy publishes the device and engineer ports; each node publishes
    one host port to its own device listener, and nothing else; nobody
    publishes the metrics port."""
    assert sorted(published(services()["haproxy"])) == [
        f"{DEVICE_PORT}:{DEVICE_PORT}",
        f"{ENGINEER_PORT}:{ENGINEER_PORT}",
    ]
    host_ports = []
    for name, service in broker_nodes().items():
        (port,) = published(service)
        host, container = port.split(":")
        assert int(container) == DEVICE_PORT, name
        host_ports.append(int(host))
    assert host_ports == [8501, 8502, 8503]
    for name, service in services().items():
        for port in published(service):
            assert str(METRICS_PORT) not in port, name
    assert published(services()["prometheus"]) == ["127.0.0.1:9090:9090"]


def test_advertised_device_urls_match_the_published_ports() -> None:
    """Each node advertises wss://PUBLIC_HOST:PORT with PORT the host port
    published to its device listener; one host name for all, the one the
    console origin (and so the listener certificate) names."""
    origins = yaml.safe_load(example_env()["RELAY_ENGINEER_LISTENER__ALLOWED_ORIGINS"])
    (origin,) = origins
    hosts = set()
    for name, service in broker_nodes().items():
        url = urlsplit(node_environment(service)["RELAY_CLUSTER__ADVERTISE_DEVICE_URL"])
        assert url.scheme == "wss", name
        assert url.path == "", name
        (port,) = published(service)
        assert url.port == int(port.split(":")[0]), name
        hosts.add(url.hostname)
    assert hosts == {PUBLIC_HOST} == {urlsplit(origin).hostname}


def test_public_host_must_be_set() -> None:
    """Without RELAY_PUBLIC_HOST compose stops, rather than advertise nothing."""
    for service in broker_nodes().values():
        raw = str(service["environment"]["RELAY_CLUSTER__ADVERTISE_DEVICE_URL"])
        with pytest.raises(AssertionError, match="compose would stop"):
            interpolate(raw, {})


def test_metrics_reach_prometheus_on_the_internal_network_only() -> None:
    networks = compose()["networks"]
    assert networks["internal"]["internal"] is True
    for name, service in broker_nodes().items():
        assert "internal" in service["networks"], name
        assert node_environment(service)["RELAY_METRICS_LISTEN"] == (
            f"0.0.0.0:{METRICS_PORT}"
        )
    assert "internal" in services()["prometheus"]["networks"]
    assert services()["haproxy"]["networks"] == ["public"]
    for name in ("postgres", "redis"):
        assert services()[name]["networks"] == ["internal"]
        assert not published(services()[name])
    prometheus = "\n".join(services()["prometheus"]["volumes"])
    assert "./prometheus/prometheus.yml:" in prometheus
    assert "./prometheus/rules.yml:" in prometheus


def test_prometheus_scrapes_every_node() -> None:
    """The static job `relay` names every node's metrics listener."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{name}:{METRICS_PORT}" for name in NODES}


def test_locked_down_containers() -> None:
    for name in (*NODES, "ca-init", "haproxy"):
        service = services()[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
    for name in NODES:
        assert services()[name]["stop_grace_period"] == "20s"


def test_secrets_are_files_never_inline_values() -> None:
    document = compose()
    for secret in document["secrets"].values():
        assert set(secret) == {"file"}
        assert secret["file"].startswith("./secrets/")
    for name, service in document["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN", "SEALING")):
                assert str(value).startswith("/run/secrets/"), (name, key)
            assert "@" not in str(value), (name, key)  # no user:password@host
    assert services()["redis"]["command"][1:3] == [
        "--aclfile",
        "/run/secrets/redis_acl",
    ]


def test_env_file_example_holds_no_secret_values() -> None:
    """The sealing key is empty and the URLs' passwords are placeholders."""
    example = example_env()
    assert example["RELAY_TOTP_SEALING_KEY"] == ""
    placeholder = "PASSWORD"
    for key in ("RELAY_DATABASE_URL", "RELAY_CLUSTER__REDIS_URL"):
        assert urlsplit(example[key]).password == placeholder, key


def _config_check(tmp_path: Path, service: dict[str, Any], *, advertise: bool) -> str:
    config = tmp_path / "empty.toml"
    config.write_text("")
    environment = node_environment(service)
    if not advertise:
        del environment["RELAY_CLUSTER__ADVERTISE_DEVICE_URL"]
    return relay_config_check(config, {**environment, **example_env()})


@pytest.mark.parametrize("node", NODES)
def test_node_environment_passes_config_check(tmp_path: Path, node: str) -> None:
    """relay.env.example with a node's environment passes `relay config check`
    (the advertised address aside: see the next test), as a cluster node on
    PostgreSQL and Redis."""
    out = _config_check(tmp_path, services()[node], advertise=False)
    assert out.startswith("ok\n")
    assert f'metrics_listen = "0.0.0.0:{METRICS_PORT}"' in out
    assert 'database_url = "postgresql+psycopg://relay:***@postgres:5432/relay"' in out
    assert 'cluster.redis_url = "redis://:***@redis:6379/0"' in out
    assert f'cluster.node_id = "{node}"' in out


@pytest.mark.parametrize("node", NODES)
def test_advertised_address_passes_config_check(tmp_path: Path, node: str) -> None:
    """With sessions across nodes the broker takes the advertised address."""
    out = _config_check(tmp_path, services()[node], advertise=True)
    number = NODES.index(node) + 1
    assert f"wss://{PUBLIC_HOST}:850{number}" in out
