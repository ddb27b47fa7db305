"""Authentication for the relay: pure functions, no I/O.

Bytes, certificate objects and the current time go in; verified identities come out,
or an :class:`AuthError` subclass is raised. Nothing here imports trio, sockets or
ssl, reads the clock or touches files.
"""

from .errors import (
    AuthError as AuthError,
    CertificateRequestError as CertificateRequestError,
    UntrustedPeer as UntrustedPeer,
)
from .pki import (
    DEVICE_ID_PATTERN as DEVICE_ID_PATTERN,
    DEVICE_URI_PREFIX as DEVICE_URI_PREFIX,
    CertificateAuthority as CertificateAuthority,
    DeviceIdentity as DeviceIdentity,
    SignedDevice as SignedDevice,
    build_device_csr as build_device_csr,
    certificate_fingerprint as certificate_fingerprint,
    create_ca as create_ca,
    device_identity as device_identity,
    generate_private_key as generate_private_key,
    issue_server_certificate as issue_server_certificate,
    load_ca as load_ca,
    load_private_key as load_private_key,
    private_key_pem as private_key_pem,
    sign_device_csr as sign_device_csr,
    validate_device_id as validate_device_id,
    verify_device_certificate as verify_device_certificate,
)

__all__ = [
    "DEVICE_ID_PATTERN",
    "DEVICE_URI_PREFIX",
    "AuthError",
    "CertificateAuthority",
    "CertificateRequestError",
    "DeviceIdentity",
    "SignedDevice",
    "UntrustedPeer",
    "build_device_csr",
    "certificate_fingerprint",
    "create_ca",
    "device_identity",
    "generate_private_key",
    "issue_server_certificate",
    "load_ca",
    "load_private_key",
    "private_key_pem",
    "sign_device_csr",
    "validate_device_id",
    "verify_device_certificate",
]
