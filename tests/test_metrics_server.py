"""The agent's /metrics server (agent/metrics.py) on its own: HTTP/1.1 over a real socket,
good and bad requests, keep-alive, timeouts, and mutual TLS with a client CA."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import metrics
from agent.metrics import AgentMetrics, MetricsServer, server_tls_context
from agent.sdk import Identity

GET = b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body


async def read_response(reader: asyncio.StreamReader, head: bool = False) -> Response:
    """One response off the connection; ``head``: to a HEAD, so no body follows its headers."""
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    body = b"" if head else await asyncio.wait_for(reader.readexactly(length), 5)
    return Response(int(status_line.split()[1]), headers, body)


async def closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """Whether the server closes the connection (within ``timeout``) without sending more."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def exchange(port: int, request: bytes, head: bool = False) -> tuple[Response, bool]:
    """Send ``request`` on a new connection: its one response, and whether the server then closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        response = await read_response(reader, head)
        return response, await closed(reader, 0.3)
    finally:
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    agent_metrics = AgentMetrics()
    agent_metrics.connected.set(1)
    served = MetricsServer(agent_metrics, "127.0.0.1", 0)
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


async def test_get_serves_the_registry_in_the_text_format(server: MetricsServer) -> None:
    response, _ = await exchange(server.port, GET)
    assert response.status == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert int(response.headers["content-length"]) == len(response.body)
    assert "date" in response.headers
    text = response.body.decode()
    assert "# TYPE kumo_agent_controller_connected gauge\nkumo_agent_controller_connected 1.0\n" in text
    assert "process_resident_memory_bytes" in text  # the ProcessCollector


async def test_head_sends_the_headers_of_a_get_and_no_body(server: MetricsServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: node\r\n\r\n" + GET)
        head = await read_response(reader, head=True)
        assert head.status == 200 and int(head.headers["content-length"]) > 0
        assert head.headers["content-type"] == CONTENT_TYPE_LATEST
        get = await read_response(reader)  # the next bytes are the GET's answer: no body came in between
        assert get.status == 200 and get.body.startswith(b"# HELP")
    finally:
        writer.close()


async def test_keep_alive_serves_many_requests_on_one_connection_until_close(server: MetricsServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(3):
            writer.write(GET)
            response = await read_response(reader)
            assert response.status == 200 and "connection" not in response.headers
        writer.write(GET + GET)  # pipelined: answered in order
        assert [(await read_response(reader)).status for _ in range(2)] == [200, 200]
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        last = await read_response(reader)
        assert last.status == 200 and last.headers["connection"] == "close"
        assert await closed(reader)
    finally:
        writer.close()


async def test_http_1_0_closes_unless_asked_to_keep_alive(server: MetricsServer) -> None:
    response, was_closed = await exchange(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert response.status == 200 and response.headers["connection"] == "close" and was_closed
    response, was_closed = await exchange(server.port, b"GET /metrics HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert response.status == 200 and response.headers["connection"] == "keep-alive" and not was_closed


@pytest.mark.parametrize("target", [b"/metrics?name[]=up", b"http://node:9464/metrics", b"/%6Detrics"])
async def test_the_metrics_path_in_any_form_of_request_target(server: MetricsServer, target: bytes) -> None:
    response, _ = await exchange(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: node\r\n\r\n")
    assert response.status == 200


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST"])
@pytest.mark.parametrize("path", [b"/", b"/metrics/", b"/other", b"/metricsx"])
async def test_other_paths_are_not_found(server: MetricsServer, method: bytes, path: bytes) -> None:
    response, was_closed = await exchange(server.port, method + b" " + path + b" HTTP/1.1\r\nHost: node\r\n\r\n",
                                          head=method == b"HEAD")
    assert response.status == 404
    assert not was_closed


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get"])
async def test_other_methods_are_not_allowed(server: MetricsServer, method: bytes) -> None:
    response, was_closed = await exchange(server.port, method + b" /metrics HTTP/1.1\r\nHost: node\r\n\r\n")
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert not was_closed


async def test_a_request_with_a_body_is_answered_then_the_connection_closed(server: MetricsServer) -> None:
    response, was_closed = await exchange(
        server.port, b"POST /metrics HTTP/1.1\r\nHost: node\r\nContent-Length: 5\r\n\r\nhello")
    assert response.status == 405 and response.headers["connection"] == "close" and was_closed
    response, was_closed = await exchange(
        server.port, b"GET /metrics HTTP/1.1\r\nHost: node\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert response.status == 200 and was_closed


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"hello\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET http://[::1/metrics HTTP/1.1\r\n\r\n", 400),
    (b"G(T /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost : node\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: no\x00de\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: node\r\n folded\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /" + b"a" * metrics.MAX_LINE + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * metrics.MAX_LINE + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\n" + b"X-Many: 1\r\n" * (metrics.MAX_HEADERS + 1) + b"\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 8000 + b"\r\n") * 9 + b"\r\n", 431),
])
async def test_malformed_and_oversized_requests_are_refused_and_closed(
        server: MetricsServer, request_bytes: bytes, status: int) -> None:
    response, was_closed = await exchange(server.port, request_bytes)
    assert response.status == status
    assert response.headers["connection"] == "close" and was_closed


async def test_the_longest_allowed_lines_are_served(server: MetricsServer) -> None:
    target = b"/metrics?" + b"a" * (metrics.MAX_LINE - len(b"GET /metrics? HTTP/1.1"))
    request = b"GET " + target + b" HTTP/1.1\r\nX-Long: " + b"b" * (metrics.MAX_LINE - len(b"X-Long: ")) + b"\r\n\r\n"
    response, _ = await exchange(server.port, request)
    assert response.status == 200


async def test_silent_and_stalled_connections_are_closed(server: MetricsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(metrics, "IDLE_TIMEOUT", 1.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await closed(reader, 3)  # sent nothing at all
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: no")  # a request begun and never finished
    assert await closed(reader, 3)
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    await asyncio.sleep(0.8)  # longer than a request may take, shorter than a kept-alive connection may idle
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    assert await closed(reader, 3)  # then idle for longer
    writer.close()
    assert not server._connections


async def test_a_failing_render_answers_500_and_keeps_serving(server: MetricsServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bytes:
        raise RuntimeError("a collector broke")

    monkeypatch.setattr(server.metrics, "render", broken)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(GET + GET)
        assert [(await read_response(reader)).status for _ in range(2)] == [500, 500]
    finally:
        writer.close()


async def test_stop_closes_kept_alive_connections_and_the_listener() -> None:
    served = MetricsServer(AgentMetrics(), "127.0.0.1", 0)
    await served.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    await asyncio.wait_for(served.stop(), 5)
    assert await closed(reader, 2)
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", served.port)
    await served.stop()  # twice is fine


async def test_a_connection_over_the_cap_is_answered_503_and_closed() -> None:
    served = MetricsServer(AgentMetrics(), "127.0.0.1", 0, max_connections=2)
    await served.start()
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(2)]
    try:
        for reader, writer in held:
            writer.write(GET)
            assert (await read_response(reader)).status == 200
        response, was_closed = await exchange(served.port, GET)
        assert (response.status, response.headers["connection"], was_closed) == (503, "close", True)
        assert response.body == (b"503: Service Unavailable: this agent's /metrics already holds 2 connections "
                                 b"(metrics.max_connections in agent.yaml); retry shortly")
        held.pop()[1].close()  # a place frees: the next connection is served
        async with asyncio.timeout(5):
            while len(served._connections) > 1:
                await asyncio.sleep(0.01)
        assert (await exchange(served.port, GET))[0].status == 200
    finally:
        for _, writer in held:
            writer.close()
        await served.stop()


# ---- mutual TLS --------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(minutes=1))
            .not_valid_after(NOW + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], name: str, directory: Path,
           server: bool = False) -> tuple[Path, Path]:
    """A certificate for ``name`` signed by ``ca``, written as ``name``.crt and ``name``.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(minutes=1)).not_valid_after(NOW + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(builder.sign(ca[0], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _write_ca(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], path: Path) -> Path:
    path.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[MetricsServer, Identity, dict[str, Path]]]:
    """A server with a node certificate of the node CA that requires a client certificate of
    the scraper CA; ``paths``: both CAs and the certificates of a scraper and of a stranger."""
    node_ca, scraper_ca, other_ca = _ca("kumo"), _ca("scrapers"), _ca("strangers")
    node_cert, node_key = _issue(node_ca, "node", tmp_path, server=True)
    identity = Identity("n-test", node_key, node_cert, _write_ca(node_ca, tmp_path / "ca.crt"))
    paths = {"node_ca": identity.ca, "scraper_ca": _write_ca(scraper_ca, tmp_path / "scrapers.crt")}
    paths["scraper_cert"], paths["scraper_key"] = _issue(scraper_ca, "prometheus", tmp_path)
    paths["stranger_cert"], paths["stranger_key"] = _issue(other_ca, "stranger", tmp_path)
    paths["renewed_cert"], paths["renewed_key"] = _issue(node_ca, "node-renewed", tmp_path, server=True)
    served = MetricsServer(AgentMetrics(), "127.0.0.1", 0, server_tls_context(identity, paths["scraper_ca"]))
    await served.start()
    try:
        yield served, identity, paths
    finally:
        await served.stop()


def _client(paths: dict[str, Path], who: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(paths["node_ca"]))
    if who is not None:
        ctx.load_cert_chain(paths[f"{who}_cert"], paths[f"{who}_key"])
    return ctx


async def _scrape_tls(port: int, ctx: ssl.SSLContext) -> tuple[Response, x509.Certificate]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        peer = x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.write(GET)
        return await read_response(reader), peer
    finally:
        writer.close()


async def test_tls_serves_a_client_with_a_certificate_of_the_client_ca(tls_server) -> None:
    served, _, paths = tls_server
    response, peer = await _scrape_tls(served.port, _client(paths, "scraper"))
    assert response.status == 200 and b"kumo_agent_controller_connected" in response.body
    assert peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node"


@pytest.mark.parametrize("who", [None, "stranger"])
async def test_tls_refuses_a_client_without_a_certificate_of_the_client_ca(tls_server, who: str | None) -> None:
    served, _, paths = tls_server
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, AssertionError)):
        # TLS 1.3 finishes the client's side of the handshake first: the refusal then comes
        # as an alert (SSLError), a reset or an end of stream where the answer should be.
        await _scrape_tls(served.port, _client(paths, who))


async def test_tls_refuses_plain_http(tls_server) -> None:
    served, _, _ = tls_server
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(GET)
    try:
        sent = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    except ConnectionError:
        sent = b""
    finally:
        writer.close()
    assert b"HTTP/" not in sent and b"kumo_agent" not in sent


async def test_tls_serves_the_renewed_certificate_after_reload(tls_server) -> None:
    served, identity, paths = tls_server
    renewed = Identity(identity.node_id, paths["renewed_key"], paths["renewed_cert"], identity.ca)
    served.reload_certificate(renewed)
    response, peer = await _scrape_tls(served.port, _client(paths, "scraper"))
    assert response.status == 200
    assert peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-renewed"


async def test_behind_kumos_own_ca_only_scraper_and_admin_certificates_are_served(tmp_path: Path) -> None:
    # Every node holds a certificate of the fleet's CA: one node must not read another's metrics.
    from controller import pki

    ca = pki.CertificateAuthority.create()
    (tmp_path / "ca.crt").write_text(pki.pem(ca.cert))

    def pair(role: str, name: str, server: bool = False) -> tuple[Path, Path]:
        key = pki.new_key()
        cert = ca.issue(key.public_key(), role, name, datetime.timedelta(hours=1), ips=("127.0.0.1",), server=server)
        (tmp_path / f"{name}.crt").write_text(pki.pem(cert))
        pki.write_private(tmp_path / f"{name}.key", pki.key_pem(key))
        return tmp_path / f"{name}.crt", tmp_path / f"{name}.key"

    node_cert, node_key = pair("node", "n-served", server=True)
    served = MetricsServer(AgentMetrics(), "127.0.0.1", 0,
                           server_tls_context(Identity("n-served", node_key, node_cert, tmp_path / "ca.crt"),
                                              tmp_path / "ca.crt"))
    await served.start()
    try:
        for role, allowed in (("scraper", True), ("admin", True), ("node", False), ("controller", False)):
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            ctx.load_cert_chain(*pair(role, f"{role}-client"))
            if allowed:
                assert (await _scrape_tls(served.port, ctx))[0].status == 200, role
            else:
                with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, AssertionError)):
                    await _scrape_tls(served.port, ctx)
    finally:
        await served.stop()


def test_metrics_are_served_on_loopback_only_unless_configured() -> None:
    # Plain HTTP on every interface used to be the default: anyone on the network read a
    # node's instances and usage. Off the host, metrics need metrics.listen and client_ca.
    from agent.settings import MetricsSettings

    assert MetricsSettings().listen == "127.0.0.1:9464" and MetricsSettings().client_ca is None
