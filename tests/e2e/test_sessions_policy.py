"""Access policies enforced by a running broker, end to end over real TLS.

The broker loads a policy directory the test writes; the device is the
scripted fake of test_sessions_broker.py. Reload and recheck intervals are
0.2 s (the defaults are 2 s and 1 s; the budget for a live session to end
after a change is 5 s).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from policies import PolicyError
from relay._trio.broker import serve_broker
from relay.audit_reader import read_records
from relay.config import PolicyConfig
from relay.pki_files import DataDir
from relay.proto import control, tunnel
from tests.e2e.conftest import PKI, wait_until
from tests.e2e.test_sessions_broker import (
    DEVICE,
    Harness,
    active_session,
    attach,
    device_closed,
    engineer_closed,
    fake_device,
    harness,
    open_tunnel,
    status,
)

pytestmark = pytest.mark.slow

ACME_ONLY = """
[[rule]]
name = "acme-service"
description = "Engineers on ACME instruments"
engineer_roles = ["engineer"]
device_labels = { customer = "acme" }
channels = ["shell", "tcp:22"]
max_session_seconds = 120
grant_timeout_s = 4
"""

SHELL_ONLY = """
[[rule]]
name = "shell-only"
engineer_roles = ["engineer"]
channels = ["shell"]
"""

SHELL_AND_SSH = """
[[rule]]
name = "field"
engineer_roles = ["engineer"]
channels = ["shell", "tcp:22"]
"""

NOBODY = """
[[rule]]
name = "admins-only"
engineer_roles = ["admin"]
channels = ["shell"]
"""


def _policy_dir(tmp_path: Path, text: str) -> PolicyConfig:
    directory = tmp_path / "policy"
    directory.mkdir(exist_ok=True)
    (directory / "10-rules.toml").write_text(text)
    return PolicyConfig(dir=directory, reload_poll_s=0.2, recheck_s=0.2)


def _rewrite(config: PolicyConfig, text: str) -> None:
    """Replace the rules, with a modification time the poll cannot miss."""
    assert config.dir is not None
    path = config.dir / "10-rules.toml"
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def _label(h: Harness, **labels: str) -> None:
    with h.pki.store() as store:
        store.set_device_labels(DEVICE, set=labels, remove=(), at=datetime.now(UTC))


def _events(h: Harness, event: str) -> list[dict[str, Any]]:
    audit_dir = DataDir(h.broker.config.data_dir).audit_dir
    return [r for r in read_records(audit_dir) if r.get("event") == event]


async def test_a_request_is_decided_by_the_policy_and_the_decision_audited(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """No rule for an unlabelled device: 403 naming why; labelled, the rule's
    limits go into the offer; both decisions are in the audit log."""
    policy = _policy_dir(tmp_path, ACME_ONLY)
    async with (
        harness(pki, nursery, policy=policy, max_session_seconds=600) as h,
        fake_device(h) as device,
    ):
        refused = await h.request(channels=["shell"])
        assert refused.status_code == 403
        assert (
            refused.json()["error"]
            == f"no rule allows alice (engineer) a session on {DEVICE}"
        )
        [record] = _events(h, "session.refused")
        assert record["policy_allowed"] is False
        assert record["policy_code"] == "no_matching_rule"
        assert record["policy_rules"] == []
        assert (
            h.broker.sample("relay_policy_decisions_total", outcome="no_matching_rule")
            == 1
        )

        _label(h, customer="acme")
        api_devices = await h.api.get("/api/v1/devices", headers=h.headers())
        assert api_devices.json()[0]["labels"] == {"customer": "acme"}
        created = await h.request(channels=["shell"])
        assert created.status_code == 201, created.text
        offer = await device.next_event()
        assert isinstance(offer, control.Offer)
        assert list(offer.channels) == ["shell"]
        assert offer.max_seconds == 120  # the rule's cap, under the config's 600
        [requested] = _events(h, "session.requested")
        assert requested["policy_allowed"] is True
        assert requested["policy_rules"] == ["acme-service"]
        assert requested["policy_cap_s"] == 120
        assert requested["policy_grant_timeout_ms"] == 4000
        assert requested["policy_channels"] == ["shell", "tcp:22"]
        [loaded] = _events(h, "policy.loaded")
        assert requested["policy_digest"] == loaded["digest"]
        assert loaded["rules"] == 1
        assert loaded["files"] == ["10-rules.toml"]


async def test_a_channel_off_the_policy_is_refused_at_the_request_and_on_the_tunnel(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """tcp:22 is not in the policy: refused at the request; an OPEN of it on a
    shell-only session never reaches the device, which would have accepted it."""
    policy = _policy_dir(tmp_path, SHELL_ONLY)
    async with harness(pki, nursery, policy=policy) as h, fake_device(h) as device:
        refused = await h.request(channels=["shell", "tcp:22"])
        assert refused.status_code == 403
        assert refused.json()["error"].startswith("channel not allowed: tcp:22")
        created = await h.request(channels=["shell"])
        assert created.status_code == 201
        offer = await device.next_event()
        assert isinstance(offer, control.Offer)
        assert list(offer.channels) == ["shell"]
        await device.send(device.grant(offer))
        await wait_until(
            lambda: h.sessions.view(offer.session_id)["state"] == "granted"  # type: ignore[index]
        )
        async with (
            open_tunnel(h, device, offer.session_id) as tun,
            attach(h, offer.session_id) as eng,
        ):
            assert (await status(eng))["state"] == "active"
            await eng.send_message(
                tunnel.encode(tunnel.StreamOpen(stream_id=1, channel="tcp:22"))
            )
            await engineer_closed(eng)
            closed = await device_closed(tun)
            assert closed.code == 4005
        await h.assert_clean()


async def test_a_reload_that_takes_the_permission_away_ends_the_live_session(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A policy change on disk is loaded and the session it no longer allows
    ends with policy_revoked within the 5 s budget, on both sides."""
    policy = _policy_dir(tmp_path, SHELL_AND_SSH)
    async with harness(pki, nursery, policy=policy) as h, fake_device(h) as device:
        async with active_session(h, device) as (offer, tun, eng):
            pass_offer = offer
            _rewrite(policy, SHELL_AND_SSH.replace('"tcp:22"]', '"tcp:*"]'))
            await wait_until(
                lambda: (
                    h.broker.sample("relay_policy_reloads_total", outcome="reloaded")
                    == 1
                )
            )
            # Still allowed (it allows more now): the session goes on.
            await trio.sleep(0.5)
            assert h.sessions.view(offer.session_id)["state"] == "active"  # type: ignore[index]
            started = trio.current_time()
            _rewrite(policy, NOBODY)
            _, reason = await engineer_closed(eng, within_s=5)
            assert trio.current_time() - started <= 5
            assert reason.reason == "policy_revoked"
            end = await device.next_event()
            assert isinstance(end, control.SessionEnd)
            assert end.reason == "policy_revoked"
            await device_closed(tun)
        await h.assert_clean()
        [revoked] = _events(h, "session.policy_revoked")
        assert revoked["session_id"] == pass_offer.session_id
        assert revoked["change"] == "policy_reload"
        assert revoked["policy_code"] == "no_matching_rule"
        assert len(_events(h, "policy.loaded")) == 3
        assert h.broker.sample("relay_session_ends_total", reason="policy_revoked") == 1


async def test_a_label_change_ends_the_live_session(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Taking the label away (as `relay device label --remove` does, from
    another process) ends the session it allowed within 5 s."""
    policy = _policy_dir(tmp_path, ACME_ONLY)
    async with harness(pki, nursery, policy=policy) as h, fake_device(h) as device:
        _label(h, customer="acme")
        async with active_session(h, device) as (_offer, _tun, eng):
            started = trio.current_time()
            with h.pki.store() as store:
                store.set_device_labels(
                    DEVICE, set={"customer": "other"}, remove=(), at=datetime.now(UTC)
                )
            _, reason = await engineer_closed(eng, within_s=5)
            assert reason.reason == "policy_revoked"
            assert trio.current_time() - started <= 5
        [revoked] = _events(h, "session.policy_revoked")
        assert revoked["change"] == "labels_or_groups"


async def test_a_reload_that_does_not_load_keeps_the_policy_in_use(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A broken file is refused with file, rule and key; the live session and
    the decisions go on under the policy that was loaded."""
    policy = _policy_dir(tmp_path, SHELL_AND_SSH)
    async with harness(pki, nursery, policy=policy) as h, fake_device(h) as device:
        async with active_session(h, device) as (offer, _tun, _eng):
            _rewrite(policy, SHELL_AND_SSH + "max_session_seconds = 3601\n")
            await wait_until(
                lambda: (
                    h.broker.sample("relay_policy_reloads_total", outcome="refused")
                    == 1
                )
            )
            [failed] = _events(h, "policy.reload_failed")
            assert (failed["file"], failed["rule"], failed["key"]) == (
                "10-rules.toml",
                "field",
                "max_session_seconds",
            )
            await trio.sleep(0.5)
            assert h.sessions.view(offer.session_id)["state"] == "active"  # type: ignore[index]
        assert h.broker.sample("relay_policy_rules") == 1


async def test_a_broker_with_a_policy_that_does_not_load_does_not_start(
    pki: PKI, tmp_path: Path
) -> None:
    """The error names the file, the rule and the key; nothing listens."""
    policy = _policy_dir(tmp_path, '[[rule]]\nname = "x"\nchannels = ["udp:53"]\n')
    config = dataclasses.replace(pki.config, policy=policy)
    with pytest.raises(PolicyError) as info:
        await serve_broker(config, trio.Event())
    assert (info.value.file, info.value.rule, info.value.key) == (
        "10-rules.toml",
        "x",
        "channels",
    )
