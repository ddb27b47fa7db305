"""TLS contexts for the broker's listeners and the agent.

The device listener requires a client certificate issued by the device CA; the
chain, validity and signature are checked by OpenSSL during the handshake, and the
broker checks the profile and revocation right after (see ``device_listener``).
Both listeners refuse anything below TLS 1.2 and offer only ECDHE key exchange
with AEAD ciphers (Mozilla "intermediate" for TLS 1.2). Session tickets are off so
that every connection runs a full handshake and its certificate is checked again.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

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
    context.options |= (
        ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    )
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return context


def device_listener_context(
    *, cert_file: Path, key_file: Path, device_ca_file: Path
) -> ssl.SSLContext:
    """Server context for the device listener: client certificate required."""
    context = _server_context(cert_file, key_file)
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
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return context
