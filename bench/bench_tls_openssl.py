"""What OpenSSL keeps per idle server-side TLS connection of the controller, in one run.

The controller's memory per idle agent connection (bench_fleet.py, bench_tls.py) is part
OpenSSL's, part asyncio's and aiohttp's. This measures OpenSSL's part alone: malloc's in-use
bytes (glibc ``mallinfo2``) over ``--connections`` server-side ``SSLObject``\\ s, each after a
completed handshake with the controller's own TLS context (``controller.app.tls_context`` on
a ``kumo-controller init`` directory), a request read and an answer written, its last read
ending in "want read" as an idle connection's does. No sockets, no event loop: the client
ends live in memory BIOs and are freed before the count.

Three cases: the API listener's context (a client certificate required and verified, as
every agent's); the enrollment listener's (no client certificate); and the first again
with OpenSSL's ``SSL_MODE_RELEASE_BUFFERS`` cleared. CPython sets that mode on every
context it makes (``_ssl.c``), so an idle connection does not keep its 16 KiB record-layer
read and write buffers; the third case shows what that is worth, and the run checks that the
mode is set on the controller's context. Reading and clearing the mode goes through ctypes
(``SSL_CTX_ctrl`` on the libssl that ``_ssl`` is linked to, the ``SSL_CTX *`` read from the
``ssl.SSLContext`` object), checked against ``SSLContext.options`` before it is used; where
that check cannot be made (not CPython, libssl not found, not glibc) the run says so and
measures the first two cases only.

Run: ``.venv/bin/python bench/bench_tls_openssl.py`` (a few seconds). It prints; it never asserts.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_heartbeat import client_context, tool

SSL_CTRL_MODE = 33  # SSL_CTX_get_mode / SSL_CTX_set_mode
SSL_CTRL_CLEAR_MODE = 78
SSL_MODE_RELEASE_BUFFERS = 0x10
WARM_UP = 50  # handshakes before counting, so that one-time allocations are not counted


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc only)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class ContextMode:
    """Read and clear an ``ssl.SSLContext``'s OpenSSL mode, or say why that cannot be done here."""

    def __init__(self) -> None:
        import _ssl

        if sys.implementation.name != "cpython":
            raise OSError(f"{sys.implementation.name} is not CPython: its SSLContext layout is unknown")
        if not getattr(_ssl, "__file__", None):
            raise OSError("the _ssl module is built into this interpreter: its libssl cannot be told apart")
        # dlsym through _ssl's own handle finds the libssl it is linked to, whatever else is loaded.
        linked = ctypes.CDLL(_ssl.__file__)
        if not hasattr(linked, "SSL_CTX_ctrl") or not hasattr(linked, "SSL_CTX_get_options"):
            raise OSError(f"{_ssl.__file__} exports no SSL_CTX_ctrl (OpenSSL linked statically?)")
        self._ctrl = linked.SSL_CTX_ctrl
        self._ctrl.restype = ctypes.c_long
        self._ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self._options = linked.SSL_CTX_get_options
        self._options.restype = ctypes.c_uint64
        self._options.argtypes = [ctypes.c_void_p]

    def _pointer(self, context: ssl.SSLContext) -> int:
        # CPython's PySSLContext starts with PyObject_HEAD and then the SSL_CTX *: read it, and
        # use it only if OpenSSL's options for it are what Python reports for the context.
        pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not pointer or self._options(pointer) != int(context.options):
            raise OSError("the SSL_CTX found in the SSLContext object does not match its options")
        return pointer

    def get(self, context: ssl.SSLContext) -> int:
        return self._ctrl(self._pointer(context), SSL_CTRL_MODE, 0, None)

    def clear(self, context: ssl.SSLContext, mode: int) -> None:
        self._ctrl(self._pointer(context), SSL_CTRL_CLEAR_MODE, mode, None)
        if self.get(context) & mode:
            raise OSError(f"mode {mode:#x} is still set after SSL_CTX_clear_mode")


def idle_connection(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A server-side connection after a handshake and one request and answer, as a long-poll
    holds it (the server's last read wanted more), with its two memory BIOs."""
    incoming, outgoing, client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = server.wrap_bio(incoming, outgoing, server_side=True)
    theirs = client.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")

    def carry() -> int:
        moved = client_out.read()
        incoming.write(moved)
        answer = outgoing.read()
        client_in.write(answer)
        return len(moved) + len(answer)

    def attempt(call, *args):  # noqa: ANN001, ANN202 - an SSLObject method and its arguments
        try:
            return call(*args)
        except ssl.SSLWantReadError:
            return None

    while True:
        attempt(theirs.do_handshake)
        attempt(ours.do_handshake)
        if not carry():
            break
    theirs.write(b"GET /v1/nodes/n/tasks?wait=30 HTTP/1.1\r\nHost: ctl\r\n\r\n")
    carry()
    attempt(theirs.read, 1)  # the server's session tickets
    while attempt(ours.read, 1 << 16):
        pass
    ours.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    carry()
    attempt(ours.read, 1 << 16)
    return ours, incoming, outgoing


def per_connection(server: ssl.SSLContext, client: ssl.SSLContext, count: int) -> float:
    """malloc in-use KiB per idle server connection over ``count`` of them."""
    for _ in range(WARM_UP):
        idle_connection(server, client)
    gc.collect()
    before = malloc_in_use()
    held = [idle_connection(server, client) for _ in range(count)]
    gc.collect()
    kib = (malloc_in_use() - before) / 1024 / len(held)
    del held
    return kib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="connections held per case (default %(default)s)")
    args = parser.parse_args()
    if args.connections < 1:
        sys.exit("bench: --connections: expected a whole number of connections, 1 or more")
    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        sys.exit("bench: malloc's statistics need glibc 2.33 or later (mallinfo2)")
    from controller.app import tls_context
    from controller.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="kumo-bench-openssl-") as tmp:
        work = Path(tmp)
        subprocess.run(  # noqa: S603 - an argv list, never a shell
            [tool("kumo-controller"), "init", "--dir", str(work), "--listen", "127.0.0.1:1",
             "--enroll-listen", "127.0.0.1:2", "--san", "127.0.0.1"], check=True, stdout=subprocess.DEVNULL)
        settings = load_settings(work / "controller.yaml")
        pki = work / "pki"
        agent = client_context(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        joining = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        api = per_connection(tls_context(settings, True), agent, args.connections)
        enrollment = per_connection(tls_context(settings, False), joining, args.connections)
        release = "unknown"
        cleared: float | str = "not measured"
        try:
            modes = ContextMode()
            measured = tls_context(settings, True)
            release = "set" if modes.get(measured) & SSL_MODE_RELEASE_BUFFERS else "NOT set"
            modes.clear(measured, SSL_MODE_RELEASE_BUFFERS)
            cleared = per_connection(measured, agent, args.connections)
        except OSError as exc:
            cleared = f"not measured: {exc}"
    print(f"OpenSSL per idle server connection (malloc in-use bytes), {ssl.OPENSSL_VERSION}, "
          f"{args.connections} connections per case")
    print(f"  client certificate verified (API listener)   {api:6.1f} KiB")
    print(f"  no client certificate (enrollment listener)  {enrollment:6.1f} KiB")
    print(f"  SSL_MODE_RELEASE_BUFFERS on the controller's context: {release}")
    if isinstance(cleared, float):
        print(f"  client certificate verified, mode cleared    {cleared:6.1f} KiB")
        print(f"with/without SSL_MODE_RELEASE_BUFFERS: {api / cleared:.2f}×")
    else:
        print(f"  with the mode cleared: {cleared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
