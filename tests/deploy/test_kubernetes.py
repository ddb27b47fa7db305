"""deploy/kubernetes: well-formed manifests, a locked-down single-replica broker,
probes on the metrics listener, a valid relay.toml, no secret values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def broker_container() -> dict[str, Any]:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = container
    return found


def test_every_document_names_its_kind() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
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


def test_single_replica_recreated_never_overlapping() -> None:
    """SQLite on a ReadWriteOnce volume and in-process presence: one pod at a time."""
    spec = one("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    assert one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


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
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "memory" in container["resources"]["limits"]
        assert container["resources"]["requests"]


def test_grace_period_covers_the_shutdown() -> None:
    """The broker exits within 10 s of SIGTERM; Kubernetes waits at least 15 s."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 15


def test_data_dir_on_the_claim_and_secrets_only_referenced() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in broker_container()["volumeMounts"]}
    claim = volumes[mounts["/var/lib/relay"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one("PersistentVolumeClaim")["metadata"]["name"]
    assert volumes[mounts["/etc/relay/tls"]]["secret"]["secretName"] == "relay-tls"
    env = {e["name"]: e for e in broker_container()["env"]}
    assert "value" not in env["RELAY_TOTP_SEALING_KEY"]
    assert (
        env["RELAY_TOTP_SEALING_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        == "relay-totp"
    )
    # No Secret with values is committed.
    assert not [d for d in documents() if d["kind"] == "Secret"]


def test_public_service_has_no_metrics_port() -> None:
    public = one("Service", "relay-public")
    assert public["spec"]["type"] in {"LoadBalancer", "NodePort"}
    assert public["spec"]["externalTrafficPolicy"] == "Local"
    ports = public["spec"]["ports"]
    assert {p["port"] for p in ports} == PUBLIC_PORTS
    assert {p["targetPort"] for p in ports} == {"device", "engineer"}
    metrics = one("Service", "relay-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in metrics["spec"]["ports"]] == [METRICS_PORT]


def test_network_policy_admits_metrics_from_monitoring_only() -> None:
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


def test_pod_disruption_budget_selects_the_broker() -> None:
    pdb = one("PodDisruptionBudget")["spec"]
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] == 1


def test_configmap_relay_toml_passes_config_check(tmp_path: Path) -> None:
    """`relay config check` accepts the ConfigMap's relay.toml (no RELAY_* set),
    and the file binds the metrics listener where the probes look for it."""
    config = tmp_path / "relay.toml"
    config.write_text(one("ConfigMap")["data"]["relay.toml"])
    out = relay_config_check(config)
    assert out.startswith("ok\n")
    assert f'metrics_listen = "0.0.0.0:{METRICS_PORT}"' in out
    assert 'data_dir = "/var/lib/relay"' in out
    assert "database_url" not in out


@pytest.mark.parametrize(
    "path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda p: p.name
)
def test_no_inline_secret_material(path: Path) -> None:
    text = path.read_text()
    assert "PRIVATE KEY" not in text
    assert "stringData" not in text
