"""The image catalogue over HTTP: parse, authorise (the route's role) and render; the
decisions are :mod:`controller.services.images`'s.

An import is two or more calls: ``POST /v1/images/uploads`` declares the image (its size
and SHA-256 first, so nothing unverified is ever kept), then ``PUT
/v1/images/uploads/{id}?offset=N`` streams its bytes (as one body or several, and again
from the offset the upload reports after a broken transfer). Blobs are served as files
(aiohttp's FileResponse: Range requests, read from disk as they are sent), to nodes by
``GET /v1/nodes/{id}/images/{sha256}`` and to other controllers by
``GET /v1/images/{sha256}/blob``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from controller.api import ApiError, Route, field, json_body, reject_unknown, reply, state
from controller.services import images

CHUNK = 1 << 20


async def list_images(request: web.Request) -> web.Response:
    ctl = state(request)
    rows = await ctl.store.find_images()
    return reply({"images": [images.shown(row) for row in rows],
                  "aliases": await ctl.store.list_image_aliases()})


def _kind(request: web.Request) -> str | None:
    return request.query.get("kind") or None


async def show(request: web.Request) -> web.Response:
    rows = await images.resolve(state(request), request.match_info["ref"], _kind(request))
    return reply({"images": [images.shown(row) for row in rows]})


async def delete(request: web.Request) -> web.Response:
    rows = await images.delete(state(request), request.match_info["ref"], _kind(request))
    return reply({"deleted": [images.shown(row) for row in rows]})


async def start_upload(request: web.Request) -> web.Response:
    data = await json_body(request)
    reject_unknown(data, {"name", "version", "kind", "description", "size_bytes", "sha256"})
    declared = {
        "name": field(data, "name", str),
        "version": field(data, "version", str, required=False),
        "kind": field(data, "kind", str),
        "description": field(data, "description", str, required=False, default=""),
        "size_bytes": field(data, "size_bytes", int),
        "sha256": field(data, "sha256", str),
    }
    upload, new = await images.start_upload(state(request), declared)
    return reply(upload, 201 if new else 200)


async def show_upload(request: web.Request) -> web.Response:
    return reply(await images.get_upload(state(request), request.match_info["upload_id"]))


async def cancel_upload(request: web.Request) -> web.Response:
    await images.cancel_upload(state(request), request.match_info["upload_id"])
    return reply({"ok": True})


async def send_upload(request: web.Request) -> web.Response:
    raw = request.query.get("offset", "")
    if not raw.isdigit():
        raise ApiError(400, f"offset must be the number of bytes the upload holds (GET it to see), got {raw!r:.40}")

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                yield chunk
        except aiohttp.ClientError as exc:  # the client went away mid-body
            raise ConnectionError(str(exc) or type(exc).__name__) from None

    done = await images.receive(state(request), request.match_info["upload_id"], int(raw), body())
    if "offset" in done:
        return reply(done)
    return reply({"image": images.shown(done)}, 201)


async def put_alias(request: web.Request) -> web.Response:
    data = await json_body(request)
    reject_unknown(data, {"target"})
    return reply(await images.set_alias(state(request), request.match_info["alias"], field(data, "target", str)))


async def delete_alias(request: web.Request) -> web.Response:
    await images.delete_alias(state(request), request.match_info["alias"])
    return reply({"ok": True})


async def node_pull(request: web.Request) -> web.StreamResponse:
    path = await images.blob(state(request), request.match_info["sha256"])
    return _file(path)


async def peer_pull(request: web.Request) -> web.StreamResponse:
    return _file(await images.local_blob(state(request), request.match_info["sha256"]))


def _file(path: Any) -> web.FileResponse:
    # Streamed from disk as it is sent (sendfile where the transport allows): many nodes
    # pulling at once cost one read stream each, never a copy of the image in memory.
    return web.FileResponse(path, chunk_size=CHUNK, headers={"Content-Type": "application/octet-stream"})


IMAGE = "/v1/images/{ref}"
UPLOAD = "/v1/images/uploads/{upload_id}"
ROUTES = [
    Route("GET", "/v1/images", list_images, "admin", "The image catalogue: every image (each form of each "
          "version of each name) and the aliases."),
    Route("POST", "/v1/images/uploads", start_upload, "admin",
          "Declare an image to import; the upload to PUT its bytes to (the same one again, with its offset, "
          "for the same bytes and name: resume). 413 over the quota, 409 when it is in the catalogue already.",
          {"name": "the image's name", "version": "optional: default the UTC time", "kind": "kvm or lxc",
           "description": "text, optional", "size_bytes": "integer", "sha256": "64 hex digits"}),
    Route("GET", UPLOAD, show_upload, "admin", "An upload under way: what was declared and the offset it holds."),
    Route("PUT", UPLOAD, send_upload, "admin",
          "Bytes of an upload from ?offset=N (where it ends; 409 with the offset otherwise). The last byte "
          "imports it: 201 with the image, 400 when the sha256 differs, 422 when it is not an image of its kind."),
    Route("DELETE", UPLOAD, cancel_upload, "admin", "Abandon an upload and its bytes."),
    Route("PUT", "/v1/images/aliases/{alias}", put_alias, "admin", "Point an alias at NAME or NAME:VERSION.",
          {"target": "NAME (its newest version) or NAME:VERSION"}),
    Route("DELETE", "/v1/images/aliases/{alias}", delete_alias, "admin", "Remove an alias."),
    Route("GET", IMAGE, show, "admin",
          "The images a reference names (NAME: its newest version's forms, NAME:VERSION, an alias or a sha256; "
          "?kind=kvm|lxc for one form)."),
    Route("DELETE", IMAGE, delete, "admin",
          "Delete the images a reference names (?kind= for one form); 409 naming the instances that use them."),
    Route("GET", "/v1/nodes/{id}/images/{sha256}", node_pull, "node",
          "A catalogue image's bytes, for the node's image cache; Range requests resume."),
    Route("GET", "/v1/images/{sha256}/blob", peer_pull, "controller",
          "This controller's copy of an image's bytes, for another controller that has none."),
]
