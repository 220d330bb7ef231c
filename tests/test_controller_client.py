"""The agent's controller client (agent/client.py) against a real mutual-TLS aiohttp server:
kept-alive connections are reused, a connection the server closed is replaced without the
caller noticing, a cancelled long poll lets go at once, a renewal stops reusing connections
made with the old certificate, and answers are sorted into unavailable and rejected."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.client import ControllerClient, ControllerRejected
from agent.sdk import ControllerUnavailable, Identity
from controller.pki import CertificateAuthority, key_pem, new_key, pem

DAY = datetime.timedelta(days=1)


class Server:
    """An HTTPS server requiring client certificates from the test CA; counts connections."""

    def __init__(self) -> None:
        self.peers: set[object] = set()
        self.requests: list[str] = []
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport)
        self.requests.append(f"{request.method} {request.path}")
        if request.path == "/v1/nodes/n1/hold":
            await self.release.wait()
        if request.path == "/v1/nodes/n1/bad":
            return web.json_response({"error": "no such thing"}, status=404)
        if request.path == "/v1/nodes/n1/broken":
            return web.Response(text="oops", status=502)
        body = await request.json() if request.can_read_body else None
        return web.json_response({"echo": body})


def _identity(ca: CertificateAuthority, directory: Path, name: str) -> Identity:
    key = new_key()
    cert = ca.issue(key.public_key(), "node", "n1", DAY)
    (directory / f"{name}.key").write_bytes(key_pem(key))
    (directory / f"{name}.crt").write_text(pem(cert))
    return Identity(node_id="n1", key=directory / f"{name}.key", certificate=directory / f"{name}.crt",
                    ca=directory / "ca.crt")


def _serving(ca: CertificateAuthority, directory: Path, role: str) -> ssl.SSLContext:
    """A server context with a certificate of ``role`` for 127.0.0.1, requiring client certificates."""
    (directory / "ca.crt").write_text(pem(ca.cert))
    key = new_key()
    cert = ca.issue(key.public_key(), role, f"a-{role}", DAY, ips=("127.0.0.1",), server=True)
    (directory / f"{role}.key").write_bytes(key_pem(key))
    (directory / f"{role}.crt").write_text(pem(cert))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(directory / "ca.crt"))
    tls.verify_mode = ssl.CERT_REQUIRED
    tls.load_cert_chain(str(directory / f"{role}.crt"), str(directory / f"{role}.key"))
    return tls


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[tuple[Server, ControllerClient, CertificateAuthority]]:
    ca = CertificateAuthority.create()
    tls = _serving(ca, tmp_path, "controller")
    server = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    client = ControllerClient([f"https://127.0.0.1:{port}"], _identity(ca, tmp_path, "node"))
    yield server, client, ca
    server.release.set()
    await client.close()
    await runner.cleanup()


async def test_requests_reuse_one_kept_alive_connection(bed) -> None:
    server, client, _ = bed
    for i in range(3):
        assert await client.node_call("POST", "heartbeat", {"n": i}) == {"echo": {"n": i}}
    assert await client.node_call("GET", "tasks") == {"echo": None}
    assert len(server.peers) == 1


async def test_answers_are_sorted_into_rejected_and_unavailable(bed) -> None:
    _, client, _ = bed
    with pytest.raises(ControllerRejected) as rejected:
        await client.node_call("GET", "bad")
    assert rejected.value.status == 404 and rejected.value.error == "no such thing"
    with pytest.raises(ControllerUnavailable, match="controller error 502: oops"):
        await client.node_call("GET", "broken")
    with pytest.raises(ControllerUnavailable, match="no answer within 1 s"):
        await client.node_call("GET", "hold", timeout=1)


async def test_a_connection_the_server_closed_is_replaced_unnoticed(bed) -> None:
    server, client, _ = bed
    await client.node_call("GET", "first")
    for transport in server.peers:
        transport.close()  # as the server's keep-alive timeout does
    await asyncio.sleep(0.1)
    assert await client.node_call("POST", "second", {"x": 1}) == {"echo": {"x": 1}}
    assert server.requests == ["GET /v1/nodes/n1/first", "POST /v1/nodes/n1/second"]


async def test_a_cancelled_long_poll_lets_go_of_its_thread_at_once(bed) -> None:
    _, client, _ = bed
    poll = asyncio.create_task(client.node_call("GET", "hold", timeout=60))
    await asyncio.sleep(0.5)
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poll
    started = time.monotonic()
    await client.close()  # waits for the client's threads
    assert time.monotonic() - started < 10  # not the poll's 60 s


async def test_after_a_renewal_new_requests_use_the_new_certificate(bed, tmp_path: Path) -> None:
    server, client, ca = bed
    await client.node_call("GET", "before")
    renewed = _identity(ca, tmp_path, "renewed")
    client.identity.key.write_bytes(renewed.key.read_bytes())
    client.identity.certificate.write_bytes(renewed.certificate.read_bytes())
    client.reload_identity()
    await client.node_call("GET", "after")
    assert len(server.peers) == 2  # the old certificate's connection was not reused


async def test_an_untrusted_controller_is_unavailable_with_the_reason(bed, tmp_path: Path) -> None:
    _, client, _ = bed
    other = CertificateAuthority.create("another CA")
    (tmp_path / "ca.crt").write_text(pem(other.cert))
    client.reload_identity()
    with pytest.raises(ControllerUnavailable, match="certificate is not trusted"):
        await client.node_call("GET", "x")


async def test_a_node_certificate_cannot_pose_as_the_controller(tmp_path: Path) -> None:
    # The same CA signs nodes' certificates, with serverAuth (they serve /metrics): a node
    # that answers on the controller's address is refused in the handshake, before the
    # request (a task result, a migration image) leaves.
    ca = CertificateAuthority.create()
    tls = _serving(ca, tmp_path, "node")
    heard: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(1024))
        writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    client = ControllerClient([f"https://127.0.0.1:{port}"], _identity(ca, tmp_path, "node"))
    try:
        with pytest.raises(ControllerUnavailable, match="not a controller certificate"):
            await client.node_call("POST", "tasks/t1/result", {"secret": "s3cret"})
    finally:
        await client.close()
        server.close()
    assert not any(b"s3cret" in data for data in heard)
