"""Joining: admins make join tokens; a new node trades one for its certificate.

Only the token's SHA-256 is stored, so a copy of the database cannot enroll anything. The
join string also carries the hash of the CA's public key, which the node checks before it
sends the token (see ``agent/enroll.py``), and every controller's URL, which the node keeps.

A node remembers the token and key it joined with, so that the same join retried after its
answer was lost (the controller killed after the commit) gets the same node, not a refusal
of the spent token and a node nobody holds a key for.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import logging
import secrets
import time
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from controller import pki
from controller.api import ApiError, Route, field, json_body, reject_unknown, reply, state
from controller.services import iso
from controller.settings import split_address

log = logging.getLogger(__name__)

JOIN_PREFIX = "kumo2"
MAX_TOKEN_TTL = 30 * 86400
MAX_TOKEN_USES = 1000


def join_string(enroll_port: int, token: str, ca_hash: str, urls: list[str]) -> str:
    """``kumo2:<enroll_port>:<token>:<ca_hash>:<url>[,<url>...]`` (parsed by agent/enroll.py).

    The URLs come last because they hold colons themselves: the agent splits the first four
    fields off and the rest at commas, which an https://HOST:PORT URL never contains.
    """
    return f"{JOIN_PREFIX}:{enroll_port}:{token}:{ca_hash}:{','.join(urls)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    reject_unknown(data, {"ttl_seconds", "uses"})
    ttl = field(data, "ttl_seconds", int, required=False, default=3600)
    uses = field(data, "uses", int, required=False, default=1)
    if not 60 <= ttl <= MAX_TOKEN_TTL:
        raise ApiError(400, f"ttl_seconds must be from 60 to {MAX_TOKEN_TTL} (30 days), got {ttl}")
    if not 1 <= uses <= MAX_TOKEN_USES:
        raise ApiError(400, f"uses must be from 1 to {MAX_TOKEN_USES}, got {uses}")
    token = secrets.token_urlsafe(24)
    expires_at = time.time() + ttl
    await ctl.store.add_token(token_hash(token), expires_at, uses)
    _, enroll_port = split_address(ctl.settings.enroll_listen, "enroll_listen")
    join = join_string(enroll_port, token, pki.spki_sha256(ctl.ca.cert), await ctl.controller_urls())
    return reply({"join": join, "expires_at": iso(expires_at), "uses": uses}, 201)


async def enroll_node(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    reject_unknown(data, {"token", "csr", "hostname", "previous"})
    token = field(data, "token", str)
    csr = field(data, "csr", str)
    hostname = field(data, "hostname", str)
    previous = field(data, "previous", dict, required=False)
    if not 0 < len(hostname) <= 253:
        raise ApiError(400, "hostname must be 1 to 253 characters")
    # The token first: without one that exists nobody gets the CA to verify a signature or
    # sign a certificate (this port is open to anyone who can reach it).
    hashed = token_hash(token)
    status = await ctl.store.token_status(hashed)
    if status == "unknown":
        _refuse_unless_ok(ctl, status)
    try:
        public_key = pki.public_key_from_csr(csr)
    except pki.CSRError as exc:
        # Checked before the token is spent: a bad CSR does not cost the node its token.
        ctl.metrics.enrollments.labels("bad-csr").inc()
        raise ApiError(400, str(exc)) from None
    key_hash = pki.key_sha256(public_key)
    # The same join again (same token, same key) after its answer was lost, say to a
    # controller killed after the commit: it gets its node again, whatever the token has
    # left. A used token with any other key is refused.
    node_id = await ctl.store.joined_before(hashed, key_hash)
    cert: x509.Certificate | None = None
    if node_id is None:
        _refuse_unless_ok(ctl, status)
        node_id, cert = await _join(ctl, request, hashed, key_hash, public_key, hostname, previous, token, csr)
    if cert is None:
        cert = _issue(ctl, public_key, node_id, request.remote)
        if not await ctl.store.add_certificate(node_id, format(cert.serial_number, "x"), _cert_expiry(ctl)):
            _refuse_removed(ctl, node_id)
        log.info("node %s asked again for the answer to its join: answered with a new certificate", node_id)
    ctl.metrics.enrollments.labels("ok").inc()
    return reply(
        {
            "node_id": node_id,
            "certificate": pki.pem(cert),
            "ca": pki.pem(ctl.ca.cert),
            "cert_ttl_seconds": ctl.settings.node_cert_ttl,
        },
        201,
    )


async def _join(ctl: Any, request: web.Request, hashed: str, key_hash: str, public_key: ec.EllipticCurvePublicKey, hostname: str,
                previous: dict[str, Any] | None, token: str, csr: str) -> tuple[str, x509.Certificate | None]:
    """Spend a use of the token on a new node (or, with ``previous``, on the node it proves
    it was): its id and certificate; no certificate when this same join's lost first try,
    still running when the node gave up its connection, spent the use meanwhile."""
    node_id = "n-" + secrets.token_hex(6) if previous is None else _previous_node(ctl, previous, token, csr)
    cert = _issue(ctl, public_key, node_id, request.remote)
    serial = format(cert.serial_number, "x")
    # Spent here, atomically: another enrollment may have used the token's last use meanwhile.
    if previous is None:
        outcome = await ctl.store.enroll(hashed, key_hash, node_id, hostname, serial, _cert_expiry(ctl))
    else:
        outcome = await ctl.store.rejoin(hashed, key_hash, node_id, serial, _cert_expiry(ctl))
        if outcome == "removed":
            _refuse_removed(ctl, node_id)
    if outcome == "used":
        earlier = await ctl.store.joined_before(hashed, key_hash)
        if earlier is not None:
            return earlier, None
    _refuse_unless_ok(ctl, outcome)
    if previous is not None:
        log.info("node %s joined again with a new key (certificate serial %s)", node_id, serial)
    return node_id, cert


def _issue(ctl: Any, public_key: ec.EllipticCurvePublicKey, node_id: str, remote: str | None) -> x509.Certificate:
    return ctl.ca.issue_node(public_key, node_id, datetime.timedelta(seconds=ctl.settings.node_cert_ttl), remote)


def _cert_expiry(ctl: Any) -> float:
    return time.time() + ctl.settings.node_cert_ttl


def _refuse_removed(ctl: Any, node_id: str) -> None:
    ctl.metrics.enrollments.labels("removed").inc()
    raise ApiError(403, f"node {node_id} was removed, for good: join as a new node (move the state "
                        "directory's node.key, node.crt and join.json away, then join again)")


def _previous_node(ctl: Any, previous: dict[str, Any], token: str, csr: str) -> str:
    """The node a re-joining agent proves it was: a certificate of ours naming it (expired, as
    after a partition longer than its lifetime, or not) and a signature with that
    certificate's key over this token and CSR. A token alone never buys an existing node's
    identity: only the holder of its key can come back as it, and a removed node never can."""
    reject_unknown(previous, {"certificate", "signature"})
    certificate = field(previous, "certificate", str)
    try:
        signature = base64.b64decode(field(previous, "signature", str), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "previous.signature must be base64") from None
    try:
        return pki.previous_node(ctl.ca, certificate, signature, pki.rejoin_message(token, csr))
    except pki.CSRError as exc:
        ctl.metrics.enrollments.labels("bad-previous").inc()
        raise ApiError(403, str(exc)) from None


def _refuse_unless_ok(ctl: Any, outcome: str) -> None:
    if outcome == "ok":
        return
    ctl.metrics.enrollments.labels(outcome).inc()
    why = {
        "unknown": "is not known to this controller",
        "expired": "has expired",
        "used": "was already used as many times as it allows",
    }[outcome]
    raise ApiError(401, f"the join token {why}; make a new one with `kumoctl token create`")


ROUTES = [
    Route("POST", "/v1/tokens", create_token, "admin", "Create a join token and its join string.",
          {"ttl_seconds": "integer, 60..2592000 (default 3600)", "uses": "integer, 1..1000 (default 1)"}),
    Route("POST", "/v1/enroll", enroll_node, "enroll", "Trade a join token and a CSR for a node certificate. The same token "
          "with the same key again (an answer lost) gets the same node, until the token expires and at least "
          "10 minutes after its use.",
          {"token": "the token part of the join string", "csr": "PEM CSR, ECDSA P-256", "hostname": "string",
           "previous": "optional object, to join again as the same node: {certificate: the node's last PEM "
                       "certificate, signature: base64 ECDSA-SHA256 by its key over "
                       "'kumo-rejoin\\0' + token + '\\0' + csr}"}),
]
