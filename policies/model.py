"""The policy model: rules, the request they judge, and the decision.

A :class:`Rule` matches engineers (by role and by group) to devices (by
labels) and either allows sessions, with limits, or denies them. A
:class:`Policy` is the ordered rules of one policy directory. What a request
gets is a :class:`Decision`: allowed or not, the rules behind it, and the
:class:`Limits` the session runs under. :func:`policies.decide.decide` makes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

from policies.channels import ChannelSet
from policies.windows import TimeWindow

__all__ = [
    "ANY_VALUE",
    "GROUP_NAME",
    "LABEL_KEY",
    "LABEL_VALUE",
    "RULE_NAME",
    "SESSION_ROLES",
    "AccessRequest",
    "Decision",
    "Denial",
    "Device",
    "Effect",
    "Engineer",
    "Limits",
    "Policy",
    "Rule",
]

#: The roles that may hold remote sessions at all (the API's own check); an
#: auditor never does, whatever a rule says.
SESSION_ROLES: Final = frozenset({"engineer", "admin"})
#: Every role a rule may name.
ROLES: Final = frozenset({"engineer", "admin", "auditor"})
#: A device label selector value that matches any value of a present label.
ANY_VALUE: Final = "*"
#: Device label keys (``customer``, ``site``, ``model``, ``region`` ...).
LABEL_KEY: Final = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
#: Device label values: printable, no spaces at either end, at most 128.
LABEL_VALUE: Final = re.compile(
    r"[A-Za-z0-9_.:/@+-](?:[A-Za-z0-9_.:/@+ -]{0,126}[A-Za-z0-9_.:/@+-])?"
)
#: Engineer group names.
GROUP_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
#: Rule names.
RULE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Denial(StrEnum):
    """Why a request was refused (the decision's ``code``)."""

    NO_MATCHING_RULE = "no_matching_rule"
    DENIED_BY_RULE = "denied_by_rule"
    ROLE = "role"
    CHANNEL_NOT_ALLOWED = "channel_not_allowed"
    REASON_REQUIRED = "reason_required"
    REASON_MISMATCH = "reason_mismatch"
    OUTSIDE_WINDOW = "outside_window"
    TOO_MANY_SESSIONS = "too_many_sessions"


@dataclass(frozen=True, slots=True)
class Engineer:
    """Who asks: the user name, role and groups from the user store."""

    name: str
    role: str
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Device:
    """What is asked for: the device id and its labels from the device store."""

    device_id: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """One session request, with everything the decision depends on.

    Attributes:
        engineer: Who asks.
        device: For which device.
        channels: The channels asked for (``shell``, ``tcp:PORT``).
        reason: The engineer's reason, as typed.
        at: When (aware); time windows are judged against it.
        live_sessions: The engineer's sessions pending or active right now,
            for ``max_concurrent_sessions``.
    """

    engineer: Engineer
    device: Device
    channels: tuple[str, ...]
    reason: str
    at: datetime
    live_sessions: int = 0


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a policy file.

    Attributes:
        name: Unique in the policy; decisions and audit records name it.
        source: The file it came from.
        description: For people.
        effect: Allow or deny.
        engineer_roles: Roles it matches; None for any.
        engineer_groups: Groups it matches (an engineer in any one of them);
            None for any.
        device_labels: Every key must be a label of the device with one of
            the values (``*``: any value); empty for every device.
        windows: When the rule applies; empty for always. An allow rule
            outside its windows refuses; a deny rule refuses only inside them.
        channels: The channels an allow rule allows.
        max_session_seconds: The cap an allow rule sets (never above 3600).
        grant_timeout_s: How long the person at the device has to answer.
        reason_required: Whether the engineer must give a reason.
        reason_pattern: A regular expression the reason must contain.
        max_concurrent_sessions: How many sessions an engineer may hold at once.
        auditors_may_watch: Whether auditors may watch the session live.
    """

    name: str
    source: str
    description: str = ""
    effect: Effect = Effect.ALLOW
    engineer_roles: frozenset[str] | None = None
    engineer_groups: frozenset[str] | None = None
    device_labels: Mapping[str, frozenset[str]] = field(default_factory=dict)
    windows: tuple[TimeWindow, ...] = ()
    channels: ChannelSet | None = None
    max_session_seconds: int | None = None
    grant_timeout_s: float | None = None
    reason_required: bool = True
    reason_pattern: re.Pattern[str] | None = None
    max_concurrent_sessions: int | None = None
    auditors_may_watch: bool = True

    def mismatch(self, engineer: Engineer, device: Device) -> str | None:
        """Why this rule does not concern *engineer* and *device*; None if it does."""
        if self.engineer_roles is not None and engineer.role not in self.engineer_roles:
            return f"role {engineer.role} is not one of {_listed(self.engineer_roles)}"
        if self.engineer_groups is not None and not (
            engineer.groups & self.engineer_groups
        ):
            return f"{engineer.name} is in none of the groups {_listed(self.engineer_groups)}"
        for key, values in self.device_labels.items():
            value = device.labels.get(key)
            if value is None:
                return f"device has no label {key}"
            if ANY_VALUE not in values and value not in values:
                return f"device label {key}={value} is not one of {_listed(values)}"
        return None

    def window_end(self, at: datetime) -> datetime | None:
        """The end of this rule's window that *at* falls in (the latest, if several)."""
        ends = [e for w in self.windows if (e := w.end_of_occurrence(at)) is not None]
        return max(ends) if ends else None


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules of one policy directory, in file and then rule order.

    Attributes:
        rules: The rules.
        files: The files they came from (names relative to the directory).
        digest: SHA-256 over the files' names and bytes: what was loaded, for
            the audit record of the load.
    """

    rules: tuple[Rule, ...]
    files: tuple[str, ...] = ()
    digest: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a session may do, the most restrictive of every rule that applied.

    Attributes:
        channels: Every channel it may open streams on.
        max_session_seconds: Its cap (the broker's ceiling, the rules' caps and
            the end of the time window it starts in, whichever is first).
        grant_timeout_s: How long the person at the device has to answer.
        reason_required: Whether a reason must be given.
        reason_patterns: Regular expressions the reason must contain, each.
        max_concurrent_sessions: How many sessions the engineer may hold at
            once; None for no policy limit.
        auditors_may_watch: Whether auditors may watch it live.
        window_ends_at: When the time window it started in ends, if any.
    """

    channels: ChannelSet
    max_session_seconds: int
    grant_timeout_s: float
    reason_required: bool
    reason_patterns: tuple[str, ...] = ()
    max_concurrent_sessions: int | None = None
    auditors_may_watch: bool = True
    window_ends_at: datetime | None = None

    def as_record(self) -> dict[str, object]:
        """The limits as JSON-friendly fields (audit records, the API)."""
        return {
            "channels": self.channels.patterns(),
            "max_session_seconds": self.max_session_seconds,
            "grant_timeout_s": self.grant_timeout_s,
            "reason_required": self.reason_required,
            "reason_patterns": list(self.reason_patterns),
            "max_concurrent_sessions": self.max_concurrent_sessions,
            "auditors_may_watch": self.auditors_may_watch,
            "window_ends_at": (
                self.window_ends_at.isoformat() if self.window_ends_at else None
            ),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one :class:`AccessRequest`.

    Attributes:
        allowed: Whether the session may be offered.
        rules: The names of the rules that applied (matched the engineer and
            the device), in policy order.
        code: Why it was refused (None when allowed).
        message: The refusal in words, for the engineer and the audit log.
        limits: The session's limits, when at least one allow rule applied and
            no deny rule did (also on a refusal for a channel, a reason, a
            window or the session count, so ``relay policy explain`` shows
            what would be allowed).
        policy_digest: The :attr:`Policy.digest` of the policy that decided.
    """

    allowed: bool
    rules: tuple[str, ...]
    code: Denial | None = None
    message: str = ""
    limits: Limits | None = None
    policy_digest: str = ""

    def as_record(self) -> dict[str, object]:
        """The decision as JSON-friendly fields (``relay policy explain --json``)."""
        return {
            "allowed": self.allowed,
            "rules": list(self.rules),
            "code": str(self.code) if self.code else None,
            "message": self.message,
            "limits": self.limits.as_record() if self.limits else None,
            "policy_digest": self.policy_digest,
        }

    def flat_fields(self) -> dict[str, object]:
        """The decision as flat ``policy_*`` fields of strings, integers,
        booleans, null and short lists (what an audit record holds)."""
        fields: dict[str, object] = {
            "policy_allowed": self.allowed,
            "policy_code": str(self.code) if self.code else None,
            "policy_rules": list(self.rules),
            "policy_digest": self.policy_digest,
        }
        limits = self.limits
        if limits is not None:
            fields |= {
                "policy_channels": limits.channels.patterns(),
                "policy_cap_s": limits.max_session_seconds,
                "policy_grant_timeout_ms": round(limits.grant_timeout_s * 1000),
                "policy_reason_required": limits.reason_required,
                "policy_max_concurrent": limits.max_concurrent_sessions,
                "policy_auditors_may_watch": limits.auditors_may_watch,
                "policy_window_ends_at": (
                    limits.window_ends_at.isoformat() if limits.window_ends_at else None
                ),
            }
        return fields


def _listed(values: frozenset[str]) -> str:
    return "[" + ", ".join(sorted(values)) + "]"
