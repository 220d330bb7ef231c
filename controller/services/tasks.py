"""Tasks: queueing work for a node and waiting for its end.

A task is stored before anyone is told of it; the store's event wakes the node's long-poll
on whichever controller holds it. A kind is ``<plugin>.<operation>``; what an ended task
does to the controller's records is decided here (:func:`leaves_no_instance`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any


def new_task(node: str, kind: str, payload: dict[str, Any], key: str | None = None, instance: str | None = None) -> dict[str, Any]:
    task_id = "t-" + uuid.uuid4().hex[:16]
    return {"id": task_id, "node": node, "kind": kind, "payload": payload,
            "idempotency_key": key or task_id, "instance": instance}


async def submit(ctl: Any, task: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Store ``task`` (the store's event wakes its node's long-poll, on any controller). (task, created)."""
    return await ctl.store.add_task(task)


def leaves_no_instance(task: dict[str, Any]) -> bool:
    """Whether an ended task takes its instance's record with it: a deleted instance, or one
    whose create failed, leaves nothing behind in the controller either."""
    operation = task["kind"].rpartition(".")[2]
    return (operation == "delete" and task["state"] == "succeeded") or (operation == "create" and task["state"] == "failed")


async def run_task(ctl: Any, node: str, kind: str, payload: dict[str, Any], timeout: float,
                   instance: str | None = None) -> dict[str, Any]:
    """Queue a task and wait for its end (:func:`wait`)."""
    task, _ = await submit(ctl, new_task(node, kind, payload, instance=instance))
    return await wait(ctl, task, timeout)


async def wait(ctl: Any, task: dict[str, Any], timeout: float, harmless: bool = False) -> dict[str, Any]:
    """``task`` once it has ended. A task no node took in time is withdrawn (failed, code
    ``node-timeout``); one taken but never answered comes back with state ``lost``.

    A node that stops reporting (unreachable: no heartbeat within the controller's window)
    ends the wait early, so that a step meant for a dead node fails in seconds, not at
    ``timeout``: a task it had not taken is withdrawn (failed, code ``node-unreachable``).
    One it took may have run, or may run yet (its agent, back, is handed it again), so it is
    waited for, unless the caller says running it late is ``harmless`` (a transfer's end:
    nothing is restored by it): then it is failed the same way, for good.
    """
    node, kind = task["node"], task["kind"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await ctl.wait_task(task["id"], max(0.0, min(deadline - loop.time(), ctl.settings.heartbeat_interval)))
        except TimeoutError:
            pass
        silent = await _silent(ctl, node)
        if silent is not None:
            sentence = f"{silent}: {kind} was {'given up' if harmless else 'withdrawn'}"
            if await ctl.store.cancel_task(task["id"], sentence, "node-unreachable", taken=harmless):
                return {**task, "state": "failed", "error": sentence, "code": "node-unreachable"}
        if loop.time() >= deadline:
            break
    sentence = f"node {node} did not take {kind} within {timeout:.0f} s (is its agent running?)"
    if await ctl.store.cancel_task(task["id"], sentence, "node-timeout"):
        return {**task, "state": "failed", "error": sentence, "code": "node-timeout"}
    return {**task, "state": "lost", "error": f"node {node} took {kind} but did not answer within {timeout:.0f} s",
            "code": "no-answer"}


async def _silent(ctl: Any, node_id: str) -> str | None:
    """Why ``node_id`` counts as gone, or None while it reports."""
    row = await ctl.store.get_node(node_id)
    view = ctl.node_view(row) if row is not None else None
    if view is None or view["state"] == "removed":
        return f"node {node_id} was removed"
    if view["state"] == "ready":
        return None
    if view["last_seen"] is None:
        return f"node {node_id} has never reported"
    return f"node {node_id} has not reported for {time.time() - view['last_seen']:.0f} s (unreachable)"
