"""TLS that checks who the peer is, not only that Kumo's CA signed its certificate.

Every certificate the controller issues names its holder's role in the subject
(``O=kumo, OU=<admin|node|controller|scraper>, CN=<name>``). A CA check alone would let any
node, whose certificate the same CA signed, serve as the controller to every agent and
kumoctl, or scrape another node's metrics. :func:`require_peer_role` makes a context refuse
the handshake itself unless the peer's certificate has one of the given roles: the check
runs inside ``do_handshake``, so not one byte of a request (a migration image, a task
result) reaches a peer that fails it, and it holds for every client or server built on the
context (``http.client``, asyncio streams, aiohttp).
"""

from __future__ import annotations

import ssl
from typing import Any

ROLE_ATTRIBUTE = "organizationalUnitName"


def peer_role(certificate: dict[str, Any] | None) -> str | None:
    """The role in a peer certificate as ``getpeercert()`` returns it; None when it has none."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == ROLE_ATTRIBUTE:
                return str(value)
    return None


def require_peer_role(context: ssl.SSLContext, *roles: str) -> ssl.SSLContext:
    """Make ``context`` refuse a handshake whose peer certificate has none of ``roles``.

    The peer must present a certificate (a server context needs ``CERT_REQUIRED``). A refusal
    is an :class:`ssl.SSLCertVerificationError` naming the role found and the roles wanted.
    Returns ``context``.
    """
    allowed = frozenset(roles)

    def check(found: dict[str, Any] | None) -> None:
        role = peer_role(found)
        if role not in allowed:
            message = (f"the peer's certificate is a Kumo {role or 'role-less'} certificate, "
                       f"not a {' or '.join(sorted(allowed))} certificate")
            error = ssl.SSLCertVerificationError(message)
            error.verify_message = message
            error.verify_code = 0
            raise error

    class RoleCheckedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check(self.getpeercert())

    class RoleCheckedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check(self.getpeercert())

    context.sslobject_class = RoleCheckedObject
    context.sslsocket_class = RoleCheckedSocket
    return context
