"""Who sees which instrument, through a real broker (TLS, the engineer listener
as ``relay serve`` builds it): customers see their organisation's instruments
only, and never hold remote sessions.

The finer cases (every role, every route, the policy's reach) are in
tests/relay/_trio/test_feed_api.py; this checks that the broker wires them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pyotp

import auth
from relay.pki_files import DataDir, load_or_create_sealing_key
from relay.users import create_user
from tests.e2e.conftest import PKI, RunningBroker, add_engineer, login_token

PASSWORD = "correct horse battery"  # noqa: S105 - test account


def _add_customer(pki: PKI, username: str, organisation: str) -> str:
    """A customer of *organisation* (as ``relay user add --role customer``);
    returns its TOTP secret."""
    key, _origin = load_or_create_sealing_key(DataDir(pki.data_dir), None)
    with pki.store() as store:
        new_user = create_user(
            store,
            auth.PasswordHasher(),
            auth.SecretSealer(key),
            username=username,
            role="customer",
            password=PASSWORD,
            now=datetime.now(UTC),
            organisation=organisation,
        )
    secret: str = pyotp.parse_uri(new_user.otpauth_uri).secret
    return secret


def _labelled(pki: PKI, device_id: str, customer: str) -> None:
    pki.enroll(device_id)
    with pki.store() as store:
        store.set_device_labels(
            device_id, set={"customer": customer}, remove=(), at=datetime.now(UTC)
        )


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_customer_sees_only_its_organisations_devices(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """The device list shows a customer its own instrument only; the other
    organisation's answers 404 on every monitoring route, exactly as an unknown
    one; an engineer (the shipped policy: every instrument) sees both."""
    _labelled(pki, "acme-1", "ACME")
    _labelled(pki, "globex-1", "Globex")
    customer = await login_token(client, "carla", _add_customer(pki, "carla", "ACME"))
    engineer = await login_token(client, "eve", add_engineer(pki, "eve"))

    listed = await client.get("/api/v1/devices", headers=_bearer(customer))
    assert listed.status_code == 200
    assert [d["device_id"] for d in listed.json()] == ["acme-1"]
    listed = await client.get("/api/v1/devices", headers=_bearer(engineer))
    assert [d["device_id"] for d in listed.json()] == ["acme-1", "globex-1"]

    own = await client.get("/api/v1/devices/acme-1/alarms", headers=_bearer(customer))
    assert own.status_code == 200
    assert own.json() == {"device_id": "acme-1", "alarms": []}
    for device_id in ("globex-1", "nowhere-1"):
        for path in ("alarms", "snapshots", "sessions", "exports/alarms"):
            hidden = await client.get(
                f"/api/v1/devices/{device_id}/{path}", headers=_bearer(customer)
            )
            assert (hidden.status_code, hidden.json()) == (
                404,
                {"error": "unknown device"},
            ), (device_id, path)
        asked = await client.post(
            f"/api/v1/devices/{device_id}/data-requests",
            json={"kind": "configuration", "reason": "curious"},
            headers=_bearer(customer),
        )
        assert (asked.status_code, asked.json()) == (404, {"error": "unknown device"})


async def test_a_customer_may_not_request_a_remote_session(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """POST /api/v1/sessions as a customer, even for its own instrument, is 403
    and counted as forbidden."""
    _labelled(pki, "acme-1", "ACME")
    customer = await login_token(client, "carla", _add_customer(pki, "carla", "ACME"))
    refused = await client.post(
        "/api/v1/sessions",
        json={"device_id": "acme-1", "reason": "look", "channels": ["shell"]},
        headers=_bearer(customer),
    )
    assert (refused.status_code, refused.json()) == (403, {"error": "forbidden"})
    assert broker.sample("relay_auth_forbidden_total") == 1
