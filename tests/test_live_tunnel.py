"""The controller's live-migration tunnel endpoints as an attacker meets them: who may attach,
when, to what, how often, with how big a message. The handlers and the identity guard are the
controller's own, in an aiohttp test server; the certificate's identity comes from a header
(the real server takes it from the TLS session, tested in test_controller.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controller.api import migration
from controller.app import IDENTIFY, guard
from controller.services import Refused, inflight, live

MID = "m-0123456789abcdef"


class Ctl:
    """What the guard and the handlers ask of the controller."""

    unavailable = None
    revoked: set[str] = set()

    async def node_may_connect(self, node_id: str, serial: str) -> bool:
        return True


@web.middleware
async def refused(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refused as exc:
        return web.json_response({"error": exc.message}, status=exc.status)


async def identity(request: web.Request) -> tuple[str, str, str]:
    role, _, name = request.headers["X-Cert"].partition(" ")
    return role, name, "1"


@pytest.fixture
async def tunnel(aiohttp_client: Any) -> Any:
    """(the tunnel of migration MID from node s to node d, a function opening a websocket as
    a certificate, e.g. ``"node s"``, to a path under /v1/nodes/)."""
    ctl = Ctl()
    app = web.Application(middlewares=[refused])
    app["kumo"] = ctl
    app[IDENTIFY] = identity
    for route in migration.ROUTES:
        if route.path.startswith(migration.LIVE):
            app.router.add_route(route.method, route.path, guard(route, route.handler))
    client = await aiohttp_client(app)
    made = inflight.migrations(ctl).tunnels[MID] = inflight.Tunnel("s", "d")

    async def ws(cert: str, path: str, **query: str) -> Any:
        return await client.ws_connect(f"/v1/nodes/{path}", headers={"X-Cert": cert}, params=query or None)

    return made, ws


async def refusal(opening: Any) -> tuple[int, str]:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await opening
    return caught.value.status, caught.value.message


async def ready(tunnel: Any, ws: Any) -> Any:
    """The destination attached and ready with channel ``control``; its control websocket."""
    control = await ws("node d", f"d/migrations/{MID}/live")
    await control.send_str(json.dumps({"definition": "<domain/>", "channels": ["control"]}))
    await asyncio.wait_for(asyncio.shield(tunnel.ready), 5)
    tunnel.live = True
    return control


async def test_only_the_migrations_ends_attach_and_only_as_themselves(tunnel):
    made, ws = tunnel
    # A third node, as itself or in the name of an end; an admin certificate.
    assert (await refusal(ws("node x", f"x/migrations/{MID}/live")))[0] == 403
    assert (await refusal(ws("node x", f"d/migrations/{MID}/live")))[0] == 403
    assert (await refusal(ws("admin root", f"d/migrations/{MID}/live")))[0] == 403
    assert (await refusal(ws("node x", f"x/migrations/{MID}/live/control")))[0] == 403
    # Another migration's id, and this one once it ended.
    assert (await refusal(ws("node s", "s/migrations/m-ffffffffffffffff/live")))[0] == 404
    made.ended.set()
    assert (await refusal(ws("node d", f"d/migrations/{MID}/live")))[0] == 404


async def test_the_source_opens_nothing_before_its_live_phase_and_only_named_channels(tunnel):
    made, ws = tunnel
    status, _ = await refusal(ws("node s", f"s/migrations/{MID}/live/control"))
    assert status == 409
    control = await ready(made, ws)
    assert (await refusal(ws("node d", f"d/migrations/{MID}/live")))[0] == 409  # one destination control
    assert (await refusal(ws("node s", f"s/migrations/{MID}/live/shell")))[0] == 404
    await control.close()


async def test_a_connection_is_joined_once_by_the_destination_on_its_channel(tunnel):
    made, ws = tunnel
    control = await ready(made, ws)
    source = await ws("node s", f"s/migrations/{MID}/live/control")
    order = json.loads((await control.receive(timeout=5)).data)
    assert order == {"channel": "control", "conn": "1"}
    # The destination joins only on the announced channel.
    assert (await refusal(ws("node d", f"d/migrations/{MID}/live/memory", conn="1")))[0] == 404
    joined = await ws("node d", f"d/migrations/{MID}/live/control", conn="1")
    await source.send_bytes(b"hello")
    assert (await joined.receive(timeout=5)).data == b"hello"
    await joined.send_bytes(b"back")
    assert (await source.receive(timeout=5)).data == b"back"
    # Replayed, the number joins nothing.
    assert (await refusal(ws("node d", f"d/migrations/{MID}/live/control", conn="1")))[0] == 404
    for each in (joined, source, control):
        await each.close()


async def test_connections_and_messages_are_bounded(tunnel, monkeypatch):
    made, ws = tunnel
    monkeypatch.setattr(inflight, "TUNNEL_MESSAGE_MAX", 1024)
    monkeypatch.setattr(inflight, "TUNNEL_CONNECTIONS_MAX", 2)
    control = await ready(made, ws)
    sources = [await ws("node s", f"s/migrations/{MID}/live/control") for _ in range(2)]
    status, _ = await refusal(ws("node s", f"s/migrations/{MID}/live/control"))
    assert status == 429
    for number in ("1", "2"):
        assert json.loads((await control.receive(timeout=5)).data)["conn"] == number
    joined, other = [await ws("node d", f"d/migrations/{MID}/live/control", conn=n) for n in ("1", "2")]
    # One message bigger than the bound closes the connection, both ends, nothing relayed.
    await sources[0].send_bytes(b"x" * 2048)
    assert (await sources[0].receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert (await joined.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert made.bytes == 0
    for each in (joined, other, *sources, control):
        await each.close()


async def test_a_peer_that_takes_nothing_ends_its_connection_both_ends_closed(tunnel, monkeypatch):
    made, ws = tunnel
    monkeypatch.setattr(inflight, "TUNNEL_SEND_TIMEOUT", 0.5)
    control = await ready(made, ws)
    source = await ws("node s", f"s/migrations/{MID}/live/control")
    await control.receive(timeout=5)
    frozen = await ws("node d", f"d/migrations/{MID}/live/control", conn="1")  # never reads: a stopped agent

    async def send() -> None:
        chunk = b"x" * (256 << 10)
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):  # the end, as it is closed
            while not source.closed:
                await source.send_bytes(chunk)

    sending = asyncio.ensure_future(send())
    # Once the buffers on the way are full, the controller's send to the frozen end times
    # out: the source's end is closed (its hypervisor sees the connection go) ...
    assert (await source.receive(timeout=30)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await asyncio.wait_for(sending, 10)
    for _ in range(200):  # ... and the tunnel holds no connection
        if made.open == 0:
            break
        await asyncio.sleep(0.05)
    assert made.open == 0
    # The frozen end finds its connection cut after what was buffered for it.
    while (message := await frozen.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY:
        pass
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), message
    for each in (source, frozen, control):
        await each.close()


async def test_the_sources_progress_keeps_figures_only(tunnel):
    made, ws = tunnel
    made.live = True
    control = await ws("node s", f"s/migrations/{MID}/live")
    await control.send_str(json.dumps({"progress": {
        "memory_remaining": 5, "not_converging": "abort", "bytes_total": 1, "Evil": 1, "x" * 60: 1,
        "nested": {"a": 1}, "text": "y" * 100}}))
    await control.close()
    assert made.progress == {"memory_remaining": 5, "not_converging": "abort"}


class Store:
    async def get_instance(self, name: str) -> dict[str, Any]:
        return {"spec": {"vcpus": 1, "memory_mib": 64}}

    async def put_migration(self, doc: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize(("received", "outcome"), [
    ({"state": "failed", "code": "migration-failed", "error": "nothing of it is left here"}, "holds nothing of it"),
    ({"state": "failed", "code": "interrupted", "error": "the agent stopped"},
     "did not confirm it removed what it prepared (the agent stopped)"),
])
async def test_a_failed_move_says_what_the_destination_left_only_as_it_confirmed(monkeypatch, received, outcome):
    ctl = Ctl()
    ctl.store = Store()
    ctl.settings = type("Settings", (), {"url": "https://ctl:8443"})
    doc = {"id": MID, "instance": "vm", "kind": "kvm", "source": "s", "destination": "d", "phase": "prepare",
           "live": {"max_downtime_ms": 300}, "progress": {}}

    async def run_task(ctl: Any, node: str, kind: str, payload: Any, timeout: float, instance: Any = None) -> Any:
        assert kind == "checkpoint.live_facts"
        return {"state": "succeeded", "result": {"facts": {}}}

    async def wait(ctl: Any, task: Any, timeout: float, harmless: bool = False) -> Any:
        if task["kind"] == "checkpoint.live_send":
            assert inflight.migrations(ctl).tunnels[MID].live and harmless
            return {"state": "failed", "code": "migration-failed", "error": "the tunnel broke"}
        return received

    async def submit(ctl: Any, task: dict[str, Any]) -> Any:
        if task["kind"] == "checkpoint.live_receive":
            inflight.migrations(ctl).tunnels[MID].ready.set_result({"definition": "<domain/>", "channels": ["control"]})
        return task, True

    monkeypatch.setattr(live, "run_task", run_task)
    monkeypatch.setattr(live, "submit", submit)
    monkeypatch.setattr(live.tasks, "wait", wait)
    await live.migrate_live(ctl, doc)
    assert doc["code"] == "migration-failed" and "runs on node s" in doc["outcome"], doc
    assert outcome in doc["outcome"], doc


@pytest.mark.parametrize("answers", [[True], [False], [None, None, True], [None, False]])
async def test_a_copy_the_destination_holds_goes_on_only_when_the_source_has_none(monkeypatch, answers):
    # libvirt's Finish started the guest on the destination, and its answer was lost on the
    # way back: the source's libvirt resumed its own copy, and the destination, not told that
    # the move finished, paused its copy. The source's goes on if it runs; the held one if the
    # source says it has none; neither, while the source does not say (None: no report).
    source_runs = answers[-1]
    phases: list[str] = []
    ctl = Ctl()
    ctl.store = Store()
    ctl.settings = type("Settings", (), {"url": "https://ctl:8443", "heartbeat_interval": 10.0})
    doc = {"id": MID, "instance": "vm", "kind": "kvm", "source": "s", "destination": "d", "phase": "prepare",
           "live": {"max_downtime_ms": 300}, "progress": {}, "error": None}
    asked: list[tuple[str, str]] = []
    moved: list[tuple[str, str, str]] = []

    async def run_task(ctl: Any, node: str, kind: str, payload: Any, timeout: float, instance: Any = None) -> Any:
        asked.append((node, kind))
        if kind == "checkpoint.live_facts":
            return {"state": "succeeded", "result": {"facts": {}}}
        return {"state": "succeeded", "result": {}}

    async def submit(ctl: Any, task: dict[str, Any]) -> Any:
        if task["kind"] == "checkpoint.live_receive":
            inflight.migrations(ctl).tunnels[MID].ready.set_result({"definition": "<domain/>", "channels": ["control"]})
        return task, True

    async def wait(ctl: Any, task: Any, timeout: float, harmless: bool = False) -> Any:
        if task["kind"] == "checkpoint.live_send":
            return {"state": "failed", "code": "migration-failed", "error": "End of file while reading data",
                    "result": None}
        return {"state": "succeeded", "result": {"arrived": True, "held": True}}

    async def running_on(ctl: Any, nodes: list[str], name: str, kind: str, since: float) -> str | None:
        return "d" if source_runs is False and "d" in nodes else None

    async def reports_running(ctl: Any, node: str, name: str, kind: str, since: float,
                              poll: float = 0.2) -> bool | None:
        assert node == "s"
        phases.append(doc["phase"])
        return answers.pop(0)

    async def move_instance(name: str, source: str, destination: str) -> None:
        moved.append((name, source, destination))

    monkeypatch.setattr(live, "run_task", run_task)
    monkeypatch.setattr(live, "submit", submit)
    monkeypatch.setattr(live.tasks, "wait", wait)
    monkeypatch.setattr(live, "running_on", running_on)
    monkeypatch.setattr(live, "reports_running", reports_running)
    monkeypatch.setattr(ctl.store, "move_instance", move_instance, raising=False)
    await live.migrate_live(ctl, doc)
    assert answers == [], "asked again until the source said"
    # Until then the migration waits, held, and says so.
    assert phases == ["live"] + ["held"] * (len(phases) - 1), phases
    if source_runs:
        assert moved == [] and ("d", "kvm.delete") in asked and ("d", "kvm.start") not in asked, (moved, asked)
        assert doc["outcome"].startswith("the instance was not moved and runs on node s; node d's copy"), doc
        assert doc["outcome"].endswith("was paused and removed"), doc
    else:
        assert ("d", "kvm.start") in asked and ("d", "kvm.delete") not in asked, asked
        assert moved == [("vm", "s", "d")] and ("s", "kvm.delete") in asked, (moved, asked)
        assert doc["node"] == "d" and doc["outcome"].startswith("instance vm runs on node d; node s no longer has it"), doc


async def test_a_removed_source_runs_nothing():
    # An admin removes the node of a host that is gone: a held copy then goes on.
    ctl = Ctl()

    async def get_node(node_id: str) -> dict[str, Any]:
        return {"id": node_id, "removed": True}

    ctl.store = type("RemovedStore", (), {"get_node": staticmethod(get_node)})()
    ctl.settings = type("Settings", (), {"heartbeat_interval": 10.0})
    assert await inflight.reports_running(ctl, "s", "vm", "kvm", 0.0) is False
