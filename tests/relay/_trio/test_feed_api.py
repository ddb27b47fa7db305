"""The monitoring routes and who sees which instrument (relay._trio.feed_api).

The engineer listener's routes (``api_routes`` with the store, a policy and a
fake data requester) in-process over httpx's ASGI transport, on a SQLite store
in ``tmp_path``. Users are logged in by creating their login session in the
store, so the tests need no password hashing and no TOTP.

The instruments: ``acme-1`` (``customer=ACME``, ``team=eu``), ``globex-1``
(``customer=Globex``) and ``lab-1`` (no labels). The users: an admin, an
auditor, two customers (ACME and Globex), an engineer in group ``eu`` and one
in no group. The policy lets group ``eu`` reach instruments labelled
``team=eu``, denies everybody ``globex-1`` in a nightly window (which hides
nothing), and has nothing else.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import auth
from policies import Device, Engineer, Policy, load_policy_files
from relay import simulated_instrument as instrument
from relay._trio.device_feed import DeviceFeed
from relay._trio.engineer_api import api_routes, guarded_route
from relay._trio.engineer_sockets import EngineerSockets
from relay._trio.engineer_ws import events_handler
from relay._trio.enrollment_api import Enroller
from relay._trio.feed_api import (
    DeviceVisibility,
    csv_cell,
    export_csv,
    policy_reaches,
)
from relay._trio.feed_requests import DataRequestUnavailable
from relay._trio.login_service import LoginService, Principal
from relay.api_contract import (
    ALL_ROLES,
    EVENTS_PATH,
    ROUTE_ROLES,
    SESSION_ATTACH_PATH,
    SESSION_PATH,
    SESSIONS_PATH,
    WEBSOCKET_ROLES,
)
from relay.config import EngineerAuthConfig, EngineerListenerConfig, PKIConfig
from relay.metrics import RelayMetrics
from relay.proto import feed
from relay.store import (
    DataRequestRow,
    FeedRow,
    RemoteSessionRecord,
    Store,
    StoreError,
)

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
POLICY = b"""
[[rule]]
name = "eu-team"
engineer_roles = ["engineer", "admin"]
engineer_groups = ["eu"]
device_labels = { team = "eu" }
channels = ["shell", "tcp:443"]
windows = [{ days = ["mon-fri"], from = "08:00", to = "18:00", timezone = "Europe/Paris" }]

[[rule]]
name = "no-globex-at-night"
effect = "deny"
device_labels = { customer = "Globex" }
windows = [{ days = ["mon-sun"], from = "00:00", to = "06:00" }]
"""

USERS = {
    "ada": ("admin", None),
    "audrey": ("auditor", None),
    "carla": ("customer", "ACME"),
    "gus": ("customer", "Globex"),
    "eve": ("engineer", None),
    "nils": ("engineer", None),
}
DEVICES = {
    "acme-1": {"customer": "ACME", "team": "eu"},
    "globex-1": {"customer": "Globex"},
    "lab-1": {},
}
#: Who sees which instrument (the decision this module documents).
SEES = {
    "ada": {"acme-1", "globex-1", "lab-1"},
    "audrey": {"acme-1", "globex-1", "lab-1"},
    "carla": {"acme-1"},
    "gus": {"globex-1"},
    "eve": {"acme-1"},
    "nils": set(),
}
MONITORING_GETS = (
    "alarms",
    "daily-stats",
    "snapshots",
    "sessions",
    "exports/alarms",
    "exports/daily-stats?format=json",
)


class RecordingLog:
    """A structured logger that keeps every event (the audit ones too)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.events.append({"event": event, "level": level, **fields})

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._add("debug", event, **fields)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


@dataclass
class FakeRequester:
    """The broker's DataRequester, as far as the routes use it."""

    store: Store
    unavailable: str | None = None
    calls: list[dict[str, str]] = field(default_factory=list)

    async def request(
        self,
        *,
        device_id: str,
        kind: str,
        username: str,
        role_text: str,
        reason: str,
        source: str,
    ) -> DataRequestRow:
        self.calls.append(
            {
                "device_id": device_id,
                "kind": kind,
                "username": username,
                "role_text": role_text,
                "reason": reason,
            }
        )
        if self.unavailable is not None:
            raise DataRequestUnavailable(self.unavailable, "not now")
        return self.store.create_data_request(
            request_id=f"{len(self.calls):032x}",
            device_id=device_id,
            kind=kind,
            requested_by=username,
            reason=reason,
            at=datetime.now(UTC),
        )


@dataclass
class FixedPolicy:
    """The policy gate, as far as visibility reads it."""

    policy: Policy


@dataclass
class World:
    store: Store
    client: httpx.AsyncClient
    tokens: dict[str, str]
    log: RecordingLog
    requester: FakeRequester

    async def get(self, who: str, path: str) -> httpx.Response:
        return await self.client.get(
            path, headers={"Authorization": f"Bearer {self.tokens[who]}"}
        )

    async def post(self, who: str, path: str, body: Any) -> httpx.Response:
        return await self.client.post(
            path, json=body, headers={"Authorization": f"Bearer {self.tokens[who]}"}
        )


def _rng(seed: int) -> random.Random:
    """A seeded generator for test data."""
    return random.Random(seed)  # noqa: S311 - test data, not secrets


def _enroll(store: Store, device_id: str, serial: int) -> None:
    store.record_enrollment(
        device_id=device_id,
        serial_hex=f"{serial:x}",
        fingerprint_sha256=f"{serial:064x}",
        not_before=T0 - timedelta(days=30),
        not_after=T0 + timedelta(days=365),
        issued_at=T0 - timedelta(days=30),
    )


def _login(store: Store, username: str) -> str:
    token = auth.new_token()
    store.create_login_session(
        token_hash=auth.token_hash(token),
        username=username,
        at=datetime.now(UTC),
        source="127.0.0.1",
        totp_secret_sealed=f"sealed-{username}",
    )
    return token


def put(
    store: Store,
    device_id: str,
    record: feed.Record,
    *,
    request_id: str | None = None,
    received_at: datetime | None = None,
) -> str:
    """Store *record* as the broker's intake would; return its record id."""
    record_id = f"r{random.getrandbits(64):016x}"
    assert store.add_feed_record(
        device_id,
        record,
        record_id=record_id,
        request_id=request_id,
        received_at=received_at or datetime.now(UTC),
    )
    return record_id


def _session(store: Store, device_id: str, engineer: str, at: datetime) -> str:
    session_id = f"{random.getrandbits(128):032x}"
    store.record_session_request(
        RemoteSessionRecord(
            session_id=session_id,
            node_id="node-a",
            device_id=device_id,
            engineer=engineer,
            reason="ticket 4711: conductivity alarm",
            channels=("shell",),
            source="192.0.2.10",
            device_fingerprint="ab" * 32,
            requested_at=at,
            start_seq=1,
        )
    )
    store.record_session_grant(
        session_id,
        at=at + timedelta(seconds=20),
        decided_by="on-site user",
        channels=("shell",),
        max_seconds=3600,
    )
    store.record_session_end(
        session_id,
        at=at + timedelta(minutes=12),
        reason="engineer",
        bytes_to_device=100,
        bytes_from_device=2000,
    )
    return session_id


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'relay.sqlite3'}")
    try:
        for serial, (device_id, labels) in enumerate(DEVICES.items(), start=1):
            _enroll(opened, device_id, serial)
            if labels:
                opened.set_device_labels(device_id, set=labels, remove=(), at=T0)
        for username, (role, organisation) in USERS.items():
            opened.add_user(
                username=username,
                role=role,
                password_hash=f"$argon2id$hash-of-{username}",
                totp_secret_sealed=f"sealed-{username}",
                at=T0,
                organisation=organisation,
            )
        opened.set_user_groups("eve", add={"eu"}, remove=(), at=T0)
        yield opened
    finally:
        opened.close()


def _app(store: Store, log: RecordingLog, requester: FakeRequester) -> Starlette:
    metrics = RelayMetrics()
    now = lambda: datetime.now(UTC)  # noqa: E731 - a clock, named for reading
    service = LoginService(
        store=store,
        hasher=auth.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1),
        sealer=auth.SecretSealer(auth.generate_sealing_key()),
        config=EngineerAuthConfig(),
        metrics=metrics,
        log=log,
        wall_clock=now,
    )
    config = EngineerListenerConfig()
    sockets = EngineerSockets(
        login=service,
        store=store,
        config=config,
        metrics=metrics,
        log=log,
        wall_clock=now,
    )

    async def no_devices() -> list[dict[str, Any]]:
        return []

    routes = api_routes(
        service,
        banner=lambda: {"service": "remote-care-relay", "version": "test"},
        presence_stale_after=timedelta(seconds=90),
        sockets=sockets,
        device_feed=DeviceFeed(
            read=no_devices, interval_s=1.0, metrics=metrics, log=log
        ),
        origins=lambda: auth.OriginAllowList(()),
        websocket_send_timeout_s=1.0,
        enroller=Enroller(
            ca=None,
            store=store,
            config=PKIConfig(),
            metrics=metrics,
            log=log,
            wall_clock=now,
        ),
        store=store,
        policy=FixedPolicy(load_policy_files({"test.toml": POLICY})),
        data_requester=requester,
    )

    async def fake_sessions(_request: Request, _principal: Principal) -> Response:
        return JSONResponse({"session_id": "0" * 32, "state": "pending"}, 201)

    # The session routes' role check, with a stand-in for the session broker.
    routes.append(
        guarded_route(
            service,
            lambda: auth.OriginAllowList(()),
            "POST",
            SESSIONS_PATH,
            fake_sessions,
        )
    )
    return Starlette(routes=routes)


@pytest.fixture
async def world(store: Store) -> AsyncIterator[World]:
    log = RecordingLog()
    requester = FakeRequester(store)
    transport = httpx.ASGITransport(app=_app(store, log, requester))
    async with httpx.AsyncClient(
        transport=transport, base_url="https://relay.test"
    ) as client:
        yield World(
            store=store,
            client=client,
            tokens={name: _login(store, name) for name in USERS},
            log=log,
            requester=requester,
        )


# --- who sees what ----------------------------------------------------------------


@pytest.mark.parametrize("who", sorted(USERS))
async def test_device_list_shows_each_role_what_it_may_see(
    world: World, who: str
) -> None:
    """GET /api/v1/devices lists exactly the instruments the user may see."""
    response = await world.get(who, "/api/v1/devices")
    assert response.status_code == 200, response.text
    assert {d["device_id"] for d in response.json()} == SEES[who]


@pytest.mark.parametrize("who", sorted(USERS))
@pytest.mark.parametrize("device_id", sorted(DEVICES))
async def test_monitoring_routes_answer_404_for_a_device_the_user_may_not_see(
    world: World, who: str, device_id: str
) -> None:
    """Every monitoring route answers 200 for a visible instrument and exactly
    the unknown-device 404 otherwise."""
    for route in MONITORING_GETS:
        response = await world.get(who, f"/api/v1/devices/{device_id}/{route}")
        if device_id in SEES[who]:
            assert response.status_code == 200, (route, response.text)
        else:
            assert response.status_code == 404, (route, response.text)
            assert response.json() == {"error": "unknown device"}


async def test_a_hidden_device_answers_like_an_unknown_one(world: World) -> None:
    """No existence oracle: another organisation's instrument, an unknown id and
    an id of the wrong form get the same status and body, for every method,
    even with a bad query or a bad body."""
    answers = set()
    for device_id in ("globex-1", "nowhere-9", "bad%20id"):
        for method, route, body in (
            ("GET", "alarms?limit=0", None),
            ("GET", "exports/alarms?format=xlsx", None),
            ("GET", "data-requests/" + "0" * 32, None),
            ("POST", "data-requests", {"kind": "configuration", "reason": "x"}),
            ("POST", "data-requests", {"kind": "firmware"}),
        ):
            path = f"/api/v1/devices/{device_id}/{route}"
            if method == "GET":
                response = await world.get("carla", path)
            else:
                response = await world.post("carla", path, body)
            answers.add((response.status_code, response.text))
    assert answers == {(404, '{"error":"unknown device"}')}
    assert world.requester.calls == []


async def test_a_customer_moved_to_another_organisation_sees_its_devices(
    world: World,
) -> None:
    """Visibility reads the user's row on every request: ``relay user set
    --organisation`` takes effect at once."""
    world.store.set_user_organisation("carla", "Globex", at=datetime.now(UTC))
    response = await world.get("carla", "/api/v1/devices")
    assert {d["device_id"] for d in response.json()} == {"globex-1"}
    response = await world.get("carla", "/api/v1/devices/acme-1/alarms")
    assert response.status_code == 404


def test_policy_reaches_ignores_time_windows_but_not_unwindowed_denials() -> None:
    """An allow rule with windows makes the device visible at any time; a deny
    rule without windows hides it; no allow rule, or allow rules whose channels
    leave nothing, hide it too."""
    engineer = Engineer("eve", "engineer", frozenset({"eu"}))
    eu = Device("d", {"team": "eu"})
    policy = load_policy_files({"p.toml": POLICY})
    assert policy_reaches(policy, engineer, eu)
    assert not policy_reaches(policy, Engineer("nils", "engineer"), eu)
    assert not policy_reaches(policy, engineer, Device("d", {}))
    hidden = load_policy_files(
        {
            "p.toml": POLICY
            + b'\n[[rule]]\nname = "never"\neffect = "deny"\n'
            + b'device_labels = { team = "eu" }\n'
        }
    )
    assert not policy_reaches(hidden, engineer, eu)
    disjoint = load_policy_files(
        {
            "p.toml": POLICY
            + b'\n[[rule]]\nname = "ssh-only"\nchannels = ["tcp:22"]\n'
            + b'engineer_groups = ["eu"]\n'
        }
    )
    assert not policy_reaches(disjoint, engineer, eu)


def test_customers_may_not_hold_remote_sessions_by_route_roles() -> None:
    """The session routes and the attach socket allow engineers and admins only;
    every route of the contract knows the customer role."""
    for route in (("POST", SESSIONS_PATH), ("GET", SESSION_PATH)):
        assert "customer" not in ROUTE_ROLES[route]
    assert "customer" not in WEBSOCKET_ROLES[SESSION_ATTACH_PATH]
    assert WEBSOCKET_ROLES[EVENTS_PATH] == ALL_ROLES
    assert "customer" in ALL_ROLES


async def test_a_customer_requesting_a_remote_session_gets_403(world: World) -> None:
    """POST /api/v1/sessions as a customer is 403 (and audited as forbidden),
    while an engineer reaches the handler."""
    body = {"device_id": "acme-1", "reason": "look", "channels": ["shell"]}
    response = await world.post("carla", SESSIONS_PATH, body)
    assert response.status_code == 403
    assert response.json() == {"error": "forbidden"}
    response = await world.post("eve", SESSIONS_PATH, body)
    assert response.status_code == 201


async def test_events_feed_sends_each_socket_only_visible_devices(
    store: Store,
) -> None:
    """The live feed's handler filters the shared list per socket: a customer's
    console never receives another organisation's instrument."""
    metrics = RelayMetrics()
    listed = [
        {"device_id": d, "online": True, "revoked": False, "labels": labels}
        for d, labels in DEVICES.items()
    ]

    async def read() -> list[dict[str, Any]]:
        return listed

    device_feed = DeviceFeed(read=read, interval_s=1.0, metrics=metrics, log=None)
    visibility = DeviceVisibility(
        store=store, policy=FixedPolicy(load_policy_files({"p.toml": POLICY}))
    )
    handler = events_handler(device_feed, send_timeout_s=1.0, select=visibility.filter)

    class Socket:
        def __init__(self) -> None:
            self.sent: list[str] = []
            self.got_one = trio.Event()

        async def send_text(self, text: str) -> None:
            self.sent.append(text)
            self.got_one.set()

        async def receive(self) -> dict[str, Any]:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    principal = Principal(
        username="carla", role="customer", token_hash="0" * 64, created_at=T0
    )
    socket = Socket()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device_feed.run)
            nursery.start_soon(handler, cast(Any, socket), principal, cast(Any, None))
            await socket.got_one.wait()
            nursery.cancel_scope.cancel()
    [text] = socket.sent
    assert '"acme-1"' in text
    assert "globex" not in text
    assert "lab-1" not in text


async def test_events_feed_closes_when_the_store_cannot_say_who_sees_what(
    store: Store,
) -> None:
    """No list without its filter: a store failure closes the socket with 1013
    and nothing is sent."""
    metrics = RelayMetrics()

    async def read() -> list[dict[str, Any]]:
        return [{"device_id": "acme-1", "labels": {"customer": "ACME"}}]

    class BrokenStore:
        def get_user(self, username: str) -> None:
            raise StoreError("database is locked")

    device_feed = DeviceFeed(read=read, interval_s=1.0, metrics=metrics, log=None)
    visibility = DeviceVisibility(store=cast(Any, BrokenStore()), policy=None)
    handler = events_handler(device_feed, send_timeout_s=1.0, select=visibility.filter)
    sent: list[str] = []

    class Socket:
        async def send_text(self, text: str) -> None:
            sent.append(text)

        async def receive(self) -> dict[str, Any]:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    principal = Principal(
        username="carla", role="customer", token_hash="0" * 64, created_at=T0
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device_feed.run)
            close = await handler(cast(Any, Socket()), principal, cast(Any, None))
            nursery.cancel_scope.cancel()
    assert close == (1013, "store unavailable")
    assert sent == []


# --- alarms, statistics, snapshots ----------------------------------------------------


async def test_alarms_newest_first_with_range_and_limit(world: World) -> None:
    """Alarms come newest first; since/until select by the instrument's time and
    limit keeps the newest N."""
    rng = _rng(4711)
    times = [T0 + timedelta(hours=h) for h in range(6)]
    for at in times:
        put(world.store, "acme-1", instrument.random_alarm(at, rng))
    response = await world.get("carla", "/api/v1/devices/acme-1/alarms")
    alarms = response.json()["alarms"]
    assert len(alarms) == 6
    stamps = [datetime.fromisoformat(a["device_time"]) for a in alarms]
    assert stamps == sorted(stamps, reverse=True)
    assert {"code", "severity", "text", "state", "record_id", "received_at"} <= set(
        alarms[0]
    )
    since = (T0 + timedelta(hours=1)).isoformat()
    until = (T0 + timedelta(hours=4)).isoformat()
    response = await world.client.get(
        "/api/v1/devices/acme-1/alarms",
        params={"since": since, "until": until, "limit": "2"},
        headers={"Authorization": f"Bearer {world.tokens['carla']}"},
    )
    got = [datetime.fromisoformat(a["device_time"]) for a in response.json()["alarms"]]
    assert got == [T0 + timedelta(hours=3), T0 + timedelta(hours=2)]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=1&limit=2", "limit"),
        ("since=yesterday", "since"),
        ("since=2026-11-20T12:00:00", "since"),
        ("since=2026-11-21T00:00:00Z&until=2026-11-20T00:00:00Z", "until"),
        ("colour=red", "colour"),
    ],
)
async def test_bad_query_parameters_are_400_naming_them(
    world: World, query: str, named: str
) -> None:
    """A parameter of the wrong form, given twice, or unknown is 400 naming it."""
    response = await world.get("ada", f"/api/v1/devices/acme-1/alarms?{query}")
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"bad {named}:")


async def test_bad_export_and_snapshot_queries_are_400(world: World) -> None:
    """An export format that is not csv or json, a limit on an export, and any
    parameter on the snapshots are 400; an unknown data set is 404."""
    base = "/api/v1/devices/acme-1"
    for path in (
        f"{base}/exports/alarms?format=xlsx",
        f"{base}/exports/alarms?limit=5",
        f"{base}/snapshots?x=1",
    ):
        response = await world.get("ada", path)
        assert response.status_code == 400, path
    response = await world.get("ada", f"{base}/exports/configuration")
    assert response.status_code == 404


async def test_daily_stats_oldest_first_from_the_simulated_instrument(
    world: World,
) -> None:
    """Daily statistics come oldest first, each with its named values and units."""
    for stats in instrument.daily_stats_history(date(2026, 11, 19), 14, _rng(1)):
        put(world.store, "acme-1", stats)
    response = await world.get("eve", "/api/v1/devices/acme-1/daily-stats")
    days = response.json()["daily_stats"]
    assert [d["day"] for d in days] == sorted(d["day"] for d in days)
    assert len(days) == 14
    names = {v["name"]: v["unit"] for v in days[0]["values"]}
    assert names["volume_dispensed"] == "L"


async def test_snapshots_show_the_last_configuration_and_consumables(
    world: World,
) -> None:
    """The snapshots route has the last record of each request-only kind (null
    when none) and the newest data requests."""
    response = await world.get("carla", "/api/v1/devices/acme-1/snapshots")
    assert response.json() == {
        "device_id": "acme-1",
        "configuration": None,
        "consumables": None,
        "data_requests": [],
    }
    row = await world.requester.request(
        device_id="acme-1",
        kind="configuration",
        username="carla",
        role_text="customer",
        reason="",
        source="x",
    )
    put(
        world.store,
        "acme-1",
        instrument.configuration_snapshot(T0),
        request_id=row.request_id,
    )
    answer = (await world.get("carla", "/api/v1/devices/acme-1/snapshots")).json()
    assert answer["consumables"] is None
    assert answer["configuration"]["request_id"] == row.request_id
    assert {p["name"] for p in answer["configuration"]["parameters"]} >= {"model"}
    [request] = answer["data_requests"]
    assert (request["status"], request["requested_by"]) == ("answered", "carla")


# --- data requests ---------------------------------------------------------------


async def test_data_request_is_202_and_pollable_until_answered(world: World) -> None:
    """POST data-requests hands the request to the requester (with the user and
    the customer's organisation) and answers 202; GET of the request shows it
    pending, then answered with the record."""
    response = await world.post(
        "carla",
        "/api/v1/devices/acme-1/data-requests",
        {"kind": "consumables", "reason": "reorder filters"},
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert (created["status"], created["kind"]) == ("pending", "consumables")
    [call] = world.requester.calls
    assert call["username"] == "carla"
    assert call["role_text"] == "customer (ACME)"
    path = f"/api/v1/devices/acme-1/data-requests/{created['request_id']}"
    polled = (await world.get("carla", path)).json()
    assert (polled["status"], polled["record"]) == ("pending", None)
    put(
        world.store,
        "acme-1",
        instrument.consumables_snapshot(T0, _rng(2)),
        request_id=created["request_id"],
    )
    polled = (await world.get("carla", path)).json()
    assert polled["status"] == "answered"
    assert polled["record"]["items"]


async def test_a_data_request_of_another_device_is_404(world: World) -> None:
    """A request id is looked up under its own instrument only."""
    created = (
        await world.post(
            "ada", "/api/v1/devices/globex-1/data-requests", {"kind": "configuration"}
        )
    ).json()
    path = f"/api/v1/devices/acme-1/data-requests/{created['request_id']}"
    response = await world.get("ada", path)
    assert response.status_code == 404
    assert response.json() == {"error": "unknown data request"}


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "alarm"},
        {"kind": "configuration", "reason": "x" * 201},
        {"kind": "configuration", "reason": "line\nbreak"},
        {"kind": "configuration", "extra": 1},
        ["configuration"],
    ],
)
async def test_bad_data_request_bodies_are_400(world: World, body: Any) -> None:
    """A kind that is not request-only, a long or multi-line reason, an extra
    key or a non-object is 400, and nothing is asked."""
    response = await world.post("eve", "/api/v1/devices/acme-1/data-requests", body)
    assert response.status_code == 400
    assert world.requester.calls == []


async def test_auditors_may_not_request_data(world: World) -> None:
    """Auditors only read: their POST is 403."""
    response = await world.post(
        "audrey", "/api/v1/devices/acme-1/data-requests", {"kind": "configuration"}
    )
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("offline", 409),
        ("agent_too_old", 409),
        ("store_unavailable", 503),
        ("other_node", 503),
    ],
)
async def test_an_unavailable_requester_answers_409_or_503(
    world: World, reason: str, status: int
) -> None:
    """An offline instrument or an old agent is 409 with a clear message; the
    broker's own trouble is 503 with Retry-After."""
    world.requester.unavailable = reason
    response = await world.post(
        "eve", "/api/v1/devices/acme-1/data-requests", {"kind": "configuration"}
    )
    assert response.status_code == status
    if status == 503:
        assert response.headers["retry-after"] == "5"
    else:
        assert "instrument" in response.json()["error"]


# --- session history ------------------------------------------------------------


async def test_session_history_shows_who_when_why_and_how_it_ended(
    world: World,
) -> None:
    """The device's remote sessions, for its customer too, without addresses,
    fingerprints or byte counts."""
    session_id = _session(world.store, "acme-1", "eve", T0)
    _session(world.store, "globex-1", "eve", T0)
    response = await world.get("carla", "/api/v1/devices/acme-1/sessions")
    [row] = response.json()["sessions"]
    assert row["session_id"] == session_id
    assert (row["engineer"], row["end_reason"]) == ("eve", "engineer")
    assert row["reason"] == "ticket 4711: conductivity alarm"
    assert row["duration_s"] == 12 * 60 - 20
    assert not {"source", "device_fingerprint", "bytes_to_device"} & set(row)


# --- exports --------------------------------------------------------------------


def test_csv_cell_defends_against_formulas() -> None:
    """Text starting with = + - @ gets a leading quote; numbers the broker
    formats stay numbers."""
    assert csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert csv_cell("+1") == "'+1"
    assert csv_cell("-5 degC") == "'-5 degC"
    assert csv_cell("@SUM(A1)") == "'@SUM(A1)"
    assert csv_cell("safe = text") == "safe = text"
    assert csv_cell(-3.5) == "-3.5"
    assert csv_cell(None) == ""
    assert csv_cell(True) == "true"


async def test_csv_export_quotes_and_defends_and_is_audited(world: World) -> None:
    """The alarms CSV has a header and one row per alarm, quoted where needed,
    with formula cells defused; the export is an audit event with its range and
    row count."""
    put(
        world.store,
        "acme-1",
        feed.Alarm(
            code="E-17",
            severity="alarm",
            text='=cmd|"/c calc"!A1, and a "quote"',
            device_time=T0,
        ),
    )
    put(
        world.store,
        "acme-1",
        feed.Alarm(code="W2", severity="warning", text="ok", device_time=T0),
    )
    response = await world.client.get(
        "/api/v1/devices/acme-1/exports/alarms",
        params={"format": "csv", "since": "2026-11-01T00:00:00Z"},
        headers={"Authorization": f"Bearer {world.tokens['carla']}"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith(
        'attachment; filename="acme-1-alarms-'
    )
    assert "\r\n" in response.text
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == [
        "device_id",
        "record_id",
        "device_time",
        "received_at",
        "code",
        "severity",
        "state",
        "text",
    ]
    texts = {row[4]: row[7] for row in rows[1:]}
    assert texts == {"E-17": "'" + '=cmd|"/c calc"!A1, and a "quote"', "W2": "ok"}
    # RFC 4180: the cell with a comma and quotes is quoted, its quotes doubled.
    assert '"\'=cmd|""/c calc""!A1, and a ""quote"""\r\n' in response.text
    [event] = world.log.named("feed.exported")
    assert event["audit"] is True
    assert (event["username"], event["device_id"], event["data_set"]) == (
        "carla",
        "acme-1",
        "alarms",
    )
    assert (event["format"], event["rows"], event["records"]) == ("csv", 2, 2)
    assert event["since"] == "2026-11-01T00:00:00+00:00"
    assert event["until"] is None


async def test_daily_stats_exports_one_row_per_measurement(world: World) -> None:
    """The statistics CSV has one row per measurement with its unit; the JSON
    export has the records."""
    history = instrument.daily_stats_history(date(2026, 11, 19), 3, _rng(3))
    for stats in history:
        put(world.store, "acme-1", stats)
    response = await world.get("eve", "/api/v1/devices/acme-1/exports/daily-stats")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert len(rows) == 1 + sum(len(s.values) for s in history)
    assert rows[0][-3:] == ["name", "value", "unit"]
    assert {"volume_dispensed", "L"} <= {cell for row in rows for cell in row}
    response = await world.get(
        "eve", "/api/v1/devices/acme-1/exports/daily-stats?format=json"
    )
    body = response.json()
    assert body["data_set"] == "daily-stats"
    assert len(body["records"]) == 3
    assert [e["rows"] for e in world.log.named("feed.exported")] == [
        len(rows) - 1,
        3,
    ]


def test_export_csv_counts_lines() -> None:
    """export_csv returns the text and its number of data lines."""
    row = FeedRow(
        record_id="r1",
        device_id="d",
        kind="alarm",
        received_at=T0,
        device_time=T0,
        body=feed.to_json(
            feed.Alarm(code="A", severity="info", text="@x", device_time=T0)
        ),
    )
    text, lines = export_csv("alarms", [row])
    assert lines == 1
    assert text.splitlines()[1].endswith(",'@x")
