"""Write the seed corpora under fuzz/corpus/<target>/, reproducibly.

Every seed is built from fixed values (fixed keys, deterministic ECDSA, fixed
WebSocket masks), so running this again writes the same files. A seed's file
name is the SHA-1 of its bytes, as libFuzzer names the inputs it keeps.

    python -m fuzz.make_corpus            # (re)write fuzz/corpus/
    python -m fuzz.make_corpus --check    # exit 1 if the committed corpus differs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fuzz import TARGETS
from relay.proto import tunnel

CORPUS = Path(__file__).resolve().parent / "corpus"
_MASK = b"\x37\xfa\x21\x3d"


# tunnel_frame ---------------------------------------------------------------


def _frames() -> list[tunnel.Frame]:
    return [
        tunnel.StreamOpen(stream_id=1, channel="shell", cols=80, rows=24),
        tunnel.StreamOpen(stream_id=3, channel="tcp:443"),
        tunnel.StreamOpenOk(stream_id=1),
        tunnel.StreamOpenFail(
            stream_id=3, code=tunnel.OpenFailCode.NOT_ALLOWED, reason="not granted"
        ),
        tunnel.StreamData(stream_id=1, payload=b"ls -l\r"),
        tunnel.StreamWindow(stream_id=1, credit=65536),
        tunnel.StreamEof(stream_id=1),
        tunnel.StreamClose(stream_id=1, code=tunnel.StreamCloseCode.NORMAL),
        tunnel.StreamResize(stream_id=1, cols=132, rows=43),
    ]


def _record(side: int, message: bytes) -> bytes:
    return bytes([side]) + struct.pack(">H", len(message)) + message


def tunnel_frame_seeds() -> Iterator[bytes]:
    """Mode 0: each frame type; mode 1: a whole session, and a short one."""
    frames = _frames()
    for frame in frames:
        yield b"\x00" + tunnel.encode(frame)
    engineer, device = 0, 1
    open_shell, open_tcp, ok, fail, data, window, eof, close, resize = (
        tunnel.encode(frame) for frame in frames
    )
    yield b"\x01" + b"".join(
        [
            _record(engineer, open_shell),
            _record(device, ok),
            _record(engineer, data),
            _record(device, data),
            _record(device, window),
            _record(engineer, resize),
            _record(engineer, open_tcp),
            _record(device, fail),
            _record(engineer, eof),
            _record(engineer, close),
            _record(device, close),
        ]
    )
    yield b"\x01" + _record(engineer, open_shell) + _record(engineer, close)


# ws_frames ------------------------------------------------------------------


def _ws_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack(">H", size)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack(">Q", size)
    masked = bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))
    return head + _MASK + masked


_UPGRADE = (
    b"GET /v1/device/control HTTP/1.1\r\n"
    b"Host: relay.example:8443\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def ws_frames_seeds() -> Iterator[bytes]:
    """Mode 0: upgrade requests; mode 1: binary, fragmented, control frames."""
    yield b"\x00" + _UPGRADE
    yield b"\x00" + (
        b"GET /api/v1/events HTTP/1.1\r\n"
        b"Host: relay.example\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\n"
        b"Origin: https://relay.example\r\n"
        b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    # Found by this target: bytes after the request that are not a frame made
    # websockets fail the connection before the relay answered, and the
    # relay's answer then tripped websockets' assertions (fixed in
    # ServerHandshake.accept). A valid request and a mangled one.
    yield b"\x00" + _UPGRADE + b"\x00\x00\x00\x00"
    yield (
        b"\x00"
        + _UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"x3JJ 13")
        + b"\x00" * 4
    )
    frame = tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"hello"))
    yield b"\x01" + _ws_frame(0x2, frame)
    yield b"\x01" + _ws_frame(0x2, frame[:3], fin=False) + _ws_frame(0x0, frame[3:])
    yield b"\x01" + _ws_frame(0x9, b"ping") + _ws_frame(0xA, b"pong")
    yield b"\x01" + _ws_frame(0x1, b"text is refused")
    yield b"\x01" + _ws_frame(0x8, struct.pack(">H", 1000) + b"bye")
    yield b"\x01" + _ws_frame(0x2, b"\x04\x00\x00\x00\x01" + b"x" * 300)


# csr_intake -----------------------------------------------------------------


def _csr(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    device_id: str,
    *,
    extras: bool = False,
) -> x509.CertificateSigningRequest:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:relay:device:{device_id}")]
            ),
            critical=False,
        )
    )
    if extras:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)


def csr_intake_seeds() -> Iterator[bytes]:
    """Mode 0: PEM and DER requests (valid, with extras, weak key); mode 1:
    an enrollment body."""
    p256 = ec.derive_private_key(0x5EED, ec.SECP256R1())
    p384 = ec.derive_private_key(0x5EED, ec.SECP384R1())
    weak = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    plain = _csr(p256, "pump-7")
    pem = plain.public_bytes(serialization.Encoding.PEM)
    yield b"\x00" + pem
    yield b"\x00" + plain.public_bytes(serialization.Encoding.DER)
    yield b"\x00" + _csr(p384, "infusion-12", extras=True).public_bytes(
        serialization.Encoding.PEM
    )
    yield b"\x00" + _csr(weak, "pump-8").public_bytes(serialization.Encoding.DER)
    yield b"\x01" + json.dumps({"csr": pem.decode("ascii")}).encode()


SEEDS = {
    "tunnel_frame": tunnel_frame_seeds,
    "ws_frames": ws_frames_seeds,
    "csr_intake": csr_intake_seeds,
}


def expected() -> dict[str, dict[str, bytes]]:
    """Every target's seeds, by file name."""
    assert set(SEEDS) == set(TARGETS)  # noqa: S101 - a programming error
    return {
        target: {hashlib.sha1(seed).hexdigest(): seed for seed in make()}  # noqa: S324 - a name, as libFuzzer's
        for target, make in SEEDS.items()
    }


def differences(root: Path = CORPUS) -> list[str]:
    """How the corpus under *root* differs from what this script writes."""
    found: list[str] = []
    for target, seeds in expected().items():
        directory = root / target
        present = (
            {p.name for p in directory.iterdir() if p.is_file()}
            if directory.is_dir()
            else set()
        )
        found.extend(
            f"{target}/{name}: missing" for name in sorted(set(seeds) - present)
        )
        found.extend(f"{target}/{name}: extra" for name in sorted(present - set(seeds)))
        found.extend(
            f"{target}/{name}: differs"
            for name in sorted(set(seeds) & present)
            if (directory / name).read_bytes() != seeds[name]
        )
    return found


def write(root: Path = CORPUS) -> int:
    """Replace the corpus under *root*; return the number of seeds written."""
    count = 0
    for target, seeds in expected().items():
        directory = root / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            if old.name not in seeds:
                old.unlink()
        for name, seed in seeds.items():
            (directory / name).write_bytes(seed)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    """Write the corpus, or with ``--check`` compare it."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.make_corpus")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if args.check:
        found = differences()
        for line in found:
            print(line)
        return 1 if found else 0
    print(f"wrote {write()} seeds under {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
