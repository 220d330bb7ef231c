"""Checkpoint, restore and migration of instances, and the moves a drain makes.

Checkpoint and restore are one task each on the instance's node (the checkpoint plugin's
``checkpoint.dump`` / ``checkpoint.restore``: CRIU for process trees, the kind's own save
for a VM). A migration is a sequence the controller drives, one task at a time, and
records as a document (``GET /v1/migrations/{id}``). Here it is placed, started, ended and
taken over from a controller that died; a live one's steps are :mod:`controller.services.live`'s,
and what the controller holds of a migration while it drives it (the image relay, the live
tunnels) is :mod:`controller.services.inflight`'s. A stop-and-copy:

1. pre-flight on the source (``checkpoint.preflight``): blockers refuse it at once (409);
2. checkpoint on the source (``checkpoint.dump``, stopping the instance);
3. transfer: what the destination's image cache already holds of the images the
   checkpoint needs (a VM's base image) is asked first (``checkpoint.holds``) and left
   out; ``checkpoint.send`` on the source and ``checkpoint.receive`` on the destination
   meet here: the controller relays one stream between the two mutual-TLS requests through
   a small queue (never to disk, never whole in memory), counting the bytes as they pass;
   both ends report the stream's sha256 and they must agree. With several controllers the
   relay lives in the one driving the migration; an end attached to another controller
   reaches it through that controller, which forwards the stream (``/v1/relay/...``) with
   its own certificate, so nodes never need to reach a particular controller;
4. restore on the destination (``checkpoint.restore``), then wait until the destination's
   own heartbeat reports the instance running;
5. only then the instance's record moves to the destination and the source deletes its copy
   (``<kind>.delete``) and its checkpoints (``checkpoint.discard``).

A container's directory (config and rootfs) travels in the same stream as its image, and
the destination's lxc plugin takes it over as its own when it restores it (see
plugins/checkpoint/). Only the kinds both nodes' checkpoint plugins publish in their
fingerprint (``attributes.instance_kinds``) can be checkpointed or moved.

Any failure after step 2 restores the instance on the source from the checkpoint it just
made, so it is never lost; nothing is restored on the source while the destination might
still run it, so it never runs twice. When the controller cannot know (a node took a task
and never answered), it says so and leaves the checkpoint in place rather than guess.
A node that stops reporting fails the steps queued for it, and the transfer it was an end
of, as soon as the controller counts it unreachable (:func:`controller.services.tasks.wait`),
not at their timeouts: a destination that dies before its restore leaves the instance
restored on the source within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from controller import scheduler
from controller.services import Refused, instances, iso, tasks
from controller.services.checkpoints import checked_id
from controller.services.inflight import (
    ABORT_GRACE,
    CLEANUP_TIMEOUT,
    CRIU_TIMEOUT,
    PREFLIGHT_TIMEOUT,
    TRANSFER_TIMEOUT,
    Relay,
    fail,
    migrations,
    record_phase,
    running_on,
)
from controller.services.live import cannot_live, live_options, migrate_live, settle_held
from controller.services.tasks import new_task, run_task, submit
from controller.store.database import cancel_and_wait

log = logging.getLogger("kumo.controller.migration")

STATES = ("running", "succeeded", "failed")


async def listing(ctl: Any, state: str | None, limit: int,
                  before: tuple[float, str] | None = None) -> list[dict[str, Any]]:
    """Migrations newest first (see Store.list_migrations); one this controller drives is
    its live document, whose phase may be newer than the store's."""
    if state is not None and state not in STATES:
        raise Refused(400, f"state must be one of {', '.join(STATES)}, got {state!r:.40}")
    docs = migrations(ctl).docs
    return [{**docs[doc["id"]], "listed_at": doc["listed_at"]} if doc["id"] in docs else doc
            for doc in await ctl.store.list_migrations(state, limit, before)]


async def shutdown(ctl: Any) -> None:
    """Stop driving migrations (the controller is stopping); their records say they were cut off."""
    await cancel_and_wait(list(migrations(ctl).running.values()))


async def preflight(ctl: Any, row: dict[str, Any], doing: str) -> None:
    """Ask the instance's node what would block a checkpoint; 409 naming the blockers."""
    task = await run_task(ctl, row["node"], "checkpoint.preflight", {"name": row["name"], "kind": row["kind"]},
                          PREFLIGHT_TIMEOUT)
    if task["state"] != "succeeded":
        raise Refused(409, f"cannot {doing} instance {row['name']}: the pre-flight check on node {row['node']} "
                       f"failed: {task['error']}", code=task.get("code"))
    blockers = (task["result"] or {}).get("blockers") or []
    if blockers:
        raise Refused(
            409,
            f"cannot {doing} instance {row['name']} on node {row['node']}: "
            + "; ".join(f"{b['message']} [{b['code']}]" for b in blockers),
            blockers=blockers,
        )


def checkpoint_kinds(node: dict[str, Any] | None) -> list[str]:
    """The instance kinds ``node`` can checkpoint and move, as its checkpoint plugin publishes them."""
    plugin = ((node or {}).get("plugins") or {}).get("checkpoint") or {}
    kinds = (plugin.get("attributes") or {}).get("instance_kinds")
    return [k for k in kinds if isinstance(k, str)] if isinstance(kinds, list) else []


def unsupported(node: dict[str, Any] | None, node_id: str, kind: str) -> str | None:
    """Why ``node`` cannot checkpoint ``kind`` instances, or None when it can."""
    kinds = checkpoint_kinds(node)
    if kind in kinds:
        return None
    return f"node {node_id} cannot checkpoint {kind} instances (it can move: {', '.join(kinds) or 'none'})"


async def restore_payload(ctl: Any, node_id: str, name: str, kind: str, checkpoint: str | None) -> dict[str, Any]:
    """``checkpoint.restore``'s payload for ``node_id``, from ``checkpoint`` (an id; None:
    the latest). A kind the node restores by its own means (``native_kinds``: a VM) gets the
    instance's create payload, so a destination builds the instance from it rather than
    from what the source node wrote."""
    payload: dict[str, Any] = {"name": name, "kind": kind}
    if checkpoint is not None:
        payload["checkpoint"] = checkpoint
    instance = await kept_instance(ctl, node_id, name, kind, "native_kinds")
    if instance is not None:
        payload["instance"] = instance
    return payload


async def kept_instance(ctl: Any, node_id: str, name: str, kind: str, takers: str) -> dict[str, Any] | None:
    """The instance's create payload as this controller keeps it, for a task to ``node_id``
    when its checkpoint plugin lists ``kind`` under the attribute ``takers``; else None
    (older agents, which take no such key, are never sent it)."""
    stored = await ctl.store.get_node(node_id)
    plugin = ((ctl.node_view(stored) if stored is not None else {}).get("plugins") or {}).get("checkpoint") or {}
    if kind not in ((plugin.get("attributes") or {}).get(takers) or []):
        return None
    row = await ctl.store.get_instance(name)
    return None if row is None else {"name": name, "kind": kind, **row["spec"]}


async def checkpointable(ctl: Any, row: dict[str, Any], doing: str) -> None:
    stored = await ctl.store.get_node(row["node"])
    why = unsupported(ctl.node_view(stored) if stored is not None else None, row["node"], row["kind"])
    if why is not None:
        raise Refused(409, f"cannot {doing} instance {row['name']}: {why}", code="unsupported-kind")


async def modes(ctl: Any, row: dict[str, Any], instance: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Whether the instance (``row``, shown as ``instance``) could be moved now, per mode,
    and why not. The same checks a migration makes before it starts, except the source's
    pre-flight scan: the blockers its kind already knows come with its details. ``rejected``
    (when the scheduler was asked) names each node it would not move the instance to, and why."""
    why: str | None = None
    if instance["state"] != "running":
        why = f"it is {instance['state']}: only a running instance is checkpointed and moved"
    blockers = (instance.get("details") or {}).get("checkpoint_blockers") or []
    if why is None and blockers:
        why = "; ".join(f"{b.get('message')} [{b.get('code')}]" for b in blockers if isinstance(b, dict))
    shown: dict[str, dict[str, Any]] = {}
    for mode, live in (("stop-and-copy", False), ("live", True)):
        cannot, destination, rejected = why, None, None
        if cannot is None:
            try:
                await checkpointable(ctl, row, "migrate")
                destination, rejected = await _destination(ctl, row, None, live)
            except Refused as exc:
                cannot, rejected = exc.message, exc.extra.get("reasons")
        how = ("copy its memory and disk to another node while it runs, through the controller, then pause it "
               "briefly" if live else f"checkpoint on node {row['node']}, relay through the controller and restore "
               "on another node")
        shown[mode] = {"possible": cannot is None,
                       "reason": cannot or f"{how} (the scheduler would choose {destination} now)"}
        if rejected:
            shown[mode]["rejected"] = rejected
    return shown


async def checkpoint(ctl: Any, row: dict[str, Any], leave_running: bool) -> dict[str, Any]:
    """Queue a checkpoint of the instance on its node, after its pre-flight; the task."""
    await checkpointable(ctl, row, "checkpoint")
    await instances.refuse_if_migrating(ctl, row["name"])
    await preflight(ctl, row, "checkpoint")
    payload = {"name": row["name"], "kind": row["kind"], "leave_running": leave_running}
    if row.get("checkpoint_keep") is not None:  # the instance's own retention, else the node's
        payload["keep"] = row["checkpoint_keep"]
    task, _ = await submit(ctl, new_task(row["node"], "checkpoint.dump", payload, instance=row["name"]))
    return task


async def restore(ctl: Any, row: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """Queue a restore of the instance on its node from its latest checkpoint, or the one
    whose id is ``checkpoint``; the task."""
    if checkpoint is not None:
        checked_id(checkpoint)
    await checkpointable(ctl, row, "restore")
    await instances.refuse_if_migrating(ctl, row["name"])
    payload = await restore_payload(ctl, row["node"], row["name"], row["kind"], checkpoint)
    task, _ = await submit(ctl, new_task(row["node"], "checkpoint.restore", payload, instance=row["name"]))
    return task


async def end_orphans(ctl: Any) -> None:
    """Take over the migrations whose controller died while driving them (SQLite: this
    controller's previous run) and bring each to an end (:func:`_recover`)."""
    for doc in await ctl.store.orphaned_migrations(await ctl.live_controllers()):
        dead = doc.pop("controller")
        if not await ctl.store.adopt_migration(doc["id"], dead, ctl.id):
            continue  # another controller took it first
        log.warning("migration %s of %s: its controller %s stopped; this one takes it over", doc["id"],
                    doc["instance"], dead)
        mgr = migrations(ctl)
        mgr.docs[doc["id"]] = doc
        mgr.running[doc["id"]] = asyncio.create_task(
            _drive(ctl, doc, time.time(), _recover), name=f"kumo-migration-{doc['id']}")


async def _recover(ctl: Any, doc: dict[str, Any]) -> None:
    """End a migration another controller was driving when it died, from what the nodes say.

    The steps it had queued and no node took are withdrawn; those a node took are waited
    for (a transfer fails by itself: its relay died). Then: the destination runs the
    instance, so the move is finished; or the source still runs it, so nothing moved; or it
    runs nowhere, so it is restored on the source from the checkpoint the migration made.
    Never both: the source is restored only when the destination does not run it.
    """
    name, kind, source, destination = doc["instance"], doc["kind"], doc["source"], doc["destination"]
    base = {"name": name, "kind": kind}
    cut_at = doc["phase"]
    since = datetime.datetime.fromisoformat(doc["created_at"].replace("Z", "+00:00")).timestamp()
    for task in await ctl.store.instance_tasks(name, since):
        if task["state"] == "pending" and await ctl.store.cancel_task(task["id"], "the migration's controller stopped"):
            continue
        if task["state"] in ("pending", "delivered"):
            with contextlib.suppress(TimeoutError):
                await ctl.wait_task(task["id"], CRIU_TIMEOUT)
    ended = await ctl.store.instance_tasks(name, since)
    dumps = [t for t in ended if t["kind"] == "checkpoint.dump" and t["state"] == "succeeded" and t["node"] == source]
    image = doc.get("image") or (dumps[-1]["result"].get("image") if dumps else None)
    stopped = f"the controller driving this migration stopped during its {cut_at} phase"
    # A live move's destination that was not told how the move ended holds a paused copy
    # when libvirt's Finish started it there: which copy goes on is decided first.
    if any(t["kind"] == "checkpoint.live_receive" and t["node"] == destination and t["state"] == "succeeded"
           and (t["result"] or {}).get("held") for t in ended):
        finished = any(t["kind"] == "checkpoint.live_send" and t["node"] == source and t["state"] == "succeeded"
                       for t in ended)
        if await settle_held(ctl, doc, finished) != destination:  # its outcome says where it is
            doc.update(error=stopped, code="interrupted")
            return
    where = await running_on(ctl, [n for n in (destination, source) if n], name, kind, time.time())
    if destination and where == destination:
        await ctl.store.move_instance(name, source, destination)
        doc.update(node=destination, phase="done")
        cleanup = await run_task(ctl, source, f"{kind}.delete", base, CLEANUP_TIMEOUT, name)
        if cleanup["state"] == "succeeded":
            await run_task(ctl, source, "checkpoint.discard", base, CLEANUP_TIMEOUT, name)
        doc["outcome"] = (f"{stopped}; another controller found it running on node {destination} and finished the "
                          f"move" + ("" if cleanup["state"] == "succeeded" else
                                     f" (removing the stopped copy from node {source} failed: {cleanup.get('error')})"))
        return
    doc.update(error=stopped, code="interrupted")
    if where == source:
        doc["outcome"] = f"the instance was not moved and runs on node {source}"
        if destination:
            await run_task(ctl, destination, "checkpoint.discard", base, CLEANUP_TIMEOUT, name)
    elif image:
        await _roll_back(ctl, doc, base, image)
    else:
        doc["outcome"] = (f"the instance runs nowhere and no checkpoint of it was finished; see "
                          f"kumoctl instances show {name}")


async def _destination(ctl: Any, row: dict[str, Any], to: str | None,
                       live: bool = False) -> tuple[str, dict[str, str]]:
    """The node to move ``row``'s instance to (``to``, or the scheduler's choice), and why
    each node it will not go to was filtered out; ``live``: it moves while it runs."""
    source = row["node"]
    if to == source:
        raise Refused(409, f"instance {row['name']} is already on node {source}: choose another node", code="same-node")
    nodes = await instances.fleet(ctl)
    by_id = {n["id"]: n for n in nodes}
    if to is not None and to not in by_id:
        raise Refused(404, f"no node {to!r} to migrate to: see `kumoctl nodes list`")
    if source not in by_id or by_id[source]["state"] != "ready":
        state_ = by_id[source]["state"] if source in by_id else "removed"
        raise Refused(409, f"instance {row['name']} is on node {source}, which is {state_}: it cannot be checkpointed "
                       "there now", code="source-unreachable")
    if live and (cannot := cannot_live(by_id[source], source, row["kind"])) is not None:
        raise Refused(409, f"cannot migrate instance {row['name']} live: {cannot}", code="unsupported-kind")
    reasons: dict[str, str] = {}
    usable = []
    for node in nodes:
        if node["id"] == source:
            continue
        cannot = cannot_receive(node, row["kind"]) or (cannot_live(node, node["id"], row["kind"]) if live else None)
        if cannot is not None:
            if node["id"] == to:
                raise Refused(409, f"cannot migrate instance {row['name']}: {cannot}", code="unsupported-kind")
            reasons[node["id"]] = cannot
        else:
            usable.append(node)
    chosen, more = scheduler.place(move_request(row, to), usable, ctl.settings.placement_cpu_busy_max)
    reasons.update(more)
    if chosen is None:
        if to is not None:
            raise Refused(409, f"node {to} cannot take instance {row['name']}: {reasons.get(to)}", reasons=reasons)
        why = "; ".join(f"{node}: {reason}" for node, reason in sorted(reasons.items())) or "it is the only node"
        raise Refused(409, f"no other node can take instance {row['name']}: {why}", reasons=reasons)
    return chosen, reasons


def cannot_receive(node: dict[str, Any], kind: str) -> str | None:
    """Why ``node`` cannot restore a moved instance of ``kind``, or None when it can (the
    scheduler's filters come on top: :func:`move_request`)."""
    plugin = (node.get("plugins") or {}).get("checkpoint")
    if not plugin or not plugin.get("available"):
        return f"plugin checkpoint is unavailable: {(plugin or {}).get('reason') or 'not installed'}"
    return unsupported(node, node["id"], kind)


def move_request(row: dict[str, Any], to: str | None) -> dict[str, Any]:
    """What the scheduler is asked for a destination of ``row``'s instance."""
    return {"kind": row["kind"], "vcpus": row["spec"].get("vcpus", 1),
            "memory_mib": row["spec"].get("memory_mib", 0), "node": to}


async def start_migration(ctl: Any, row: dict[str, Any], to: str | None,
                          live: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check, pre-flight and start moving ``row``'s instance (while it runs, with ``live``:
    :func:`~controller.services.live.live_options`); its migration document.

    Raises ApiError (404/409) when it cannot start: then nothing was changed anywhere.
    """
    name = row["name"]
    await checkpointable(ctl, row, "migrate")
    now = time.time()
    doc: dict[str, Any] = {
        "id": "m-" + uuid.uuid4().hex[:16], "instance": name, "kind": row["kind"], "source": row["node"],
        "destination": None, "node": row["node"], "state": "running", "phase": "preflight",
        "progress": {"bytes_total": None, "bytes_sent": 0, "bytes_received": 0},
        "image": None, "sha256": None, "error": None, "code": None, "outcome": None,
        "created_at": iso(now), "finished_at": None, "seconds": None,
        "mode": "live" if live is not None else "stop-and-copy",
    }
    if live is not None:
        doc["live"] = live
    # Held from here, in the store: no other controller starts a second migration of it meanwhile.
    holder = await ctl.store.begin_migration(doc, ctl.id)
    if holder is not None:
        instances.busy(name, holder)
    try:
        doc["destination"] = destination = (await _destination(ctl, row, to, live is not None))[0]
        await preflight(ctl, row, "migrate")
        doc["phase"] = "checkpoint" if live is None else "prepare"
        await ctl.store.put_migration(doc)
    except BaseException:
        await asyncio.shield(ctl.store.drop_migration(doc["id"]))
        raise
    mgr = migrations(ctl)
    mgr.docs[doc["id"]] = doc
    mgr.running[doc["id"]] = asyncio.create_task(_drive(ctl, doc, now, _migrate if live is None else migrate_live),
                                                 name=f"kumo-migration-{doc['id']}")
    log.info("migration %s: %s %s from %s to %s", doc["id"], row["kind"], name, row["node"], destination)
    return doc


async def _drive(ctl: Any, doc: dict[str, Any], started: float,
                 steps: Callable[[Any, dict[str, Any]], Awaitable[None]]) -> None:
    mgr = migrations(ctl)
    try:
        await steps(ctl, doc)
    except Exception as exc:
        log.exception("migration %s failed unexpectedly", doc["id"])
        doc.update(error=f"the controller failed while migrating: {exc}", code="internal")
    finally:
        tunnel = mgr.tunnels.pop(doc["id"], None)
        if tunnel is not None:
            doc["progress"].update(tunnel.progress, bytes_sent=tunnel.bytes)
        relay = mgr.relays.pop(doc["id"], None)
        if relay is not None:
            doc["progress"].update(bytes_sent=relay.sent, bytes_received=relay.received)
            if relay.total is not None:
                doc["progress"]["bytes_total"] = relay.total
        # One write frees the instance and shows the end state: a client that sees
        # "succeeded" may at once stop, delete or migrate it again.
        doc.update(state="succeeded" if doc["phase"] == "done" and doc["error"] is None else "failed",
                   finished_at=iso(time.time()), seconds=round(time.time() - started, 3))
        with contextlib.suppress(Exception):
            await ctl.store.put_migration(doc)
        mgr.running.pop(doc["id"], None)
        mgr.docs.pop(doc["id"], None)
        log.info("migration %s %s: %s", doc["id"], doc["state"], doc.get("outcome") or doc.get("error"))


async def _migrate(ctl: Any, doc: dict[str, Any]) -> None:
    name, kind, source, destination = doc["instance"], doc["kind"], doc["source"], doc["destination"]
    base = {"name": name, "kind": kind}

    dump = await run_task(ctl, source, "checkpoint.dump", {**base, "leave_running": False}, CRIU_TIMEOUT, name)
    if dump["state"] != "succeeded":
        fail(doc, dump, f"checkpoint on node {source} failed")
        doc["outcome"] = (f"the instance was not moved; if the dump stopped it, restore it with "
                          f"kumoctl instances restore {name}" if dump["state"] == "lost"
                          else f"the instance was not moved and stays on node {source} as the dump left it")
        return
    image = dump["result"]["image"]
    doc.update(image=image)
    doc["progress"]["bytes_total"] = dump["result"].get("size_bytes")

    await record_phase(ctl, doc, "transfer")
    needed = dump["result"].get("images") or []
    held: list[str] = []
    if needed:
        holds = await run_task(ctl, destination, "checkpoint.holds", {**base, "images": needed}, PREFLIGHT_TIMEOUT,
                               name)
        if holds["state"] == "succeeded":  # else (an older destination) everything travels
            held = holds["result"].get("held") or []
    doc["images_sent"] = [digest for digest in needed if digest not in held]
    received = await _transfer(ctl, doc, base, image, held)
    if received is None:
        await _roll_back(ctl, doc, base, image)
        return

    await record_phase(ctl, doc, "restore")
    # Reports from when the restore was asked count: the one the destination sends as soon as
    # the instance runs may arrive before the task's end, and the next comes a heartbeat later.
    asked = time.time()
    restored = await run_task(ctl, destination, "checkpoint.restore",
                              await restore_payload(ctl, destination, name, kind, _id_of(received)), CRIU_TIMEOUT,
                              name)
    if restored["state"] == "lost":
        fail(doc, restored, f"restore on node {destination} has no outcome")
        doc["outcome"] = (f"the instance may be running on node {destination}; it was not restored on node {source} "
                          f"so that it cannot run twice: check node {destination}, then restore it where it belongs "
                          f"(its checkpoint is kept at {image} on node {source})")
        return
    if restored["state"] != "succeeded":
        fail(doc, restored, f"restore on node {destination} failed")
        await _roll_back(ctl, doc, base, image)
        return
    if await running_on(ctl, [destination], name, kind, asked) != destination:
        undone = await run_task(ctl, destination, f"{kind}.delete", base, CLEANUP_TIMEOUT, name)
        doc.update(code="not-running",
                   error=f"node {destination} restored the instance but never reported it running")
        if undone["state"] == "succeeded":
            await _roll_back(ctl, doc, base, image)
        else:
            doc["outcome"] = (f"removing it from node {destination} failed too ({undone.get('error')}); it was not "
                              f"restored on node {source} so that it cannot run twice: check node {destination}")
        return

    await record_phase(ctl, doc, "cleanup")
    await ctl.store.move_instance(name, source, destination)
    doc.update(node=destination)
    cleanup = await run_task(ctl, source, f"{kind}.delete", base, CLEANUP_TIMEOUT, name)
    doc.update(phase="done")
    if cleanup["state"] == "succeeded":
        discard = await run_task(ctl, source, "checkpoint.discard", base, CLEANUP_TIMEOUT, name)
        doc["outcome"] = f"instance {name} runs on node {destination}; node {source} no longer has it"
        if discard["state"] != "succeeded":
            doc["outcome"] += (f" (removing its checkpoints there failed: {discard.get('error')}; delete "
                               f"{image} and the checkpoints beside it by hand)")
    else:
        doc["outcome"] = (f"instance {name} runs on node {destination}; removing the stopped copy from node {source} "
                          f"failed ({cleanup.get('error')}): delete it there by hand")


async def _transfer(ctl: Any, doc: dict[str, Any], base: dict[str, Any], image: str, held: list[str]) -> str | None:
    """Relay the image, without the cached images the destination ``held``; the destination's
    path of it, or None (``doc`` says why)."""
    mgr = migrations(ctl)
    source, destination = doc["source"], doc["destination"]
    relay = mgr.relays[doc["id"]] = Relay(source, destination)
    transfer = {**base, "migration": doc["id"]}
    sending = {**transfer, "image": image, **({"skip_images": held} if held else {})}
    send, _ = await submit(ctl, new_task(source, "checkpoint.send", sending, instance=doc["instance"]))
    receiving = {**transfer, "image_name": _id_of(image)}
    # What confines the instance there (a container's user namespace) is the controller's
    # word, not the source's: the source may be compromised.
    instance = await kept_instance(ctl, destination, doc["instance"], doc["kind"], "directory_kinds")
    if instance is not None:
        receiving["instance"] = instance
    recv, _ = await submit(ctl, new_task(destination, "checkpoint.receive", receiving, instance=doc["instance"]))
    # Harmless to give up on an end whose node went silent: sending reads a checkpoint and
    # receiving one never restores it.
    waits = {asyncio.ensure_future(tasks.wait(ctl, t, TRANSFER_TIMEOUT, harmless=True)): t for t in (send, recv)}
    ended: dict[str, dict[str, Any]] = {}
    pending = set(waits)
    while pending:
        # After an abort a live end learns of it at once; one whose node died is given up
        # once the node is unreachable, and one that still does not answer after the grace
        # is given up too (rolling back without its answer is safe, as above).
        grace = ABORT_GRACE if relay.aborted.is_set() else None
        done, pending = await asyncio.wait(pending, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            for future in pending:
                future.cancel()
                task = waits[future]
                ended[task["id"]] = {**task, "state": "failed", "code": "transfer-failed",
                                     "error": f"{relay.error}; node {task['node']} did not answer within "
                                     f"{ABORT_GRACE:.0f} s after the transfer was aborted"}
            break
        for future in done:
            task = waits[future]
            ended[task["id"]] = future.result()
            if ended[task["id"]]["state"] != "succeeded":
                # One end gave up: the other must not wait out the stall timeout.
                relay.abort(f"node {task['node']} failed: {ended[task['id']].get('error')}")
                for other in pending:
                    # Withdrawn if not yet taken; the store's event then ends its wait at once.
                    await ctl.store.cancel_task(waits[other]["id"], "the migration's transfer was aborted")
    sent, got = ended[send["id"]], ended[recv["id"]]
    for task, where in ((got, destination), (sent, source)):
        if task["state"] != "succeeded":
            fail(doc, task, f"transfer ({'receiving on' if where == destination else 'sending from'} node {where}) failed")
            return None
    if sent["result"].get("sha256") != got["result"].get("sha256") or sent["result"].get("bytes") != got["result"].get("bytes"):
        doc.update(code="transfer-checksum",
                   error=f"the image arrived damaged: node {source} sent {sent['result'].get('bytes')} bytes with sha256 "
                   f"{sent['result'].get('sha256')}, node {destination} received {got['result'].get('bytes')} with "
                   f"{got['result'].get('sha256')}")
        return None
    doc["sha256"] = got["result"]["sha256"]
    return got["result"]["image"]


async def _roll_back(ctl: Any, doc: dict[str, Any], base: dict[str, Any], image: str) -> None:
    """Restore the instance on the source from the checkpoint this migration made."""
    source = doc["source"]
    doc["phase"] = "rollback"
    await ctl.store.put_migration(doc)
    payload = await restore_payload(ctl, source, doc["instance"], doc["kind"], _id_of(image))
    restored = await run_task(ctl, source, "checkpoint.restore", payload, CRIU_TIMEOUT, doc["instance"])
    if restored["state"] == "succeeded":
        doc["outcome"] = f"the instance was restored on node {source} from its checkpoint and runs there"
    else:
        doc["outcome"] = (f"restoring it on node {source} failed too ({restored.get('error')}); its checkpoint is kept "
                          f"at {image}: kumoctl instances restore {doc['instance']} --checkpoint {_id_of(image)}")
    # What the destination received (the checkpoint, a container's unpacked directory) will
    # never be restored there: it goes, after the source runs the instance again.
    discard = await run_task(ctl, doc["destination"], "checkpoint.discard", base, CLEANUP_TIMEOUT, doc["instance"])
    if discard["state"] != "succeeded":
        log.warning("migration %s: node %s kept what it received (%s)", doc["id"], doc["destination"],
                    discard.get("error") or discard["state"])


def _id_of(image: str) -> str:
    """The id of the checkpoint a node names by its directory (a dump's or a receive's ``image``)."""
    return image.rstrip("/").rpartition("/")[2]


async def evacuate(ctl: Any, node_id: str) -> dict[str, Any]:
    """Start migrating every instance of ``node_id`` that passes its pre-flight check: live
    when its kind and both nodes can (as ``modes`` and a live migration's placement judge it),
    else by stop-and-copy. A live move that does not converge is finished by pausing the
    instance: the node must empty either way.

    Returns ``{"moving": [migration document, whose "mode" says which], "staying": [{"name",
    "kind", "reason", "blockers"}]}``.
    """
    moving, staying = [], []
    for row in await ctl.store.list_instances():
        if row["node"] != node_id:
            continue
        try:
            moving.append(await start_migration(ctl, row, None, await _drain_live_options(ctl, row)))
        except Refused as exc:
            staying.append({"name": row["name"], "kind": row["kind"], "reason": exc.message,
                            "blockers": exc.extra.get("blockers") or []})
    return {"moving": moving, "staying": staying}


async def _drain_live_options(ctl: Any, row: dict[str, Any]) -> dict[str, Any] | None:
    """A drain's live options for ``row``'s instance, or None when no node could take it live
    (then it moves by stop-and-copy, and whatever keeps it from moving at all is said then)."""
    try:
        await _destination(ctl, row, None, live=True)
    except Refused:
        return None
    return live_options(None, None, "stop-and-copy")
