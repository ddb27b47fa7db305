"""Harness for the conformance and scanner tests: an echo endpoint on our
WebSocket transport for kosoku (the Autobahn cases), and sslyze runs read back
from their JSON.

Theory of operation
===================
* **Echo endpoint.** A test-only trio TCP server that runs each connection
  through :class:`relay._trio.websocket.ServerHandshake` with the limits the
  device listener uses, and echoes every message. The Autobahn cases send text
  messages, which relay channels never carry (the device listener fails a text
  frame with 1003); the endpoint turns text on for its connections and answers
  text with text through the protocol object, the way ``send_message`` sends
  bytes. Everything else (framing, fragments, control frames, UTF-8, the close
  handshake, the message cap) is the transport as deployed.
* **kosoku** drives asyncio; it runs in a worker thread with its own event loop
  while the trio loop keeps serving.
* **sslyze** lives in a venv of its own (it pins an older cryptography); it runs
  as a subprocess with ``--json_out`` and the findings are recomputed from the
  JSON against the Mozilla profile sslyze ships, so the test can tell the
  findings we accept (and say why) from the ones we do not.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from kosoku import FailureError, run_fuzzingclient
from kosoku._kosoku import CaseResult
from websockets.protocol import State

from relay._trio.websocket import (
    ConnectionClosed,
    HandshakeFailed,
    ServerHandshake,
    WebSocketConnection,
)
from relay.config import WebSocketLimits

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]

# Echo endpoint ------------------------------------------------------------------


async def serve_echo(
    limits: WebSocketLimits,
    handshake_timeout_s: float,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the echo endpoint on a loopback port (reported via *task_status*)."""

    async def handle(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, limits, handshake_timeout_s)

    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port: int = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(port)


async def _serve_connection(
    stream: trio.SocketStream, limits: WebSocketLimits, handshake_timeout_s: float
) -> None:
    handshake = ServerHandshake(stream, limits)
    try:
        with trio.fail_after(handshake_timeout_s):
            request = await handshake.receive_request()
    except (HandshakeFailed, trio.TooSlowError):
        await trio.aclose_forcefully(stream)
        return
    try:
        async with handshake.accept(request) as ws:
            # Set before the reader's first step: nothing awaits between the
            # connection's creation and the body.
            ws._accept_text = True
            await _echo(ws)
    except HandshakeFailed:
        return


async def _echo(ws: WebSocketConnection) -> None:
    try:
        while True:
            message = await ws.receive()
            if isinstance(message, bytes):
                await ws.send_message(message)
            elif not await _send_text(ws, message):
                return
    except ConnectionClosed:
        return


async def _send_text(ws: WebSocketConnection, text: str) -> bool:
    """Queue one text message as ``send_message`` queues bytes; False once the
    connection is closing."""
    if ws.closed or ws._protocol.state is not State.OPEN:
        return False
    ws._protocol.send_text(text.encode())
    ws._pump()
    await trio.lowlevel.checkpoint()
    return True


# kosoku -------------------------------------------------------------------------

#: Verdicts of a case's message exchange, as Autobahn labels them.
OK, NON_STRICT, INFORMATIONAL = "OK", "NON-STRICT", "INFORMATIONAL"
FAILED, UNIMPLEMENTED, ERROR = "FAILED", "UNIMPLEMENTED", "ERROR"


async def run_autobahn(
    url: str,
    *,
    cases: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    concurrency: int = 2,
) -> list[CaseResult]:
    """Run the selected Autobahn cases against *url*; every case's result.

    kosoku raises when a case does not pass; its results are returned all the
    same, for the test to sort.
    """

    def run() -> list[CaseResult]:
        async def drive() -> list[CaseResult]:
            try:
                return await run_fuzzingclient(
                    url, cases, list(exclude), concurrency=concurrency
                )
            except FailureError as failure:
                return failure.results

        return asyncio.run(drive())

    return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


def verdict(result: CaseResult) -> str:
    """One label per case: the exchange's verdict, FAILED when the exchange or
    the closing handshake is not acceptable, UNIMPLEMENTED as reported."""
    behavior = result.behavior.value
    if behavior in (UNIMPLEMENTED, ERROR):
        return behavior
    return behavior if result.passed else FAILED


def tally(results: Sequence[CaseResult]) -> Counter[str]:
    """How many cases got each :func:`verdict`."""
    return Counter(verdict(result) for result in results)


# sslyze -------------------------------------------------------------------------


def sslyze_venv() -> Path | None:
    """The sslyze tool venv (the Makefile creates it), or None when absent."""
    for root in (Path(sys.prefix) / "tools" / "sslyze", REPO / ".venv/tools/sslyze"):
        if (root / "bin" / "sslyze").exists():
            return root
    return None


def mozilla_profile(venv: Path, name: str) -> dict[str, Any]:
    """Mozilla's *name* configuration, from the guideline file sslyze checks with."""
    found = sorted(
        venv.glob("lib/python3*/site-packages/sslyze/mozilla_tls_profile/*.json")
    )
    if not found:
        raise FileNotFoundError(f"no Mozilla profile in {venv}")
    profile: dict[str, Any] = json.loads(found[-1].read_text())["configurations"][name]
    return profile


@dataclass(frozen=True)
class SslyzeRun:
    """One sslyze run: its exit status, the JSON result for the one target, and
    the findings it printed against the Mozilla configuration (key -> text)."""

    returncode: int
    version: str
    server: dict[str, Any]
    tool_findings: dict[str, str]
    stdout: str


async def run_sslyze(
    venv: Path,
    target: str,
    out: Path,
    *,
    mozilla_config: str,
    cert: Path | None = None,
    key: Path | None = None,
    ca_file: Path | None = None,
) -> SslyzeRun:
    """Scan *target* with ``--mozilla_config`` plus resumption and early-data
    checks; *ca_file* is the private CA the certificate path is validated with."""
    command = [str(venv / "bin" / "sslyze"), f"--mozilla_config={mozilla_config}"]
    if cert is not None and key is not None:
        command += ["--cert", str(cert), "--key", str(key)]
    if ca_file is not None:
        command += ["--certinfo_ca_file", str(ca_file)]
    command += ["--resum", "--early_data", "--json_out", str(out), target]
    completed = await trio.run_process(
        command, capture_stdout=True, capture_stderr=True, check=False
    )
    stdout = completed.stdout.decode(errors="replace")
    document = json.loads(await trio.Path(out).read_text())
    (server,) = document["server_scan_results"]
    return SslyzeRun(
        returncode=completed.returncode,
        version=str(document["sslyze_version"]),
        server=server,
        tool_findings=dict(re.findall(r"^\s+\* (\w+): (.*)$", stdout, re.MULTILINE)),
        stdout=stdout,
    )


_VERSIONS = (
    ("ssl_2_0_cipher_suites", "SSLv2"),
    ("ssl_3_0_cipher_suites", "SSLv3"),
    ("tls_1_0_cipher_suites", "TLSv1"),
    ("tls_1_1_cipher_suites", "TLSv1.1"),
    ("tls_1_2_cipher_suites", "TLSv1.2"),
    ("tls_1_3_cipher_suites", "TLSv1.3"),
)
# Mozilla's profiles name P-256 the ANSI way; sslyze reports the SECG name.
_SECG = {"prime256v1": "secp256r1"}
_AEAD = ("_GCM_", "CHACHA20_POLY1305", "_CCM")


@dataclass(frozen=True)
class TlsFacts:
    """What a scan found, in the terms the tests assert on."""

    protocols: frozenset[str]
    suites: dict[str, frozenset[str]]  # protocol -> accepted suites (IANA names)
    curves: frozenset[str]  # key-exchange groups the server accepts
    compression: bool
    secure_renegotiation: bool
    client_renegotiation: bool
    fallback_scsv: bool
    extended_master_secret: bool
    known_vulnerabilities: frozenset[str]
    ticket_resumption: str
    session_id_resumption: str
    early_data: bool
    cert_key: str
    cert_curve: str | None
    cert_signature: str
    cert_lifetime_days: int
    validated_by: frozenset[str]  # trust stores the server's chain validates in

    @property
    def all_suites(self) -> frozenset[str]:
        return frozenset().union(*self.suites.values())

    @property
    def non_aead_suites(self) -> frozenset[str]:
        return frozenset(
            s for s in self.all_suites if not any(mark in s for mark in _AEAD)
        )

    def summary(self) -> dict[str, Any]:
        """The key facts for the scorecard record."""
        return {
            "protocols": sorted(self.protocols),
            "suites": {p: sorted(s) for p, s in sorted(self.suites.items()) if s},
            "groups": sorted(self.curves),
            "certificate": (
                f"{self.cert_key} {self.cert_curve or ''} {self.cert_signature}, "
                f"{self.cert_lifetime_days} days"
            ),
            "compression": self.compression,
            "client_renegotiation": self.client_renegotiation,
            "tls12_ticket_resumption": self.ticket_resumption,
            "tls12_session_id_resumption": self.session_id_resumption,
            "early_data": self.early_data,
        }


def tls_facts(server: dict[str, Any]) -> TlsFacts:
    """Read the facts out of one ``server_scan_results`` entry."""
    scan = server["scan_result"]

    def result(name: str) -> dict[str, Any]:
        attempt = scan[name]
        if attempt["status"] != "COMPLETED":
            raise AssertionError(f"sslyze did not complete {name}: {attempt}")
        value: dict[str, Any] = attempt["result"]
        return value

    suites = {
        version: frozenset(
            accepted["cipher_suite"]["name"]
            for accepted in result(field)["accepted_cipher_suites"]
        )
        for field, version in _VERSIONS
    }
    protocols = frozenset(
        version
        for field, version in _VERSIONS
        if result(field)["is_tls_version_supported"]
    )
    curves = frozenset(
        c["name"] for c in result("elliptic_curves")["supported_curves"] or []
    )
    renegotiation = result("session_renegotiation")
    resumption = result("session_resumption")
    vulnerabilities = {
        "heartbleed": result("heartbleed")["is_vulnerable_to_heartbleed"],
        "ccs_injection": result("openssl_ccs_injection")[
            "is_vulnerable_to_ccs_injection"
        ],
        "robot": result("robot")["robot_result"].startswith("VULNERABLE"),
    }
    certificate_info = result("certificate_info")
    (deployment,) = certificate_info["certificate_deployments"]
    leaf = deployment["received_certificate_chain"][0]
    lifetime = _parse_time(leaf["not_valid_after"]) - _parse_time(
        leaf["not_valid_before"]
    )
    public_key = leaf["public_key"]
    return TlsFacts(
        protocols=protocols,
        suites=suites,
        curves=curves,
        compression=result("tls_compression")["supports_compression"],
        secure_renegotiation=renegotiation["supports_secure_renegotiation"],
        client_renegotiation=renegotiation["is_vulnerable_to_client_renegotiation_dos"]
        or renegotiation["client_renegotiations_success_count"] > 0,
        fallback_scsv=result("tls_fallback_scsv")["supports_fallback_scsv"],
        extended_master_secret=result("tls_extended_master_secret")[
            "supports_ems_extension"
        ],
        known_vulnerabilities=frozenset(k for k, v in vulnerabilities.items() if v),
        ticket_resumption=resumption["tls_ticket_resumption_result"],
        session_id_resumption=resumption["session_id_resumption_result"],
        early_data=result("tls_1_3_early_data")["supports_early_data"],
        cert_key={"ECPublicKey": "ecdsa", "RSAPublicKey": "rsa"}.get(
            public_key["algorithm"], public_key["algorithm"]
        ),
        cert_curve=public_key["ec_curve_name"],
        cert_signature=leaf["signature_algorithm_oid"]["name"],
        cert_lifetime_days=int(lifetime // 86400),
        validated_by=frozenset(
            p["trust_store"]["name"]
            for p in deployment["path_validation_results"]
            if p["was_validation_successful"]
        ),
    )


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def mozilla_findings(facts: TlsFacts, profile: dict[str, Any]) -> dict[str, str]:
    """Where *facts* fall short of a Mozilla configuration, keyed like sslyze's
    own compliance report (the same checks, made on the JSON)."""
    findings: dict[str, str] = {}
    if extra := facts.protocols - set(profile["tls_versions"]):
        findings["tls_versions"] = f"{sorted(extra)} accepted"
    if extra := facts.suites["TLSv1.3"] - set(profile["ciphersuites"]):
        findings["ciphersuites"] = f"{sorted(extra)} accepted"
    older = facts.all_suites - facts.suites["TLSv1.3"]
    if extra := older - set(profile["ciphers"]["iana"]):
        findings["ciphers"] = f"{sorted(extra)} accepted"
    allowed_curves = {_SECG.get(c, c) for c in profile["tls_curves"]}
    if extra := facts.curves - allowed_curves:
        findings["tls_curves"] = f"{sorted(extra)} accepted"
    if facts.cert_key not in profile["certificate_types"]:
        findings["certificate_types"] = f"{facts.cert_key} certificate"
    if facts.cert_key == "ecdsa" and facts.cert_curve not in {
        _SECG.get(c, c) for c in profile["certificate_curves"]
    }:
        findings["certificate_curves"] = f"certificate curve {facts.cert_curve}"
    if facts.cert_signature not in profile["certificate_signatures"]:
        findings["certificate_signatures"] = facts.cert_signature
    if facts.cert_lifetime_days > profile["maximum_certificate_lifespan"]:
        findings["maximum_certificate_lifespan"] = f"{facts.cert_lifetime_days} days"
    if not facts.validated_by:
        findings["certificate_path_validation"] = "no trust store validates the chain"
    if facts.compression:
        findings["tls_vulnerability_compression"] = "TLS compression"
    if not facts.fallback_scsv:
        findings["tls_vulnerability_fallback_scsv"] = "no TLS_FALLBACK_SCSV"
    if not facts.secure_renegotiation:
        findings["tls_vulnerability_renegotiation"] = "insecure renegotiation"
    if not facts.extended_master_secret:
        findings["tls_vulnerability_extended_master_secret"] = "no EMS"  # noqa: S105 - a finding, not a secret
    for name in sorted(facts.known_vulnerabilities):
        findings[f"tls_vulnerability_{name}"] = name
    return findings
