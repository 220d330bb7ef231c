"""Shared test harness: real components started by the tests, and the rule for missing ones.

Each component has a module here (``tests/harness/libvirt.py``...) whose fixtures start the
real daemon. They are loaded for every test by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[2]
# Slow fixtures (guest kernels and images, the criu build) are built once per machine here.
CACHE_DIR = Path(os.environ.get("KUMO_TEST_CACHE", "/var/cache/kumo-test"))


def require(condition: bool, what: str) -> None:
    """Skip on a developer's machine when a real component is missing; fail in CI (CI=true).

    ``what`` says what is missing and how to get it (usually ``make deps``).
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing in CI: {what}", pytrace=False)
    pytest.skip(f"missing: {what} (run `make deps`)")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def free_port(count: int = 1) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, with the ``count - 1`` after it.

    Chosen below the kernel's ephemeral range: a port the kernel hands out itself (bind to
    port 0) can become the local end of any outgoing connection before the test's server
    binds it, which failed a CI run with "address already in use". No port is handed out
    twice in one run, so two servers of one test never draw the same.
    """
    low, _ = _ephemeral_range()
    pool = range(10000, max(low, 10000 + 1000) - count)
    for _ in range(200):
        port = random.choice(pool)
        wanted = range(port, port + count)
        if _handed_out.intersection(wanted):
            continue
        try:
            for candidate in wanted:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        _handed_out.update(wanted)
        return port
    raise RuntimeError(f"no {count} free consecutive TCP ports below {low}")


def read_counter(path: Path) -> int:
    """The number a test workload keeps writing to ``path`` (0 before it wrote one).

    A writer that truncates before it writes (a shell's ``echo $i > file``) leaves the file
    empty for an instant: an empty read is that instant, not a count, so read again.
    """
    for _ in range(100):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return 0
        if text.strip():
            return int(text)
        time.sleep(0.01)
    return 0


def tls_server_context(directory: Path) -> ssl.SSLContext:
    """A server context with a throwaway self-signed certificate for 127.0.0.1, written with its
    key to ``directory/cert.pem`` and ``key.pem``: the client trusts ``cert.pem`` as its CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kumo-test-images")])
    now = datetime.datetime.utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context
