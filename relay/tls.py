"""TLS contexts for the broker's listeners and the agent.

The device listener requires a client certificate issued by the device CA; the
chain, validity and signature are checked by OpenSSL during the handshake, and the
broker checks the profile and revocation right after (see ``device_listener``).
The device listener speaks TLS 1.3 only (Mozilla "modern"); the engineer
listener, which browsers reach, refuses anything below TLS 1.2 and offers only
ECDHE key exchange with AEAD ciphers (Mozilla "intermediate"). No session
tickets are issued, for TLS 1.2 (``OP_NO_TICKET``) or TLS 1.3
(``num_tickets = 0``), so a device runs a full handshake on every connection.
On the engineer listener TLS 1.2 session-ID resumption remains (CPython 3.11
has no switch for OpenSSL's server session cache; Mozilla's profiles allow
it). Whatever the handshake, the device listener checks the certificate
itself right after it (a resumed handshake would skip OpenSSL's chain check).

Key exchange uses P-256 only. OpenSSL's default group list also offers X448 and
secp521r1, which Mozilla's profiles reject (sslyze finds them), and CPython 3.11
can set only one group (``set_ecdh_curve``): X25519 cannot be kept with P-256 and
P-384. The agent asks for the same group, so its TLS 1.3 key share is accepted at
once (no HelloRetryRequest round trip).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

#: The one ECDHE group, on every context (see the module docstring).
ECDH_CURVE: Final = "prime256v1"

# Mozilla intermediate, TLS 1.2 part: ECDHE + AEAD only (TLS 1.3 suites are fixed).
TLS12_CIPHERS: Final = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def _server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.set_ecdh_curve(ECDH_CURVE)
    context.options |= (
        ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    )
    context.num_tickets = 0  # TLS 1.3: OP_NO_TICKET covers only TLS 1.2
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return context


def device_listener_context(
    *, cert_file: Path, key_file: Path, device_ca_file: Path
) -> ssl.SSLContext:
    """Server context for the device listener: client certificate required.

    TLS 1.3 only (Mozilla "modern"): the only client is our agent, which speaks
    it, so nothing older needs to be kept for compatibility.
    """
    context = _server_context(cert_file, key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(device_ca_file))
    return context


def engineer_listener_context(*, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Server context for the engineer listener (browsers and the CLI)."""
    context = _server_context(cert_file, key_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


def agent_context(
    *,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    extra_ca_file: Path | None = None,
) -> ssl.SSLContext:
    """Client context for the agent: trusts only *ca_file* (and *extra_ca_file*,
    the CA bundle a renewal brought, when it exists), presents the device cert.

    The broker's name is checked against its certificate (``check_hostname``).
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    if extra_ca_file is not None and extra_ca_file.exists():
        context.load_verify_locations(cafile=str(extra_ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.set_ecdh_curve(ECDH_CURVE)
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return context
