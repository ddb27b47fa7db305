"""Conformance and scanners (reference section 5.4): the Autobahn cases (kosoku)
against our WebSocket transport, and sslyze against both TLS listeners of a
real broker (rows C7, C10, D4, D5, A2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from relay._trio.broker import serve_broker
from relay.config import BrokerConfig
from relay.metrics import RelayMetrics
from relay.pki_files import DataDir, init_ca
from relay.proto.close import CloseCode
from relay.store import Store
from reliability import scorecard
from tests.e2e.conftest import LOOPBACK, PKI, RunningBroker, short_config
from tests.reliability.conformance_harness import (
    ERROR,
    FAILED,
    INFORMATIONAL,
    NON_STRICT,
    OK,
    UNIMPLEMENTED,
    mozilla_findings,
    mozilla_profile,
    run_autobahn,
    run_sslyze,
    serve_echo,
    sslyze_venv,
    tally,
    tls_facts,
    verdict,
)

# kosoku's vendored 12.x cases open their test data without closing it; the
# warning comes when the file object is collected, during any later test step.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <_io.\\w+ name='[^']*/kosoku/shim/"
    ":pytest.PytestUnraisableExceptionWarning"
)

#: The device listener's WebSocket limits and handshake deadline, as deployed.
DEPLOYED = BrokerConfig()

#: 9.x cases whose messages are larger than the 64 KiB cap: 256 KiB to 16 MiB
#: whole (9.1.2-6, 9.2.2-6), 4 MiB fragmented (9.3, 9.4), 1 MiB chopped (9.5, 9.6).
OVER_CAP = (
    *(f"9.1.{n}" for n in range(2, 7)),
    *(f"9.2.{n}" for n in range(2, 7)),
    "9.3.*",
    "9.4.*",
    "9.5.*",
    "9.6.*",
)
#: permessage-deflate is never offered or accepted (transport rule 3, row C10).
COMPRESSION = ("12.*", "13.*")
EXCLUDED = (*OVER_CAP, *COMPRESSION)

AUTOBAHN_TIMEOUT_S = 240.0
SSLYZE_TIMEOUT_S = 120.0


# Autobahn -----------------------------------------------------------------------


async def _echo_url(nursery: trio.Nursery) -> str:
    port = await nursery.start(
        serve_echo, DEPLOYED.websocket, DEPLOYED.device_listener.handshake_timeout_s
    )
    return f"ws://{LOOPBACK}:{port}"


async def test_autobahn_cases_pass_on_the_relay_websocket_transport(
    nursery: trio.Nursery,
) -> None:
    """Every Autobahn case outside the exclusions ends OK, NON-STRICT or
    INFORMATIONAL on our transport with the device listener's limits: no FAILED,
    nothing UNIMPLEMENTED (C7)."""
    url = await _echo_url(nursery)
    started = trio.current_time()
    with trio.fail_after(AUTOBAHN_TIMEOUT_S):
        results = await run_autobahn(url, exclude=EXCLUDED)
    elapsed = trio.current_time() - started
    by_id = {result.case_id: result for result in results}
    verdicts = {case: verdict(result) for case, result in by_id.items()}
    counts = tally(results)

    groups = {case.split(".")[0] for case in verdicts}
    assert groups == {"1", "2", "3", "4", "5", "6", "7", "9", "10"}, sorted(groups)
    failed = sorted(c for c, v in verdicts.items() if v in (FAILED, ERROR))
    assert failed == [], {
        c: (by_id[c].result, by_id[c].result_close, by_id[c].remote_close_code)
        for c in failed
    }
    # A close between two fragments is echoed, not failed with 1002
    # (websockets' own answer; see relay/_trio/websocket.py _CloseMidMessage).
    assert by_id["7.1.5"].remote_close_code == CloseCode.NORMAL
    unimplemented = sorted(c for c, v in verdicts.items() if v == UNIMPLEMENTED)
    assert unimplemented == []
    assert counts[OK] > 200  # the bulk of the suite really ran

    scorecard.record_conformance(
        "autobahn (kosoku) on the relay WebSocket transport",
        tool="kosoku 0.1.0",
        verdict="pass",
        row="C7",
        ok=counts[OK],
        non_strict=counts[NON_STRICT],
        informational=counts[INFORMATIONAL],
        failed=len(failed),
        unimplemented=len(unimplemented),
        excluded=list(EXCLUDED),
        cases=len(results),
        non_strict_cases=sorted(c for c, v in verdicts.items() if v == NON_STRICT),
        limits=(
            f"max message {DEPLOYED.websocket.max_message_bytes} B, ping every "
            f"{DEPLOYED.websocket.ping_interval_s} s, dead after "
            f"{DEPLOYED.websocket.ping_missed_max} missed"
        ),
        seconds=round(elapsed, 1),
    )


async def test_autobahn_excluded_cases_are_refused_for_the_stated_reasons(
    nursery: trio.Nursery,
) -> None:
    """The excluded cases fail only because of our deliberate limits: every 9.x
    case above the cap is closed by us with 1009 (C5), and the 12.x/13.x cases
    find no permessage-deflate in the handshake (C10)."""
    url = await _echo_url(nursery)
    with trio.fail_after(AUTOBAHN_TIMEOUT_S):
        results = await run_autobahn(url, cases=(*OVER_CAP, "12.1.1", "13.1.1"))
    by_id = {result.case_id: result for result in results}
    over_cap = sorted(c for c in by_id if c.startswith("9."))
    deflate = sorted(c for c in by_id if not c.startswith("9."))

    assert len(over_cap) == 10 + 4 * 9 - 6  # 9.1.2-6, 9.2.2-6, 9.3-9.6 (9+9+6+6)
    closes = {c: by_id[c].remote_close_code for c in over_cap}
    assert set(closes.values()) == {CloseCode.MESSAGE_TOO_BIG}, closes
    assert deflate == ["12.1.1", "13.1.1"]
    for case in deflate:
        assert verdict(by_id[case]) == UNIMPLEMENTED
        assert "sec-websocket-extensions" not in by_id[case].http_response.lower()

    scorecard.record_conformance(
        "autobahn (kosoku) excluded cases: above the message cap, deflate",
        tool="kosoku 0.1.0",
        verdict="pass",
        row="C5, C10",
        over_cap_cases=len(over_cap),
        over_cap_answer="close 1009 from the transport",
        deflate_cases_tried=deflate,
        deflate_answer="no Sec-WebSocket-Extensions in the 101 (UNIMPLEMENTED)",
    )


# sslyze -------------------------------------------------------------------------


@pytest.fixture
def sslyze() -> Path:
    venv = sslyze_venv()
    if venv is None:
        pytest.skip("sslyze venv missing: `make` creates .venv/tools/sslyze")
    return venv


@pytest.fixture
def scan_pki(tmp_path: Path) -> PKI:
    """A data dir for a broker scanned from outside.

    The handshake deadline is the deployed 10 s, not the test config's 0.5 s:
    sslyze opens many connections at once on a shared 2-core machine.
    """
    data_dir = tmp_path / "relay-data"
    base = short_config(data_dir)
    config = dataclasses.replace(
        base,
        device_listener=dataclasses.replace(
            base.device_listener,
            handshake_timeout_s=DEPLOYED.device_listener.handshake_timeout_s,
        ),
    )
    init_ca(DataDir(data_dir), now=datetime.now(UTC), lifetime=timedelta(days=365))
    with closing(Store.open(config.effective_database_url)):
        pass
    return PKI(data_dir=data_dir, config=config)


@pytest.fixture
async def scanned_broker(
    scan_pki: PKI, nursery: trio.Nursery
) -> AsyncIterator[RunningBroker]:
    """A real broker in this trio loop; sslyze runs as a subprocess meanwhile."""
    metrics, shutdown = RelayMetrics(), trio.Event()
    ports = await nursery.start(
        lambda task_status: serve_broker(
            scan_pki.config, shutdown, metrics=metrics, task_status=task_status
        )
    )
    yield RunningBroker(ports, scan_pki.config, metrics, shutdown)
    shutdown.set()


def _total(broker: RunningBroker, name: str) -> float:
    """A counter summed over all its labels."""
    return sum(
        sample.value
        for metric in broker.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == name
    )


def _private_ca_not_applicable(validated_by: frozenset[str]) -> dict[str, str]:
    assert "Supplied CA file" in validated_by, validated_by
    return {
        "public_root_path_validation": (
            "private CA: the chain validates against the broker's own CA "
            "(--certinfo_ca_file); public root stores do not apply"
        )
    }


async def test_device_listener_tls_meets_mozilla_modern(
    sslyze: Path, scan_pki: PKI, scanned_broker: RunningBroker, tmp_path: Path
) -> None:
    """With a device certificate, sslyze finds on the device listener: TLS 1.3
    only; AEAD suites only; P-256 only; no compression, tickets, client
    renegotiation or early data; no finding against Mozilla "modern" (D4, D5)."""
    device = scan_pki.enroll("scan-0001")
    with trio.fail_after(SSLYZE_TIMEOUT_S):
        run = await run_sslyze(
            sslyze,
            f"{LOOPBACK}:{scanned_broker.ports.device}",
            tmp_path / "device.json",
            mozilla_config="modern",
            cert=device.cert,
            key=device.key,
            ca_file=scan_pki.ca_file,
        )
    assert run.server["scan_status"] == "COMPLETED", run.stdout
    facts = tls_facts(run.server)
    modern = mozilla_findings(facts, mozilla_profile(sslyze, "modern"))

    assert facts.protocols == {"TLSv1.3"}
    assert facts.non_aead_suites == frozenset()
    assert facts.curves == {"secp256r1"}
    assert not facts.compression
    assert not facts.client_renegotiation
    assert not facts.early_data
    assert facts.ticket_resumption != "FULLY_SUPPORTED"
    assert modern == {}, modern
    assert set(run.tool_findings) == set(modern), run.tool_findings  # sslyze agrees
    not_applicable = _private_ca_not_applicable(facts.validated_by)

    scorecard.record_conformance(
        "sslyze --mozilla_config=modern on the device listener (mTLS)",
        tool=f"sslyze {run.version}",
        verdict="pass",
        row="D4, D5",
        mozilla_modern="compliant",
        not_applicable=not_applicable,
        client_auth="required (see the scan without a certificate)",
        **facts.summary(),
    )


async def test_device_listener_refuses_a_scan_without_client_certificate(
    sslyze: Path, scanned_broker: RunningBroker, tmp_path: Path
) -> None:
    """Without a client certificate sslyze cannot complete one connection to
    the device listener, and the broker counts each refusal as
    ``no_certificate`` (A2: the certificate is required, not optional)."""
    before = scanned_broker.sample(
        "relay_tls_handshake_failures_total", listener="device", reason="no_certificate"
    )
    with trio.fail_after(SSLYZE_TIMEOUT_S):
        run = await run_sslyze(
            sslyze,
            f"{LOOPBACK}:{scanned_broker.ports.device}",
            tmp_path / "device-nocert.json",
            mozilla_config="modern",
        )
    refused = (
        scanned_broker.sample(
            "relay_tls_handshake_failures_total",
            listener="device",
            reason="no_certificate",
        )
        - before
    )

    assert run.server["connectivity_status"] == "ERROR", run.stdout
    assert run.server["scan_result"] is None
    assert refused >= 1
    assert _total(scanned_broker, "relay_device_rejections_total") == 0  # no upgrade

    scorecard.record_conformance(
        "sslyze without a client certificate on the device listener",
        tool=f"sslyze {run.version}",
        verdict="pass",
        row="A2, D4",
        client_auth="required",
        sslyze_connectivity=run.server["connectivity_status"],
        broker_no_certificate_failures=int(refused),
    )


async def test_engineer_listener_tls_meets_mozilla_intermediate(
    sslyze: Path, scan_pki: PKI, scanned_broker: RunningBroker, tmp_path: Path
) -> None:
    """sslyze finds the engineer listener compliant with Mozilla
    "intermediate": TLS 1.2 and 1.3 only, ECDHE with AEAD suites, P-256 only,
    no compression, tickets, client renegotiation or early data (D4, D5)."""
    with trio.fail_after(SSLYZE_TIMEOUT_S):
        run = await run_sslyze(
            sslyze,
            f"{LOOPBACK}:{scanned_broker.ports.engineer}",
            tmp_path / "engineer.json",
            mozilla_config="intermediate",
            ca_file=scan_pki.ca_file,
        )
    assert run.server["scan_status"] == "COMPLETED", run.stdout
    facts = tls_facts(run.server)
    findings = mozilla_findings(facts, mozilla_profile(sslyze, "intermediate"))

    assert facts.protocols == {"TLSv1.2", "TLSv1.3"}
    assert facts.non_aead_suites == frozenset()
    assert all("_ECDHE_" in s for s in facts.suites["TLSv1.2"])
    assert facts.curves == {"secp256r1"}
    assert not facts.compression
    assert not facts.client_renegotiation
    assert not facts.early_data
    assert facts.ticket_resumption != "FULLY_SUPPORTED"
    assert findings == {}
    assert run.tool_findings == {}
    assert run.returncode == 0, run.stdout
    client_auth = run.server["connectivity_result"]["client_auth_requirement"]
    assert client_auth == "DISABLED"  # browsers and the CLI log in instead
    not_applicable = _private_ca_not_applicable(facts.validated_by)

    scorecard.record_conformance(
        "sslyze --mozilla_config=intermediate on the engineer listener",
        tool=f"sslyze {run.version}",
        verdict="pass",
        row="D4, D5",
        mozilla_intermediate="compliant",
        not_applicable=not_applicable,
        client_auth="none (password + TOTP login)",
        **facts.summary(),
    )
