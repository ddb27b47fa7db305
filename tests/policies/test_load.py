"""Tests for policies.load: policy files read and checked, every error named.

Malformed and hostile files must be refused with a PolicyError naming the
file, the rule and the key; a policy that does not load is never partly used.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import PolicyError, load_policy_files
from policies.load import MAX_FILE_BYTES, MAX_FILES
from relay.policy_files import load_policy_dir, read_policy_dir

RULE = '[[rule]]\nname = "r"\n'
ALLOW = RULE + 'channels = ["shell"]\n'
DENY = RULE + 'effect = "deny"\n'


def window(text: str) -> str:
    """An allow rule with one window given as inline-table text."""
    return ALLOW + f"windows = [{text}]\n"


def labels(text: str) -> str:
    """An allow rule with device_labels given as TOML value text."""
    return ALLOW + f"device_labels = {text}\n"


# --- Malformed files: where and why ---------------------------------------------------

# (file content, rule, key, the problem or a part of it)
MALFORMED = [
    # The file itself.
    pytest.param(b"\xff\xfe[[rule]]", None, None, "not UTF-8 text", id="not-utf8"),
    pytest.param(b"[[rule]\nname = 1", None, None, "not valid TOML:", id="toml-syntax"),
    pytest.param(
        b"x = " + b"[" * 5000 + b"]" * 5000,
        None,
        None,
        "not valid TOML: nested too deeply",
        id="deeply-nested-arrays",
    ),
    pytest.param(
        b"x = " + b"{a = " * 5000 + b"}" * 5000,
        None,
        None,
        "not valid TOML: nested too deeply",
        id="deeply-nested-tables",
    ),
    pytest.param(
        b'x = "a\x00"', None, None, "not valid TOML: Illegal character", id="nul-byte"
    ),
    pytest.param(
        b"[policy]\nname = 1\n",
        None,
        "policy",
        "unknown top-level key (a policy file holds [[rule]] tables only)",
        id="unknown-top-level-key",
    ),
    pytest.param(b"rule = 1\n", None, "rule", "must be [[rule]] tables", id="rule-int"),
    pytest.param(
        b'[rule]\nname = "r"\n',
        None,
        "rule",
        "must be [[rule]] tables",
        id="rule-table",
    ),
    pytest.param(
        b"rule = [1, 2]\n",
        None,
        "rule",
        "must be [[rule]] tables",
        id="rule-list-of-ints",
    ),
    # Names and effects.
    pytest.param(
        b'[[rule]]\nchannels = ["shell"]\n', "#1", "name", "required", id="no-name"
    ),
    pytest.param(
        ALLOW + '[[rule]]\nchannels = ["shell"]\n',
        "#2",
        "name",
        "required",
        id="second-rule-no-name",
    ),
    pytest.param(
        b'[[rule]]\nname = "bad name"\nchannels = ["shell"]\n',
        "#1",
        "name",
        "must be 1..64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        id="name-with-space",
    ),
    pytest.param(b"[[rule]]\nname = 7\n", "#1", "name", "must be 1..64", id="name-int"),
    pytest.param(
        b'[[rule]]\nname = ""\n', "#1", "name", "must be 1..64", id="name-empty"
    ),
    pytest.param(
        b'[[rule]]\nname = "-r"\n',
        "#1",
        "name",
        "must be 1..64",
        id="name-leading-dash",
    ),
    pytest.param(
        f'[[rule]]\nname = "{"n" * 65}"\n',
        "#1",
        "name",
        "must be 1..64",
        id="name-too-long",
    ),
    pytest.param(
        ALLOW + 'effect = "maybe"\n',
        "r",
        "effect",
        "must be allow or deny, got 'maybe'",
        id="bad-effect",
    ),
    pytest.param(
        ALLOW + 'effect = "Allow"\n',
        "r",
        "effect",
        "must be allow or deny",
        id="effect-case",
    ),
    pytest.param(
        ALLOW + "effect = [1]\n",
        "r",
        "effect",
        "must be allow or deny",
        id="effect-list",
    ),
    pytest.param(
        ALLOW + "max_sessions_seconds = 60\n",
        "r",
        "max_sessions_seconds",
        "unknown key",
        id="unknown-key-typo",
    ),
    pytest.param(
        DENY + 'channels = ["shell"]\n',
        "r",
        "channels",
        "has no meaning in a deny rule",
        id="allow-key-in-deny-rule",
    ),
    pytest.param(
        DENY + "max_session_seconds = 60\n",
        "r",
        "max_session_seconds",
        "has no meaning in a deny rule",
        id="cap-in-deny-rule",
    ),
    pytest.param(
        ALLOW + "description = 5\n",
        "r",
        "description",
        "must be text of at most 500 characters",
        id="description-int",
    ),
    pytest.param(
        ALLOW + f'description = "{"d" * 501}"\n',
        "r",
        "description",
        "must be text of at most 500 characters",
        id="description-too-long",
    ),
    # Channels.
    pytest.param(
        RULE,
        "r",
        "channels",
        "required in an allow rule (what it allows)",
        id="no-channels",
    ),
    pytest.param(
        RULE + "channels = []\n",
        "r",
        "channels",
        "must be a non-empty list of channel patterns",
        id="empty-channels",
    ),
    pytest.param(
        RULE + 'channels = "shell"\n',
        "r",
        "channels",
        "must be a non-empty list",
        id="channels-string",
    ),
    pytest.param(
        RULE + 'channels = ["shell", 22]\n',
        "r",
        "channels",
        "must be a non-empty list",
        id="channels-int-item",
    ),
    pytest.param(
        RULE + 'channels = ["udp:53"]\n',
        "r",
        "channels",
        "not a channel pattern (shell, tcp:PORT, tcp:LOW-HIGH, tcp:*): 'udp:53'",
        id="bad-channel-pattern",
    ),
    pytest.param(
        RULE + 'channels = ["tcp:9-1"]\n',
        "r",
        "channels",
        "ports must be in 1..65535, low to high: 'tcp:9-1'",
        id="backwards-range",
    ),
    pytest.param(
        RULE + "channels = [" + '"shell", ' * 257 + "]\n",
        "r",
        "channels",
        "must be a non-empty list",
        id="too-many-channels",
    ),
    # Numbers.
    pytest.param(
        ALLOW + "max_session_seconds = 3601\n",
        "r",
        "max_session_seconds",
        "must be an integer in 1..3600 (a session never lasts longer), got 3601",
        id="cap-3601",
    ),
    pytest.param(
        ALLOW + "max_session_seconds = 0\n",
        "r",
        "max_session_seconds",
        "got 0",
        id="cap-0",
    ),
    pytest.param(
        ALLOW + "max_session_seconds = -1\n",
        "r",
        "max_session_seconds",
        "got -1",
        id="cap-negative",
    ),
    pytest.param(
        ALLOW + "max_session_seconds = true\n",
        "r",
        "max_session_seconds",
        "got True",
        id="cap-bool",
    ),
    pytest.param(
        ALLOW + "max_session_seconds = 1.5\n",
        "r",
        "max_session_seconds",
        "got 1.5",
        id="cap-float",
    ),
    pytest.param(
        ALLOW + 'max_session_seconds = "60"\n',
        "r",
        "max_session_seconds",
        "got '60'",
        id="cap-string",
    ),
    pytest.param(
        ALLOW + "grant_timeout_s = 0\n",
        "r",
        "grant_timeout_s",
        "must be a number in 1..600, got 0",
        id="grant-0",
    ),
    pytest.param(
        ALLOW + "grant_timeout_s = 601\n",
        "r",
        "grant_timeout_s",
        "must be a number in 1..600, got 601",
        id="grant-601",
    ),
    pytest.param(
        ALLOW + "grant_timeout_s = 600.5\n",
        "r",
        "grant_timeout_s",
        "got 600.5",
        id="grant-600.5",
    ),
    pytest.param(
        ALLOW + "grant_timeout_s = nan\n",
        "r",
        "grant_timeout_s",
        "got nan",
        id="grant-nan",
    ),
    pytest.param(
        ALLOW + "grant_timeout_s = inf\n",
        "r",
        "grant_timeout_s",
        "got inf",
        id="grant-inf",
    ),
    pytest.param(
        ALLOW + "grant_timeout_s = -inf\n",
        "r",
        "grant_timeout_s",
        "got -inf",
        id="grant-minus-inf",
    ),
    pytest.param(
        ALLOW + "grant_timeout_s = true\n",
        "r",
        "grant_timeout_s",
        "got True",
        id="grant-bool",
    ),
    pytest.param(
        ALLOW + "max_concurrent_sessions = 0\n",
        "r",
        "max_concurrent_sessions",
        "must be an integer in 1..100, got 0",
        id="concurrent-0",
    ),
    pytest.param(
        ALLOW + "max_concurrent_sessions = 101\n",
        "r",
        "max_concurrent_sessions",
        "must be an integer in 1..100, got 101",
        id="concurrent-101",
    ),
    # Flags and patterns.
    pytest.param(
        ALLOW + 'reason_required = "no"\n',
        "r",
        "reason_required",
        "must be true or false",
        id="reason-required-string",
    ),
    pytest.param(
        ALLOW + 'auditors_may_watch = "yes"\n',
        "r",
        "auditors_may_watch",
        "must be true or false",
        id="auditors-may-watch-string",
    ),
    pytest.param(
        ALLOW + "auditors_may_watch = 1\n",
        "r",
        "auditors_may_watch",
        "must be true or false",
        id="auditors-may-watch-int",
    ),
    pytest.param(
        ALLOW + 'reason_pattern = "INC-(["\n',
        "r",
        "reason_pattern",
        "not a regular expression:",
        id="pattern-does-not-compile",
    ),
    pytest.param(
        ALLOW + f'reason_pattern = "{"a" * 201}"\n',
        "r",
        "reason_pattern",
        "must be a regular expression of 1..200 characters",
        id="pattern-too-long",
    ),
    pytest.param(
        ALLOW + 'reason_pattern = ""\n',
        "r",
        "reason_pattern",
        "must be a regular expression of 1..200 characters",
        id="pattern-empty",
    ),
    pytest.param(
        ALLOW + "reason_pattern = 5\n",
        "r",
        "reason_pattern",
        "must be a regular expression",
        id="pattern-int",
    ),
    # Who.
    pytest.param(
        ALLOW + "engineer_roles = []\n",
        "r",
        "engineer_roles",
        "must be a non-empty list (leave the key out to match any)",
        id="roles-empty",
    ),
    pytest.param(
        ALLOW + 'engineer_roles = ["root"]\n',
        "r",
        "engineer_roles",
        "'root' is not one of admin, auditor, engineer",
        id="roles-root",
    ),
    pytest.param(
        ALLOW + 'engineer_roles = "engineer"\n',
        "r",
        "engineer_roles",
        "must be a non-empty list",
        id="roles-string",
    ),
    pytest.param(
        ALLOW + 'engineer_groups = ["field", "Field Service"]\n',
        "r",
        "engineer_groups",
        "'Field Service' is not a group name (a-z, 0-9, '.', '_', '-')",
        id="group-bad-name",
    ),
    pytest.param(
        ALLOW + "engineer_groups = [3]\n",
        "r",
        "engineer_groups",
        "3 is not a group name",
        id="group-int",
    ),
    # Which devices.
    pytest.param(
        labels('"acme"'),
        "r",
        "device_labels",
        'must be a table: {key = "value" or ["v1", "v2"] or "*"}',
        id="labels-not-a-table",
    ),
    pytest.param(
        labels('{Customer = "acme"}'),
        "r",
        "device_labels",
        "'Customer' is not a label key (a-z first, then a-z, 0-9, '.', '_', '-')",
        id="labels-bad-key",
    ),
    pytest.param(
        labels('{"" = "acme"}'),
        "r",
        "device_labels",
        "'' is not a label key",
        id="labels-empty-key",
    ),
    pytest.param(
        labels('{customer = " acme"}'),
        "r",
        "device_labels",
        "customer: ' acme' is not a label value",
        id="labels-bad-value",
    ),
    pytest.param(
        labels("{customer = 1}"),
        "r",
        "device_labels",
        "customer: 1 is not a label value",
        id="labels-int-value",
    ),
    pytest.param(
        labels("{customer = []}"),
        "r",
        "device_labels",
        "customer: must name at least one value",
        id="labels-empty-list",
    ),
    pytest.param(
        labels('{customer = {name = "acme"}}'),
        "r",
        "device_labels",
        "customer: {'name': 'acme'} is not a label value",
        id="labels-table-value",
    ),
    # When.
    pytest.param(
        ALLOW + 'windows = {days = ["mon"], from = "07:00", to = "19:00"}\n',
        "r",
        "windows",
        "must be a list of {days, from, to, timezone} tables",
        id="windows-not-a-list",
    ),
    pytest.param(
        ALLOW + 'windows = ["mon-fri"]\n',
        "r",
        "windows",
        "window 1: must be a table",
        id="window-not-a-table",
    ),
    pytest.param(
        window('{days = ["mon"], from = "07:00", to = "19:00", tz = "UTC"}'),
        "r",
        "windows",
        "window 1: unknown key tz",
        id="window-unknown-key",
    ),
    pytest.param(
        window(
            '{days = ["mon"], from = "07:00", to = "19:00"}, {days = ["funday"], from = "07:00", to = "19:00"}'
        ),
        "r",
        "windows",
        "window 2: not a day or day range (mon..sun, e.g. mon-fri): 'funday'",
        id="window-bad-day",
    ),
    pytest.param(
        window('{days = [], from = "07:00", to = "19:00"}'),
        "r",
        "windows",
        "window 1: days must name at least one day",
        id="window-no-days",
    ),
    pytest.param(
        window('{days = "mon", from = "07:00", to = "19:00"}'),
        "r",
        "windows",
        'window 1: days must be a list such as ["mon-fri"]',
        id="window-days-string",
    ),
    pytest.param(
        window('{days = ["mon"], from = "7:00", to = "19:00"}'),
        "r",
        "windows",
        "window 1: from must be HH:MM (00:00..24:00), got '7:00'",
        id="window-bad-time",
    ),
    pytest.param(
        window('{days = ["mon"], from = "07:00", to = "24:30"}'),
        "r",
        "windows",
        "window 1: to must be HH:MM (00:00..24:00), got '24:30'",
        id="window-24-30",
    ),
    pytest.param(
        window('{days = ["mon"], from = 07:00:00, to = "19:00"}'),
        "r",
        "windows",
        'window 1: from, to ("HH:MM") and timezone are text',
        id="window-toml-time",
    ),
    pytest.param(
        window('{days = ["mon"], to = "19:00"}'),
        "r",
        "windows",
        "from, to",
        id="window-no-from",
    ),
    pytest.param(
        window(
            '{days = ["mon"], from = "07:00", to = "19:00", timezone = "Europe/Atlantis"}'
        ),
        "r",
        "windows",
        "window 1: unknown time zone: 'Europe/Atlantis'",
        id="window-unknown-zone",
    ),
    pytest.param(
        DENY
        + 'windows = [{days = ["mon"], from = "07:00", to = "19:00", timezone = "../../etc/passwd"}]\n',
        "r",
        "windows",
        "unknown time zone",
        id="deny-window-path-as-zone",
    ),
]


@pytest.mark.parametrize(("data", "rule", "key", "problem"), MALFORMED)
def test_malformed_file_is_refused(
    data: bytes | str, rule: str | None, key: str | None, problem: str
) -> None:
    """Each malformed file raises a PolicyError naming file, rule and key."""
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(PolicyError) as caught:
        load_policy_files({"p.toml": raw})
    error = caught.value
    assert (error.file, error.rule, error.key) == ("p.toml", rule, key)
    assert problem in error.problem
    where = ["p.toml", *([f"rule {rule}"] if rule else []), *([key] if key else [])]
    assert str(error) == ": ".join([*where, error.problem])


def test_error_message_reads_file_rule_key_problem() -> None:
    """The message is the one people see: file: rule NAME: key: problem."""
    data = b'[[rule]]\nname = "field-service"\nchannels = ["shell"]\nmax_session_seconds = 7200\n'
    with pytest.raises(PolicyError) as caught:
        load_policy_files({"10-service.toml": data})
    assert str(caught.value) == (
        "10-service.toml: rule field-service: max_session_seconds: must be an integer "
        "in 1..3600 (a session never lasts longer), got 7200"
    )


def test_policy_error_is_a_value_error() -> None:
    """Callers that catch ValueError also catch a bad policy."""
    assert issubclass(PolicyError, ValueError)


def test_huge_integer_is_a_policy_error() -> None:
    """An integer too long to convert is refused as a PolicyError naming the file."""
    with pytest.raises(PolicyError) as caught:
        load_policy_files({"p.toml": b"x = " + b"9" * 5000})
    assert caught.value.file == "p.toml"


def test_duplicate_name_across_files_names_the_other_file() -> None:
    """A rule name used twice is refused in the later file, naming the earlier one."""
    files = {"20-b.toml": ALLOW.encode(), "10-a.toml": ALLOW.encode()}
    with pytest.raises(PolicyError) as caught:
        load_policy_files(files)
    error = caught.value
    assert (error.file, error.rule, error.key) == ("20-b.toml", "r", "name")
    assert error.problem == "rule name r is also used in 10-a.toml"


def test_duplicate_name_in_one_file_is_refused() -> None:
    """Two rules of the same name in one file are refused too."""
    with pytest.raises(PolicyError, match=r"rule name r is also used in p\.toml"):
        load_policy_files({"p.toml": (ALLOW + ALLOW).encode()})


def test_a_bad_rule_refuses_the_whole_policy() -> None:
    """One bad rule among good files: nothing loads (never partly used)."""
    files = {
        "10-good.toml": ALLOW.encode(),
        "20-bad.toml": b'[[rule]]\nname = "bad"\nchannels = ["shell"]\nmax_session_seconds = 3601\n',
    }
    with pytest.raises(PolicyError) as caught:
        load_policy_files(files)
    assert (caught.value.file, caught.value.rule) == ("20-bad.toml", "bad")


# --- Size and count limits ------------------------------------------------------------


def big_file() -> bytes:
    """A valid policy file (rule plus a comment) one byte over MAX_FILE_BYTES."""
    data = ALLOW.encode() + b"#"
    return data + b"x" * (MAX_FILE_BYTES + 1 - len(data))


def test_largest_file_allowed_loads() -> None:
    """A file of exactly MAX_FILE_BYTES loads."""
    data = big_file()[:-1]
    assert len(data) == MAX_FILE_BYTES
    assert [r.name for r in load_policy_files({"p.toml": data}).rules] == ["r"]


def test_file_too_large_is_refused_by_load_policy_files() -> None:
    """A file over MAX_FILE_BYTES is refused unparsed."""
    with pytest.raises(PolicyError) as caught:
        load_policy_files({"p.toml": big_file()})
    assert (caught.value.file, caught.value.rule, caught.value.key) == (
        "p.toml",
        None,
        None,
    )
    assert str(caught.value) == "p.toml: larger than 256 KiB"


def test_file_too_large_is_refused_by_read_policy_dir(tmp_path: Path) -> None:
    """read_policy_dir refuses a file over MAX_FILE_BYTES, naming it."""
    (tmp_path / "10-ok.toml").write_text(ALLOW)
    (tmp_path / "20-big.toml").write_bytes(big_file())
    with pytest.raises(PolicyError) as caught:
        read_policy_dir(tmp_path)
    assert caught.value.file == "20-big.toml"
    assert str(caught.value) == "20-big.toml: larger than 256 KiB"


def test_too_many_files_are_refused(tmp_path: Path) -> None:
    """More than MAX_FILES policy files in a directory are refused."""
    for number in range(MAX_FILES + 1):
        (tmp_path / f"{number:03d}.toml").write_bytes(b"")
    with pytest.raises(PolicyError) as caught:
        read_policy_dir(tmp_path)
    assert caught.value.file is None
    assert (
        str(caught.value)
        == f"{MAX_FILES + 1} policy files in {tmp_path}, at most {MAX_FILES}"
    )


def test_as_many_files_as_allowed_load(tmp_path: Path) -> None:
    """Exactly MAX_FILES (empty) files are a valid policy."""
    for number in range(MAX_FILES):
        (tmp_path / f"{number:03d}.toml").write_bytes(b"")
    assert len(load_policy_dir(tmp_path).files) == MAX_FILES


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    """A directory that does not exist is a PolicyError for the directory."""
    missing = tmp_path / "nowhere"
    with pytest.raises(PolicyError) as caught:
        read_policy_dir(missing)
    assert (caught.value.file, caught.value.rule, caught.value.key) == (
        None,
        None,
        None,
    )
    assert str(caught.value) == (
        f"cannot read the policy directory {missing}: No such file or directory"
    )


def test_file_instead_of_directory_is_refused(tmp_path: Path) -> None:
    """A policy 'directory' that is a file is refused, not crashed on."""
    path = tmp_path / "policy.toml"
    path.write_text(ALLOW)
    with pytest.raises(PolicyError, match="cannot read the policy directory"):
        read_policy_dir(path)


def test_directory_named_like_a_policy_file_is_refused(tmp_path: Path) -> None:
    """A subdirectory called x.toml is refused by name rather than raising OSError."""
    (tmp_path / "x.toml").mkdir()
    with pytest.raises(PolicyError) as caught:
        read_policy_dir(tmp_path)
    assert caught.value.file == "x.toml"
    assert str(caught.value).startswith("x.toml: cannot read: ")


# --- Directories: which files, in which order -----------------------------------------


def test_only_toml_files_are_read(tmp_path: Path) -> None:
    """README, backups and other suffixes sit next to the policy, ignored."""
    (tmp_path / "10-a.toml").write_text(ALLOW)
    (tmp_path / "README.md").write_text("not TOML [[[")
    (tmp_path / "10-a.toml.bak").write_text("not TOML [[[")
    (tmp_path / "20-b.TOML").write_text("not TOML [[[")
    (tmp_path / "toml").write_text("not TOML [[[")
    assert list(read_policy_dir(tmp_path)) == ["10-a.toml"]
    assert load_policy_dir(tmp_path).files == ("10-a.toml",)


def test_files_load_in_name_order(tmp_path: Path) -> None:
    """Rules follow file names, then their order in each file, whatever the write order."""
    (tmp_path / "20-b.toml").write_text(
        '[[rule]]\nname = "b1"\neffect = "deny"\n[[rule]]\nname = "b2"\neffect = "deny"\n'
    )
    (tmp_path / "10-a.toml").write_text('[[rule]]\nname = "a1"\neffect = "deny"\n')
    (tmp_path / "15-x.toml").write_text('[[rule]]\nname = "x1"\neffect = "deny"\n')
    policy = load_policy_dir(tmp_path)
    assert policy.files == ("10-a.toml", "15-x.toml", "20-b.toml")
    assert [(r.name, r.source) for r in policy.rules] == [
        ("a1", "10-a.toml"),
        ("x1", "15-x.toml"),
        ("b1", "20-b.toml"),
        ("b2", "20-b.toml"),
    ]


def test_mapping_order_does_not_matter() -> None:
    """load_policy_files sorts by name: the same files in another order are the same policy."""
    a = {"a.toml": b'[[rule]]\nname = "a"\neffect = "deny"\n', "b.toml": ALLOW.encode()}
    b = dict(reversed(list(a.items())))
    assert load_policy_files(a) == load_policy_files(b)
    assert [r.name for r in load_policy_files(b).rules] == ["a", "r"]


def test_empty_directory_is_a_policy_without_rules(tmp_path: Path) -> None:
    """No files: a valid policy with no rules (that denies everything)."""
    policy = load_policy_dir(tmp_path)
    assert (policy.rules, policy.files) == ((), ())
    assert len(policy.digest) == 64


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty-file"),
        pytest.param(b"# only a comment\n", id="comment"),
        pytest.param(b"rule = []\n", id="empty-rule-list"),
    ],
)
def test_file_without_rules_is_valid(data: bytes) -> None:
    """A file with no rules loads with no rules."""
    assert load_policy_files({"p.toml": data}).rules == ()


def test_valid_rule_is_read_with_every_key() -> None:
    """A rule using every key loads with the values given."""
    data = b"""
[[rule]]
name = "field.service_1"
description = "Field service on Acme pumps"
engineer_roles = ["engineer", "admin"]
engineer_groups = ["field"]
device_labels = {customer = "acme", model = ["p-100", "p-200"], site = "*"}
windows = [{days = ["mon-fri"], from = "07:00", to = "19:00", timezone = "Europe/Berlin"}]
channels = ["shell", "tcp:22", "tcp:8000-8099"]
max_session_seconds = 3600
grant_timeout_s = 600
reason_required = false
reason_pattern = "INC-[0-9]+"
max_concurrent_sessions = 100
auditors_may_watch = false
"""
    (rule,) = load_policy_files({"p.toml": data}).rules
    assert rule.name == "field.service_1"
    assert rule.source == "p.toml"
    assert rule.engineer_roles == frozenset({"engineer", "admin"})
    assert rule.engineer_groups == frozenset({"field"})
    assert rule.device_labels == {
        "customer": frozenset({"acme"}),
        "model": frozenset({"p-100", "p-200"}),
        "site": frozenset({"*"}),
    }
    assert [str(w) for w in rule.windows] == [
        "mon,tue,wed,thu,fri 07:00-19:00 Europe/Berlin"
    ]
    assert rule.channels is not None
    assert rule.channels.patterns() == ["shell", "tcp:22", "tcp:8000-8099"]
    assert (rule.max_session_seconds, rule.grant_timeout_s) == (3600, 600.0)
    assert isinstance(rule.grant_timeout_s, float)
    assert rule.reason_required is False
    assert rule.reason_pattern is not None
    assert rule.reason_pattern.pattern == "INC-[0-9]+"
    assert (rule.max_concurrent_sessions, rule.auditors_may_watch) == (100, False)


def test_window_timezone_defaults_to_utc() -> None:
    """A window without timezone is in UTC."""
    data = window('{days = ["mon"], from = "07:00", to = "19:00"}').encode()
    (rule,) = load_policy_files({"p.toml": data}).rules
    assert rule.windows[0].zone == "UTC"


# --- Digest ---------------------------------------------------------------------------

FILES = {
    "10-a.toml": ALLOW.encode(),
    "20-b.toml": b'[[rule]]\nname = "b"\neffect = "deny"\n',
}


def test_digest_is_stable() -> None:
    """The same files give the same digest, every time."""
    assert load_policy_files(FILES).digest == load_policy_files(dict(FILES)).digest


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(
            {**FILES, "20-b.toml": FILES["20-b.toml"] + b" "}, id="one-byte-added"
        ),
        pytest.param(
            {**FILES, "10-a.toml": FILES["10-a.toml"].replace(b'"r"', b'"s"')},
            id="one-byte-changed",
        ),
        pytest.param(
            {"10-a.toml": FILES["10-a.toml"], "21-b.toml": FILES["20-b.toml"]},
            id="file-renamed",
        ),
        pytest.param({**FILES, "30-c.toml": b""}, id="empty-file-added"),
        pytest.param({"10-a.toml": FILES["10-a.toml"]}, id="file-removed"),
    ],
)
def test_digest_changes_with_any_byte_or_name(changed: dict[str, bytes]) -> None:
    """Changing one byte, a file name or the set of files changes the digest."""
    assert load_policy_files(changed).digest != load_policy_files(FILES).digest


def test_directory_and_mapping_digests_agree(tmp_path: Path) -> None:
    """load_policy_dir digests the same bytes as load_policy_files of the files."""
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    assert load_policy_dir(tmp_path).digest == load_policy_files(FILES).digest
