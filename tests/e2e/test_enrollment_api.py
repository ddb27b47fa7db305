"""Enrollment over the engineer API (POST /api/v1/enrollments) against a real broker
on loopback TLS: who may enroll, what a refused request is told, and that a signed
certificate really lets the device in."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import create_engine, func, select

import auth
from relay._trio.agent import AgentSettings, AgentStatus, run_agent
from relay.api_contract import ENROLLMENTS_PATH, MAX_ENROLLMENT_BODY_BYTES
from relay.metrics import ENROLLMENT_OUTCOMES
from relay.openapi import OPENAPI
from relay.pki_files import (
    AgentDir,
    DataDir,
    default_server_names,
    enroll_agent,
    ensure_listener_certificate,
    write_public,
)
from relay.store._schema import certificates
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    RunningBroker,
    add_engineer,
    broker_with,
    fast_agent_config,
    login_token,
    wait_until,
)

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"  # noqa: S105 - test account
NOT_PERMITTED = (
    "forbidden: this account may not enroll devices (an admin can grant it "
    "with `relay user set NAME --can-enroll yes`)"
)
PEM_CSR = serialization.Encoding.PEM


async def _admin(pki: PKI, api: httpx.AsyncClient) -> dict[str, str]:
    token = await login_token(api, "root", add_engineer(pki, "root", role="admin"))
    return {"Authorization": f"Bearer {token}"}


def _csr(device_id: str) -> str:
    """A CSR as ``relay agent enroll`` makes it (P-256, CN and SAN of the id)."""
    return auth.build_device_csr(auth.generate_private_key(), device_id).decode()


def _csr_signed_by(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, common_name: str
) -> str:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
        .public_bytes(PEM_CSR)
        .decode()
    )


def _weak_key_csr() -> str:
    key = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key under test
    return _csr_signed_by(key, "pump-7")


def _bad_signature_csr() -> str:
    data = bytearray(
        x509.load_pem_x509_csr(_csr("pump-7").encode()).public_bytes(
            serialization.Encoding.DER
        )
    )
    data[-1] ^= 0x01  # inside the signature (the end of ECDSA's s)
    csr = x509.load_der_x509_csr(bytes(data))
    assert not csr.is_signature_valid
    return csr.public_bytes(PEM_CSR).decode()


def _outcome(broker: RunningBroker, outcome: str) -> float:
    return broker.sample("relay_enrollments_total", outcome=outcome)


def _outcomes(broker: RunningBroker) -> dict[str, float]:
    return {outcome: _outcome(broker, outcome) for outcome in ENROLLMENT_OUTCOMES}


def _certificate_count(pki: PKI, device_id: str) -> int:
    """How many certificates the store holds for *device_id*."""
    engine = create_engine(pki.config.effective_database_url)
    try:
        with engine.connect() as connection:
            count: int = connection.execute(
                select(func.count()).where(certificates.c.device_id == device_id)
            ).scalar_one()
    finally:
        engine.dispose()
    return count


def _events(
    events: Sequence[MutableMapping[str, Any]], name: str
) -> list[MutableMapping[str, Any]]:
    return [event for event in events if event["event"] == name]


def _assert_clear_error(response: httpx.Response, status: int) -> str:
    """*response* is *status* with a JSON ``{"error": TEXT}`` and no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"error"}
    message: str = body["error"]
    return message


async def test_admin_enrolls_and_the_device_connects_with_the_certificate(
    broker: RunningBroker,
    pki: PKI,
    client: httpx.AsyncClient,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Annex 1 end to end: `relay agent enroll`'s CSR, signed over the API, gives a
    certificate of the fixed profile for the CSR's key and id, on record, with
    which the real agent connects to the device listener."""
    headers = await _admin(pki, client)
    agent_dir = AgentDir(tmp_path / "agent")
    enroll_agent(agent_dir, "pump-7")
    with structlog.testing.capture_logs() as events:
        response = await client.post(
            ENROLLMENTS_PATH, json={"csr": agent_dir.csr.read_text()}, headers=headers
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {
        "device_id",
        "serial",
        "fingerprint_sha256",
        "not_after",
        "certificate",
        "ca_certificate",
        "warnings",
    }
    assert body["ca_certificate"] == pki.ca_file.read_text()
    assert body["warnings"] == []
    ca_certificate = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    certificate = x509.load_pem_x509_certificate(body["certificate"].encode())
    identity = auth.verify_device_certificate(
        ca_certificate, certificate, now=datetime.now(UTC)
    )
    assert identity.device_id == body["device_id"] == "pump-7"
    assert identity.serial_hex == body["serial"]
    assert identity.fingerprint_sha256 == body["fingerprint_sha256"]
    assert datetime.fromisoformat(body["not_after"]) == identity.not_after
    assert abs(identity.not_after - (datetime.now(UTC) + timedelta(days=365))) < (
        timedelta(minutes=1)
    )
    device_key = serialization.load_pem_private_key(
        agent_dir.key.read_bytes(), password=None
    )
    assert certificate.public_key() == device_key.public_key()
    assert certificate.subject.rfc4514_string() == "CN=pump-7"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:relay:device:pump-7"
    ]
    with pki.store() as store:
        record = store.lookup_certificate(identity.serial_hex)
    assert record is not None
    assert (record.device_id, record.revoked) == ("pump-7", False)
    assert record.fingerprint_sha256 == identity.fingerprint_sha256
    assert _outcomes(broker) == {
        outcome: float(outcome == "signed") for outcome in ENROLLMENT_OUTCOMES
    }
    [signed] = _events(events, "enrollment.signed")
    assert signed["audit"] is True
    assert (signed["username"], signed["role"], signed["source"]) == (
        "root",
        "admin",
        LOOPBACK,
    )
    assert (signed["device_id"], signed["serial"], signed["fingerprint"]) == (
        "pump-7",
        identity.serial_hex,
        identity.fingerprint_sha256,
    )
    assert signed["warnings"] == []
    assert "CERTIFICATE REQUEST" not in repr(events)

    # The device takes the certificate and the CA certificate from the answer.
    write_public(agent_dir.cert, body["certificate"].encode())
    ca_file = tmp_path / "broker-ca.pem"
    ca_file.write_text(body["ca_certificate"])
    status = AgentStatus()
    settings = AgentSettings(
        broker_url=broker.device_url,
        agent_dir=agent_dir.root,
        ca_file=ca_file,
        limits=fast_agent_config(),
    )
    nursery.start_soon(lambda: run_agent(settings, status=status, rng=random.Random(1)))  # noqa: S311 - repeatable jitter
    await wait_until(lambda: status.connected)
    assert status.device_id == "pump-7"
    assert broker.sample("relay_devices_connected") == 1
    nursery.cancel_scope.cancel()


async def test_engineer_needs_the_enroll_permission_which_takes_effect_at_once(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """An engineer is refused until granted can_enroll, then enrolls with the same
    session, and is refused again as soon as it is withdrawn."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    headers = {"Authorization": f"Bearer {token}"}
    with structlog.testing.capture_logs() as events:
        refused = await client.post(
            ENROLLMENTS_PATH, json={"csr": _csr("pump-8")}, headers=headers
        )
    assert _assert_clear_error(refused, 403) == NOT_PERMITTED
    assert _certificate_count(pki, "pump-8") == 0
    assert _outcome(broker, "forbidden") == 1
    [event] = _events(events, "enrollment.refused")
    assert event["audit"] is True
    assert (event["username"], event["reason"], event["source"]) == (
        "alice",
        "not_permitted",
        LOOPBACK,
    )

    with pki.store() as store:
        store.set_user_can_enroll("alice", True, at=datetime.now(UTC))
    granted = await client.post(
        ENROLLMENTS_PATH, json={"csr": _csr("pump-8")}, headers=headers
    )
    assert granted.status_code == 201, granted.text
    assert granted.json()["device_id"] == "pump-8"
    assert _certificate_count(pki, "pump-8") == 1

    with pki.store() as store:
        store.set_user_can_enroll("alice", False, at=datetime.now(UTC))
    withdrawn = await client.post(
        ENROLLMENTS_PATH, json={"csr": _csr("pump-9")}, headers=headers
    )
    assert _assert_clear_error(withdrawn, 403) == NOT_PERMITTED
    assert _certificate_count(pki, "pump-9") == 0
    assert (_outcome(broker, "forbidden"), _outcome(broker, "signed")) == (2, 1)


async def test_auditor_is_refused_by_role(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """An auditor gets the role table's 403 before the route runs; nothing is signed."""
    token = await login_token(client, "bob", add_engineer(pki, "bob", role="auditor"))
    with structlog.testing.capture_logs() as events:
        response = await client.post(
            ENROLLMENTS_PATH,
            json={"csr": _csr("pump-7")},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert _assert_clear_error(response, 403) == "forbidden"
    assert broker.sample("relay_auth_forbidden_total") == 1
    assert set(_outcomes(broker).values()) == {0.0}
    assert _certificate_count(pki, "pump-7") == 0
    [event] = _events(events, "auth.forbidden")
    assert (event["username"], event["route"]) == ("bob", f"POST {ENROLLMENTS_PATH}")


async def test_logged_out_request_is_401(client: httpx.AsyncClient) -> None:
    """Without a session the route answers 401 and never looks at the body."""
    response = await client.post(ENROLLMENTS_PATH, json={"csr": _csr("pump-7")})
    assert _assert_clear_error(response, 401) == "unauthorized"


@pytest.mark.parametrize(
    ("make_csr", "reason", "detail"),
    [
        (lambda: "hello", "malformed", "not a PEM or DER certificate request"),
        (
            lambda: (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                "-----END CERTIFICATE REQUEST-----\n"
            ),
            "malformed",
            "not a PEM or DER certificate request",
        ),
        (lambda: "caf\u00e9", "malformed", "a PEM certificate request is ASCII"),
        (_weak_key_csr, "weak_key", "RSA-1024 keys are not accepted"),
        (_bad_signature_csr, "bad_signature", "signature does not verify"),
        (
            lambda: _csr_signed_by(auth.generate_private_key(), "pump 7!"),
            "bad_device_id",
            "invalid device id 'pump 7!'",
        ),
        (
            lambda: "A" * (16 * 1024 + 1),
            "too_large",
            "16385 bytes; the limit is 16384 bytes",
        ),
    ],
    ids=[
        "garbage",
        "garbage-pem",
        "not-ascii",
        "rsa-1024",
        "bad-signature",
        "bad-device-id",
        "too-large",
    ],
)
async def test_refused_csr_is_400_naming_the_reason(
    broker: RunningBroker,
    pki: PKI,
    client: httpx.AsyncClient,
    make_csr: Callable[[], str],
    reason: str,
    detail: str,
) -> None:
    """A CSR the CA code refuses gets 400 with the reason in words, a bad_csr count
    and an audit event without the CSR; nothing is recorded."""
    headers = await _admin(pki, client)
    csr = make_csr()
    with structlog.testing.capture_logs() as events:
        response = await client.post(
            ENROLLMENTS_PATH, json={"csr": csr}, headers=headers
        )
    message = _assert_clear_error(response, 400)
    assert message.startswith(f"certificate request refused ({reason}): "), message
    assert detail in message
    assert _outcomes(broker) == {
        outcome: float(outcome == "bad_csr") for outcome in ENROLLMENT_OUTCOMES
    }
    assert _certificate_count(pki, "pump-7") == 0
    [event] = _events(events, "enrollment.refused")
    assert (event["reason"], event["username"], event["audit"]) == (
        reason,
        "root",
        True,
    )
    assert csr not in repr(events)


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"\xff\xfe",
        b"[]",
        b'"csr"',
        b'{"csr": 1}',
        b'{"csr": ""}',
        b'{"csr": null}',
        b'{"CSR": "x"}',
        b'{"csr": "x", "device_id": "pump-7"}',
        b"[" * 100_000,
    ],
    ids=[
        "truncated",
        "not-utf8",
        "array",
        "string",
        "number",
        "empty",
        "null",
        "wrong-key",
        "extra-key",
        "deep",
    ],
)
async def test_malformed_body_is_400(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient, body: bytes
) -> None:
    """A body that is not {"csr": "<text>"} gets 400 saying what is expected."""
    headers = await _admin(pki, client)
    response = await client.post(
        ENROLLMENTS_PATH,
        content=body[: MAX_ENROLLMENT_BODY_BYTES - 1],
        headers={**headers, "Content-Type": "application/json"},
    )
    message = _assert_clear_error(response, 400)
    assert message.startswith("bad request: ")
    assert _outcome(broker, "bad_request") == 1


async def test_oversized_body_is_413_declared_or_streamed(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A body over 20 KiB is refused with 413, whether Content-Length says so or it
    arrives chunked without one."""
    headers = await _admin(pki, client)
    big = {"csr": "A" * MAX_ENROLLMENT_BODY_BYTES}
    declared = await client.post(ENROLLMENTS_PATH, json=big, headers=headers)
    expected = f"request body too large: at most {MAX_ENROLLMENT_BODY_BYTES} bytes"
    assert _assert_clear_error(declared, 413) == expected

    async def chunks() -> AsyncIterator[bytes]:
        # Just over the cap, crossed by the last chunk but one: the server has
        # read (almost) everything when it answers, so the client is not cut off
        # mid-send by a reset.
        yield b'{"csr": "'
        for _ in range(MAX_ENROLLMENT_BODY_BYTES // 1024):
            yield b"A" * 1024
        yield b'"}'

    streamed = await client.post(
        ENROLLMENTS_PATH,
        content=chunks(),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert "content-length" not in streamed.request.headers
    assert _assert_clear_error(streamed, 413) == expected
    assert _outcome(broker, "bad_request") == 2


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", None]
)
async def test_other_content_types_are_415(
    broker: RunningBroker,
    pki: PKI,
    client: httpx.AsyncClient,
    content_type: str | None,
) -> None:
    """Only application/json is read; anything else is 415."""
    headers = await _admin(pki, client)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await client.post(
        ENROLLMENTS_PATH, content=_csr("pump-7").encode(), headers=headers
    )
    message = _assert_clear_error(response, 415)
    assert message == "unsupported media type: send application/json"
    assert _certificate_count(pki, "pump-7") == 0


async def test_json_with_charset_is_accepted(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """application/json with a charset parameter is still JSON."""
    headers = await _admin(pki, client)
    response = await client.post(
        ENROLLMENTS_PATH,
        content=httpx.Request("POST", "/", json={"csr": _csr("pump-7")}).content,
        headers={**headers, "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 201, response.text


async def test_revoked_device_id_is_409_and_nothing_is_recorded(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A CSR for a revoked id is signed by nobody's account: 409, the store keeps
    only the old certificate, and the refusal is audited with the id."""
    pki.enroll("pump-10")
    with pki.store() as store:
        store.revoke_device("pump-10", at=datetime.now(UTC), reason="stolen")
    headers = await _admin(pki, client)
    with structlog.testing.capture_logs() as events:
        response = await client.post(
            ENROLLMENTS_PATH, json={"csr": _csr("pump-10")}, headers=headers
        )
    message = _assert_clear_error(response, 409)
    assert message.startswith("device pump-10 is revoked; revoked device ids are")
    assert _certificate_count(pki, "pump-10") == 1
    assert _outcome(broker, "revoked") == 1
    assert _outcome(broker, "signed") == 0
    [event] = _events(events, "enrollment.refused")
    assert (event["reason"], event["device_id"]) == ("device_revoked", "pump-10")


async def test_engineer_may_not_re_key_an_enrolled_device_an_admin_may(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """An engineer's CSR for an id that already has a certificate is 409: it would
    hand the instrument's identity to whoever holds the new key. An admin may
    (a replaced key), and the old certificate stays on record until revoked."""
    pki.enroll("pump-11")
    secret = add_engineer(pki, "alice")
    with pki.store() as store:
        store.set_user_can_enroll("alice", True, at=datetime.now(UTC))
    engineer = {"Authorization": f"Bearer {await login_token(client, 'alice', secret)}"}
    with structlog.testing.capture_logs() as events:
        refused = await client.post(
            ENROLLMENTS_PATH, json={"csr": _csr("pump-11")}, headers=engineer
        )
    message = _assert_clear_error(refused, 409)
    assert message.startswith("device pump-11 is already enrolled; only an admin")
    assert _certificate_count(pki, "pump-11") == 1
    assert _outcome(broker, "already_enrolled") == 1
    [event] = _events(events, "enrollment.refused")
    assert (event["reason"], event["username"]) == ("device_already_enrolled", "alice")
    fresh = await client.post(
        ENROLLMENTS_PATH, json={"csr": _csr("pump-12")}, headers=engineer
    )
    assert fresh.status_code == 201, fresh.text
    admin = await _admin(pki, client)
    rekeyed = await client.post(
        ENROLLMENTS_PATH, json={"csr": _csr("pump-11")}, headers=admin
    )
    assert rekeyed.status_code == 201, rekeyed.text
    assert _certificate_count(pki, "pump-11") == 2


async def test_extra_requests_in_the_csr_are_dropped_and_reported(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """What a CSR asks beyond the profile (server use, another name) is not in the
    certificate, and the answer says so."""
    key = auth.generate_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pump-7")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("urn:relay:device:pump-7"),
                    x509.DNSName("evil.example"),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
        .public_bytes(PEM_CSR)
        .decode()
    )
    headers = await _admin(pki, client)
    response = await client.post(ENROLLMENTS_PATH, json={"csr": csr}, headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["warnings"] == [
        "the request asked for subjectAltName DNS:evil.example; not granted "
        "(fixed device profile)",
        "the request asked for extendedKeyUsage serverAuth; not granted "
        "(fixed device profile)",
    ]
    certificate = x509.load_pem_x509_certificate(body["certificate"].encode())
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(usage.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == []


async def test_parallel_enrollments_all_succeed(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """More enrollments at once than signing slots wait their turn; each gets its
    own certificate."""
    headers = await _admin(pki, client)
    serials: dict[str, str] = {}

    async def enroll(device_id: str) -> None:
        response = await client.post(
            ENROLLMENTS_PATH, json={"csr": _csr(device_id)}, headers=headers
        )
        assert response.status_code == 201, response.text
        serials[device_id] = response.json()["serial"]

    async with trio.open_nursery() as enrollments:
        for number in range(8):
            enrollments.start_soon(enroll, f"unit-{number}")
    assert len(set(serials.values())) == 8
    with pki.store() as store:
        for device_id, serial in serials.items():
            record = store.lookup_certificate(serial)
            assert record is not None
            assert record.device_id == device_id


async def test_broker_without_ca_key_answers_503(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A broker whose data dir has the CA certificate but not its key starts,
    says once that API enrollment is disabled, and answers 503."""
    data_dir = DataDir(pki.data_dir)
    # The listener certificate exists already, so the broker needs no CA key.
    ensure_listener_certificate(
        data_dir,
        names=default_server_names(pki.config.server_names),
        now=datetime.now(UTC),
        lifetime=timedelta(days=pki.config.pki.server_cert_lifetime_days),
    )
    data_dir.ca_key.rename(pki.data_dir / "ca.key.offline")
    with structlog.testing.capture_logs() as events:
        async with broker_with(pki, nursery) as (broker, api):
            headers = await _admin(pki, api)
            response = await api.post(
                ENROLLMENTS_PATH, json={"csr": _csr("pump-7")}, headers=headers
            )
            assert _assert_clear_error(response, 503) == (
                "enrollment is not available on this broker"
            )
            assert _outcome(broker, "unavailable") == 1
    assert len(_events(events, "enrollment.api_disabled")) == 1
    [refused] = _events(events, "enrollment.refused")
    assert refused["reason"] == "no_ca_key"
    assert _certificate_count(pki, "pump-7") == 0


def test_openapi_documents_each_answer() -> None:
    """The OpenAPI operation lists every status the route can answer."""
    responses = OPENAPI["paths"][ENROLLMENTS_PATH]["post"]["responses"]
    assert set(responses) == {"201", "400", "401", "403", "409", "413", "415", "503"}
