"""What a live migration's source may say to this node's libvirtd.

The source drives libvirt's managed migration over a libvirt RPC connection tunnelled to
the destination's libvirtd socket, where it would act as root: any call (define a domain
whose disk is ``/dev/sda``...) would make a compromised source root here. So every message
the source sends on that connection passes :class:`RpcFilter` first, which lets through
only the calls a managed migration makes, and only for the instance this node prepared,
with its sockets and Kumo's flags; anything else closes the connection (the migration
fails and the guest stays on the source). libvirtd's replies pass unfiltered.

The definition the destination's qemu starts from is this node's own: the source's
libvirt sends it reformatted (its Begin phase parses and formats the definition it was
given, adding what it defaults), so the filter does not compare it but puts this node's
definition in its place, whatever the source sent.

The wire format (libvirt's "RPC infrastructure"): a 4-byte big-endian length counting
itself, a header of six XDR ints (program, version, procedure, type, serial, status), then
the call's XDR arguments (``src/remote/remote_protocol.x``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

REMOTE = 0x20008086
KEEPALIVE = 0x6B656570
CALL, MESSAGE = 0, 2  # message types: a call, and a one-way message (keepalive's)
HEADER = struct.Struct(">IIIIII")
LENGTH = struct.Struct(">I")
# The calls a migration makes are small (the largest: two domain definitions and a cookie
# of at most 16 KiB); a longer message is refused rather than buffered.
MAX_MESSAGE = 1 << 20

# remote_protocol.x's procedure numbers, which never change.
CONNECT_OPEN = 1
CONNECT_CLOSE = 2
DOMAIN_LOOKUP_BY_NAME = 23
CONNECT_GET_HOSTNAME = 59
CONNECT_SUPPORTS_FEATURE = 60
AUTH_LIST = 66
CONNECT_GET_URI = 110
CONNECT_GET_LIB_VERSION = 157
DOMAIN_GET_JOB_STATS = 298
DOMAIN_MIGRATE_PREPARE3_PARAMS = 303
DOMAIN_MIGRATE_FINISH3_PARAMS = 306
KEEPALIVE_PING, KEEPALIVE_PONG = 1, 2

# virTypedParameterType: the XDR of each type's value.
INT, UINT, LLONG, ULLONG, DOUBLE, BOOLEAN, STRING = range(1, 8)
PARAM_LIST_MAX = 64  # REMOTE_DOMAIN_MIGRATE_PARAM_LIST_MAX
COOKIE_MAX = 16384  # REMOTE_MIGRATE_COOKIE_MAX
DEST_XML, DEST_NAME = "destination_xml", "destination_name"  # VIR_MIGRATE_PARAM_DEST_XML, _DEST_NAME


class Refused(ValueError):
    """A message the destination does not let through; the connection is closed."""


class Xdr:
    """Reads XDR values off ``data``, refusing anything cut short."""

    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise Refused("a call's arguments end too early")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def uint(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def opaque(self, limit: int) -> bytes:
        size = self.uint()
        if size > limit:
            raise Refused(f"a call carries {size} bytes where at most {limit} are allowed")
        chunk = self.take(size)
        self.take(-size % 4)  # padding to 4 bytes
        return chunk

    def string(self) -> str:
        try:
            return self.opaque(MAX_MESSAGE).decode()
        except UnicodeDecodeError as exc:
            raise Refused("a call carries a string that is not UTF-8") from exc

    def optional_string(self) -> str | None:
        return self.string() if self.uint() else None

    def params(self) -> list[tuple[str, object, bytes]]:
        """An array of virTypedParameter: (name, value, its XDR), a name possibly repeated."""
        count = self.uint()
        if count > PARAM_LIST_MAX:
            raise Refused(f"a call carries {count} parameters")
        params = []
        for _ in range(count):
            start = self.at
            field, kind = self.string(), self.int()
            readers: dict[int, Callable[[], object]] = {
                INT: self.int, UINT: self.uint, BOOLEAN: self.int, STRING: self.string,
                LLONG: lambda: struct.unpack(">q", self.take(8))[0],
                ULLONG: lambda: struct.unpack(">Q", self.take(8))[0],
                DOUBLE: lambda: struct.unpack(">d", self.take(8))[0]}
            if kind not in readers:
                raise Refused(f"parameter {field!r:.40} has the unknown type {kind}")
            value = readers[kind]()
            params.append((field, value, self.data[start:self.at]))
        return params

    def end(self) -> None:
        if self.at != len(self.data):
            raise Refused("a call carries more than its arguments")


class RpcFilter:
    """The messages a source sends to this node's libvirtd in the live migration of
    ``name``: :meth:`feed` them in as they come, and forward what it returns (whole
    messages it checked); :class:`Refused` says the connection must close. ``params`` are
    the migration parameters the source must give (a list for a repeated one), ``flags``
    its flags; ``definition`` is what its ``destination_xml`` parameter becomes."""

    def __init__(self, name: str, params: dict[str, object], flags: int, definition: str):
        self.name = name
        self.params = params
        self.flags = flags
        self.definition = string_param(DEST_XML, definition)
        self.pending = b""
        self.checks: dict[int, Callable[[Xdr], bytes | None]] = {
            CONNECT_OPEN: self.open, CONNECT_CLOSE: nothing, AUTH_LIST: nothing,
            CONNECT_SUPPORTS_FEATURE: feature, CONNECT_GET_HOSTNAME: nothing,
            CONNECT_GET_URI: nothing, CONNECT_GET_LIB_VERSION: nothing,
            DOMAIN_LOOKUP_BY_NAME: self.lookup, DOMAIN_GET_JOB_STATS: self.job_stats,
            DOMAIN_MIGRATE_PREPARE3_PARAMS: self.prepare, DOMAIN_MIGRATE_FINISH3_PARAMS: self.finish}

    def feed(self, data: bytes) -> bytes:
        self.pending += data
        passed = []
        while len(self.pending) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self.pending)
            if not LENGTH.size + HEADER.size <= length <= MAX_MESSAGE:
                raise Refused(f"a message of {length} bytes")
            if len(self.pending) < length:
                break
            message, self.pending = self.pending[:length], self.pending[length:]
            passed.append(self.check(message))
        return b"".join(passed)

    def check(self, message: bytes) -> bytes:
        """``message`` as it may reach libvirtd."""
        header = message[LENGTH.size:LENGTH.size + HEADER.size]
        program, version, procedure, kind, _serial, status = HEADER.unpack(header)
        xdr = Xdr(message[LENGTH.size + HEADER.size:])
        if program == KEEPALIVE and kind == MESSAGE and procedure in (KEEPALIVE_PING, KEEPALIVE_PONG):
            xdr.end()
            return message
        if program != REMOTE or version != 1 or kind != CALL or status != 0:
            raise Refused(f"a message of program {program:#x} version {version} type {kind} status {status}")
        if procedure not in self.checks:
            raise Refused(f"libvirt call {procedure}, which a live migration does not make")
        payload = self.checks[procedure](xdr)
        xdr.end()
        if payload is None:
            return message
        return LENGTH.pack(LENGTH.size + HEADER.size + len(payload)) + header + payload

    def open(self, xdr: Xdr) -> None:
        uri = xdr.optional_string()
        xdr.uint()  # flags: read-only or not
        if uri != "qemu:///system":
            raise Refused(f"a connection to {uri!r:.80}, not qemu:///system")

    def lookup(self, xdr: Xdr) -> None:
        self.domain(xdr.string())

    def job_stats(self, xdr: Xdr) -> None:
        self.domain(xdr.string())
        xdr.take(16 + 4 + 4)  # the domain's uuid and id, the flags

    def domain(self, name: str) -> None:
        if name != self.name:
            raise Refused(f"a call about domain {name!r:.80}, not {self.name!r}")

    def prepare(self, xdr: Xdr) -> bytes:
        return xdr_params(self.migration(xdr.params())) + self.cookie_and_flags(xdr)

    def finish(self, xdr: Xdr) -> bytes:
        given = xdr.params()
        # libvirt adds the domain's name: Finish looks the arriving domain up by it.
        if [value for field, value, _ in given if field == DEST_NAME] != [self.name]:
            raise Refused(f"a migration's Finish that does not name domain {self.name!r}")
        params = [*self.migration([p for p in given if p[0] != DEST_NAME]), string_param(DEST_NAME, self.name)]
        return xdr_params(params) + self.cookie_and_flags(xdr) + xdr.take(4)  # cancelled: whether the source gave up

    def migration(self, params: list[tuple[str, object, bytes]]) -> list[bytes]:
        """Check the parameters of a migration; the XDR of each, with this node's definition."""
        given: dict[str, object] = {}
        encoded = []
        for field, value, raw in params:
            if field == DEST_XML:
                if field in given:
                    raise Refused(f"migration parameter {field!r} given twice")
                given[field] = value
                encoded.append(self.definition)
                continue
            if field not in self.params:
                raise Refused(f"migration parameter {field!r:.40}, which Kumo does not give")
            expected = self.params[field]
            if isinstance(expected, list):
                given.setdefault(field, []).append(value)  # type: ignore[union-attr]
            elif field in given:
                raise Refused(f"migration parameter {field!r:.40} given twice")
            else:
                given[field] = value
            encoded.append(raw)
        wrong = sorted(field for field in [*self.params, DEST_XML]
                       if field not in given or (field != DEST_XML and given[field] != self.params[field]))
        if wrong:
            raise Refused(f"migration parameters {', '.join(wrong)} are missing or not this node's")
        return encoded

    def cookie_and_flags(self, xdr: Xdr) -> bytes:
        start = xdr.at
        xdr.opaque(COOKIE_MAX)  # the source's cookie: see README's security model
        (flags,) = struct.unpack(">I", xdr.take(4))
        if flags != self.flags:
            raise Refused(f"migration flags {flags:#x}, not Kumo's {self.flags:#x}")
        return xdr.data[start:xdr.at]


def nothing(xdr: Xdr) -> None:
    """A call without arguments."""


def feature(xdr: Xdr) -> None:
    xdr.int()  # which feature: asking harms nothing


def xdr_params(encoded: list[bytes]) -> bytes:
    """The XDR of an array of typed parameters, each already encoded."""
    return struct.pack(">I", len(encoded)) + b"".join(encoded)


def string_param(field: str, value: str) -> bytes:
    """The XDR of a typed parameter of type string."""
    return xdr_string(field) + struct.pack(">i", STRING) + xdr_string(value)


def xdr_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", len(data)) + data + bytes(-len(data) % 4)
