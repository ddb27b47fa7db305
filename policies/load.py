"""Policy files: TOML in a directory, read and checked, every error named.

A policy directory holds ``*.toml`` files (other files are ignored, so a README
can sit next to them), read in name order; each file has one or more
``[[rule]]`` tables. :func:`load_policy_files` checks them all, pure, from
their bytes (the files are read by :mod:`relay.policy_files`). An error names the file, the rule and the key
(``10-service.toml: rule field-service: max_session_seconds: must be an
integer in 1..3600, got 7200``): a policy that does not load is never
partly used.

The keys of a rule (docs/policies.md has the reference):

====================== ======================================================
``name``               required, unique in the directory
``description``        text for people
``effect``             ``allow`` (default) or ``deny``
``engineer_roles``     roles it concerns (engineer, admin, auditor); any if absent
``engineer_groups``    groups it concerns (any one of them); any if absent
``device_labels``      ``{key = "value" | ["v1", "v2"] | "*"}``; all must hold
``windows``            ``[{days = ["mon-fri"], from = "07:00", to = "19:00",
                       timezone = "Europe/Berlin"}]``
``channels``           allow rules: required; ``shell``, ``tcp:22``,
                       ``tcp:8000-8099``, ``tcp:*``
``max_session_seconds`` allow rules: 1..3600
``grant_timeout_s``    allow rules: 1..600
``reason_required``    allow rules: true (default) or false
``reason_pattern``     allow rules: a regular expression the reason contains
``max_concurrent_sessions`` allow rules: 1..100
``auditors_may_watch`` allow rules: true (default) or false
====================== ======================================================
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final

from policies.channels import ChannelSet, ChannelSyntaxError
from policies.model import (
    ANY_VALUE,
    GROUP_NAME,
    LABEL_KEY,
    LABEL_VALUE,
    ROLES,
    RULE_NAME,
    Effect,
    Policy,
    Rule,
)
from policies.windows import TimeWindow, WindowSyntaxError

__all__ = [
    "MAX_FILES",
    "MAX_FILE_BYTES",
    "MAX_RULES",
    "PolicyError",
    "load_policy_files",
]

#: A policy file larger than this is refused unread (a policy is reviewed by
#: people; 256 KiB is thousands of rules).
MAX_FILE_BYTES: Final = 256 * 1024
#: At most this many files in a policy directory, and rules in all of them.
MAX_FILES: Final = 256
MAX_RULES: Final = 10_000
MAX_DESCRIPTION_CHARS: Final = 500
MAX_PATTERN_CHARS: Final = 200
MAX_LIST_ITEMS: Final = 256
MAX_CAP_S: Final = 3600
MAX_GRANT_TIMEOUT_S: Final = 600
MAX_CONCURRENT: Final = 100

_COMMON_KEYS: Final = frozenset(
    {
        "name",
        "description",
        "effect",
        "engineer_roles",
        "engineer_groups",
        "device_labels",
        "windows",
    }
)
_ALLOW_KEYS: Final = frozenset(
    {
        "channels",
        "max_session_seconds",
        "grant_timeout_s",
        "reason_required",
        "reason_pattern",
        "max_concurrent_sessions",
        "auditors_may_watch",
    }
)
_WINDOW_KEYS: Final = frozenset({"days", "from", "to", "timezone"})


class PolicyError(ValueError):
    """A policy that does not load: where and why.

    Attributes:
        file: The file (its name in the directory), or None for the directory.
        rule: The rule's name (or its position, ``#3``), or None.
        key: The key, or None.
        problem: What is wrong.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        rule: str | None = None,
        key: str | None = None,
    ) -> None:
        self.file, self.rule, self.key, self.problem = file, rule, key, problem
        where = [
            part
            for part in (file, f"rule {rule}" if rule else None, key)
            if part is not None
        ]
        super().__init__(": ".join([*where, problem]))


#: Makes the PolicyError of one key of the rule being read.
_Error = Callable[[str | None, str], PolicyError]


def load_policy_files(files: Mapping[str, bytes]) -> Policy:
    """Check the policy files *files* (name -> bytes), in name order.

    Raises:
        PolicyError: The first problem found, naming its file, rule and key.
    """
    digest = hashlib.sha256()
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for name in sorted(files):
        data = files[name]
        digest.update(name.encode() + b"\0" + data + b"\0")
        for rule in _file_rules(name, data):
            if rule.name in seen:
                raise PolicyError(
                    f"rule name {rule.name} is also used in {seen[rule.name]}",
                    file=name,
                    rule=rule.name,
                    key="name",
                )
            seen[rule.name] = name
            rules.append(rule)
            if len(rules) > MAX_RULES:
                raise PolicyError(f"more than {MAX_RULES} rules", file=name)
    return Policy(
        rules=tuple(rules), files=tuple(sorted(files)), digest=digest.hexdigest()
    )


def _file_rules(name: str, data: bytes) -> list[Rule]:
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError(f"larger than {MAX_FILE_BYTES // 1024} KiB", file=name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text", file=name) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {exc}", file=name) from None
    except ValueError as exc:  # an integer past Python's 4300-digit limit
        raise PolicyError(f"not valid TOML: {exc}", file=name) from None
    except RecursionError:
        raise PolicyError("not valid TOML: nested too deeply", file=name) from None
    unknown = sorted(set(document) - {"rule"})
    if unknown:
        raise PolicyError(
            "unknown top-level key (a policy file holds [[rule]] tables only)",
            file=name,
            key=unknown[0],
        )
    tables = document.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise PolicyError("must be [[rule]] tables", file=name, key="rule")
    return [_rule(name, i, table) for i, table in enumerate(tables, start=1)]


def _rule(file: str, position: int, table: dict[str, Any]) -> Rule:
    label = f"#{position}"
    raw_name = table.get("name")
    if isinstance(raw_name, str) and RULE_NAME.fullmatch(raw_name):
        label = raw_name

    def error(key: str | None, problem: str) -> PolicyError:
        return PolicyError(problem, file=file, rule=label, key=key)

    if raw_name is None:
        raise error("name", "required")
    if not isinstance(raw_name, str) or not RULE_NAME.fullmatch(raw_name):
        raise error(
            "name",
            "must be 1..64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    effect_text = table.get("effect", "allow")
    if effect_text not in ("allow", "deny"):
        raise error("effect", f"must be allow or deny, got {effect_text!r}")
    effect = Effect(effect_text)
    allowed_keys = _COMMON_KEYS | (_ALLOW_KEYS if effect is Effect.ALLOW else set())
    for key in table:
        if key not in allowed_keys:
            if key in _ALLOW_KEYS:
                raise error(key, "has no meaning in a deny rule")
            raise error(key, "unknown key")
    description = table.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise error(
            "description", f"must be text of at most {MAX_DESCRIPTION_CHARS} characters"
        )

    roles = _names(
        table,
        "engineer_roles",
        error,
        lambda v: v in ROLES,
        "one of admin, auditor, engineer",
    )
    groups = _names(
        table,
        "engineer_groups",
        error,
        lambda v: bool(GROUP_NAME.fullmatch(v)),
        "a group name (a-z, 0-9, '.', '_', '-')",
    )
    labels = _labels(table.get("device_labels", {}), error)
    windows = _windows(table.get("windows", []), error)
    rule = Rule(
        name=raw_name,
        source=file,
        description=description,
        effect=effect,
        engineer_roles=roles,
        engineer_groups=groups,
        device_labels=labels,
        windows=windows,
    )
    if effect is Effect.DENY:
        return rule
    return _allow_limits(rule, table, error)


def _allow_limits(rule: Rule, table: dict[str, Any], error: _Error) -> Rule:
    if "channels" not in table:
        raise error("channels", "required in an allow rule (what it allows)")
    channels = table["channels"]
    if (
        not isinstance(channels, list)
        or not channels
        or len(channels) > MAX_LIST_ITEMS
        or not all(isinstance(c, str) for c in channels)
    ):
        raise error("channels", "must be a non-empty list of channel patterns")
    try:
        channel_set = ChannelSet.parse(channels)
    except ChannelSyntaxError as exc:
        raise error("channels", str(exc)) from None
    cap = table.get("max_session_seconds")
    if cap is not None and (type(cap) is not int or not 1 <= cap <= MAX_CAP_S):
        raise error(
            "max_session_seconds",
            f"must be an integer in 1..{MAX_CAP_S} (a session never lasts longer), "
            f"got {cap!r}",
        )
    grant = table.get("grant_timeout_s")
    if grant is not None and (
        type(grant) not in (int, float)
        or not math.isfinite(grant)
        or not 1 <= grant <= MAX_GRANT_TIMEOUT_S
    ):
        raise error(
            "grant_timeout_s",
            f"must be a number in 1..{MAX_GRANT_TIMEOUT_S}, got {grant!r}",
        )
    required = table.get("reason_required", True)
    if type(required) is not bool:
        raise error("reason_required", "must be true or false")
    pattern_text = table.get("reason_pattern")
    pattern = None
    if pattern_text is not None:
        if (
            not isinstance(pattern_text, str)
            or not 1 <= len(pattern_text) <= MAX_PATTERN_CHARS
        ):
            raise error(
                "reason_pattern",
                f"must be a regular expression of 1..{MAX_PATTERN_CHARS} characters",
            )
        try:
            pattern = re.compile(pattern_text)
        except re.error as exc:
            raise error("reason_pattern", f"not a regular expression: {exc}") from None
    most = table.get("max_concurrent_sessions")
    if most is not None and (type(most) is not int or not 1 <= most <= MAX_CONCURRENT):
        raise error(
            "max_concurrent_sessions",
            f"must be an integer in 1..{MAX_CONCURRENT}, got {most!r}",
        )
    watch = table.get("auditors_may_watch", True)
    if type(watch) is not bool:
        raise error("auditors_may_watch", "must be true or false")
    return replace(
        rule,
        channels=channel_set,
        max_session_seconds=cap,
        grant_timeout_s=float(grant) if grant is not None else None,
        reason_required=required,
        reason_pattern=pattern,
        max_concurrent_sessions=most,
        auditors_may_watch=watch,
    )


def _names(
    table: dict[str, Any],
    key: str,
    error: _Error,
    valid: Callable[[str], bool],
    what: str,
) -> frozenset[str] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not value or len(value) > MAX_LIST_ITEMS:
        raise error(key, "must be a non-empty list (leave the key out to match any)")
    for item in value:
        if not isinstance(item, str) or not valid(item):
            raise error(key, f"{item!r} is not {what}")
    return frozenset(value)


def _labels(value: object, error: _Error) -> dict[str, frozenset[str]]:
    if not isinstance(value, dict):
        raise error(
            "device_labels", 'must be a table: {key = "value" or ["v1", "v2"] or "*"}'
        )
    if len(value) > MAX_LIST_ITEMS:
        raise error("device_labels", f"at most {MAX_LIST_ITEMS} labels")
    labels: dict[str, frozenset[str]] = {}
    for key, wanted in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise error(
                "device_labels",
                f"{key!r} is not a label key (a-z first, then a-z, 0-9, '.', '_', '-')",
            )
        items = wanted if isinstance(wanted, list) else [wanted]
        if not items or len(items) > MAX_LIST_ITEMS:
            raise error("device_labels", f"{key}: must name at least one value")
        for item in items:
            if not isinstance(item, str) or not (
                item == ANY_VALUE or LABEL_VALUE.fullmatch(item)
            ):
                raise error("device_labels", f"{key}: {item!r} is not a label value")
        labels[key] = frozenset(items)
    return labels


def _windows(value: object, error: _Error) -> tuple[TimeWindow, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
        raise error("windows", "must be a list of {days, from, to, timezone} tables")
    windows = []
    for number, window in enumerate(value, start=1):
        if not isinstance(window, dict):
            raise error("windows", f"window {number}: must be a table")
        unknown = sorted(set(window) - _WINDOW_KEYS)
        if unknown:
            raise error("windows", f"window {number}: unknown key {unknown[0]}")
        days, start, end = window.get("days"), window.get("from"), window.get("to")
        zone = window.get("timezone", "UTC")
        if not isinstance(days, list) or not all(isinstance(d, str) for d in days):
            raise error(
                "windows", f'window {number}: days must be a list such as ["mon-fri"]'
            )
        if (
            not isinstance(start, str)
            or not isinstance(end, str)
            or not isinstance(zone, str)
        ):
            raise error(
                "windows", f'window {number}: from, to ("HH:MM") and timezone are text'
            )
        try:
            windows.append(TimeWindow.parse(days, start, end, zone))
        except WindowSyntaxError as exc:
            raise error("windows", f"window {number}: {exc}") from None
    return tuple(windows)
