"""The web interface's sessions, from the admin's side: ``kumoctl ui`` asks for a sign-in
link here (with its admin certificate), lists the sessions and revokes them. The listener
and its pages are :mod:`controller.ui`'s."""

from __future__ import annotations

from aiohttp import web

from controller.api import ApiError, Route, json_body, reject_unknown, reply, state
from controller.ui import create_signin, shown_session


async def signin(request: web.Request) -> web.Response:
    ctl = state(request)
    reject_unknown(await json_body(request), set())
    _, name, _ = ctl.peer(request)
    return reply(await create_signin(ctl, name), 201)


async def list_sessions(request: web.Request) -> web.Response:
    rows = await state(request).store.list_ui_sessions()
    return reply({"sessions": [shown_session(row) for row in rows]})


async def revoke_session(request: web.Request) -> web.Response:
    session_id = request.match_info["id"]
    if not await state(request).store.revoke_ui_session(session_id):
        raise ApiError(404, f"no web session or sign-in link {session_id!r}: see kumoctl ui sessions")
    return reply({"id": session_id, "revoked": True})


ROUTES = [
    Route("POST", "/v1/ui/signin", signin, "admin",
          "A single-use sign-in link to the web interface, valid for minutes (409 when ui_listen is not set).", {}),
    Route("GET", "/v1/ui/sessions", list_sessions, "admin",
          "The web interface's sessions and unused sign-in links that have not expired."),
    Route("DELETE", "/v1/ui/sessions/{id}", revoke_session, "admin",
          "End a web session (or withdraw a sign-in link) at once."),
]
