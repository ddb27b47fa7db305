"""atheris target: the CSR intake, ``auth.sign_device_csr`` on untrusted bytes.

The first byte picks the mode. Even: the rest is the certificate request
itself (PEM or DER), as ``relay ca sign``, the enrollment API and a renewal
hand it to ``auth.sign_device_csr`` with the default profile and size cap; it
must return a certificate for a valid device id or raise
``CertificateRequestError``. Odd: the rest is the body of ``POST
/api/v1/enrollments``, read by the enrollment API's own ``_read_csr`` (the JSON
shape and ASCII checks) and then signed the same way; a refusal there is the
API's 400/413/415. Anything else raised is a crash.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import atheris  # type: ignore[import-untyped]

# Only our code (and the parser under test) is instrumented: instrumenting
# every dependency makes start-up take minutes for no useful coverage.
with atheris.instrument_imports(
    include=["auth", "relay._trio.enrollment_api", "relay._trio.request_body"],
    enable_loader_override=False,
):
    import auth
    from relay._trio import enrollment_api
    from relay.api_contract import MAX_ENROLLMENT_BODY_BYTES
    from relay.config import PKIConfig

from fuzz._shared import json_request, run_without_io

_NOW = datetime(2026, 6, 1, tzinfo=UTC)
_CA = auth.create_ca(common_name="Fuzz CA", now=_NOW, lifetime=timedelta(days=3650))
_PROFILE = PKIConfig()


def _sign(csr: bytes) -> None:
    try:
        signed = auth.sign_device_csr(
            _CA,
            csr,
            now=_NOW,
            lifetime=timedelta(days=_PROFILE.device_cert_lifetime_days),
            max_csr_bytes=_PROFILE.max_csr_bytes,
        )
    except auth.CertificateRequestError:
        return
    auth.validate_device_id(signed.identity.device_id)


def _enrollment(body: bytes) -> None:
    request = json_request(body)
    try:
        csr = run_without_io(
            enrollment_api._read_csr(request, MAX_ENROLLMENT_BODY_BYTES)
        )
    except enrollment_api._Refused as refused:
        if refused.status not in (400, 413, 415):
            raise AssertionError(f"unexpected status {refused.status}") from None
        return
    _sign(csr)


def fuzz_one_input(data: bytes) -> None:
    """One input: a CSR (first byte even) or an enrollment body (odd)."""
    if not data:
        return
    if data[0] & 1:
        _enrollment(data[1:])
    else:
        _sign(data[1:])


def main() -> None:
    """Fuzz with libFuzzer's command line (see fuzz/README.md)."""
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
