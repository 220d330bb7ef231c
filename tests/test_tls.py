"""controller.tls: an idle connection holds a small TLS read buffer, an upload grows it to
asyncio's own size and arrives whole."""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from controller import tls
from tests.harness import free_port, tls_server_context


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ssl.SSLContext, list[tls.GrowingTLS]]:
    made: list[tls.GrowingTLS] = []

    class Recorded(tls.GrowingTLS):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(tls, "GrowingTLS", Recorded)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": True})

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return web.json_response({"sha256": digest.hexdigest()})

    app = web.Application(client_max_size=1 << 30)
    app.router.add_get("/hello", hello)
    app.router.add_post("/upload", upload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    server = await tls.serve(runner.server, "127.0.0.1", port, tls_server_context(tmp_path), 5.0)
    yield f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(tmp_path / "cert.pem")), made
    server.close()
    await runner.cleanup()


async def test_idle_connection_keeps_a_small_buffer_and_an_upload_grows_it(served) -> None:
    url, context, made = served
    body = os.urandom(16 << 20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1)) as session:
        async with session.get(f"{url}/hello") as response:
            assert await response.json() == {"hello": True}
        (protocol,) = made
        assert len(protocol.get_buffer(-1)) == tls.INITIAL_BUFFER

        async with session.post(f"{url}/upload", data=body) as response:
            assert await response.json() == {"sha256": hashlib.sha256(body).hexdigest()}
        assert made == [protocol]  # the same kept-alive connection
        assert len(protocol.get_buffer(-1)) == tls.FULL_BUFFER
