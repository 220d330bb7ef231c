"""Moving a migration stream between nodes through the controller, which relays it.

The controller never stores the image: ``checkpoint.send`` on the source PUTs the stream
to ``/v1/nodes/<source>/migrations/<id>/image`` while ``checkpoint.receive`` on the
destination GETs ``/v1/nodes/<destination>/migrations/<id>/image``, both over mutual TLS
with the node's own certificate. Both ends return the stream's sha256 and length, which
the controller compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.sdk import PluginContext, TaskError
from plugins.checkpoint.image import CHUNK
from plugins.checkpoint.stream import Member, stream_size, tar_chunks

STALL_TIMEOUT = 60.0  # seconds a transfer may go without a byte moving
MIGRATION_RE = re.compile(r"^m-[0-9a-f]{1,32}\Z")


async def send(context: PluginContext, migration: str, members: list[Member]) -> dict[str, Any]:
    """Stream ``members`` to the controller; ``{"bytes", "sha256", "relayed"}``."""
    digest, sent = hashlib.sha256(), 0

    async def body() -> Any:
        nonlocal sent
        async for chunk in tar_chunks(members):
            digest.update(chunk)
            sent += len(chunk)
            yield chunk

    # The size is known before the first byte, so the controller can show progress against it.
    headers = {"Content-Type": "application/x-tar", "X-Kumo-Size": str(stream_size(members))}
    answer = await _request(context, "PUT", migration, body(), headers)
    return {"bytes": sent, "sha256": digest.hexdigest(), "relayed": answer.get("bytes")}


async def receive(context: PluginContext, migration: str, unpack: Callable[[Any], dict[str, Any]],
                  into: Path) -> dict[str, Any]:
    """Read the stream from the controller into ``unpack(body)``, which runs in a worker
    thread and reads ``body`` as a file; what it returned, with ``bytes`` and ``sha256``.

    The source declares the stream's size before sending it; a stream without one, or
    larger than the free space where it lands (``into``), is refused before a byte is
    written, and no more than the declared size is read."""
    return await _request(context, "GET", migration, None, {}, unpack, into)


async def _request(context: PluginContext, method: str, migration: str, body: Any, headers: Mapping[str, str],
                   unpack: Callable[[Any], dict[str, Any]] | None = None, into: Path | None = None) -> dict[str, Any]:
    import aiohttp  # here: an agent that never migrates never loads it for this

    if not MIGRATION_RE.match(migration):
        raise TaskError(f"payload.migration must be a migration id, got {migration!r}", code="bad-request")
    identity, base_url = context.identity, context.controller_url
    if identity is None or not base_url:
        raise TaskError("this agent has no controller session to transfer an image through", code="no-controller")
    url = f"{base_url.rstrip('/')}/v1/nodes/{identity.node_id}/migrations/{migration}/image"
    tls = await asyncio.to_thread(identity.client_tls_context)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=STALL_TIMEOUT)
    what = "sending the image to" if method == "PUT" else "receiving the image from"
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
            method, url, data=body, headers=dict(headers), ssl=tls
        ) as response:
            if response.status >= 400:
                text = await response.text(errors="replace")
                with contextlib.suppress(ValueError, AttributeError):
                    text = json.loads(text).get("error", text)
                raise TaskError(f"{what} the controller failed ({response.status}): {text}", code="transfer-failed")
            if unpack is None:
                return await response.json(content_type=None) or {}
            assert into is not None
            await _check_room(response.content_length, into)
            reader = BodyReader(response.content, asyncio.get_running_loop())
            result = await asyncio.to_thread(unpack, reader)
            return {**result, "bytes": reader.count, "sha256": reader.digest.hexdigest()}
    except (aiohttp.ClientError, OSError, TimeoutError, tarfile.TarError, EOFError) as exc:
        raise TaskError(f"{what} the controller broke off: {exc or type(exc).__name__}; nothing was restored",
                        code="transfer-failed") from exc


async def _check_room(size: int | None, into: Path) -> None:
    if size is None:
        raise TaskError("the source sent its image stream without declaring its size: refused, nothing was written",
                        code="transfer-failed")
    free = (await asyncio.to_thread(shutil.disk_usage, into)).free
    if size > free:
        raise TaskError(f"the image stream is {size} bytes and {into} has {free} bytes free: make room on this node "
                        "(or choose another destination) and migrate again", code="no-space")


class BodyReader:
    """A blocking ``read`` over an aiohttp body, for tarfile in a worker thread; counts and hashes."""

    def __init__(self, content: Any, loop: asyncio.AbstractEventLoop):
        self.content = content
        self.loop = loop
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        want = CHUNK if size is None or size < 0 else size
        data = asyncio.run_coroutine_threadsafe(self.content.read(want), self.loop).result(STALL_TIMEOUT)
        self.digest.update(data)
        self.count += len(data)
        return data
