"""The agent's mutual-TLS session with the controller.

One :class:`ControllerClient` per agent. Every request presents the node certificate; after
a renewal :meth:`ControllerClient.reload_identity` builds a new TLS context, and connections
made with the old one are closed instead of reused. Failures are sorted in two:
:class:`~agent.sdk.ControllerUnavailable` (network, TLS, timeouts, 5xx: try again later) and
:class:`ControllerRejected` (a 4xx answer: retrying the same request will not help).

An agent may know several controllers (all active, on one shared store). The session uses
one at a time; when it fails, :class:`ControllerChoice` names the next to try, and the agent
stays on whichever works rather than going back to the first as soon as it returns.

Requests go through the standard library's ``http.client`` in a few worker threads of the
client's own, as ``kumo-agent join`` does, not through aiohttp: an agent's whole traffic
with the controller is small JSON requests, and importing aiohttp's client would be a
quarter of an idle agent's memory (12 MB of PyPI's aiohttp 3.14). The bodies too large for
this are streamed by what needs them: image downloads with aiohttp, imported only then;
migration streams on ``http.client`` connections of their own (plugins/checkpoint/transfer.py).
Connections are kept alive and reused; a cancelled request (the long poll, at shutdown)
shuts its socket down so that its thread returns at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from agent.sdk import ControllerUnavailable, Identity, PluginError

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 20.0
# Requests in flight at once: the long poll, a heartbeat, task results, plugins' calls.
# More wait for a free thread (their timeout starts when they are sent).
MAX_CONNECTIONS = 8
HEADERS = {"User-Agent": "kumo-agent", "Accept": "application/json"}


class ControllerRejected(PluginError):
    """The controller answered 4xx; ``status`` and the controller's own ``error`` sentence."""

    def __init__(self, status: int, error: str, method: str, path: str):
        super().__init__(f"controller refused {method} {path} ({status}): {error}")
        self.status = status
        self.error = error


class NodeRejected(Exception):
    """The controller no longer accepts this node (removed, revoked, unknown): stop the agent."""


class ControllerChoice:
    """Which controller to use, from the list in agent.yaml or join.json, and which next.

    A controller that works is kept for as long as it works, whatever its place in the list
    (no flapping back to the first). After a failure the others are tried in the list's
    order, the one that just failed last; once all failed, the same again from the top.
    """

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.current = self.urls[0]
        self._pending = self.urls[1:]

    def failed(self) -> str:
        """The current controller failed: the one to try next (the same one when it is alone)."""
        if not self._pending:
            self._pending = [url for url in self.urls if url != self.current] + [self.current]
        self.current = self._pending.pop(0)
        return self.current

    def working(self) -> None:
        """The current controller answered: the next failure starts a new round from the top."""
        self._pending = []


class ControllerClient:
    """Requests to the current controller's API listener as this node, plus the
    connected/unreachable state.

    The state changes are logged once each way (connected → unreachable → connected), never
    once per failed attempt or per controller tried: an outage of an hour must not write
    thousands of lines.
    """

    def __init__(self, urls: Sequence[str], identity: Identity, on_state_change: Any = None,
                 timeout: float = REQUEST_TIMEOUT):
        self.timeout = timeout  # a request's unless it names its own
        self.controllers = ControllerChoice([url.rstrip("/") for url in urls])
        self._use(self.controllers.current)
        self.identity = identity
        self._ssl = identity.client_tls_context()
        self.connected: bool | None = None
        self._on_state_change = on_state_change
        self._executor = concurrent.futures.ThreadPoolExecutor(MAX_CONNECTIONS, thread_name_prefix="kumo-controller")
        # Idle keep-alive connections, each with the TLS context it was made with. Only the
        # event loop touches these two; a worker thread gets one connection for one request.
        self._idle: list[tuple[ssl.SSLContext, http.client.HTTPSConnection]] = []
        self._busy: dict[http.client.HTTPSConnection, ssl.SSLContext] = {}

    @property
    def node_path(self) -> str:
        return f"/v1/nodes/{self.identity.node_id}"

    @property
    def tls(self) -> ssl.SSLContext:
        """TLS as this node with its current certificate, for a body streamed by other means."""
        return self._ssl

    def reload_identity(self) -> None:
        """Use the (renewed) key and certificate on disk for every new connection."""
        self._ssl = self.identity.client_tls_context()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        busy = list(self._busy)
        for _, conn in idle:
            conn.close()
        for conn in busy:
            _abort(conn)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        """Send one request; return the decoded JSON answer.

        Raises ControllerUnavailable (retry later) or ControllerRejected (4xx).
        """
        payload = None if body is None else json.dumps(body).encode()
        timeout = self.timeout if timeout is None else timeout
        try:
            status, raw = await self._send(method, path, payload, timeout)
        except TimeoutError:
            raise ControllerUnavailable(f"{method} {path}: no answer within {timeout:.0f} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise ControllerUnavailable(f"{method} {path}: the controller's certificate is not trusted: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ControllerUnavailable(f"{method} {path}: {exc or type(exc).__name__}") from None
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = None
        if status >= 500:
            raise ControllerUnavailable(f"{method} {path}: controller error {status}: {_error_text(data, raw)}")
        if status >= 400:
            raise ControllerRejected(status, _error_text(data, raw), method, path)
        if data is None:
            raise ControllerUnavailable(f"{method} {path}: the controller's answer is not JSON")
        return data

    async def node_call(self, method: str, path: str, json: Any = None, timeout: float | None = None) -> Any:
        """``PluginContext.call_controller``: ``path`` is relative to ``/v1/nodes/<this node>/``."""
        return await self.request(method.upper(), f"{self.node_path}/{path.lstrip('/')}", json, timeout)

    def mark_connected(self) -> None:
        self.controllers.working()
        if self.connected is not True:
            log.info("controller %s: connected as node %s", self.base_url, self.identity.node_id)
            self._set_state(True)

    def mark_unreachable(self, reason: str) -> None:
        """The session with the current controller failed: move to the next one to try."""
        failed = self.base_url
        self._use(self.controllers.failed())
        if self.connected is not False:
            then = f"using {self.base_url}" if self.base_url != failed else "retrying with backoff"
            log.warning("controller %s unreachable (%s); %s, instances keep running", failed, reason, then)
            self._set_state(False)

    def _use(self, url: str) -> None:
        self.base_url = url
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "", parts.port or 443

    def _set_state(self, connected: bool) -> None:
        self.connected = connected
        if self._on_state_change is not None:
            self._on_state_change(connected)

    # ---- connections -----------------------------------------------------------------

    async def _send(self, method: str, path: str, payload: bytes | None, timeout: float) -> tuple[int, bytes]:
        conn, reused = self._checkout()
        try:
            return await self._exchange_on(conn, method, path, payload, timeout)
        except (ConnectionError, http.client.BadStatusLine):
            if not reused:
                raise
        # The controller closed this kept-alive connection before it read the request (its
        # keep-alive timeout ran out): nothing was done, so send it once on a new one.
        conn, _ = self._checkout(fresh=True)
        return await self._exchange_on(conn, method, path, payload, timeout)

    def _checkout(self, fresh: bool = False) -> tuple[http.client.HTTPSConnection, bool]:
        """A connection for one request, and whether it was kept alive from an earlier one."""
        tls = self._ssl
        while self._idle and not fresh:
            made_with, conn = self._idle.pop()
            if made_with is tls and (conn.host, conn.port) == (self._host, self._port):
                self._busy[conn] = tls
                return conn, True
            conn.close()  # made before a renewal (the old certificate) or to another controller
        conn = http.client.HTTPSConnection(self._host, self._port, context=tls)
        self._busy[conn] = tls
        return conn, False

    async def _exchange_on(
        self, conn: http.client.HTTPSConnection, method: str, path: str, payload: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        kept = False
        try:
            status, raw, kept = await loop.run_in_executor(
                self._executor, _exchange, conn, method, path, payload, timeout
            )
            return status, raw
        except asyncio.CancelledError:
            _abort(conn)  # the thread is still reading: make its read return now
            raise
        except RuntimeError as exc:  # the executor is shut down: the agent is stopping
            raise ConnectionAbortedError(str(exc)) from None
        finally:
            tls = self._busy.pop(conn)
            if kept and len(self._idle) < MAX_CONNECTIONS:
                self._idle.append((tls, conn))
            else:
                conn.close()


def _exchange(
    conn: http.client.HTTPSConnection, method: str, path: str, payload: bytes | None, timeout: float
) -> tuple[int, bytes, bool]:
    """One request and its whole answer, in a worker thread: (status, body, keep the connection)."""
    conn.timeout = timeout
    if conn.sock is not None:
        conn.sock.settimeout(timeout)
    headers = dict(HEADERS)
    if payload is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    return response.status, raw, not response.will_close


def _abort(conn: http.client.HTTPSConnection) -> None:
    """Shut a connection's socket down under a thread blocked reading it."""
    sock = conn.sock
    if sock is not None:
        try:
            # The plain socket's shutdown: the TLS layer stays intact for the reading thread.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _error_text(data: Any, raw: bytes) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return raw[:200].decode(errors="replace") or "(empty answer)"
