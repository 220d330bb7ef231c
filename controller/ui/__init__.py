"""The web interface: the fleet in a browser, served by the controller on ``ui_listen``.

Signing in needs no browser certificate. ``kumoctl ui`` asks the API (with the admin's
certificate) for a single-use link that expires in :data:`SIGNIN_TTL` seconds; opening it
spends it and turns it into a session: a random secret in a cookie that is ``HttpOnly``
(no script reads it), ``Secure`` and ``SameSite=Strict`` (no other site's page sends it),
and expires after ``ui_session_ttl``. The store keeps only the SHA-256 of links and
sessions, so a copy of the database signs nobody in; ``kumoctl ui sessions`` lists them and
``kumoctl ui revoke`` ends one at once.

What a page does goes through the admin API's own routes, mounted here behind the same
guard (:func:`controller.app.guard`): the identity is the session's (role ``admin``, the
name of the admin whose link opened it, the session id where a certificate would give its
serial), so the audit log says which session did what and no action has a second path.
A request that changes something must also carry the session's CSRF token in the
``X-Kumo-CSRF`` header, which a page learns from ``GET /ui/session`` and another site's
page cannot read. Every answer carries a Content-Security-Policy that allows scripts only
from this listener's own files: nothing inline, nothing from elsewhere.

The pages are static files (:data:`STATIC`): HTML, CSS and JavaScript modules with no build
step and no third-party code. Every page is ``shell.html`` (the head and the navigation)
around its own ``<main>`` (``<page>.html``) and its script (``<page>.js``). Each keeps one server-sent-event stream open
(:mod:`controller.ui.live`) and fetches its data again when the stream says it changed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from controller.services import Refused, iso
from controller.settings import split_address
from controller.ui import live

IDENTIFY = "kumo.identify"  # app key: async (request) -> (role, name, serial) of the caller
SIGNIN_TTL = 300.0
COOKIE = "kumo_session"
CSRF_HEADER = "X-Kumo-CSRF"
STATIC = Path(__file__).parent / "static"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# Each page (its title and files); what it shows comes from the API once it loads.
PAGES = {"/": ("fleet", "Fleet"), "/nodes/{id}": ("node", "Node"), "/instances": ("instances", "Instances"),
         "/instances/{name}": ("instance", "Instance"), "/tasks": ("tasks", "Tasks"),
         "/migrations": ("migrations", "Migrations"), "/alerts": ("alerts", "Alerts"),
         "/tokens": ("tokens", "Join tokens"), "/logging": ("logging", "Log forwarding")}
CONTENT_TYPES = {".css": "text/css", ".js": "text/javascript"}  # what /static/ serves


def digest(secret: str) -> str:
    # errors="replace": a cookie or a URL may carry what no secret of ours holds; it then
    # matches nothing instead of failing.
    return hashlib.sha256(secret.encode(errors="replace")).hexdigest()


def csrf_token(secret: str) -> str:
    """The session's CSRF token: derived from its secret, so nothing more is stored, and
    useless without the cookie that only this listener's own pages send."""
    return hmac.new(secret.encode(), b"kumo-ui-csrf", hashlib.sha256).hexdigest()


def base_url(settings: Any) -> str:
    """The web interface's URL: ``ui_listen``'s host, or the API URL's host when it listens
    on every address."""
    host, port = split_address(settings.ui_listen, "ui_listen")
    if host in ("0.0.0.0", "::"):
        host = urlsplit(settings.url).hostname or host
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


async def create_signin(ctl: Any, name: str) -> dict[str, Any]:
    """A single-use sign-in link for the admin ``name``: its URL (which holds the secret,
    shown once) and when it expires."""
    if not ctl.settings.ui_listen:
        raise Refused(409, "the web interface is off: set ui_listen (e.g. 127.0.0.1:8445) in controller.yaml "
                           "and restart the controller")
    secret = secrets.token_urlsafe(32)
    expires_at = time.time() + SIGNIN_TTL
    link_id = "l-" + uuid.uuid4().hex[:12]
    await ctl.store.add_ui_signin(link_id, digest(secret), name, expires_at)
    return {"id": link_id, "url": f"{base_url(ctl.settings)}/signin/{secret}", "expires_at": iso(expires_at)}


def shown_session(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "kind": row["kind"], "name": row["name"], "remote": row["remote"],
            "created_at": iso(row["created_at"]), "expires_at": iso(row["expires_at"]),
            "used_at": iso(row["used_at"]), "revoked_at": iso(row["revoked_at"])}


# The listener.


async def session_of(request: web.Request) -> tuple[dict[str, Any], str]:
    """(the session row, its secret) of the request's cookie; 401 without a valid one."""
    secret = request.cookies.get(COOKIE, "")
    row = await request.app["kumo"].store.ui_session(digest(secret)) if 0 < len(secret) <= 128 else None
    if row is None:
        raise Refused(401, "not signed in, or the session expired or was revoked: run `kumoctl ui` for a new "
                           "sign-in link")
    return row, secret


async def session_identity(request: web.Request) -> tuple[str, str, str]:
    """The guard's caller: the session's admin, once its CSRF token is checked on a change."""
    row, secret = await session_of(request)
    # As bytes: compare_digest refuses str with non-ASCII characters, which a header may hold.
    given = request.headers.get(CSRF_HEADER, "").encode(errors="replace")
    if request.method not in SAFE_METHODS and not hmac.compare_digest(given, csrf_token(secret).encode()):
        raise Refused(403, f"this request changes something and needs the session's CSRF token in the {CSRF_HEADER} "
                           "header; reload the page")
    return "admin", f"{row['name']} (web)", row["id"]


@web.middleware
async def headers(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # The sign-in URL holds a secret: it must not leave in a Referer.
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


async def signin(request: web.Request) -> web.StreamResponse:
    """Spend the link and set the session cookie. The answer is a page that moves on to the
    fleet by itself: a redirect would carry over the cross-site context of a link clicked
    elsewhere, and a SameSite=Strict cookie would not be sent with it."""
    ctl = request.app["kumo"]
    secret = secrets.token_urlsafe(32)
    session = {"id": "s-" + uuid.uuid4().hex[:12], "hash": digest(secret), "remote": request.remote,
               "expires_at": time.time() + ctl.settings.ui_session_ttl}
    given = request.match_info["secret"]
    outcome = await ctl.store.redeem_ui_signin(digest(given), session) if len(given) <= 128 else "unknown"
    if outcome != "ok":
        why = {"used": "was already used: each link signs in once", "expired": "has expired",
               "unknown": "is not one this controller made"}[outcome]
        return _page(f"This sign-in link {why}. Run <code>kumoctl ui</code> for a new one.", 403)
    response = _page('Signed in. <a href="/">Open the fleet</a>.', 200, refresh="/")
    response.set_cookie(COOKIE, secret, max_age=int(ctl.settings.ui_session_ttl), path="/", secure=True,
                        httponly=True, samesite="Strict")
    return response


def _page(body: str, status: int, refresh: str | None = None) -> web.Response:
    meta = f'<meta http-equiv="refresh" content="0;url={refresh}">' if refresh else ""
    return web.Response(
        text=f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Kumo</title>{meta}'
             f'<link rel="stylesheet" href="/static/kumo.css"></head><body><main><h1>Kumo</h1><p>{body}</p>'
             "</main></body></html>",
        status=status, content_type="text/html")


async def session_info(request: web.Request) -> web.Response:
    row, secret = await session_of(request)
    return web.json_response({"id": row["id"], "name": row["name"], "expires_at": iso(row["expires_at"]),
                              "csrf": csrf_token(secret)})


async def events(request: web.Request) -> web.StreamResponse:
    """The page's one server-sent-event stream: ``change`` events naming what changed
    (nodes, instances, tasks, migrations, alerts), until the session ends."""
    row, _ = await session_of(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})
    await response.prepare(request)
    await live.hub(request.app).stream(response, row["id"], row["expires_at"])
    return response


def _static(name: str) -> web.Response:
    path = STATIC / name
    return web.Response(body=path.read_bytes(), content_type=CONTENT_TYPES[path.suffix])


@functools.cache
def _render(name: str, title: str) -> str:
    shell = (STATIC / "shell.html").read_text()
    main = (STATIC / f"{name}.html").read_text()
    return shell.replace("{title}", title).replace("{page}", name).replace("{main}", main)


def _page_handler(name: str, title: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def page(request: web.Request) -> web.Response:
        try:
            await session_of(request)
        except Refused as exc:
            return _page(f"{exc.message}.", 401)
        return web.Response(text=_render(name, title), content_type="text/html")

    return page


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if "/" in name or Path(name).suffix not in CONTENT_TYPES or not (STATIC / name).is_file():
        raise Refused(404, f"no such file: /static/{name}")
    return _static(name)


def make_app(ctl: Any, admin_routes: list[tuple[Any, Callable[[web.Request], Awaitable[web.StreamResponse]]]],
             errors: Any) -> web.Application:
    """The web interface's app: its pages, the session's endpoints and ``admin_routes``
    (each a Route and its guarded handler), except those that make or end sessions: a
    session does not extend itself."""
    app = web.Application(middlewares=[headers, errors], client_max_size=ctl.settings.max_body_bytes)
    app["kumo"] = ctl
    app[IDENTIFY] = session_identity
    app.router.add_get("/signin/{secret}", signin)
    app.router.add_get("/ui/session", session_info)
    app.router.add_get("/ui/events", events)
    app.router.add_get("/static/{name}", static)
    for path, (name, title) in PAGES.items():
        app.router.add_get(path, _page_handler(name, title))
    for route, handler in admin_routes:
        if not route.path.startswith("/v1/ui/"):
            app.router.add_route(route.method, route.path, handler)
    live.attach(app, ctl)
    return app
