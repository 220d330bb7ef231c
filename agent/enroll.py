"""Joining a controller (``kumo-agent join``) and the node key/certificate files.

The join string pins the controller's CA by the SHA-256 of its SubjectPublicKeyInfo, as
``kubeadm join --discovery-token-ca-cert-hash`` does. The agent fetches the enrollment
listener's certificate chain without trusting it, finds the certificate whose key hash is
the pinned one, and only then opens a second, fully verified TLS connection to that CA and
sends the token. A mismatch stops the join before the token leaves the node.

The node key is made here and never leaves the node: only a CSR is sent. It is kept
(node.key.pending, 0600) before the request goes out, so that a join whose answer was lost
(the controller died after enrolling the node, the connection broke) can be retried with
the same token and key: the controller then answers with the node it made for that join.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import http.client
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.sdk import atomic_write, require_peer_role
from agent.settings import (
    CA_CERT,
    JOIN_FILE,
    NODE_CERT,
    NODE_CERT_NEXT,
    NODE_KEY,
    NODE_KEY_PENDING,
    JoinError,
    JoinRecord,
    controller_url,
    write_join_record,
)

JOIN_PREFIX = "kumo2"
# What controllers printed before join strings carried their URLs: still joins, with --controller.
OLD_JOIN_PREFIX = "kumo1"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,}\Z")
_HASH_RE = re.compile(r"^[0-9a-f]{64}\Z")
_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
NETWORK_TIMEOUT = 30.0
# Waits before each new try of an enrollment request whose answer never came (a controller
# restarting, a connection reset): about 15 s in all.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)


class Unreachable(JoinError):
    """No TLS answer from one controller's enrollment listener: the next one may answer."""


class AnswerLost(JoinError):
    """The enrollment request may or may not have reached the controller: no answer came."""


@dataclasses.dataclass(frozen=True)
class JoinString:
    """A parsed ``kumo2:<enroll_port>:<token>:<ca_hash>:<url>[,<url>...]``."""

    enroll_port: int
    token: str
    ca_hash: str
    controllers: tuple[str, ...]


def parse_join_string(text: str) -> JoinString:
    """Parse the string ``kumoctl token create`` prints; JoinError names the bad part.

    The controllers' URLs come last and hold colons of their own, so only the first four
    colons separate fields; the URLs are separated by commas.
    """
    expected = (f"expected {JOIN_PREFIX}:<enroll_port>:<token>:<ca_hash>:<url>[,<url>...] "
                "as printed by `kumoctl token create`")
    parts = text.strip().split(":", 4)
    fields = {JOIN_PREFIX: 5, OLD_JOIN_PREFIX: 4}.get(parts[0])
    if fields is None:
        raise JoinError(f"malformed join string: it starts with {parts[0][:16]!r}, not {JOIN_PREFIX}; {expected}")
    if len(parts) < fields or (fields == 4 and len(parts) > 4):
        raise JoinError(f"malformed join string: {fields} fields separated by ':' needed, {len(parts)} found; {expected}")
    port, token, ca_hash = parts[1:4]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise JoinError(f"malformed join string: enrollment port {port!r} is not a TCP port; {expected}")
    if not _TOKEN_RE.match(token):
        raise JoinError(f"malformed join string: the token part is not a Kumo token; {expected}")
    ca_hash = ca_hash.lower()
    if not _HASH_RE.match(ca_hash):
        raise JoinError(
            f"malformed join string: the CA hash must be 64 hex digits (SHA-256), got {len(ca_hash)} characters; {expected}"
        )
    controllers: list[str] = []
    for i, url in enumerate(parts[4].split(",") if fields == 5 else (), start=1):
        try:
            controllers.append(controller_url(url))
        except ValueError as exc:
            raise JoinError(f"malformed join string: controller URL {i}: {exc}; {expected}") from None
    return JoinString(int(port), token, ca_hash, tuple(dict.fromkeys(controllers)))


def spki_sha256(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of a certificate's SubjectPublicKeyInfo (DER): the join string's pin."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def fetch_unverified_chain(host: str, port: int, timeout: float = NETWORK_TIMEOUT) -> list[x509.Certificate]:
    """The certificates the TLS server at host:port presents, leaf first, NOT verified.

    Python's ssl exposes the peer's chain only from 3.13 (``get_unverified_chain``); before
    that it gives just the leaf, and the leaf alone cannot be checked against a pinned CA.
    On older Pythons the chain comes from ``openssl s_client -showcerts`` (an argument list,
    no shell): the openssl binary is a dependency of the agent package anyway.
    """
    if hasattr(ssl.SSLSocket, "get_unverified_chain"):
        return _chain_from_ssl(host, port, timeout)
    return _chain_from_openssl(host, port, timeout)


def _chain_from_ssl(host: str, port: int, timeout: float) -> list[x509.Certificate]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted yet: the pin is checked by the caller
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=None if _is_ip(host) else host) as tls:
                chain = tls.get_unverified_chain() or []
    except (OSError, ssl.SSLError) as exc:
        raise Unreachable(f"cannot reach the enrollment listener at {host}:{port}: {exc}") from None
    ders = [c if isinstance(c, bytes) else c.public_bytes(ssl.ENCODING_DER) for c in chain]
    return [x509.load_der_x509_certificate(der) for der in ders]


def _chain_from_openssl(host: str, port: int, timeout: float) -> list[x509.Certificate]:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    args = ["openssl", "s_client", "-connect", target, "-showcerts"]
    if not _is_ip(host):
        args += ["-servername", host]
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise JoinError("the openssl command is missing: install the openssl package") from None
    except subprocess.TimeoutExpired:
        raise Unreachable(f"no TLS answer from the enrollment listener at {host}:{port} within {timeout:.0f} s") from None
    certs = [x509.load_pem_x509_certificate(pem) for pem in _PEM_CERT_RE.findall(proc.stdout)]
    if not certs:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[0] if detail else f"openssl exited {proc.returncode}"
        raise Unreachable(f"cannot reach the enrollment listener at {host}:{port}: {reason}")
    return certs


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def find_pinned_ca(chain: list[x509.Certificate], ca_hash: str, where: str) -> x509.Certificate:
    """The certificate of ``chain`` whose SPKI hash is ``ca_hash``; JoinError (refusal) otherwise."""
    for cert in chain:
        if spki_sha256(cert) == ca_hash:
            return cert
    seen = ", ".join(spki_sha256(c)[:16] + "..." for c in chain) or "no certificate"
    raise JoinError(
        f"refusing to join: the server at {where} presented no CA certificate matching the join "
        f"string's hash {ca_hash[:16]}... (it presented {seen}). The token was NOT sent. Check the "
        "controller's address and that the join string comes from that controller."
    )


def new_node_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 node key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> str:
    """A PEM CSR for ``key``; the controller decides the final subject (its node id)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kumo"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def check_issued(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, node_id: str) -> None:
    """The certificate the controller returned is for our key and our node id."""
    ours = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise JoinError("the controller returned a certificate for a different key; not stored")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != node_id:
        raise JoinError(f"the controller returned a certificate for another node than {node_id}; not stored")


def _verified_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The join token and CSR go only to the controller, not to a node posing as it.
    return require_peer_role(ctx, "controller")


def _post_json(host: str, port: int, ctx: ssl.SSLContext, path: str, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=NETWORK_TIMEOUT)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    except ssl.SSLCertVerificationError as exc:
        raise JoinError(
            f"the enrollment listener at {host}:{port} is not verified by the pinned CA: {exc.verify_message}; "
            "use the address the controller's certificate names (kumo-controller init --san)"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise AnswerLost(f"no answer to the enrollment request to {host}:{port}: {exc or type(exc).__name__}") from None
    finally:
        conn.close()
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        data = {}
    if response.status >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        raise JoinError(f"the controller refused the enrollment ({response.status}): {error or raw[:200]!r}")
    if not isinstance(data, dict):
        raise JoinError("the controller's enrollment answer is not a JSON object")
    return data


def identity_exists(state_dir: Path) -> bool:
    return any((state_dir / name).exists() for name in (JOIN_FILE, NODE_CERT, NODE_KEY))


def join(controllers: list[str], join_text: str, state_dir: Path, *, force: bool = False) -> JoinRecord:
    """Enroll this node; write node.key (0600), node.crt, ca.crt and join.json into ``state_dir``.

    ``controllers`` (``--controller``) come before the join string's URLs, in the list tried
    and in the one recorded: a node may reach a controller by another address than the one
    it announces. Enrollment goes to the first whose enrollment listener answers.

    With ``force``, a node this controller's CA certified before (its certificate expired
    during a partition, say) joins again as itself: it proves it holds the old key, and
    keeps its node id, its queued tasks and its instances (see :func:`rejoin_proof`).
    """
    pin = parse_join_string(join_text)
    urls = list(dict.fromkeys([*controllers, *pin.controllers]))
    if not urls:
        raise JoinError(f"this {OLD_JOIN_PREFIX} join string names no controller: pass --controller URL as well")
    if identity_exists(state_dir) and not force:
        raise JoinError(
            f"{state_dir} already holds a node identity; pass --force to replace it "
            "(the old node stays registered until an admin removes it)"
        )
    ca, host = _pinned_ca(urls, pin)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    previous = _previous_identity(state_dir, ca) if force else None
    key = _pending_key(state_dir)
    hostname = socket.gethostname()
    csr = make_csr(key, hostname)
    body: dict[str, Any] = {"token": pin.token, "csr": csr, "hostname": hostname}
    if previous is not None:
        body["previous"] = rejoin_proof(*previous, pin.token, csr)
    answer = _enroll(host, pin.enroll_port, _verified_context(ca_pem), body, state_dir / NODE_KEY_PENDING)
    try:
        node_id = str(answer["node_id"])
        cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
    except (KeyError, ValueError) as exc:
        raise JoinError(f"the controller's enrollment answer is incomplete: {exc}") from None
    check_issued(cert, key, node_id)
    (state_dir / NODE_CERT_NEXT).unlink(missing_ok=True)
    (state_dir / NODE_KEY_PENDING).replace(state_dir / NODE_KEY)
    atomic_write(state_dir / NODE_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    atomic_write(state_dir / CA_CERT, ca_pem.encode(), 0o644)
    record = JoinRecord(controllers=tuple(urls), node_id=node_id)
    write_join_record(state_dir, record)
    return record


def _pending_key(state_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The key of an earlier join of this node whose answer never came, or a new one; kept
    in node.key.pending (0600) before anything is sent, so that a retry sends the same key."""
    path = state_dir / NODE_KEY_PENDING
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (FileNotFoundError, ValueError):  # none, or not one written whole: a new one does
        key = None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    key = new_node_key()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, key_pem(key), 0o600)
    return key


def _enroll(host: str, port: int, ctx: ssl.SSLContext, body: dict[str, Any], pending: Path) -> dict[str, Any]:
    """POST the enrollment, again after a lost answer: the controller answers the same token
    and key with the node it made for them, so a retry never costs a node or the token."""
    for delay in RETRY_DELAYS:
        try:
            return _post_json(host, port, ctx, "/v1/enroll", body)
        except AnswerLost as exc:
            print(f"kumo-agent join: {exc}; trying again in {delay:.0f} s with the same token and key",
                  file=sys.stderr, flush=True)
        time.sleep(delay)
    try:
        return _post_json(host, port, ctx, "/v1/enroll", body)
    except AnswerLost as exc:
        raise JoinError(
            f"{exc}, after {len(RETRY_DELAYS) + 1} tries. The token may or may not have been used: run the same "
            f"`kumo-agent join` again (the same join string; the key is kept in {pending}) before the token "
            "expires, or within 10 minutes of its use, and the controller answers with the node it made, if any"
        ) from None


def rejoin_proof(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, token: str, csr: str) -> dict[str, str]:
    """The enrollment's ``previous``: the node's last certificate and its key's signature over
    this token and CSR (the bytes controller/pki.py's ``rejoin_message`` checks), so the proof
    cannot be replayed with another token or for another key."""
    message = b"kumo-rejoin\0" + token.encode() + b"\0" + csr.encode()
    return {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "signature": base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()}


def _previous_identity(state_dir: Path, ca: x509.Certificate) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The key and certificate in ``state_dir`` if ``ca`` issued that certificate: then the
    node is this controller's and joins again as itself; None for a node new to it."""
    try:
        key = serialization.load_pem_private_key((state_dir / NODE_KEY).read_bytes(), password=None)
        cert = load_certificate(state_dir / NODE_CERT)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.issuer != ca.subject:
            return None
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except (OSError, ValueError, TypeError, InvalidSignature):
        return None
    return key, cert


def _pinned_ca(urls: list[str], pin: JoinString) -> tuple[x509.Certificate, str]:
    """The pinned CA from the first enrollment listener that answers, and that listener's host.

    Only an unreachable listener moves on to the next: one presenting another CA stops the
    join, since something answers on a controller's address that is not the controller.
    """
    failures = []
    for url in urls:
        host = urlsplit(url).hostname or ""
        where = f"{host}:{pin.enroll_port}"
        try:
            return find_pinned_ca(fetch_unverified_chain(host, pin.enroll_port), pin.ca_hash, where), host
        except Unreachable as exc:
            failures.append(str(exc))
    raise JoinError(f"no controller's enrollment listener answered: {'; '.join(failures)}")


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cert_validity(cert: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) as aware UTC datetimes, on cryptography 38 and current releases."""
    before = getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before.replace(tzinfo=datetime.UTC)
    after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=datetime.UTC)
    return before, after


def install_renewed(state_dir: Path, key: ec.EllipticCurvePrivateKey, cert_pem: bytes) -> None:
    """Put a renewed key and certificate in place so that a crash never leaves a mismatched pair.

    Order: the new certificate waits in node.crt.next, then the key is replaced atomically,
    then the certificate. :func:`recover_renewal` finishes or discards a half-done renewal.
    """
    atomic_write(state_dir / NODE_CERT_NEXT, cert_pem, 0o644)
    atomic_write(state_dir / NODE_KEY, key_pem(key), 0o600)
    (state_dir / NODE_CERT_NEXT).replace(state_dir / NODE_CERT)


def recover_renewal(state_dir: Path) -> None:
    """Finish a renewal interrupted between the key and the certificate, or discard it."""
    pending = state_dir / NODE_CERT_NEXT
    if not pending.exists():
        return
    key = serialization.load_pem_private_key((state_dir / NODE_KEY).read_bytes(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    key_pub = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    cert_pub = load_certificate(pending).public_key().public_bytes(serialization.Encoding.DER, spki)
    if key_pub == cert_pub:
        pending.replace(state_dir / NODE_CERT)
    else:
        pending.unlink()
