"""Moving a migration stream between nodes through the controller, which relays it.

The controller never stores the image: ``checkpoint.send`` on the source PUTs the stream
to ``/v1/nodes/<source>/migrations/<id>/image`` while ``checkpoint.receive`` on the
destination GETs ``/v1/nodes/<destination>/migrations/<id>/image``, both over mutual TLS
with the node's own certificate. Both ends return the stream's sha256 and length, which
the controller compares.

Each end is one worker thread on one ``http.client`` connection, start to end: the source
reads the files into the buffer it hashes and sends; the destination reads, hashes,
unpacks and writes. The event loop carries none of the bytes, and no chunk crosses
between threads (a hop per chunk and the event loop's own TLS and hashing were a third of
a VM migration's downtime). A cancelled transfer shuts its socket down, so that its
thread returns at once, and is over when the thread is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import re
import shutil
import socket
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.sdk import PluginContext, TaskError
from plugins.checkpoint.image import CHUNK
from plugins.checkpoint.stream import Member, stream_size, write_tar

STALL_TIMEOUT = 60.0  # seconds a transfer may go without a byte moving
MIGRATION_RE = re.compile(r"^m-[0-9a-f]{1,32}\Z")
HEADERS = {"User-Agent": "kumo-agent"}


async def send(context: PluginContext, migration: str, members: list[Member]) -> dict[str, Any]:
    """Stream ``members`` to the controller; ``{"bytes", "sha256", "relayed"}``."""
    return await _exchange(context, "PUT", migration, lambda conn, path: _send(conn, path, members))


async def receive(context: PluginContext, migration: str, unpack: Callable[[Any], dict[str, Any]],
                  into: Path) -> dict[str, Any]:
    """Read the stream from the controller into ``unpack(body)``, which runs in a worker
    thread and reads ``body`` as a file; what it returned, with ``bytes`` and ``sha256``.

    The source declares the stream's size before sending it; a stream without one, or
    larger than the free space where it lands (``into``), is refused before a byte is
    written, and no more than the declared size is read."""
    return await _exchange(context, "GET", migration, lambda conn, path: _receive(conn, path, unpack, into))


async def _exchange(context: PluginContext, method: str, migration: str,
                    work: Callable[[http.client.HTTPSConnection, str], dict[str, Any]]) -> dict[str, Any]:
    if not MIGRATION_RE.match(migration):
        raise TaskError(f"payload.migration must be a migration id, got {migration!r}", code="bad-request")
    identity, base_url = context.identity, context.controller_url
    if identity is None or not base_url:
        raise TaskError("this agent has no controller session to transfer an image through", code="no-controller")
    url = urlsplit(base_url)
    path = f"{url.path.rstrip('/')}/v1/nodes/{identity.node_id}/migrations/{migration}/image"
    tls = await asyncio.to_thread(identity.client_tls_context)
    conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443, timeout=STALL_TIMEOUT, context=tls)
    what = "sending the image to" if method == "PUT" else "receiving the image from"

    def run() -> dict[str, Any]:
        try:
            return work(conn, path)
        except (OSError, http.client.HTTPException, tarfile.TarError, EOFError) as exc:
            raise TaskError(f"{what} the controller broke off: {exc or type(exc).__name__}; nothing was restored",
                            code="transfer-failed") from exc
        finally:
            conn.close()

    done = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        # The plain socket's shutdown: the thread's next read or write fails at once, and
        # the caller's clean-up runs only once the thread no longer writes.
        with contextlib.suppress(OSError, TypeError):
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
        await asyncio.wait([done])
        with contextlib.suppress(BaseException):
            done.exception()  # retrieved: the thread's error after the cancel says nothing new
        raise


def _send(conn: http.client.HTTPSConnection, path: str, members: list[Member]) -> dict[str, Any]:
    digest, sent = hashlib.sha256(), 0
    size = stream_size(members)
    conn.putrequest("PUT", path, skip_accept_encoding=True)
    # The size is known before the first byte, so the controller can show progress against it.
    for key, value in {**HEADERS, "Content-Type": "application/x-tar", "Content-Length": str(size),
                       "X-Kumo-Size": str(size)}.items():
        conn.putheader(key, value)
    conn.endheaders()
    assert conn.sock is not None

    def emit(chunk: memoryview) -> None:
        nonlocal sent
        digest.update(chunk)
        conn.sock.sendall(chunk)
        sent += len(chunk)

    try:
        write_tar(members, emit)
    except OSError:
        # The controller may have refused before taking the whole stream (and then closed):
        # its answer, when it can still be read, says why better than a broken pipe.
        with contextlib.suppress(OSError, http.client.HTTPException):
            _answer(conn.getresponse(), "sending the image to")
        raise
    response = conn.getresponse()
    answer = _answer(response, "sending the image to")
    return {"bytes": sent, "sha256": digest.hexdigest(), "relayed": answer.get("bytes")}


def _receive(conn: http.client.HTTPSConnection, path: str, unpack: Callable[[Any], dict[str, Any]],
             into: Path) -> dict[str, Any]:
    conn.request("GET", path, headers=HEADERS)
    response = conn.getresponse()
    if response.status >= 400:
        _answer(response, "receiving the image from")
    check_room(response.length, into)
    reader = BodyReader(response)
    result = unpack(reader)
    return {**result, "bytes": reader.count, "sha256": reader.digest.hexdigest()}


def _answer(response: http.client.HTTPResponse, what: str) -> dict[str, Any]:
    """The controller's JSON answer; TaskError with its ``error`` when it refused."""
    text = response.read().decode(errors="replace")
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if response.status >= 400:
        error = answer.get("error", text) if isinstance(answer, dict) else text
        raise TaskError(f"{what} the controller failed ({response.status}): {error}", code="transfer-failed")
    return answer if isinstance(answer, dict) else {}


def check_room(size: int | None, into: Path) -> None:
    """Refuse a stream of undeclared ``size`` or larger than the free space at ``into``. Blocking."""
    if size is None:
        raise TaskError("the source sent its image stream without declaring its size: refused, nothing was written",
                        code="transfer-failed")
    free = shutil.disk_usage(into).free
    if size > free:
        raise TaskError(f"the image stream is {size} bytes and {into} has {free} bytes free: make room on this node "
                        "(or choose another destination) and migrate again", code="no-space")


class BodyReader:
    """A blocking ``read`` over the answer's body, for tarfile; counts and hashes what it reads."""

    def __init__(self, response: http.client.HTTPResponse):
        self.response = response
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.response.read(CHUNK if size is None or size < 0 else size)
        self.digest.update(data)
        self.count += len(data)
        return data
