"""The agent's ``/metrics``: plugin metric families plus the agent's own health.

Served by a small HTTP/1.1 server of its own on the agent's event loop
(``asyncio.start_server``), rather than prometheus_client's ``start_http_server``: Debian
12's prometheus-client 0.16 has no TLS options there (they came in 0.17), so it could not do
the mTLS mode; it also runs a thread per request. Nor aiohttp's web server: the agent keeps
aiohttp's client for the controller session, but ``aiohttp.web`` would add ~1.5 MB resident
to serve one path. Serving on the loop costs no extra threads, shares the loop's shutdown,
and lets the server certificate be reloaded after a renewal. Rendering (which calls every
plugin's ``kumo_metrics``) happens in a worker thread, as the hook contract promises plugins.
The text is prometheus_client's own ``generate_latest``: its exposition module is loaded
anyway, by the package's ``__init__``, whatever part of prometheus_client is imported.

The server answers ``GET`` and ``HEAD /metrics`` (a query string is ignored), 404 for any
other path, 405 for another method on ``/metrics``, 400 for a malformed request, 414/431 for
a request line or headers over the limits below, 505 for an HTTP major version other than
1, and 503 to the request of a connection over ``max_connections`` (each refusal's body
says why). Connections are kept alive (HTTP/1.1 by default, HTTP/1.0 when asked; Prometheus
reuses its connections) until ``Connection: close``, an error, a request with a body (which
is not read: the answer is sent, then the connection closed) or ``IDLE_TIMEOUT``. A request
must arrive whole, and its answer be taken, within ``REQUEST_TIMEOUT``.

With ``metrics.client_ca`` set, the listener speaks TLS with the node's own certificate and
requires a client certificate signed by that CA (Prometheus' ``tls_config.cert_file``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Callable, Iterable
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent.sdk import Identity, require_peer_role

log = logging.getLogger(__name__)

PATH = "/metrics"
MAX_LINE = 8190  # bytes in the request line and in one header line, CRLF excluded (aiohttp's limits)
MAX_HEADERS = 100  # header lines in one request
MAX_HEADER_BYTES = 65536  # bytes of all header lines of one request
REQUEST_TIMEOUT = 10.0  # seconds for a TLS handshake, for a request once begun, and for its answer to be taken
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection waits for its next request (aiohttp's default)
LINGER_TIMEOUT = 2.0  # seconds, and bytes, of what a peer still sends that are read and dropped before
LINGER_BYTES = 1 << 20  # closing after an answer (see _linger)

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (\S+) HTTP/(\d)\.(\d)")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 414: "URI Too Long",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class _PluginCollector:
    """Yields every plugin's families at scrape time (``Hooks.metrics``)."""

    def __init__(self, families: Callable[[], Iterable[Any]]):
        self._families = families

    def collect(self) -> Iterable[Any]:
        yield from self._families()

    def describe(self) -> list[Any]:
        # Empty: the registry must not call plugins at registration time to learn names.
        return []


class AgentMetrics:
    """The agent's health metrics, in a registry of their own (never the process-global one)."""

    def __init__(self, plugin_families: Callable[[], Iterable[Any]] | None = None):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.heartbeat_seconds = Histogram(
            "kumo_agent_heartbeat_duration_seconds",
            "Round-trip time of heartbeats to the controller, in seconds.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.connected = Gauge(
            "kumo_agent_controller_connected",
            "1 while the agent is registered with the controller and its requests succeed, else 0.",
            registry=self.registry,
        )
        self.controller = Gauge(
            "kumo_agent_controller",
            "1 for the controller the agent is connected to (by URL), 0 for the others it knows.",
            ["url"],
            registry=self.registry,
        )
        self.tasks = Counter(
            "kumo_agent_tasks",
            "Tasks finished by this agent, by task kind and outcome (succeeded, failed, replayed).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.plugin_available = Gauge(
            "kumo_agent_plugin_available",
            "1 when the plugin reports itself available on this node, 0 when it does not.",
            ["plugin"],
            registry=self.registry,
        )
        self.cert_expiry = Gauge(
            "kumo_agent_certificate_expiry_timestamp_seconds",
            "When the node certificate expires, as a Unix timestamp in seconds.",
            registry=self.registry,
        )
        if plugin_families is not None:
            self.registry.register(_PluginCollector(plugin_families))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def server_tls_context(identity: Identity, client_ca: Path) -> ssl.SSLContext:
    """Serve with the node's certificate; require a client certificate signed by ``client_ca``.

    When that CA is Kumo's own, the certificate must also be a scraper's or an admin's: every
    node holds one from the same CA, and no node may read another's metrics.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(identity.certificate), str(identity.key))
    ctx.load_verify_locations(cafile=str(client_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if Path(client_ca).read_bytes() == identity.ca.read_bytes():
        require_peer_role(ctx, "scraper", "admin")
    return ctx


class _Refused(Exception):
    """A request answered with an error status, after which the connection is closed."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class _Request:
    """What the server needs of one parsed request."""

    __slots__ = ("method", "path", "http10", "keep_alive")

    def __init__(self, method: str, path: str, http10: bool, keep_alive: bool):
        self.method = method
        self.path = path
        self.http10 = http10
        self.keep_alive = keep_alive


class MetricsServer:
    """``GET /metrics`` on ``host:port``; plain HTTP, or mTLS when ``tls`` is given."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int, tls: ssl.SSLContext | None = None,
                 max_connections: int = 64):
        self.metrics = metrics
        self.host = host
        self.port = port  # 0 picks a free port; start() puts the one bound here
        self.tls = tls
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.tls, limit=MAX_LINE + 2,
            ssl_handshake_timeout=REQUEST_TIMEOUT if self.tls else None,
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics: serving %s://%s:%d/metrics", "https" if self.tls else "http", self.host, self.port)

    def reload_certificate(self, identity: Identity) -> None:
        """Serve the renewed node certificate to new connections."""
        if self.tls is not None:
            self.tls.load_cert_chain(str(identity.certificate), str(identity.key))

    async def stop(self) -> None:
        """Stop listening and drop open connections (a render under way finishes in its thread)."""
        if self._server is None:
            return
        self._server.close()
        connections = list(self._connections.items())
        for task, writer in connections:
            writer.transport.abort()
            task.cancel()
        await asyncio.gather(*(task for task, _ in connections), return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests answered in turn until it closes, errs or idles out."""
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        # Answered rather than dropped: a scraper shows a 503, where it retries a silent close.
        full = len(self._connections) > self.max_connections
        try:
            wait = REQUEST_TIMEOUT  # a new connection's first request is due at once
            while True:
                try:
                    request = await _read_request(reader, wait)
                    if full and request is not None:
                        raise _Refused(503, f"this agent's /metrics already holds {self.max_connections} connections "
                                            "(metrics.max_connections in agent.yaml); retry shortly")
                except _Refused as refused:
                    body = f"{refused.status}: {_REASONS[refused.status]}: {refused}".encode()
                    log.debug("metrics: answered %d: %s", refused.status, refused)
                    writer.write(_response(refused.status, body, keep_alive=False) + body)
                    break
                if request is None:
                    return  # closed or idle: nothing begun is left unanswered
                writer.write(await self._answer(request))
                if not request.keep_alive:
                    break
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await writer.drain()
                wait = IDLE_TIMEOUT
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.drain()
            await _linger(reader, writer)
        except OSError:  # reset, TLS error, or TimeoutError (an OSError) sending or mid-request
            return
        finally:
            del self._connections[task]
            writer.close()

    async def _answer(self, request: _Request) -> bytes:
        extra: tuple[str, ...] = ()
        if request.path != PATH:
            status, content_type, body = 404, "text/plain; charset=utf-8", b"404: Not Found"
        elif request.method not in ("GET", "HEAD"):
            status, content_type, body = 405, "text/plain; charset=utf-8", b"405: Method Not Allowed"
            extra = ("Allow: GET, HEAD",)
        else:
            try:
                status, content_type, body = 200, CONTENT_TYPE_LATEST, await asyncio.to_thread(self.metrics.render)
            except Exception:
                log.exception("metrics: rendering /metrics failed")
                status, content_type, body = 500, "text/plain; charset=utf-8", b"500: Internal Server Error"
        head = _response(status, body, request.keep_alive, request.http10, content_type, extra)
        return head if request.method == "HEAD" else head + body


def _response(status: int, body: bytes, keep_alive: bool, http10: bool = False,
              content_type: str = "text/plain; charset=utf-8", extra: tuple[str, ...] = ()) -> bytes:
    """The status line and headers of an answer with ``body`` (sent after them, but not to a HEAD)."""
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Date: {formatdate(usegmt=True)}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}", *extra]
    if not keep_alive:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Before closing after an answer: let the peer read it. Closing a socket with unread
    input (a body, the rest of an oversized request) resets the connection, which can
    destroy the answer in flight; so signal the end (plain TCP) and drop what still comes,
    for at most ``LINGER_TIMEOUT`` seconds and ``LINGER_BYTES``."""
    if writer.can_write_eof():
        writer.write_eof()
    dropped = 0
    with contextlib.suppress(OSError):  # TimeoutError included
        async with asyncio.timeout(LINGER_TIMEOUT):
            while dropped < LINGER_BYTES and (chunk := await reader.read(65536)):
                dropped += len(chunk)


async def _read_request(reader: asyncio.StreamReader, wait: float) -> _Request | None:
    """The next request's line and headers (a body is never read), or None when the peer
    closed, or sent nothing for ``wait`` seconds, before it began one."""
    try:
        async with asyncio.timeout(wait):
            line = await _read_line(reader, 414)
    except TimeoutError:
        return None
    if line is None:
        return None
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _Refused(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise _Refused(505, f"HTTP/{major.decode()}.{minor.decode()}")
    headers: dict[bytes, bytes] = {}
    size = 0
    async with asyncio.timeout(REQUEST_TIMEOUT):  # TimeoutError, an OSError: the connection is dropped
        for _ in range(MAX_HEADERS + 1):
            line = await _read_line(reader, 431)
            if line is None:
                raise ConnectionResetError("closed in the middle of a request")
            if not line:
                break
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise _Refused(431, f"headers over {MAX_HEADER_BYTES} bytes")
            header = _HEADER_LINE.fullmatch(line)
            if header is None:
                raise _Refused(400, "malformed header line")
            name = header[1].lower()
            headers[name] = headers[name] + b", " + header[2] if name in headers else header[2]
        else:
            raise _Refused(431, f"more than {MAX_HEADERS} header lines")
    http10 = minor == b"0"
    connection = {token.strip() for token in headers.get(b"connection", b"").lower().split(b",")}
    keep_alive = b"keep-alive" in connection if http10 else b"close" not in connection
    if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
        keep_alive = False  # a body, which is not read: answer, then close rather than parse it
    return _Request(method.decode("ascii"), _path(target), http10, keep_alive)


async def _read_line(reader: asyncio.StreamReader, too_long: int) -> bytes | None:
    """One line without its CRLF (or bare LF), or None at the end of the stream;
    ``_Refused(too_long)`` over ``MAX_LINE``."""
    try:
        line = await reader.readline()
    except ValueError:  # StreamReader.readline's LimitOverrunError: no newline within the limit
        raise _Refused(too_long, f"line over {MAX_LINE} bytes") from None
    if not line.endswith(b"\n"):
        return None
    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if len(line) > MAX_LINE:  # the limit counts the CRLF; a bare LF leaves one byte over
        raise _Refused(too_long, f"line over {MAX_LINE} bytes")
    return line


def _path(target: bytes) -> str:
    """The percent-decoded path of an origin-form (``/metrics?x``) or absolute-form target."""
    text = target.decode("latin-1")
    if text.startswith("/"):
        return unquote(text.partition("?")[0])
    if "://" in text:
        try:
            return unquote(urlsplit(text).path) or "/"
        except ValueError:  # e.g. an unclosed [IPv6 literal
            raise _Refused(400, "malformed request target") from None
    if text == "*":  # OPTIONS *
        return text
    raise _Refused(400, "malformed request target")
