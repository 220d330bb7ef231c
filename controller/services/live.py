"""Live migration: an instance moved while it runs, by its hypervisors, through the controller.

The source's facts (``checkpoint.live_facts``), the destination prepared
(``checkpoint.live_receive``, which then serves the tunnels), the move on the source
(``checkpoint.live_send``), then the record moves as after a stop-and-copy. The nodes'
hypervisors talk through the :class:`~controller.services.inflight.Tunnel` this controller
holds for the migration. Only the kinds both nodes' checkpoint plugins publish in
``attributes.live_kinds`` move live. Starting, placing and ending a migration are
:mod:`controller.services.migrations`'s, as for a stop-and-copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from controller.services import Refused, tasks
from controller.services.inflight import (
    ABORT_GRACE,
    CLEANUP_TIMEOUT,
    PREFLIGHT_TIMEOUT,
    TRANSFER_TIMEOUT,
    Tunnel,
    fail,
    migrations,
    record_phase,
    reports_running,
    running_on,
    within,
)
from controller.services.tasks import new_task, run_task, submit

log = logging.getLogger("kumo.controller.migration")

ON_NO_CONVERGE = ("stop-and-copy", "abort")
PREPARE_TIMEOUT = 120.0  # for the destination to make the instance's disk and definition ready


def live_kinds(node: dict[str, Any] | None) -> list[str]:
    """The instance kinds ``node`` can move while they run, as its checkpoint plugin publishes them."""
    plugin = ((node or {}).get("plugins") or {}).get("checkpoint") or {}
    kinds = (plugin.get("attributes") or {}).get("live_kinds")
    return [k for k in kinds if isinstance(k, str)] if isinstance(kinds, list) else []


def cannot_live(node: dict[str, Any] | None, node_id: str, kind: str) -> str | None:
    """Why ``node`` cannot be an end of a live migration of a ``kind`` instance, or None."""
    if kind in live_kinds(node):
        return None
    return f"node {node_id} cannot move {kind} instances live (its live kinds: {', '.join(live_kinds(node)) or 'none'})"


def live_options(max_downtime_ms: int | None, converge_timeout: float | None,
                 on_no_converge: str | None) -> dict[str, Any]:
    """A live migration's options, checked (400 naming the wrong one), with their defaults."""
    options = {"max_downtime_ms": 300 if max_downtime_ms is None else max_downtime_ms,
               "converge_timeout": 120.0 if converge_timeout is None else float(converge_timeout),
               "on_no_converge": on_no_converge or "abort"}
    if not 1 <= options["max_downtime_ms"] <= 60_000:
        raise Refused(400, f"max_downtime_ms must be 1 to 60000 (milliseconds), got {options['max_downtime_ms']}")
    if not 1 <= options["converge_timeout"] <= 86_400:
        raise Refused(400, f"converge_timeout must be 1 to 86400 (seconds), got {options['converge_timeout']}")
    if options["on_no_converge"] not in ON_NO_CONVERGE:
        raise Refused(400, f"on_no_converge must be one of {', '.join(ON_NO_CONVERGE)}, "
                           f"got {options['on_no_converge']!r:.40}")
    return options


async def migrate_live(ctl: Any, doc: dict[str, Any]) -> None:
    """Carry out the live migration ``doc`` (the steps above). The source's hypervisor keeps the
    instance until the destination's has it running, so every failure leaves it running there."""
    name, kind, source, destination = doc["instance"], doc["kind"], doc["source"], doc["destination"]
    base = {"name": name, "kind": kind}
    stays = f"the instance was not moved and runs on node {source}"
    facts = await run_task(ctl, source, "checkpoint.live_facts", base, PREFLIGHT_TIMEOUT, name)
    if facts["state"] != "succeeded":
        fail(doc, facts, f"node {source} cannot move it live")
        doc["outcome"] = stays
        return
    row = await ctl.store.get_instance(name)
    tunnel = migrations(ctl).tunnels[doc["id"]] = Tunnel(source, destination)
    ends = {**base, "migration": doc["id"], "controller": ctl.settings.url}
    recv, _ = await submit(ctl, new_task(destination, "checkpoint.live_receive", {
        **ends, "instance": {**base, **(row or {}).get("spec", {})}, "facts": facts["result"]["facts"]}, instance=name))
    receiving = asyncio.ensure_future(tasks.wait(ctl, recv, TRANSFER_TIMEOUT, harmless=True))
    try:
        await asyncio.wait({tunnel.ready, receiving}, timeout=PREPARE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not tunnel.ready.done() or tunnel.ready.exception() is not None:
            await tunnel.end("failed")
            got = await within(receiving, ABORT_GRACE)
            if got is not None and got["state"] not in ("succeeded", "pending", "delivered"):
                fail(doc, got, f"preparing node {destination} failed")
            else:
                doc.update(code="prepare-failed", error=f"node {destination} was not ready within "
                                                        f"{PREPARE_TIMEOUT:.0f} s")
            doc["outcome"] = stays
            return
        ready = tunnel.ready.result()
        if not isinstance(ready.get("definition"), str) or not isinstance(ready.get("channels"), list):
            await tunnel.end("failed")
            doc.update(code="prepare-failed", error=f"node {destination} said it was ready without a definition "
                                                    "and channels")
            doc["outcome"] = stays
            return
        await record_phase(ctl, doc, "live")
        tunnel.live = True
        asked = time.time()
        # A source that stops reporting is given up on (harmless: its agent answers a task
        # handed again "interrupted"); its tunnels went with it, so libvirt ended the move.
        send, _ = await submit(ctl, new_task(source, "checkpoint.live_send", {
            **ends, "definition": ready["definition"], "channels": ready["channels"], **doc["live"]}, instance=name))
        sent = await tasks.wait(ctl, send, TRANSFER_TIMEOUT, harmless=True)
        await tunnel.end("finished" if sent["state"] == "succeeded" else "failed")
        got = await within(receiving, CLEANUP_TIMEOUT)
    finally:
        receiving.cancel()
    held = got is not None and got["state"] == "succeeded" and bool((got.get("result") or {}).get("held"))
    if sent["state"] != "succeeded":
        unknown = sent["state"] == "lost" or sent.get("code") in ("interrupted", "node-unreachable")
        fail(doc, sent, f"the live migration on node {source} has no outcome" if unknown
             else f"the live migration from node {source} failed")
        where: str | None = source  # libvirt resumed it there
        if held:
            where = await settle_held(ctl, doc, finished=False)
        elif unknown:  # the source's agent stopped mid-move
            where = await running_on(ctl, [destination, source], name, kind, asked)
        if where is None:
            doc["outcome"] = f"the instance was not seen running on either node: check nodes {source} and {destination}"
            return
        if where == source:
            if held:
                return  # settle_held said what became of the destination's copy
            if got is not None and got["state"] == "failed" and got.get("code") == "migration-failed":
                doc["outcome"] = f"{stays}; node {destination} holds nothing of it"
            else:  # its agent stopped, or its clean-up failed
                doc["outcome"] = (f"{stays}; node {destination} did not confirm it removed what it prepared "
                                  f"({(got or {}).get('error') or 'no answer'}): its agent removes its directory of "
                                  "the instance when it next starts, if no create or arrival of that name replaces "
                                  "it first")
            return
    else:
        doc["progress"].update(sent["result"] or {})
        if held:  # the source finished, but the destination did not hear it: its copy goes on
            await settle_held(ctl, doc, finished=True)
    if got is None or got["state"] != "succeeded":
        log.warning("migration %s: node %s did not confirm the arrival (%s); its heartbeat decides", doc["id"],
                    destination, (got or {}).get("error"))
    if await running_on(ctl, [destination], name, kind, asked) != destination:
        doc.update(code="not-running", error=f"node {destination} never reported the instance running after "
                   f"node {source} moved it")
        doc["outcome"] = f"check node {destination}: its hypervisor took the instance, its agent did not report it"
        return
    await record_phase(ctl, doc, "cleanup")
    await ctl.store.move_instance(name, source, destination)
    doc.update(node=destination)
    # What the hypervisor left on the source: the instance's directory, its checkpoints.
    cleanup = await run_task(ctl, source, f"{kind}.delete", base, CLEANUP_TIMEOUT, name)
    if cleanup["state"] == "succeeded":
        await run_task(ctl, source, "checkpoint.discard", base, CLEANUP_TIMEOUT, name)
    doc.update(phase="done", outcome=f"instance {name} runs on node {destination}; node {source} no longer has it"
               + ("" if cleanup["state"] == "succeeded" else
                  f" (removing its files there failed: {cleanup.get('error')})"))


async def settle_held(ctl: Any, doc: dict[str, Any], finished: bool) -> str | None:
    """Decide which copy goes on when the destination holds a paused one: libvirt's Finish
    started the instance there, but the destination was not told that the source finished
    (the answer to Finish can be lost on its way back, and the source's libvirt then
    resumes its own copy). The source's copy goes on when the source did not finish and
    its node reports it running; the held copy is then removed. Otherwise the held copy is
    resumed, but only when the source finished or says it does not run it: a source that
    does not report may run its copy, so the held one stays paused, and the migration waits
    (phase ``held``) until the source reports again or an admin removes its node. The node
    it runs on; ``doc``'s outcome says what was done."""
    name, kind, source, destination = doc["instance"], doc["kind"], doc["source"], doc["destination"]
    base = {"name": name, "kind": kind}
    source_runs = None if finished else await reports_running(ctl, source, name, kind, time.time())
    if not finished and source_runs is None:
        doc["outcome"] = (f"waiting for node {source} to report whether it runs the instance: node {destination} "
                          "holds a paused copy that libvirt started there as the move ended, resumed only if node "
                          f"{source} runs none (removing node {source}, whose host must then be down, counts as that)")
        await record_phase(ctl, doc, "held")
        # This wait can last as long as the source's host is down: the store is read once a
        # heartbeat, not five times a second.
        while source_runs is None:
            source_runs = await reports_running(ctl, source, name, kind, time.time(), ctl.settings.heartbeat_interval)
    if source_runs:
        removed = await run_task(ctl, destination, f"{kind}.delete", base, CLEANUP_TIMEOUT, name)
        doc["outcome"] = (f"the instance was not moved and runs on node {source}; node {destination}'s copy, which "
                          "libvirt had started there as the source's end failed, was paused and "
                          + ("removed" if removed["state"] == "succeeded" else
                             f"removing it failed ({removed.get('error')}): delete it there by hand"))
        return source
    resumed = await run_task(ctl, destination, f"{kind}.start", base, CLEANUP_TIMEOUT, name)
    if resumed["state"] != "succeeded":
        log.error("migration %s: node %s could not resume the instance it held: %s", doc["id"], destination,
                  resumed.get("error"))
    return destination
