"""``relay policy check`` and ``relay policy explain``.

Theory of operation
===================
:mod:`relay.cli` parses and dispatches; these two commands live here, on top of
the pure :mod:`policies` package.

- ``relay policy check DIR`` loads a policy directory the way the broker does
  and says what it holds, one line per rule (exit 0), or names the file, the
  rule and the key of the first problem (exit 2). A directory with no rule is
  valid and says so: every request would be refused (default deny).
- ``relay policy explain --engineer NAME --device ID [--channel C ...]``
  answers one request as the broker would now: it reads the engineer's role
  and groups and the device's labels from the store, the policy from
  ``[policy] dir`` (or ``--policy DIR``) and the ceiling from ``[sessions]``,
  then prints the decision, the rules that applied, why each other rule did
  not, and the limits. ``--at`` judges another moment (time windows);
  without ``--channel`` no channel is held against the rules; the engineer's
  live sessions count as 0 (the broker counts them at the request).

Everything printed that came from a file or the store (labels, descriptions,
reasons) goes through :func:`_text`: control characters are escaped before
they reach a terminal.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from policies import (
    AccessRequest,
    Decision,
    Device,
    Effect,
    Engineer,
    Policy,
    PolicyError,
    Rule,
    decide,
)
from relay._trio.policy_gate import ceiling_of, policy_dir
from relay.cli import CLIError
from relay.config import BrokerConfig
from relay.policy_files import load_policy_dir
from relay.store import Store

__all__ = ["cmd_policy_check", "cmd_policy_explain"]


def _text(value: object) -> str:
    """*value* as one line with control characters escaped."""
    text = str(value)
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode() for c in text
    )


def _load(directory: Path) -> Policy:
    try:
        return load_policy_dir(directory)
    except PolicyError as exc:
        raise CLIError(f"{directory}: {_text(exc)}", exit_code=2) from None


def _rule_line(rule: Rule) -> str:
    parts = [rule.effect.value]
    if rule.engineer_roles is not None:
        parts.append("roles " + ",".join(sorted(rule.engineer_roles)))
    if rule.engineer_groups is not None:
        parts.append("groups " + ",".join(sorted(rule.engineer_groups)))
    if rule.device_labels:
        parts.append(
            "labels "
            + ",".join(
                f"{k}={'|'.join(sorted(v))}"
                for k, v in sorted(rule.device_labels.items())
            )
        )
    if rule.windows:
        parts.append("windows " + "; ".join(str(w) for w in rule.windows))
    if rule.effect is Effect.ALLOW:
        parts.append(f"channels {rule.channels}")
        if rule.max_session_seconds is not None:
            parts.append(f"cap {rule.max_session_seconds} s")
    return _text(f"{rule.name} ({rule.source}): " + "; ".join(parts))


def cmd_policy_check(args: argparse.Namespace) -> int:
    """``relay policy check DIR``: exit 0 loads, 2 does not (the error says where)."""
    directory: Path = args.dir
    policy = _load(directory)
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(directory),
                    "files": list(policy.files),
                    "rules": [r.name for r in policy.rules],
                    "digest": policy.digest,
                }
            )
        )
        return 0
    print(
        f"{_text(directory)}: {len(policy.files)} file(s), {len(policy.rules)} rule(s), "
        f"sha256 {policy.digest}"
    )
    for rule in policy.rules:
        print(f"  {_rule_line(rule)}")
    if not policy.rules:
        print("  no rules: every session request would be refused (default deny)")
    return 0


def cmd_policy_explain(
    args: argparse.Namespace,
    config: BrokerConfig,
    open_store: Callable[[BrokerConfig], AbstractContextManager[Store]],
) -> int:
    """``relay policy explain``: the decision the broker would make, and why."""
    directory = args.policy if args.policy is not None else policy_dir(config.policy)
    policy = _load(directory)
    with open_store(config) as store:
        user = store.get_user(args.engineer)
        if user is None:
            raise CLIError(f"unknown user {args.engineer!r}")
        enrolled = store.device_enrolled(args.device)
        labels = store.device_labels(args.device)
    if not enrolled:
        raise CLIError(f"unknown device {args.device!r}")
    at = args.at if args.at is not None else datetime.now(UTC)
    request = AccessRequest(
        engineer=Engineer(user.username, user.role, frozenset(user.groups)),
        device=Device(args.device, labels),
        channels=tuple(args.channel or ()),
        reason=args.reason,
        at=at,
    )
    decision = decide(policy, request, ceiling_of(config))
    if args.json:
        print(json.dumps(_explanation(policy, request, decision, directory)))
        return 0 if decision.allowed else 1
    _print_explanation(policy, request, decision, directory)
    return 0 if decision.allowed else 1


def _explanation(
    policy: Policy, request: AccessRequest, decision: Decision, directory: Path
) -> dict[str, Any]:
    engineer, device = request.engineer, request.device
    return {
        "policy": {"directory": str(directory), "digest": policy.digest},
        "engineer": {
            "name": engineer.name,
            "role": engineer.role,
            "groups": sorted(engineer.groups),
        },
        "device": {"device_id": device.device_id, "labels": dict(device.labels)},
        "channels": list(request.channels),
        "at": request.at.isoformat(),
        "decision": decision.as_record(),
        "not_applied": {
            rule.name: why
            for rule in policy.rules
            if (why := rule.mismatch(engineer, device)) is not None
        },
    }


def _print_explanation(
    policy: Policy, request: AccessRequest, decision: Decision, directory: Path
) -> None:
    engineer, device = request.engineer, request.device
    if decision.allowed:
        print("decision: allowed")
    else:
        print(f"decision: refused ({decision.code}): {_text(decision.message)}")
    groups = ", ".join(sorted(engineer.groups)) or "none"
    labels = ", ".join(f"{k}={v}" for k, v in sorted(device.labels.items())) or "none"
    print(_text(f"engineer: {engineer.name} (role {engineer.role}; groups {groups})"))
    print(_text(f"device:   {device.device_id} (labels {labels})"))
    print(f"channels: {', '.join(request.channels) or '(none asked for)'}")
    print(f"at:       {request.at.isoformat()}")
    print(_text(f"policy:   {directory} (sha256 {policy.digest[:16]}...)"))
    applied = [r for r in policy.rules if r.name in decision.rules]
    print("rules that applied:" if applied else "rules that applied: none")
    for rule in applied:
        print(f"  {_rule_line(rule)}")
    others = [
        (rule, why)
        for rule in policy.rules
        if (why := rule.mismatch(engineer, device)) is not None
    ]
    if others:
        print("rules that did not apply:")
        for rule, why in others:
            print(_text(f"  {rule.name} ({rule.source}): {why}"))
    limits = decision.limits
    if limits is None:
        return
    print("limits:")
    print(f"  channels:            {limits.channels}")
    print(f"  session cap:         {limits.max_session_seconds} s")
    print(f"  grant timeout:       {limits.grant_timeout_s:g} s")
    reason = "required" if limits.reason_required else "optional"
    if limits.reason_patterns:
        reason += ", must match " + " and ".join(limits.reason_patterns)
    print(_text(f"  reason:              {reason}"))
    most = limits.max_concurrent_sessions
    print(f"  sessions at once:    {most if most is not None else 'no policy limit'}")
    print(f"  auditors may watch:  {'yes' if limits.auditors_may_watch else 'no'}")
    if limits.window_ends_at is not None:
        print(f"  window ends at:      {limits.window_ends_at.isoformat()}")
