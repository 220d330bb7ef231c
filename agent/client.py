"""The agent's mutual-TLS session with the controller.

One :class:`ControllerClient` per agent. Every request presents the node certificate; after
a renewal :meth:`ControllerClient.reload_identity` builds a new TLS context and new requests
use it (aiohttp keys pooled connections by TLS context, so old connections are not reused).
Failures are sorted in two: :class:`~agent.sdk.ControllerUnavailable` (network, TLS,
timeouts, 5xx: try again later) and :class:`ControllerRejected` (a 4xx answer: retrying the
same request will not help).
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import aiohttp

from agent.sdk import ControllerUnavailable, Identity, PluginError

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 20.0


class ControllerRejected(PluginError):
    """The controller answered 4xx; ``status`` and the controller's own ``error`` sentence."""

    def __init__(self, status: int, error: str, method: str, path: str):
        super().__init__(f"controller refused {method} {path} ({status}): {error}")
        self.status = status
        self.error = error


class ControllerClient:
    """Requests to the controller's API listener as this node, plus the connected/unreachable state.

    The state changes are logged once each way (connected → unreachable → connected), never
    once per failed attempt: an outage of an hour must not write thousands of lines.
    """

    def __init__(self, base_url: str, identity: Identity, on_state_change: Any = None):
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self._ssl = identity.client_tls_context()
        self._session: aiohttp.ClientSession | None = None
        self.connected: bool | None = None
        self._on_state_change = on_state_change

    @property
    def node_path(self) -> str:
        return f"/v1/nodes/{self.identity.node_id}"

    def reload_identity(self) -> None:
        """Use the (renewed) key and certificate on disk for every new connection."""
        self._ssl = self.identity.client_tls_context()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, enable_cleanup_closed=True),
                headers={"User-Agent": "kumo-agent"},
            )
        return self._session

    async def request(
        self, method: str, path: str, body: Any = None, timeout: float = REQUEST_TIMEOUT
    ) -> Any:
        """Send one request; return the decoded JSON answer.

        Raises ControllerUnavailable (retry later) or ControllerRejected (4xx).
        """
        url = self.base_url + path
        try:
            async with self._get_session().request(
                method,
                url,
                json=body,
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise ControllerUnavailable(f"{method} {path}: no answer within {timeout:.0f} s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ControllerUnavailable(f"{method} {path}: the controller's certificate is not trusted: {exc}") from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
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

    async def node_call(self, method: str, path: str, json: Any = None, timeout: float = REQUEST_TIMEOUT) -> Any:
        """``PluginContext.call_controller``: ``path`` is relative to ``/v1/nodes/<this node>/``."""
        return await self.request(method.upper(), f"{self.node_path}/{path.lstrip('/')}", json, timeout)

    def mark_connected(self) -> None:
        if self.connected is not True:
            log.info("controller %s: connected as node %s", self.base_url, self.identity.node_id)
            self._set_state(True)

    def mark_unreachable(self, reason: str) -> None:
        if self.connected is not False:
            log.warning(
                "controller %s: unreachable (%s); retrying with backoff, instances keep running",
                self.base_url,
                reason,
            )
            self._set_state(False)

    def _set_state(self, connected: bool) -> None:
        self.connected = connected
        if self._on_state_change is not None:
            self._on_state_change(connected)


def _error_text(data: Any, raw: bytes) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return raw[:200].decode(errors="replace") or "(empty answer)"
