"""The TOML configuration file and its RELAY_* environment overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from relay.cli import agent_config_from_args, build_parser
from relay.config import AgentConfig, BrokerConfig, ClusterConfig, ListenAddress
from relay.config_file import (
    ConfigError,
    agent_changes,
    effective_changes,
    example_agent_config,
    example_config,
    load_agent_config,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    return info.value


def test_no_file_and_no_env_is_the_default() -> None:
    assert load_config(None, {}) == BrokerConfig()


def test_example_parses_back_to_the_defaults(tmp_path: Path) -> None:
    """`relay config example` is every key at its default, and loads as BrokerConfig()."""
    text = example_config()
    assert load_config(write(tmp_path, text), {}) == BrokerConfig()


def test_example_names_every_key_and_the_budgets() -> None:
    """Every field of every table is in the example, commented out only when unset."""
    text = example_config()
    for table in (
        "websocket",
        "device_listener",
        "pki",
        "engineer_auth",
        "engineer_listener",
        "sessions",
        "audit",
    ):
        assert f"\n[{table}]\n" in text
        cls = type(getattr(BrokerConfig(), table))
        for field in dataclasses.fields(cls):
            assert f"\n{field.name} = " in text or f"\n# {field.name} = " in text
    parsed = tomllib.loads(text)
    assert parsed["sessions"]["max_session_seconds"] == 3600
    assert parsed["sessions"]["grant_timeout_s"] == 60.0
    assert parsed["websocket"]["ping_interval_s"] == 10.0
    assert parsed["websocket"]["ping_missed_max"] == 3
    assert parsed["websocket"]["max_upgrade_request_bytes"] == 8 * 1024
    assert parsed["websocket"]["max_message_bytes"] == 64 * 1024
    assert parsed["device_listener"]["handshake_timeout_s"] == 10.0
    assert parsed["device_listener"]["max_pending_handshakes"] == 64
    assert parsed["device_listener"]["max_pending_per_source"] == 10
    assert parsed["engineer_listener"]["max_websocket_message_bytes"] == 64 * 1024
    assert parsed["engineer_auth"]["login_free_failures"] == 5
    assert parsed["engineer_auth"]["login_failures_per_hour"] == 100
    assert parsed["engineer_auth"]["unauthenticated_per_minute"] == 20.0
    assert parsed["engineer_auth"]["unauthenticated_burst"] == 40
    assert parsed["engineer_auth"]["session_idle_s"] == 15 * 60.0
    assert parsed["engineer_auth"]["session_absolute_s"] == 12 * 3600.0
    assert parsed["shutdown_grace_s"] == 5.0
    # Descriptions come from the docstrings.
    assert "# The cap of every session, counted from the grant" in text


def test_agent_example_has_the_agent_budgets_and_loads_as_the_defaults(
    tmp_path: Path,
) -> None:
    """`relay config example --agent`: reconnect backoff (1 s base, 60 s cap),
    the slow retry after a refused certificate (15 min), the SIGTERM grace."""
    text = example_agent_config()
    for field in dataclasses.fields(AgentConfig):
        assert f"\n{field.name} = " in text or f"\n# {field.name} = " in text
    parsed = tomllib.loads(text)
    assert parsed["backoff_base_s"] == 1.0
    assert parsed["backoff_cap_s"] == 60.0
    assert parsed["auth_failure_retry_s"] == 15 * 60.0
    assert parsed["max_session_seconds"] == 3600
    assert parsed["shutdown_grace_s"] == 5.0
    assert load_agent_config(write(tmp_path, text)) == AgentConfig()
    assert agent_changes(AgentConfig()) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backoff_base_s = 0\n", "backoff_base_s must be > 0, got 0.0"),
        (
            "backoff_base_s = 5\nbackoff_cap_s = 2\n",
            "backoff_cap_s must be >= backoff_base_s (5.0), got 2.0",
        ),
        ("shutdown_grace_s = 10\n", "shutdown_grace_s must be in 0..9.0, got 10.0"),
        ("max_session_seconds = 3601\n", "max_session_seconds must be in 1..3600"),
        ("allowed_ports = [0]\n", "allowed port must be in 1..65535, got 0"),
        ('ui_listen = "0.0.0.0:7070"\n', "loopback address only"),
        ("sessions = {}\n", "sessions: unknown table"),
        ('stable_after_s = "60"\n', "stable_after_s: expected a number"),
    ],
)
def test_bad_agent_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, text))
    assert message in str(info.value)
    assert info.value.source == str(tmp_path / "relay.toml")


def test_agent_flags_override_the_agent_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backoff_cap_s = 30.0\nmax_session_seconds = 900\nallowed_ports = [8080]\n",
    )
    args = build_parser().parse_args(
        [
            "agent",
            "run",
            "--broker",
            "wss://broker.example:8443",
            "--dir",
            str(tmp_path),
            "--ca-file",
            str(tmp_path / "ca.crt"),
            "--config",
            str(path),
            "--max-session-seconds",
            "600",
        ]
    )
    config = agent_config_from_args(args)
    assert config.backoff_cap_s == 30.0
    assert config.allowed_ports == (8080,)
    assert config.max_session_seconds == 600  # the flag wins
    assert agent_changes(config) == [
        "backoff_cap_s = 30.0",
        "allowed_ports = [8080]",
        "max_session_seconds = 600",
    ]


def test_file_values_reach_the_nested_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
data_dir = "/srv/relay"
device_listen = "[::1]:8443"
database_url = "postgresql://relay@db/relay"
server_names = ["relay.example"]
shutdown_grace_s = 3

[sessions]
max_session_seconds = 600
allowed_channels = ["shell"]
warning_seconds = [60]

[audit]
record_input = true
checkpoint_sink = "/mnt/other/checkpoints.jsonl"
""",
    )
    config = load_config(path, {})
    assert config.data_dir == Path("/srv/relay")
    assert config.device_listen == ListenAddress(host="::1", port=8443)
    assert config.database_url == "postgresql://relay@db/relay"
    assert config.server_names == ("relay.example",)
    assert config.shutdown_grace_s == 3.0
    assert type(config.shutdown_grace_s) is float  # an integer is a number too
    assert config.sessions.max_session_seconds == 600
    assert config.sessions.allowed_channels == ("shell",)
    assert config.sessions.warning_seconds == (60,)
    assert config.audit.record_input is True
    assert config.audit.checkpoint_sink == Path("/mnt/other/checkpoints.jsonl")
    assert config.websocket == BrokerConfig().websocket
    assert effective_changes(config) == [
        'data_dir = "/srv/relay"',
        'device_listen = "[::1]:8443"',
        'database_url = "postgresql://relay@db/relay"',
        'server_names = ["relay.example"]',
        "shutdown_grace_s = 3.0",
        "sessions.max_session_seconds = 600",
        'sessions.allowed_channels = ["shell"]',
        "sessions.warning_seconds = [60]",
        'audit.checkpoint_sink = "/mnt/other/checkpoints.jsonl"',
        "audit.record_input = true",
    ]


def test_a_cap_over_an_hour_is_refused_with_the_range(tmp_path: Path) -> None:
    exc = error(tmp_path, "[sessions]\nmax_session_seconds = 3601\n")
    assert str(exc).startswith("sessions.max_session_seconds must be in 1..3600")
    assert "3601" in str(exc)
    assert exc.source == str(tmp_path / "relay.toml")


def test_an_audit_watch_slower_than_the_fail_closed_budget_is_refused(
    tmp_path: Path,
) -> None:
    exc = error(tmp_path, "[audit]\nwatch_s = 3\n")
    assert "audit.watch_s" in str(exc)
    assert "(0, 2]" in str(exc)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[sessions]\nmax_session_secondz = 3\n",
            "sessions.max_session_secondz: unknown key; known keys: "
            "max_session_seconds, grant_timeout_s,",
        ),
        ("[foo]\na = 1\n", "foo: unknown table; known keys and tables: data_dir,"),
        ("colour = 1\n", "colour: unknown key; known keys and tables: data_dir,"),
        ("sessions = 1\n", "sessions: expected a table [sessions], got integer"),
        ("[audit.stdout]\n", "audit.stdout: expected a value, got a table"),
        (
            "[websocket]\nping_missed_max = true\n",
            "websocket.ping_missed_max: expected an integer, got boolean true",
        ),
        (
            "[websocket]\nping_missed_max = 3.0\n",
            "websocket.ping_missed_max: expected an integer, got float 3.0",
        ),
        (
            '[websocket]\nping_interval_s = "10"\n',
            'websocket.ping_interval_s: expected a number, got string "10"',
        ),
        (
            "[websocket]\nping_interval_s = nan\n",
            "websocket.ping_interval_s: expected a finite number, got nan",
        ),
        (
            "[audit]\nrecord_input = 1\n",
            "audit.record_input: expected true or false, got integer 1",
        ),
        (
            '[sessions]\nallowed_channels = "shell"\n',
            'sessions.allowed_channels: expected an array, got string "shell"',
        ),
        (
            '[sessions]\nallowed_channels = ["shell", 22]\n',
            "sessions.allowed_channels: item 1: expected a string, got integer 22",
        ),
        ("data_dir = 7\n", "data_dir: expected a string, got integer 7"),
        ('device_listen = "nohost"\n', "device_listen: expected HOST:PORT, got"),
        (
            'metrics_listen = "127.0.0.1:70000"\n',
            "metrics_listen: port must be in 0..65535, got 70000",
        ),
        (
            "[websocket]\nping_interval_s = -1\n",
            "websocket.ping_interval_s: must be > 0, got -1.0",
        ),
        (
            "[pki]\nmax_csr_bytes = 0\n",
            "pki.max_csr_bytes: must be an integer >= 1, got 0",
        ),
        (
            "[sessions]\ngrant_timeout_s = 0\n",
            "sessions.grant_timeout_s must be > 0, got 0.0",
        ),
        (
            "[sessions]\nwarning_seconds = [4000]\n",
            "sessions.warning_seconds: each of warning_seconds must be an integer "
            "1..3599",
        ),
        (
            "[audit]\nmax_file_bytes = 10\n",
            "audit.max_file_bytes must be an integer >= 4096, got 10",
        ),
        (
            "[engineer_auth]\nlogin_free_failures = 0\n",
            "engineer_auth.login_free_failures must be an integer >= 1, got 0",
        ),
        (
            "[engineer_auth]\nsession_idle_s = 0\n",
            "engineer_auth.session_idle_s must be > 0, got 0.0",
        ),
        (
            "[engineer_auth]\ntotp_step_s = 45\n",
            "engineer_auth.totp_step_s must be 30 or 60, got 45",
        ),
        (
            "[engineer_auth]\ntotp_digits = 7\n",
            "engineer_auth.totp_digits must be 6 or 8, got 7",
        ),
        (
            "[engineer_auth]\ntotp_past_steps = 2\n",
            "engineer_auth.totp_past_steps must be in 0..1, got 2",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert str(error(tmp_path, text)).startswith(message)


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    exc = error(tmp_path, "[sessions]\nmax_session_seconds = \n")
    assert str(exc).startswith("not valid TOML: ")
    assert "line 2" in str(exc)


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(tmp_path / "missing.toml", {})


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[sessions]\nmax_session_seconds = 600\n")
    config = load_config(
        path,
        {
            "RELAY_SESSIONS__MAX_SESSION_SECONDS": "300",
            "RELAY_SESSIONS__ALLOWED_CHANNELS": '["shell", "tcp:22"]',
            "RELAY_AUDIT__RECORD_INPUT": "true",
            "RELAY_WEBSOCKET__PING_INTERVAL_S": "2",
            "RELAY_DATA_DIR": "/var/lib/relay",  # raw text for a path
            "RELAY_DATABASE_URL": "sqlite:///x.db",
            "RELAY_DEVICE_LISTEN": "127.0.0.1:0",
            "RELAY_ENGINEER_AUTH__TOTP_SEALING_KEY": '"quoted"',
            "RELAY_CONFIG": "ignored: not a key",
            "RELAY_METRICS__SOMETHING_ELSE": "",  # empty counts as unset
            "HOME": "/root",
        },
    )
    assert config.sessions.max_session_seconds == 300
    assert config.sessions.allowed_channels == ("shell", "tcp:22")
    assert config.audit.record_input is True
    assert config.websocket.ping_interval_s == 2.0
    assert config.data_dir == Path("/var/lib/relay")
    assert config.database_url == "sqlite:///x.db"
    assert config.device_listen == ListenAddress(host="127.0.0.1", port=0)
    assert config.engineer_auth.totp_sealing_key == "quoted"
    assert "engineer_auth.totp_sealing_key = (set)" in effective_changes(config)


def test_older_env_names_keep_working() -> None:
    config = load_config(
        None,
        {
            "RELAY_AUDIT_CHECKPOINT_SINK": "/mnt/sink.jsonl",
            "RELAY_TOTP_SEALING_KEY": "k1",
        },
    )
    assert config.audit.checkpoint_sink == Path("/mnt/sink.jsonl")
    assert config.engineer_auth.totp_sealing_key == "k1"
    # The RELAY_<TABLE>__<KEY> spelling wins over the older one.
    config = load_config(
        None,
        {
            "RELAY_AUDIT__CHECKPOINT_SINK": "/b",
            "RELAY_AUDIT_CHECKPOINT_SINK": "/a",
        },
    )
    assert config.audit.checkpoint_sink == Path("/b")


@pytest.mark.parametrize(
    ("env", "source", "message"),
    [
        (
            {"RELAY_SESSIONS__MAX_SESSION_SECONDZ": "1"},
            "RELAY_SESSIONS__MAX_SESSION_SECONDZ",
            "unknown override; names are RELAY_<TABLE>__<KEY>",
        ),
        (
            {"RELAY_SESSIONS__MAX_SESSION_SECONDS": "3601"},
            "RELAY_SESSIONS__MAX_SESSION_SECONDS",
            "sessions.max_session_seconds must be in 1..3600",
        ),
        (
            {"RELAY_SESSIONS__MAX_SESSION_SECONDS": "true"},
            "RELAY_SESSIONS__MAX_SESSION_SECONDS",
            "sessions.max_session_seconds: expected an integer, got boolean true",
        ),
        (
            {"RELAY_AUDIT__RECORD_INPUT": "yes"},
            "RELAY_AUDIT__RECORD_INPUT",
            "audit.record_input: expected true or false, got 'yes'",
        ),
        (
            {"RELAY_SESSIONS__ALLOWED_CHANNELS": "shell"},
            "RELAY_SESSIONS__ALLOWED_CHANNELS",
            "sessions.allowed_channels: not a TOML value: 'shell'",
        ),
        (
            {"RELAY_DEVICE_LISTEN": "nohost"},
            "RELAY_DEVICE_LISTEN",
            "device_listen: expected HOST:PORT",
        ),
    ],
)
def test_bad_env_overrides_name_the_variable_and_key(
    env: dict[str, str], source: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env)
    assert info.value.source == source
    assert str(info.value).startswith(message)


def test_database_password_is_not_shown() -> None:
    config = BrokerConfig(database_url="postgresql://relay:s3cret@db/relay")
    assert effective_changes(config) == [
        'database_url = "postgresql://relay:***@db/relay"'
    ]


def test_redis_password_is_not_shown() -> None:
    config = BrokerConfig(
        cluster=ClusterConfig(redis_url="redis://:s3cret@redis:6379/0", node_id="b-1")
    )
    assert effective_changes(config) == [
        'cluster.redis_url = "redis://:***@redis:6379/0"',
        'cluster.node_id = "b-1"',
    ]


def test_the_cluster_table_from_a_file_and_the_environment() -> None:
    config = load_config(
        None,
        {
            "RELAY_CLUSTER__REDIS_URL": "rediss://redis.example:6380/1",
            "RELAY_CLUSTER__NODE_ID": "broker-2.eu",
            "RELAY_CLUSTER__HEARTBEAT_S": "0.5",
        },
    )
    assert config.cluster == ClusterConfig(
        redis_url="rediss://redis.example:6380/1",
        node_id="broker-2.eu",
        heartbeat_s=0.5,
    )
    assert config.cluster.effective_node_id == "broker-2.eu"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"redis_url": "http://redis:6379"}, "redis_url must start with"),
        ({"node_id": "-leading-dash"}, "node id"),
        ({"node_id": "n" * 65}, "node id"),
        ({"key_prefix": "Relay"}, "key_prefix"),
        ({"heartbeat_s": 0.05}, "heartbeat_s must be in 0.1..30"),
        ({"heartbeat_s": 31}, "heartbeat_s must be in 0.1..30"),
        ({"command_deadline_s": 0.1}, "command_deadline_s must be in 0.5..60"),
        ({"redis_timeout_s": 11}, "redis_timeout_s must be in 0.1..10"),
    ],
)
def test_cluster_values_out_of_range_are_refused(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**changes)  # type: ignore[arg-type]


def test_a_host_name_that_is_no_node_id_is_made_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "_build host")
    assert ClusterConfig().effective_node_id == "node-_build-host"
