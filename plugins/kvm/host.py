"""libvirt in this process: the binding, its event thread, and the one connection the plugin
manages VMs through, kept open across libvirtd restarts.

- libvirt (the binding, libvirt.so with what it links, and its event thread: ~12 MB) is
  loaded only once the node has KVM work: instance directories from before (domains to
  adopt) or a kvm task. It then stays loaded, since libvirt cannot unregister its event
  loop. Until then :mod:`plugins.kvm.liveness` answers for libvirtd.
- Domain lifecycle events arrive on libvirt's default event loop, which runs in its own
  thread; they are handed to asyncio with ``call_soon_threadsafe`` and never touch the
  plugin's state from that thread.
- Keepalive notices a daemon that vanished without closing the socket; the close callback
  then drops the connection and a task reconnects with backoff until libvirtd is back.
- Every libvirt call runs in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from agent.sdk import Backoff, TaskError

log = logging.getLogger(__name__)

NO_BINDING = (
    "the libvirt Python binding is not installed "
    "(apt install python3-libvirt or pip install libvirt-python)"
)


class _EventThread:
    """libvirt's default event loop, run in one daemon thread for the whole process.

    libvirt allows registering its event implementation once per process and offers no way
    to unregister it, so the thread lives as long as the process; connections only add and
    remove their callbacks.
    """

    _lock = threading.Lock()
    _started = False

    @classmethod
    def load(cls) -> Any:
        """Import libvirt and start the event thread once; the module (ImportError without it)."""
        import libvirt

        with cls._lock:
            if not cls._started:
                # Errors are raised as exceptions; libvirt would also print each one to stderr.
                libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
                libvirt.virEventRegisterDefaultImpl()
                threading.Thread(target=cls._run, args=(libvirt,), name="libvirt-events", daemon=True).start()
                cls._started = True
        return libvirt

    @staticmethod
    def _run(libvirt: Any) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


load_libvirt = _EventThread.load


def versions(libvirt: Any, conn: Any) -> dict[str, str]:
    """libvirtd's and QEMU's versions; they change only with a libvirtd restart."""

    def dotted(number: int) -> str:
        return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"

    try:
        return {"libvirt_version": dotted(conn.getLibVersion()), "qemu_version": dotted(conn.getVersion())}
    except libvirt.libvirtError:
        return {}


def open_connection(libvirt: Any, uri: str, on_close: Any, on_lifecycle: Any) -> tuple[Any, int, dict[str, str]]:
    """Connect the way the plugin manages VMs through: (connection, event callback id, versions).
    Blocking."""
    conn = libvirt.open(uri)
    try:
        conn.setKeepAlive(5, 3)
        conn.registerCloseCallback(on_close, None)
        callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
    except libvirt.libvirtError:
        conn.close()
        raise
    return conn, callback, versions(libvirt, conn)


def close_connection(conn: Any, callback: int | None) -> None:
    """Deregister and close, ignoring a connection that is already dead. Blocking."""
    with contextlib.suppress(Exception):
        if callback is not None:
            conn.domainEventDeregisterAny(callback)
        conn.unregisterCloseCallback()
    with contextlib.suppress(Exception):
        conn.close()


def cannot_connect(uri: str, exc: Any) -> str:
    return f"cannot connect to {uri}: {exc.get_error_message()}"


def ask_libvirtd(uri: str) -> dict[str, Any]:
    """Connect once exactly as :class:`Host` does and hang up: ``{"reason": "" or why
    libvirtd cannot be used, "versions": {...}}``. What the liveness child prints."""
    try:
        libvirt = load_libvirt()
    except ImportError:
        return {"reason": NO_BINDING, "versions": {}}
    try:
        conn, callback, found = open_connection(libvirt, uri, lambda *_: None, lambda *_: None)
    except libvirt.libvirtError as exc:
        return {"reason": cannot_connect(uri, exc), "versions": {}}
    close_connection(conn, callback)
    return {"reason": "", "versions": found}


class Host:
    """The plugin's connection to libvirtd, once libvirt is loaded.

    ``on_connected(conn)`` runs after every (re)connection, to re-read the domains;
    ``on_lost()`` when the connection drops; ``on_event(name, event, detail)`` for each
    domain lifecycle event. All three run on the event loop.
    """

    def __init__(
        self,
        uri: str,
        on_connected: Callable[[Any], Awaitable[None]],
        on_lost: Callable[[], None],
        on_event: Callable[[str, int, int], None],
    ):
        self.uri = uri
        self.libvirt: Any = None
        self.conn: Any = None
        self.versions: dict[str, str] = {}
        # Empty while connected; else why there is no connection.
        self.unavailable = "libvirt is not loaded"
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._on_event = on_event
        self._callback: int | None = None
        self._connect_lock = asyncio.Lock()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._stopped = False

    @property
    def loaded(self) -> bool:
        return self.libvirt is not None

    async def load(self) -> bool:
        """Load libvirt and connect (or keep reconnecting); False while there is no connection."""
        if self.libvirt is None:
            try:
                self.libvirt = await asyncio.to_thread(load_libvirt)
            except ImportError:
                self.unavailable = NO_BINDING
                return False
            log.info("kvm: libvirt loaded (this node has KVM work)")
        if await self.connect():
            return True
        self._start_reconnecting()
        return False

    async def connect(self) -> bool:
        """Open the connection and hand it to ``on_connected``; False if libvirtd is down."""
        async with self._connect_lock:
            if self.conn is not None:
                return True
            if self._stopped:
                return False
            try:
                conn, callback, found = await asyncio.to_thread(
                    open_connection, self.libvirt, self.uri, self._closed_by_libvirt, self._lifecycle
                )
            except self.libvirt.libvirtError as exc:
                self.unavailable = cannot_connect(self.uri, exc)
                return False
            self.conn, self._callback, self.versions = conn, callback, found
            self.unavailable = ""
            await self._on_connected(conn)
            log.info("kvm: connected to %s", self.uri)
            return True

    async def connection(self) -> Any:
        """The connection a task works through; the first kvm task of an idle node loads
        libvirt. ``unavailable`` (a failed task) while there is none."""
        if self.conn is None and not await self.load():
            if not self.loaded:
                raise TaskError(f"the kvm plugin is unavailable: {self.unavailable}", code="unavailable")
            raise TaskError(
                f"libvirtd is not reachable: {self.unavailable}; start libvirtd and retry",
                code="unavailable",
            )
        return self.conn

    async def close(self) -> None:
        self._stopped = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        conn, self.conn = self.conn, None
        if conn is not None:
            await asyncio.to_thread(close_connection, conn, self._callback)

    async def call(self, name: str, what: str, func: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking libvirt call on domain ``name``; libvirt's refusal is a failed task."""
        try:
            return await asyncio.to_thread(func, *args)
        except self.libvirt.libvirtError as exc:
            raise TaskError(f"libvirt could not {what} {name!r}: {exc.get_error_message()}", code="failed") from exc

    # ---- the event thread's callbacks, and what they do on the event loop ---------------

    def _closed_by_libvirt(self, conn: Any, reason: int, opaque: Any) -> None:
        self._to_loop(self._disconnected, conn, reason)

    def _lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        self._to_loop(self._on_event, dom.name(), event, detail)

    def _to_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        # The agent's loop may already be closed when a late libvirt event arrives.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _disconnected(self, conn: Any, reason: int) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        self.unavailable = f"lost the connection to libvirtd at {self.uri} (close reason {reason})"
        log.warning("kvm: %s; reconnecting", self.unavailable)
        self._on_lost()
        # Closing may wait on the dead connection: never on the event loop.
        threading.Thread(target=close_connection, args=(conn, None), daemon=True).start()
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if not self._stopped and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        backoff = Backoff(base=0.5, cap=10.0)
        while not self._stopped and not await self.connect():
            await asyncio.sleep(backoff.next())
