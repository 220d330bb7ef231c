"""An instance's checkpoints on its node: listing, removing one, pruning to the newest.

The node's checkpoint plugin keeps them under the instance (``checkpoint.list``,
``checkpoint.remove``, ``checkpoint.prune``) and answers at once; the controller waits for
the answer, so these are plain requests rather than tasks to follow. A checkpoint is named
by its id (:data:`agent.sdk.CHECKPOINT_ID_RE`), checked here before any node is asked.
"""

from __future__ import annotations

from typing import Any

from agent.sdk import CHECKPOINT_ID_RE
from controller.services import Refused, instances
from controller.services.tasks import run_task

TIMEOUT = 30.0  # a node answers at once, unless a dump or restore of the instance holds it

# The node's error codes that are the request's fault, and their status.
STATUS = {"not-found": 404, "bad-request": 400}


def checked_id(checkpoint: Any) -> str:
    """``checkpoint`` when it is a checkpoint id; 400 otherwise (never a path)."""
    if not isinstance(checkpoint, str) or not CHECKPOINT_ID_RE.match(checkpoint):
        raise Refused(400, f"{checkpoint!r:.80} is not a checkpoint id (such as 20260101T000000.000000Z-0a1b2c): "
                      "see kumoctl instances checkpoints NAME")
    return checkpoint


async def _ask(ctl: Any, row: dict[str, Any], operation: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``checkpoint.<operation>`` on the instance's node; its result, or Refused saying why not."""
    await instances.refuse_if_migrating(ctl, row["name"])
    payload = {"name": row["name"], "kind": row["kind"], **(extra or {})}
    task = await run_task(ctl, row["node"], f"checkpoint.{operation}", payload, TIMEOUT, row["name"])
    if task["state"] != "succeeded":
        code = task.get("code")
        status = STATUS.get(code or "", 503 if code in ("node-timeout", "no-answer") else 409)
        raise Refused(status, f"instance {row['name']}: node {row['node']}: {task.get('error')}", code=code)
    return task["result"]


async def listing(ctl: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The instance's checkpoints on its node, newest first (see ``checkpoint.list``)."""
    return (await _ask(ctl, row, "list"))["checkpoints"]


async def remove(ctl: Any, row: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """Remove one checkpoint: ``{"removed", "latest"}``."""
    return await _ask(ctl, row, "remove", {"checkpoint": checked_id(checkpoint)})


async def prune(ctl: Any, row: dict[str, Any], keep: Any) -> dict[str, Any]:
    """Keep the latest and the newest others, ``keep`` in all: ``{"removed", "checkpoints"}``."""
    return await _ask(ctl, row, "prune", {"keep": instances.checked_keep(keep, "keep")})
