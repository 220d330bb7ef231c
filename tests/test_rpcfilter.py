"""The filter of what a live migration's source says to the destination's libvirtd
(plugins/kvm/rpcfilter.py): unit checks on crafted messages, and a real libvirtd behind it."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugins.kvm import rpcfilter
from plugins.kvm.rpcfilter import Refused, RpcFilter, Xdr, string_param, xdr_string

NAME = "kumo-vm"
OWN = "<domain type='qemu'><name>kumo-vm</name></domain>"
SOCKETS = "unix:///run/kumo/migrations/m-1"
PARAMS: dict[str, object] = {"migrate_uri": f"{SOCKETS}/memory.sock", "disks_uri": f"{SOCKETS}/disks.sock",
                             "persistent_xml": OWN, "migrate_disks": ["vda"]}
FLAGS = 0x1 | 0x80 | 0x8 | 0x10


def message(procedure: int, payload: bytes = b"", program: int = rpcfilter.REMOTE, kind: int = rpcfilter.CALL) -> bytes:
    header = struct.pack(">IIIIII", program, 1, procedure, kind, 7, 0)
    return struct.pack(">I", 4 + len(header) + len(payload)) + header + payload


def params(*pairs: tuple[str, str]) -> bytes:
    return struct.pack(">I", len(pairs)) + b"".join(string_param(field, value) for field, value in pairs)


def migration(dest: str = "<domain><disk>/dev/sda</disk></domain>", **changed: str) -> list[tuple[str, str]]:
    """The parameters a migration gives, ``changed``, with ``dest`` as the definition."""
    given = {**{k: v for k, v in PARAMS.items() if isinstance(v, str)}, **changed}
    return [*given.items(), ("destination_xml", dest), ("migrate_disks", "vda")]


def prepare(pairs: list[tuple[str, str]], flags: int = FLAGS) -> bytes:
    cookie = xdr_string("<qemu-migration/>")
    return message(rpcfilter.DOMAIN_MIGRATE_PREPARE3_PARAMS, params(*pairs) + cookie + struct.pack(">I", flags))


def sent_params(forwarded: bytes) -> list[tuple[str, object]]:
    return [(field, value) for field, value, _ in Xdr(forwarded[28:]).params()]


def refused(data: bytes) -> str:
    with pytest.raises(Refused) as caught:
        RpcFilter(NAME, PARAMS, FLAGS, OWN).feed(data)
    return str(caught.value)


def test_calls_a_migration_makes_pass_whole_even_when_they_come_a_byte_at_a_time() -> None:
    calls = (message(rpcfilter.AUTH_LIST) + message(rpcfilter.CONNECT_OPEN, struct.pack(">I", 1)
                                                   + xdr_string("qemu:///system") + struct.pack(">I", 0))
             + message(rpcfilter.CONNECT_SUPPORTS_FEATURE, struct.pack(">i", 9))
             + message(rpcfilter.DOMAIN_LOOKUP_BY_NAME, xdr_string(NAME))
             + message(rpcfilter.KEEPALIVE_PING, program=rpcfilter.KEEPALIVE, kind=rpcfilter.MESSAGE))
    feed = RpcFilter(NAME, PARAMS, FLAGS, OWN).feed
    assert b"".join(feed(calls[i:i + 1]) for i in range(len(calls))) == calls


@pytest.mark.parametrize(("data", "why"), [
    (message(11, xdr_string("<domain/>")), "libvirt call 11"),  # defineXML
    (message(273, struct.pack(">iI", 1, 0)), "libvirt call 273"),  # listAllDomains
    (message(rpcfilter.CONNECT_OPEN, struct.pack(">I", 1) + xdr_string("lxc:///system") + bytes(4)), "lxc:///"),
    (message(rpcfilter.DOMAIN_LOOKUP_BY_NAME, xdr_string("other")), "domain 'other'"),
    (message(rpcfilter.AUTH_LIST, kind=3), "type 3"),  # a stream
    (message(rpcfilter.AUTH_LIST, program=0x11223344), "program 0x11223344"),
    (message(rpcfilter.AUTH_LIST, b"more"), "more than its arguments"),
    (message(rpcfilter.DOMAIN_LOOKUP_BY_NAME, struct.pack(">I", 99) + b"ab"), "end too early"),
    (struct.pack(">I", rpcfilter.MAX_MESSAGE + 1), "a message of"),
    (struct.pack(">I", 8), "a message of 8 bytes"),
    (prepare(migration(migrate_uri="unix:///run/libvirt/libvirt-sock")), "migrate_uri"),
    (prepare(migration(persistent_xml="<domain><disk>/dev/sda</disk></domain>")), "persistent_xml"),
    (prepare([p for p in migration() if p[0] != "persistent_xml"]), "persistent_xml"),
    (prepare([*migration(), ("migrate_disks", "hdc")]), "migrate_disks"),
    (prepare([*migration(), ("listen_address", "0.0.0.0")]), "'listen_address'"),
    (prepare([*migration(), ("destination_xml", OWN)]), "given twice"),
    (prepare(migration(), flags=FLAGS | 0x2), "flags"),  # peer-to-peer
    (message(rpcfilter.DOMAIN_MIGRATE_PREPARE3_PARAMS, struct.pack(">I", 1) + xdr_string("x") + struct.pack(">i", 9)),
     "unknown type 9"),
])
def test_anything_else_is_refused_saying_what(data: bytes, why: str) -> None:
    assert why in refused(data)


def test_a_prepare_gets_this_nodes_definition_whatever_the_source_sent() -> None:
    forwarded = RpcFilter(NAME, PARAMS, FLAGS, OWN).feed(prepare(migration()))
    assert ("destination_xml", OWN) in sent_params(forwarded)
    assert "/dev/sda" not in forwarded.decode(errors="replace")
    assert forwarded.endswith(xdr_string("<qemu-migration/>") + struct.pack(">I", FLAGS))
    assert struct.unpack(">I", forwarded[:4])[0] == len(forwarded)


def test_a_finish_must_name_the_domain_prepared_here() -> None:
    def finish(pairs: list[tuple[str, str]]) -> bytes:
        return message(rpcfilter.DOMAIN_MIGRATE_FINISH3_PARAMS, params(*pairs) + xdr_string("c")
                       + struct.pack(">Ii", FLAGS, 0))

    forwarded = RpcFilter(NAME, PARAMS, FLAGS, OWN).feed(finish([*migration(), ("destination_name", NAME)]))
    assert sent_params(forwarded)[-1] == ("destination_name", NAME)
    assert ("destination_xml", OWN) in sent_params(forwarded)
    assert "does not name domain" in refused(finish(migration()))
    assert "does not name domain" in refused(finish([*migration(), ("destination_name", "other")]))


# ---- a real libvirtd behind the filter ------------------------------------------------


class Source:
    """The source's end of a tunnelled connection, as :func:`splice` sees its websocket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> Any:
        import aiohttp

        data = await self.reader.read(65536)
        if not data:
            raise StopAsyncIteration
        return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None)

    async def close(self) -> None:
        self.writer.close()


@pytest.fixture
def filtered(libvirtd: str, tmp_path: Path) -> Iterator[str]:
    """The URI of the libvirtd behind the filter, as the destination's control channel splices it."""
    from plugins.checkpoint.tunnels import splice
    from plugins.kvm.live import libvirtd_socket

    target = libvirtd_socket(libvirtd)
    assert target is not None
    path = tmp_path / "control.sock"
    loop = asyncio.new_event_loop()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(target)
        await splice(up_reader, up_writer, Source(reader, writer), RpcFilter(NAME, PARAMS, FLAGS, OWN).feed)

    server = loop.run_until_complete(asyncio.start_unix_server(tunnel, path=str(path)))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"qemu+unix:///system?socket={path}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    server.close()
    loop.close()


@pytest.mark.integration
def test_a_source_that_defines_or_lists_domains_has_its_connection_closed(
        libvirtd: str, filtered: str, caplog: pytest.LogCaptureFixture) -> None:
    import libvirt

    name = "kumo-rpcfilter-forbidden"
    conn = libvirt.open(filtered)
    assert conn.getLibVersion() > 0, "the calls a migration makes pass"
    with pytest.raises(libvirt.libvirtError, match="End of file|closed"):
        conn.defineXML(f"<domain type='qemu'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>"
                       "<devices><disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk></devices>"
                       "</domain>")
    assert "libvirt call 11, which a live migration does not make" in caplog.text
    with pytest.raises(libvirt.libvirtError):
        conn.getLibVersion()  # closed for good
    conn.close()

    conn = libvirt.open(filtered)
    with pytest.raises(libvirt.libvirtError, match="End of file|closed"):
        conn.listAllDomains()
    conn.close()
    assert "libvirt call 273" in caplog.text

    local = libvirt.open(libvirtd)
    try:
        assert name not in [dom.name() for dom in local.listAllDomains()], "nothing was defined"
    finally:
        local.close()
