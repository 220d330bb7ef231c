"""The admin's HTTPS client: JSON over one keep-alive connection, with the admin certificate.

http.client and ssl are imported when a client is made, so ``--help`` and usage errors
never load the TLS modules.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlencode, urlsplit

from .config import Config
from .errors import ApiError, CommandError

REQUEST_TIMEOUT = 30.0


class Client:
    """JSON over one keep-alive HTTPS connection, authenticated with the admin certificate."""

    def __init__(self, config: Config):
        import http.client
        import ssl

        from agent.sdk.tls import require_peer_role

        self._http = http.client
        self._ssl = ssl
        self.config = config
        self._use(config.controllers[0])
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.ca))
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(
                f"{config.source}: ca: cannot load {config.ca}: {_os_reason(exc)}"
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(config.cert), str(config.key))
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(
                f"{config.source}: cannot load the client certificate {config.cert} "
                f"with key {config.key}: {_os_reason(exc)}"
            ) from None
        # Only the controller's own certificate: every node holds one from the same CA.
        self._context = require_peer_role(context, "controller")
        self._conn: Any = None
        self._used = False

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the decoded JSON answer or raise CommandError/ApiError.

        A GET that cannot reach the controller goes to the next one in the config (a GET
        changes nothing, so sending it twice is harmless); other methods are not resent.
        """
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        untried = [url for url in self.config.controllers if url != self.url] if method == "GET" else []
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (self._http.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                # A keep-alive connection the server closed while idle: retry on a fresh
                # one. A reset on a fresh connection is the server refusing our certificate.
                if not reused:
                    raise CommandError(self._network_message(exc)) from None
            except (OSError, self._http.HTTPException) as exc:
                self.close()
                # A TLS failure is this config's credentials, the same on every controller.
                if not untried or isinstance(exc, self._ssl.SSLError):
                    raise CommandError(self._network_message(exc)) from None
                print(f"kumoctl: {self._network_message(exc)}; trying {untried[0]}", file=sys.stderr)
                self._use(untried.pop(0))
        self._used = True
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            snippet = raw[:200].decode(errors="replace").strip()
            raise CommandError(
                f"the controller answered {method} {path} with HTTP {response.status} and a "
                f"body that is not JSON: {snippet!r}"
            ) from None
        if response.status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise ApiError(
                response.status, message or f"{method} {path} failed with {response.reason}"
            )
        return data

    def send_file(self, path: str, source: Any, length: int, sent: Any) -> Any:
        """PUT ``length`` bytes read from the binary file ``source`` (from where it stands)
        as one streamed body, calling ``sent(n)`` as they go; the decoded JSON answer.
        Network failures raise OSError (the caller resumes), HTTP errors ApiError."""
        self.close()  # a fresh connection: a stale kept-alive one would fail mid-body
        conn, _ = self._connection()
        try:
            conn.putrequest("PUT", path)
            for header, value in (("Content-Type", "application/octet-stream"), ("Content-Length", str(length)),
                                  ("Accept", "application/json")):
                conn.putheader(header, value)
            conn.endheaders()
            left = length
            while left:
                chunk = source.read(min(left, 1 << 20))
                if not chunk:
                    raise CommandError(f"the file ended {left} bytes early: did it change while importing?")
                conn.send(chunk)
                left -= len(chunk)
                sent(len(chunk))
            response = conn.getresponse()
            raw = response.read()
        except (OSError, self._http.HTTPException) as exc:
            self.close()
            raise OSError(self._network_message(exc)) from None
        self._used = True
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if response.status >= 400 or not isinstance(data, dict):
            message = data.get("error") if isinstance(data, dict) else None
            raise ApiError(response.status, message or f"PUT {path} failed with {response.reason}")
        return data

    def pages(self, path: str, key: str, most: int | None = None) -> list[Any]:
        """Every item (or the first ``most``) of a paged list endpoint, following ``next``."""
        items: list[Any] = []
        after = None
        while most is None or len(items) < most:
            query = {"after": after} if after else {}
            if most is not None:
                query["limit"] = str(min(most - len(items), 1000))
            separator = "&" if "?" in path else "?"
            answer = self.call("GET", path + (separator + urlencode(query) if query else ""))
            items += answer[key]
            after = answer.get("next")
            if not after:
                break
        return items

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _use(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 443

    def _connection(self) -> tuple[Any, bool]:
        """The connection, and whether it already carried a request (it may have gone stale)."""
        if self._conn is None:
            self._conn = self._http.HTTPSConnection(
                self.host, self.port, context=self._context, timeout=REQUEST_TIMEOUT
            )
            self._used = False
        return self._conn, self._used

    def _network_message(self, exc: BaseException) -> str:
        ssl = self._ssl
        where = f"the controller at {self.url}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"{where} presented a certificate that does not verify against {self.config.ca}: "
                f"{exc.verify_message}; check 'ca' in {self.config.source}"
            )
        if isinstance(exc, ssl.SSLError | ConnectionResetError | BrokenPipeError):
            return (
                f"{where} refused the TLS session ({_os_reason(exc)}): is {self.config.cert} "
                f"an admin certificate issued by this controller's CA?"
            )
        if isinstance(exc, ConnectionRefusedError):
            return f"cannot connect to {where}: connection refused; is kumo-controller running?"
        if isinstance(exc, TimeoutError):
            return f"{where} did not answer within {REQUEST_TIMEOUT:g} s"
        if isinstance(exc, OSError) and exc.__class__.__name__ == "gaierror":
            return f"cannot resolve the controller's host name {self.host!r}: {_os_reason(exc)}"
        return f"cannot talk to {where}: {_os_reason(exc)}"


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not exc.__class__.__name__.startswith("SSL"):
        return exc.strerror
    reason = getattr(exc, "reason", None)
    return str(reason or exc) or exc.__class__.__name__

