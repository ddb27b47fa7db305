"""deploy/kubernetes: well-formed manifests; three locked-down broker nodes in a
StatefulSet, each with its own volume, node id and per-node device Service,
all with the same CA, sealing key, PostgreSQL and Redis; probes on the metrics
listener; a valid relay.toml; no secret values."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from relay.config import BrokerConfig
from tests.deploy.deploy_files import DEPLOY, relay_config_check

KUBERNETES = DEPLOY / "kubernetes"
METRICS_PORT = BrokerConfig().metrics_listen.port
PUBLIC_PORTS = {BrokerConfig().device_listen.port, BrokerConfig().engineer_listen.port}


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs.extend(
            doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None
        )
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [
        d
        for d in documents()
        if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    return doc


def statefulset() -> dict[str, Any]:
    return one("StatefulSet")


def pod() -> dict[str, Any]:
    found: dict[str, Any] = statefulset()["spec"]["template"]["spec"]
    return found


def broker_container() -> dict[str, Any]:
    (container,) = pod()["containers"]
    found: dict[str, Any] = container
    return found


def pod_names() -> list[str]:
    """The StatefulSet's pods: NAME-0, NAME-1, ..."""
    spec = statefulset()
    return [f"{spec['metadata']['name']}-{i}" for i in range(spec["spec"]["replicas"])]


def env() -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in broker_container()["env"]}


def env_for(pod_name: str) -> dict[str, str]:
    """The literal variables of *pod_name*, $(VAR) references expanded as the
    kubelet does (POD_NAME from metadata.name)."""
    values: dict[str, str] = {}
    for item in broker_container()["env"]:
        if item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == (
            "metadata.name"
        ):
            values[item["name"]] = pod_name
        elif "value" in item:
            values[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: values[m[1]], item["value"]
            )
    return values


def test_every_document_names_its_kind() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "StatefulSet",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
    }
    for doc in docs:
        assert doc["apiVersion"], doc
        assert doc["kind"], doc
        assert doc["metadata"]["name"], doc


def test_kustomization_lists_every_manifest() -> None:
    listed = set(one("Kustomization")["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_three_nodes_with_stable_names() -> None:
    """A StatefulSet of three (broker-0..2), governed by a headless Service,
    replaced one at a time; no Deployment and no shared claim left over."""
    spec = statefulset()["spec"]
    assert spec["replicas"] == 3
    assert pod_names() == ["broker-0", "broker-1", "broker-2"]
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    governing = one("Service", spec["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert not [
        d for d in documents() if d["kind"] in {"Deployment", "PersistentVolumeClaim"}
    ]


def test_node_id_from_the_pod_name() -> None:
    """Each node's id is its pod's name, so unique in the set."""
    ids = [env_for(name)["RELAY_CLUSTER__NODE_ID"] for name in pod_names()]
    assert ids == pod_names()


def test_every_node_uses_postgres_and_redis_from_secrets() -> None:
    """The store and Redis URLs (passwords inside) come from Secrets, the same
    for every node (one pod template); PostgreSQL and Redis are external."""
    variables = env()
    for name, secret in [
        ("RELAY_DATABASE_URL", "relay-database"),
        ("RELAY_CLUSTER__REDIS_URL", "relay-redis"),
    ]:
        assert "value" not in variables[name]
        assert variables[name]["valueFrom"]["secretKeyRef"] == {
            "name": secret,
            "key": "url",
        }
    images = {
        c["image"]
        for d in documents()
        if d["kind"] == "StatefulSet"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert not any("postgres" in image or "redis" in image for image in images)


def test_probes_hit_the_metrics_listener() -> None:
    container = broker_container()
    (metrics,) = [p for p in container["ports"] if p["containerPort"] == METRICS_PORT]
    for probe, path in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ]:
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in (metrics["name"], METRICS_PORT)


def test_locked_down_security_context() -> None:
    spec = pod()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"] + spec.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "memory" in container["resources"]["limits"]
        assert container["resources"]["requests"]


def test_grace_period_covers_the_shutdown() -> None:
    """The broker exits within 10 s of SIGTERM; Kubernetes waits at least 15 s."""
    assert pod()["terminationGracePeriodSeconds"] >= 15


def test_own_data_volume_per_node_and_secrets_only_referenced() -> None:
    """The data dir is a volumeClaimTemplate (one claim per node); the CA, the
    sealing key and the listener certificate come from Secrets, the same for
    every node."""
    volumes = {v["name"]: v for v in pod()["volumes"]}
    mounts = {m["mountPath"]: m for m in broker_container()["volumeMounts"]}
    (template,) = statefulset()["spec"]["volumeClaimTemplates"]
    assert mounts["/var/lib/relay"]["name"] == template["metadata"]["name"]
    assert mounts["/var/lib/relay"]["name"] not in volumes
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert (
        volumes[mounts["/etc/relay/tls"]["name"]]["secret"]["secretName"] == "relay-tls"
    )
    variables = env()
    assert "value" not in variables["RELAY_TOTP_SEALING_KEY"]
    assert (
        variables["RELAY_TOTP_SEALING_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        == "relay-totp"
    )
    # No Secret with values is committed.
    assert not [d for d in documents() if d["kind"] == "Secret"]


def test_same_device_ca_on_every_node_read_only() -> None:
    """The Secret relay-ca (and, during a rollover, relay-ca-previous) is
    mounted read-only where the broker looks for the CA: DATA_DIR/ca."""
    mounts = {m["mountPath"]: m for m in broker_container()["volumeMounts"]}
    ca = mounts["/var/lib/relay/ca"]
    assert ca["readOnly"] is True
    volumes = {v["name"]: v for v in pod()["volumes"]}
    current, previous = volumes[ca["name"]]["projected"]["sources"]
    assert current["secret"]["name"] == "relay-ca"
    assert "optional" not in current["secret"]
    assert {i["path"] for i in current["secret"]["items"]} == {"ca.crt", "ca.key"}
    assert previous["secret"] == {
        "name": "relay-ca-previous",
        "optional": True,
        "items": [
            {"key": "ca.crt", "path": "previous/ca.crt"},
            {"key": "ca.key", "path": "previous/ca.key"},
        ],
    }
    # Nothing creates a CA per pod any more.
    assert "initContainers" not in pod()


def test_public_service_balances_every_node_and_has_no_metrics_port() -> None:
    public = one("Service", "relay-public")
    assert public["spec"]["type"] in {"LoadBalancer", "NodePort"}
    assert public["spec"]["externalTrafficPolicy"] == "Local"
    assert public["spec"]["sessionAffinity"] == "ClientIP"
    assert (
        public["spec"]["selector"] == statefulset()["spec"]["selector"]["matchLabels"]
    )
    ports = public["spec"]["ports"]
    assert {p["port"] for p in ports} == PUBLIC_PORTS
    assert {p["targetPort"] for p in ports} == {"device", "engineer"}
    metrics = one("Service", "relay-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in metrics["spec"]["ports"]] == [METRICS_PORT]


def test_one_device_service_per_node_matching_its_advertised_address() -> None:
    """Each pod has a Service of its own for its device listener (and only
    that port), and the pod advertises wss://POD.DOMAIN:PORT with that port;
    the names differ only in the pod's label, under one domain (the agents'
    tunnel_hosts, the listener certificate's wildcard)."""
    device_port = BrokerConfig().device_listen.port
    domains = set()
    for name in pod_names():
        service = one("Service", f"{name}-device")
        assert service["spec"]["selector"] == {
            **statefulset()["spec"]["selector"]["matchLabels"],
            "statefulset.kubernetes.io/pod-name": name,
        }
        assert service["spec"]["externalTrafficPolicy"] == "Local"
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == "device"
        url = urlsplit(env_for(name)["RELAY_CLUSTER__ADVERTISE_DEVICE_URL"])
        assert url.scheme == "wss"
        assert url.port == port["port"] == device_port
        assert url.hostname is not None
        label, _, domain = url.hostname.partition(".")
        assert label == name
        domains.add(domain)
    (domain,) = domains
    relay_toml = tomllib.loads(one("ConfigMap")["data"]["relay.toml"])
    origins = relay_toml["engineer_listener"]["allowed_origins"]
    assert [urlsplit(o).hostname for o in origins] == [domain]


def test_network_policy_admits_metrics_from_monitoring_only() -> None:
    assert one("NetworkPolicy")["spec"]["policyTypes"] == ["Ingress", "Egress"]
    rules = one("NetworkPolicy")["spec"]["ingress"]
    for rule in rules:
        ports = {p["port"] for p in rule["ports"]}
        if METRICS_PORT in ports:
            assert ports == {METRICS_PORT}
            (source,) = rule["from"]
            assert source == {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                }
            }
        else:
            assert ports == PUBLIC_PORTS
    assert any(METRICS_PORT in {p["port"] for p in r["ports"]} for r in rules)


def test_network_policy_lets_the_nodes_reach_postgres_redis_and_dns() -> None:
    rules = one("NetworkPolicy")["spec"]["egress"]
    ports = {(p["port"], p["protocol"]) for rule in rules for p in rule["ports"]}
    assert ports == {
        (53, "UDP"),
        (53, "TCP"),
        (5432, "TCP"),
        (6379, "TCP"),
        (6380, "TCP"),
    }


def test_pod_disruption_budget_selects_the_broker() -> None:
    """One node at a time may be evicted; the other two keep the fleet."""
    pdb = one("PodDisruptionBudget")["spec"]
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1
    assert "minAvailable" not in pdb


def test_configmap_relay_toml_passes_config_check(tmp_path: Path) -> None:
    """`relay config check` accepts the ConfigMap's relay.toml (no RELAY_* set),
    and the file binds the metrics listener where the probes look for it."""
    config = tmp_path / "relay.toml"
    config.write_text(one("ConfigMap")["data"]["relay.toml"])
    out = relay_config_check(config)
    assert out.startswith("ok\n")
    assert f'metrics_listen = "0.0.0.0:{METRICS_PORT}"' in out
    assert 'data_dir = "/var/lib/relay"' in out
    # The URLs and their passwords come from Secrets, never from the file.
    assert "database_url" not in out
    assert "redis_url" not in out


#: What the Secrets relay-database and relay-redis hold, for the config check.
SECRET_URLS = {
    "RELAY_DATABASE_URL": "postgresql+psycopg://relay:PASSWORD@db.example:5432/relay",
    "RELAY_CLUSTER__REDIS_URL": "redis://:PASSWORD@redis.example:6379/0",
}


@pytest.mark.parametrize("pod_name", ["broker-0", "broker-1", "broker-2"])
def test_node_passes_config_check(tmp_path: Path, pod_name: str) -> None:
    """The ConfigMap with a node's environment (Secrets stood in for) is a
    cluster node on PostgreSQL and Redis named after its pod."""
    config = tmp_path / "relay.toml"
    config.write_text(one("ConfigMap")["data"]["relay.toml"])
    variables = {
        k: v
        for k, v in env_for(pod_name).items()
        if k.startswith("RELAY_") and k != "RELAY_CLUSTER__ADVERTISE_DEVICE_URL"
    }
    out = relay_config_check(config, {**variables, **SECRET_URLS})
    assert (
        'database_url = "postgresql+psycopg://relay:***@db.example:5432/relay"' in out
    )
    assert 'cluster.redis_url = "redis://:***@redis.example:6379/0"' in out
    assert f'cluster.node_id = "{pod_name}"' in out


def test_advertised_address_passes_config_check(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(one("ConfigMap")["data"]["relay.toml"])
    variables = {k: v for k, v in env_for("broker-1").items() if k.startswith("RELAY_")}
    out = relay_config_check(config, {**variables, **SECRET_URLS})
    assert "wss://broker-1.relay.example.com:8443" in out


@pytest.mark.parametrize(
    "path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda p: p.name
)
def test_no_inline_secret_material(path: Path) -> None:
    text = path.read_text()
    assert "PRIVATE KEY" not in text
    assert "stringData" not in text
