"""Tasks: queueing work for a node and waiting for its end.

A task is stored before anyone is told of it; the store's event wakes the node's long-poll
on whichever controller holds it. A kind is ``<plugin>.<operation>``; what an ended task
does to the controller's records is decided here (:func:`leaves_no_instance`).
"""

from __future__ import annotations

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
    """Queue a task and wait for its end. A task no node took in time is withdrawn (failed,
    code ``node-timeout``); one taken but never answered comes back with state ``lost``."""
    task, _ = await submit(ctl, new_task(node, kind, payload, instance=instance))
    try:
        return await ctl.wait_task(task["id"], timeout)
    except TimeoutError:
        sentence = f"node {node} did not take {kind} within {timeout:.0f} s (is its agent running?)"
        if await ctl.store.cancel_task(task["id"], sentence):
            return {**task, "state": "failed", "error": sentence, "code": "node-timeout"}
        return {**task, "state": "lost", "error": f"node {node} took {kind} but did not answer within {timeout:.0f} s",
                "code": "no-answer"}


