"""Tests for policies.decide: default deny, deny rules, and the most restrictive limits.

Policies are small TOML files loaded with load_policy_files; time is the
request's aware datetime (2026-03-02 is a Monday, 2026-03-07 a Saturday).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from policies import (
    DEFAULT_POLICY_DIR,
    AccessRequest,
    Ceiling,
    ChannelSet,
    Decision,
    Denial,
    Device,
    Engineer,
    Policy,
    decide,
    load_policy_files,
)
from relay.policy_files import load_policy_dir

MONDAY_NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
SATURDAY_NOON = datetime(2026, 3, 7, 12, 0, tzinfo=UTC)
DEFAULT_CHANNELS = ChannelSet.parse(["shell", "tcp:22", "tcp:443"])
CEILING = Ceiling(
    max_session_seconds=3600, grant_timeout_s=60.0, channels=DEFAULT_CHANNELS
)
WIDE_CEILING = Ceiling()  # every channel, 3600 s, 60 s


def policy(toml: str) -> Policy:
    """The policy of one file p.toml."""
    return load_policy_files({"p.toml": toml.encode()})


def request(
    *,
    role: str = "engineer",
    groups: frozenset[str] = frozenset({"field"}),
    labels: dict[str, str] | None = None,
    channels: tuple[str, ...] = ("shell",),
    reason: str = "INC-42 pump calibration",
    at: datetime = MONDAY_NOON,
    live_sessions: int = 0,
) -> AccessRequest:
    """A request by alice for device dev-1 (labels customer=acme, site=lab-1 unless given)."""
    return AccessRequest(
        engineer=Engineer(name="alice", role=role, groups=groups),
        device=Device(
            device_id="dev-1",
            labels={"customer": "acme", "site": "lab-1"} if labels is None else labels,
        ),
        channels=channels,
        reason=reason,
        at=at,
        live_sessions=live_sessions,
    )


ALLOW_ALL = """
[[rule]]
name = "all"
channels = ["shell", "tcp:*"]
"""
ENGINEERS = """
[[rule]]
name = "engineers"
engineer_roles = ["engineer"]
channels = ["shell", "tcp:*"]
"""
AUDITORS = """
[[rule]]
name = "auditors"
engineer_roles = ["auditor", "engineer", "admin"]
channels = ["shell", "tcp:*"]
"""
FIELD_GROUP = """
[[rule]]
name = "field-group"
engineer_groups = ["field", "lab"]
channels = ["shell"]
"""
ACME = """
[[rule]]
name = "acme"
device_labels = {customer = ["acme", "globex"]}
channels = ["shell"]
"""
ANY_CUSTOMER = """
[[rule]]
name = "any-customer"
device_labels = {customer = "*"}
channels = ["shell"]
"""
TWO_LABELS = """
[[rule]]
name = "two-labels"
device_labels = {customer = "acme", site = ["lab-1", "lab-2"]}
channels = ["shell"]
"""
DENY_GLOBEX = """
[[rule]]
name = "all"
channels = ["shell", "tcp:*"]

[[rule]]
name = "no-globex"
effect = "deny"
description = "Globex forbids remote access"
device_labels = {customer = "globex"}

[[rule]]
name = "shell"
channels = ["shell"]
"""
DENY_WEEKENDS = """
[[rule]]
name = "all"
channels = ["shell", "tcp:*"]

[[rule]]
name = "no-weekends"
effect = "deny"
windows = [{days = ["sat-sun"], from = "00:00", to = "24:00"}]
"""
OFFICE_HOURS = """
[[rule]]
name = "office"
channels = ["shell"]
windows = [{days = ["mon-fri"], from = "07:00", to = "19:00", timezone = "Europe/Berlin"}]
"""
NO_REASON = """
[[rule]]
name = "casual"
channels = ["shell"]
reason_required = false
"""
TICKET = """
[[rule]]
name = "ticket"
channels = ["shell"]
reason_pattern = "INC-[0-9]+"
"""
TWO_PATTERNS = """
[[rule]]
name = "ticket"
channels = ["shell"]
reason_pattern = "INC-[0-9]+"

[[rule]]
name = "pump"
channels = ["shell"]
reason_pattern = "(?i)pump"
"""
TWO_AT_ONCE = """
[[rule]]
name = "two"
channels = ["shell"]
max_concurrent_sessions = 2
"""


@pytest.mark.parametrize(
    ("toml", "req", "code", "rules"),
    [
        # Default deny.
        pytest.param("", request(), Denial.NO_MATCHING_RULE, (), id="empty-policy"),
        pytest.param(ALLOW_ALL, request(), None, ("all",), id="allow-all"),
        # Roles.
        pytest.param(ENGINEERS, request(), None, ("engineers",), id="role-matches"),
        pytest.param(
            ENGINEERS,
            request(role="admin"),
            Denial.NO_MATCHING_RULE,
            (),
            id="role-other",
        ),
        pytest.param(
            AUDITORS, request(role="auditor"), Denial.ROLE, (), id="auditor-never"
        ),
        pytest.param(
            ALLOW_ALL, request(role="viewer"), Denial.ROLE, (), id="unknown-role-never"
        ),
        # Groups.
        pytest.param(
            FIELD_GROUP, request(), None, ("field-group",), id="group-matches"
        ),
        pytest.param(
            FIELD_GROUP,
            request(groups=frozenset({"sales", "lab"})),
            None,
            ("field-group",),
            id="one-of-several-groups",
        ),
        pytest.param(
            FIELD_GROUP,
            request(groups=frozenset({"sales"})),
            Denial.NO_MATCHING_RULE,
            (),
            id="group-other",
        ),
        pytest.param(
            FIELD_GROUP,
            request(groups=frozenset()),
            Denial.NO_MATCHING_RULE,
            (),
            id="no-groups",
        ),
        # Device labels.
        pytest.param(ACME, request(), None, ("acme",), id="label-value-listed"),
        pytest.param(
            ACME,
            request(labels={"customer": "initech"}),
            Denial.NO_MATCHING_RULE,
            (),
            id="label-value-not-listed",
        ),
        pytest.param(
            ACME,
            request(labels={"site": "lab-1"}),
            Denial.NO_MATCHING_RULE,
            (),
            id="label-missing",
        ),
        pytest.param(
            ACME,
            request(labels={"customer": "ACME"}),
            Denial.NO_MATCHING_RULE,
            (),
            id="label-value-case-matters",
        ),
        pytest.param(
            ANY_CUSTOMER,
            request(labels={"customer": "initech"}),
            None,
            ("any-customer",),
            id="star-matches-any-value",
        ),
        pytest.param(
            ANY_CUSTOMER,
            request(labels={}),
            Denial.NO_MATCHING_RULE,
            (),
            id="star-needs-the-label",
        ),
        pytest.param(TWO_LABELS, request(), None, ("two-labels",), id="two-labels"),
        pytest.param(
            TWO_LABELS,
            request(labels={"customer": "acme", "site": "lab-9"}),
            Denial.NO_MATCHING_RULE,
            (),
            id="one-of-two-labels-wrong",
        ),
        # Deny rules.
        pytest.param(
            DENY_GLOBEX,
            request(labels={"customer": "globex"}),
            Denial.DENIED_BY_RULE,
            ("all", "no-globex", "shell"),
            id="deny-wins-over-allows",
        ),
        pytest.param(
            DENY_GLOBEX, request(), None, ("all", "shell"), id="deny-not-matching"
        ),
        pytest.param(
            DENY_WEEKENDS,
            request(at=SATURDAY_NOON),
            Denial.DENIED_BY_RULE,
            ("all", "no-weekends"),
            id="deny-inside-its-window",
        ),
        pytest.param(
            DENY_WEEKENDS,
            request(),
            None,
            ("all", "no-weekends"),
            id="deny-outside-its-window",
        ),
        # Windows of allow rules.
        pytest.param(OFFICE_HOURS, request(), None, ("office",), id="inside-window"),
        pytest.param(
            OFFICE_HOURS,
            request(at=SATURDAY_NOON),
            Denial.OUTSIDE_WINDOW,
            ("office",),
            id="outside-window-day",
        ),
        pytest.param(
            OFFICE_HOURS,
            request(at=datetime(2026, 3, 2, 18, 30, tzinfo=UTC)),
            Denial.OUTSIDE_WINDOW,
            ("office",),
            id="outside-window-berlin-evening",
        ),
        # Channels.
        pytest.param(
            FIELD_GROUP,
            request(channels=("tcp:22",)),
            Denial.CHANNEL_NOT_ALLOWED,
            ("field-group",),
            id="channel-not-allowed",
        ),
        pytest.param(
            ALLOW_ALL,
            request(channels=("tcp:22-23",)),
            Denial.CHANNEL_NOT_ALLOWED,
            ("all",),
            id="channel-junk",
        ),
        # Reasons.
        pytest.param(
            ALLOW_ALL,
            request(reason=""),
            Denial.REASON_REQUIRED,
            ("all",),
            id="no-reason",
        ),
        pytest.param(
            ALLOW_ALL,
            request(reason=" \t\n"),
            Denial.REASON_REQUIRED,
            ("all",),
            id="whitespace-reason",
        ),
        pytest.param(
            NO_REASON, request(reason=""), None, ("casual",), id="reason-optional"
        ),
        pytest.param(TICKET, request(), None, ("ticket",), id="pattern-matches"),
        pytest.param(
            TICKET,
            request(reason="fix the pump"),
            Denial.REASON_MISMATCH,
            ("ticket",),
            id="pattern-mismatch",
        ),
        pytest.param(
            TWO_PATTERNS,
            request(reason="INC-7 Pump"),
            None,
            ("ticket", "pump"),
            id="both-patterns-match",
        ),
        pytest.param(
            TWO_PATTERNS,
            request(reason="INC-7 valve"),
            Denial.REASON_MISMATCH,
            ("ticket", "pump"),
            id="second-pattern-mismatch",
        ),
        pytest.param(
            TWO_PATTERNS,
            request(reason="pump, no ticket"),
            Denial.REASON_MISMATCH,
            ("ticket", "pump"),
            id="first-pattern-mismatch",
        ),
        # Session count.
        pytest.param(
            TWO_AT_ONCE, request(live_sessions=1), None, ("two",), id="one-below-max"
        ),
        pytest.param(
            TWO_AT_ONCE,
            request(live_sessions=2),
            Denial.TOO_MANY_SESSIONS,
            ("two",),
            id="at-max",
        ),
    ],
)
def test_decision(
    toml: str, req: AccessRequest, code: Denial | None, rules: tuple[str, ...]
) -> None:
    """Allowed or refused with the expected code, naming every applied rule in order."""
    decision = decide(policy(toml), req, WIDE_CEILING)
    assert (decision.allowed, decision.code, decision.rules) == (
        code is None,
        code,
        rules,
    )
    assert bool(decision.message) is (code is not None)


def test_role_refusal_ignores_rules_naming_auditors() -> None:
    """An auditor is refused for the role, with no rules and no limits, even if named."""
    loaded = policy(AUDITORS)
    decision = decide(loaded, request(role="auditor"), CEILING)
    assert decision == Decision(
        allowed=False,
        rules=(),
        code=Denial.ROLE,
        message="role auditor does not hold remote sessions",
        policy_digest=loaded.digest,
    )


def test_deny_rule_refusal_names_rule_and_description_without_limits() -> None:
    """A deny rule's refusal says which rule and why, and offers no limits."""
    decision = decide(
        policy(DENY_GLOBEX), request(labels={"customer": "globex"}), CEILING
    )
    assert decision.message == "denied by rule no-globex: Globex forbids remote access"
    assert decision.limits is None


def test_default_deny_message_names_engineer_and_device() -> None:
    """With no rule, the refusal says who and which device, and offers no limits."""
    decision = decide(policy(""), request(), CEILING)
    assert decision.message == "no rule allows alice (engineer) a session on dev-1"
    assert decision.limits is None


def test_deny_rule_applies_even_when_listed_last() -> None:
    """Deny wins whatever its place in the policy, and in another file."""
    files = {
        "10-allow.toml": ALLOW_ALL.encode(),
        "90-deny.toml": b'[[rule]]\nname = "freeze"\neffect = "deny"\n',
    }
    decision = decide(load_policy_files(files), request(), CEILING)
    assert (decision.code, decision.rules) == (Denial.DENIED_BY_RULE, ("all", "freeze"))


# --- Limits: the most restrictive wins ------------------------------------------------

TWO_CHANNEL_RULES = """
[[rule]]
name = "wide"
channels = ["shell", "tcp:1-1000"]

[[rule]]
name = "narrow"
channels = ["tcp:22", "tcp:443", "tcp:8080"]
"""


def test_channels_are_the_intersection_of_rules_and_ceiling() -> None:
    """Channels every rule and the ceiling allow: shell is dropped by one rule, 8080 by another."""
    decision = decide(policy(TWO_CHANNEL_RULES), request(channels=("tcp:22",)), CEILING)
    assert decision.allowed
    assert decision.limits is not None
    assert decision.limits.channels.patterns() == ["tcp:22", "tcp:443"]


@pytest.mark.parametrize(
    ("channel", "allowed_text"),
    [
        pytest.param("shell", "tcp:22, tcp:443", id="dropped-by-a-rule"),
        pytest.param("tcp:8080", "tcp:22, tcp:443", id="dropped-by-rule-and-ceiling"),
        pytest.param("tcp:80", "tcp:22, tcp:443", id="dropped-by-the-ceiling"),
    ],
)
def test_channel_refusal_keeps_the_limits(channel: str, allowed_text: str) -> None:
    """A channel refusal names the channel and what is allowed, and still carries limits."""
    decision = decide(
        policy(TWO_CHANNEL_RULES), request(channels=("tcp:22", channel)), CEILING
    )
    assert decision.code is Denial.CHANNEL_NOT_ALLOWED
    assert decision.message == (
        f"channel not allowed: {channel} (allowed: {allowed_text})"
    )
    assert decision.limits is not None
    assert decision.limits.channels.patterns() == ["tcp:22", "tcp:443"]


def test_disjoint_channel_rules_allow_nothing() -> None:
    """Two rules with no channel in common refuse every channel, showing 'none'."""
    toml = ACME + FIELD_GROUP.replace('["shell"]', '["tcp:22"]')
    decision = decide(policy(toml), request(), CEILING)
    assert decision.code is Denial.CHANNEL_NOT_ALLOWED
    assert decision.message == "channel not allowed: shell (allowed: none)"


CAPS = """
[[rule]]
name = "long"
channels = ["shell"]
max_session_seconds = 3000
grant_timeout_s = 120

[[rule]]
name = "short"
channels = ["shell"]
max_session_seconds = 1800
grant_timeout_s = 45.5
"""


@pytest.mark.parametrize(
    ("toml", "ceiling", "cap", "grant"),
    [
        pytest.param(ALLOW_ALL, Ceiling(), 3600, 60.0, id="ceiling-only"),
        pytest.param(CAPS, Ceiling(), 1800, 45.5, id="smallest-rule"),
        pytest.param(
            CAPS,
            Ceiling(max_session_seconds=900, grant_timeout_s=30.0),
            900,
            30.0,
            id="ceiling-below-rules",
        ),
        pytest.param(
            ALLOW_ALL,
            Ceiling(max_session_seconds=7200),
            3600,
            60.0,
            id="ceiling-above-3600-clamped",
        ),
    ],
)
def test_cap_and_grant_timeout_are_the_smallest(
    toml: str, ceiling: Ceiling, cap: int, grant: float
) -> None:
    """The session cap and grant timeout are the minimum of the ceiling, the rules and 3600 s."""
    decision = decide(policy(toml), request(), ceiling)
    assert decision.limits is not None
    assert decision.limits.max_session_seconds == cap
    assert decision.limits.grant_timeout_s == grant


WINDOWED_CAP = """
[[rule]]
name = "office"
channels = ["shell"]
max_session_seconds = 3000
windows = [{days = ["mon-fri"], from = "07:00", to = "19:00", timezone = "Europe/Berlin"}]

[[rule]]
name = "late-shift"
channels = ["shell"]
windows = [
    {days = ["mon-fri"], from = "12:00", to = "18:50", timezone = "Europe/Berlin"},
    {days = ["mon-fri"], from = "07:00", to = "19:00", timezone = "Europe/Berlin"},
]
"""


@pytest.mark.parametrize(
    ("at", "cap", "ends"),
    [
        pytest.param(
            datetime(2026, 3, 2, 12, 0, tzinfo=UTC),
            3000,
            datetime(2026, 3, 2, 18, 0, tzinfo=UTC),
            id="rule-cap-first",
        ),
        pytest.param(
            datetime(2026, 3, 2, 17, 20, tzinfo=UTC),
            40 * 60,
            datetime(2026, 3, 2, 18, 0, tzinfo=UTC),
            id="window-end-first",
        ),
        pytest.param(
            datetime(2026, 3, 2, 17, 59, 59, 500_000, tzinfo=UTC),
            1,
            datetime(2026, 3, 2, 18, 0, tzinfo=UTC),
            id="under-a-second-left-is-one",
        ),
    ],
)
def test_cap_never_runs_past_the_window(at: datetime, cap: int, ends: datetime) -> None:
    """The cap is cut to the seconds left in the earliest-ending rule's window.

    A rule with two windows counts the later of the two it is in (19:00 Berlin),
    so both rules end at 19:00 Berlin = 18:00 UTC.
    """
    decision = decide(policy(WINDOWED_CAP), request(at=at), CEILING)
    assert decision.allowed
    assert decision.limits is not None
    assert decision.limits.max_session_seconds == cap
    assert decision.limits.window_ends_at == ends


def test_outside_window_names_the_rule_and_its_windows() -> None:
    """An allow rule out of its windows refuses, saying which rule and when it applies."""
    decision = decide(policy(OFFICE_HOURS), request(at=SATURDAY_NOON), CEILING)
    assert decision.code is Denial.OUTSIDE_WINDOW
    assert decision.message == (
        "outside the time windows of rule office "
        "(mon,tue,wed,thu,fri 07:00-19:00 Europe/Berlin)"
    )
    assert decision.limits is not None


def test_outside_one_rules_window_refuses_even_if_another_rule_allows() -> None:
    """Every applying allow rule's windows must hold: the most restrictive wins."""
    decision = decide(
        policy(ALLOW_ALL + OFFICE_HOURS), request(at=SATURDAY_NOON), CEILING
    )
    assert (decision.code, decision.rules) == (Denial.OUTSIDE_WINDOW, ("all", "office"))


REASONS = """
[[rule]]
name = "casual"
channels = ["shell"]
reason_required = false

[[rule]]
name = "strict"
channels = ["shell"]
"""


def test_reason_is_required_if_any_rule_requires_it() -> None:
    """One rule without reason_required does not lift another's requirement."""
    decision = decide(policy(REASONS), request(reason=""), CEILING)
    assert decision.code is Denial.REASON_REQUIRED
    assert decision.limits is not None
    assert decision.limits.reason_required is True


def test_reason_patterns_are_all_listed_and_the_failing_one_named() -> None:
    """Limits carry every pattern in rule order; the refusal names the one that failed."""
    decision = decide(policy(TWO_PATTERNS), request(reason="INC-7 valve"), CEILING)
    assert decision.limits is not None
    assert decision.limits.reason_patterns == ("INC-[0-9]+", "(?i)pump")
    assert decision.message == "the reason must match the pattern (?i)pump"


CONCURRENCY = """
[[rule]]
name = "five"
channels = ["shell"]
max_concurrent_sessions = 5

[[rule]]
name = "three"
channels = ["shell"]
max_concurrent_sessions = 3

[[rule]]
name = "unlimited"
channels = ["shell"]
"""


@pytest.mark.parametrize(
    ("toml", "live", "allowed", "most"),
    [
        pytest.param(CONCURRENCY, 2, True, 3, id="below-smallest"),
        pytest.param(CONCURRENCY, 3, False, 3, id="at-smallest"),
        pytest.param(CONCURRENCY, 4, False, 3, id="above-smallest-below-other"),
        pytest.param(ALLOW_ALL, 1000, True, None, id="no-limit"),
    ],
)
def test_concurrent_sessions_are_the_smallest_limit(
    toml: str, live: int, allowed: bool, most: int | None
) -> None:
    """max_concurrent_sessions is the smallest of the rules; holding that many refuses."""
    decision = decide(policy(toml), request(live_sessions=live), CEILING)
    assert decision.allowed is allowed
    assert decision.limits is not None
    assert decision.limits.max_concurrent_sessions == most
    if not allowed:
        assert decision.code is Denial.TOO_MANY_SESSIONS
        assert decision.message == (
            f"alice already holds {live} session(s), the most allowed at once is 3"
        )


@pytest.mark.parametrize(
    ("watch", "expected"),
    [
        pytest.param((True, True), True, id="both-allow"),
        pytest.param((True, False), False, id="one-forbids"),
        pytest.param((False, False), False, id="both-forbid"),
    ],
)
def test_auditors_may_watch_only_if_every_rule_lets_them(
    watch: tuple[bool, bool], expected: bool
) -> None:
    """auditors_may_watch is the AND of the applying rules."""
    toml = "".join(
        f'[[rule]]\nname = "r{i}"\nchannels = ["shell"]\n'
        f"auditors_may_watch = {str(w).lower()}\n"
        for i, w in enumerate(watch)
    )
    decision = decide(policy(toml), request(), CEILING)
    assert decision.limits is not None
    assert decision.limits.auditors_may_watch is expected


def test_rules_that_do_not_apply_set_no_limits() -> None:
    """A rule for another group neither appears in the decision nor restricts it."""
    toml = ALLOW_ALL + (
        '[[rule]]\nname = "lab-only"\nengineer_groups = ["lab"]\n'
        'channels = ["tcp:22"]\nmax_session_seconds = 60\n'
    )
    decision = decide(policy(toml), request(), CEILING)
    assert decision.allowed
    assert decision.rules == ("all",)
    assert decision.limits is not None
    assert decision.limits.max_session_seconds == 3600
    assert "shell" in decision.limits.channels


# --- Records --------------------------------------------------------------------------


def test_allowed_decision_record_is_json_with_every_field() -> None:
    """Decision.as_record() and Limits.as_record() survive json.dumps with their values."""
    toml = WINDOWED_CAP + TWO_PATTERNS.replace('"ticket"', '"t2"').replace(
        '"pump"', '"p2"'
    )
    req = request(reason="INC-7 Pump", at=datetime(2026, 3, 2, 17, 20, tzinfo=UTC))
    loaded = policy(toml)
    decision = decide(loaded, req, CEILING)
    record = json.loads(json.dumps(decision.as_record()))
    assert record == {
        "policy_digest": loaded.digest,
        "allowed": True,
        "rules": ["office", "late-shift", "t2", "p2"],
        "code": None,
        "message": "",
        "limits": {
            "channels": ["shell"],
            "max_session_seconds": 2400,
            "grant_timeout_s": 60.0,
            "reason_required": True,
            "reason_patterns": ["INC-[0-9]+", "(?i)pump"],
            "max_concurrent_sessions": None,
            "auditors_may_watch": True,
            "window_ends_at": "2026-03-02T18:00:00+00:00",
        },
    }
    flat = json.loads(json.dumps(decision.flat_fields()))
    assert flat == {
        "policy_allowed": True,
        "policy_code": None,
        "policy_rules": ["office", "late-shift", "t2", "p2"],
        "policy_digest": loaded.digest,
        "policy_channels": ["shell"],
        "policy_cap_s": 2400,
        "policy_grant_timeout_ms": 60000,
        "policy_reason_required": True,
        "policy_max_concurrent": None,
        "policy_auditors_may_watch": True,
        "policy_window_ends_at": "2026-03-02T18:00:00+00:00",
    }


def test_refused_decision_record_is_json() -> None:
    """A refusal's record carries its code as text and its limits (or None)."""
    refused = decide(policy(TWO_AT_ONCE), request(live_sessions=2), CEILING)
    record = json.loads(json.dumps(refused.as_record()))
    assert record["allowed"] is False
    assert record["code"] == "too_many_sessions"
    assert record["limits"]["max_concurrent_sessions"] == 2
    assert record["limits"]["window_ends_at"] is None
    no_rule = json.loads(json.dumps(decide(policy(""), request(), CEILING).as_record()))
    assert (no_rule["code"], no_rule["limits"]) == ("no_matching_rule", None)


# --- The shipped default policy -------------------------------------------------------


@pytest.fixture(scope="module")
def default_policy() -> Policy:
    return load_policy_dir(DEFAULT_POLICY_DIR)


def test_default_policy_loads(default_policy: Policy) -> None:
    """The shipped policy loads: one allow rule from remote-care.toml."""
    assert default_policy.files == ("remote-care.toml",)
    assert [r.name for r in default_policy.rules] == ["engineers-any-instrument"]
    assert len(default_policy.digest) == 64


@pytest.mark.parametrize("role", ["engineer", "admin"])
@pytest.mark.parametrize(
    "labels",
    [
        pytest.param({}, id="no-labels"),
        pytest.param({"customer": "acme", "model": "x9"}, id="some-labels"),
    ],
)
def test_default_policy_allows_engineers_a_shell_anywhere(
    default_policy: Policy, role: str, labels: dict[str, str]
) -> None:
    """Engineers and admins get shell on any device, within the ceiling's channels."""
    decision = decide(default_policy, request(role=role, labels=labels), CEILING)
    assert decision.allowed
    assert decision.rules == ("engineers-any-instrument",)
    assert decision.limits is not None
    assert decision.limits.channels.patterns() == ["shell", "tcp:22", "tcp:443"]
    assert decision.limits.max_session_seconds == 3600
    assert decision.limits.reason_required


@pytest.mark.parametrize(
    ("req", "code"),
    [
        pytest.param(
            request(channels=("tcp:8080",)),
            Denial.CHANNEL_NOT_ALLOWED,
            id="tcp-8080-over-the-ceiling",
        ),
        pytest.param(request(role="auditor"), Denial.ROLE, id="auditor"),
        pytest.param(request(reason=""), Denial.REASON_REQUIRED, id="no-reason"),
    ],
)
def test_default_policy_refuses(
    default_policy: Policy, req: AccessRequest, code: Denial
) -> None:
    """The default policy refuses channels beyond the ceiling, auditors, and no reason."""
    decision = decide(default_policy, req, CEILING)
    assert (decision.allowed, decision.code) == (False, code)
