"""A TCP forwarder to a controller's enrollment port that injects a fault into one enrollment.

    with EnrollmentCutter(controller.enroll_port, "answer", crash) as cutter:
        ... join through 127.0.0.1:cutter.port ...

It reads only the TLS record headers (type and length), never the plaintext, so it sees the
enrollment request as the client's first application data of any size (the TLS 1.3
Finished record is 53 bytes or less; a request carries a CSR) and the answer as the
server's application data that follows it. Once, on the connection carrying the request, it
calls ``fault`` and then drops the connection both ways:

- ``"request"``: right after forwarding the request (the controller may or may not commit);
- ``"answer"``: when the server has sent more than a session ticket's worth after the
  request (the answer is two certificates): none of it reaches the client.

A connection it cannot make upstream (the controller down) is closed at once, as a refused
connection would be. Forwarding style as tests/harness/libvirt.py's LibvirtSocketProxy.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Literal

from tests.harness import free_port

APPLICATION_DATA = 0x17
REQUEST_BYTES = 300  # more client application data than a Finished record: the request
ANSWER_BYTES = 1000  # more server application data than session tickets: the answer


class EnrollmentCutter:
    def __init__(self, target_port: int, at: Literal["request", "answer"], fault: Callable[[], None]):
        self.target_port = target_port
        self.at = at
        self.fault = fault
        self.port = free_port()
        self.fired = threading.Event()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> EnrollmentCutter:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            requested = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, requested), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, requested), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, requested: threading.Event) -> None:
        """Client to server: forwarded as it comes; marks when the request has gone."""
        sent = 0
        for record in _records(client):
            try:
                upstream.sendall(record)
            except OSError:
                break
            if record[0] == APPLICATION_DATA and not self.fired.is_set():
                sent += len(record) - 5
                if sent > REQUEST_BYTES and not requested.is_set():
                    requested.set()
                    if self.at == "request":
                        self._cut(client, upstream)
                        return
        _close(upstream)

    def _answers(self, upstream: socket.socket, client: socket.socket, requested: threading.Event) -> None:
        """Server to client: after the request, held until it is clearly the answer, then cut
        (``"answer"``); otherwise forwarded as it comes."""
        held: list[bytes] = []
        for record in _records(upstream):
            if self.at == "answer" and requested.is_set() and not self.fired.is_set():
                held.append(record)
                if sum(len(r) - 5 for r in held if r[0] == APPLICATION_DATA) > ANSWER_BYTES:
                    self._cut(client, upstream)
                    return
                continue
            try:
                client.sendall(b"".join([*held, record]))
            except OSError:
                break
            held = []
        if self.at == "request" and requested.is_set():
            self.fired.wait(60)  # the client sees the connection end once the fault is done
        with contextlib.suppress(OSError):
            client.sendall(b"".join(held))  # an answer too small to be the enrollment's
        _close(client)

    def _cut(self, client: socket.socket, upstream: socket.socket) -> None:
        if not self.fired.is_set():
            self.fault()
            self.fired.set()
        _close(client)
        _close(upstream)


def _records(sock: socket.socket):  # noqa: ANN202 - a generator of bytes
    """The TLS records read from ``sock`` (header included), whole, until it closes."""
    buffer = b""
    while True:
        while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[3:5], "big"):
            size = 5 + int.from_bytes(buffer[3:5], "big")
            yield buffer[:size]
            buffer = buffer[size:]
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        buffer += data


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
