"""The controller's decisions: one function per action, whoever asks for it.

The HTTP handlers (controller/api/) parse a request, check who may make it, call a service
and render what it returns; the web interface and the controller's own background work
call the same functions, so there is one path to every action. A service checks what the
action needs, decides, records it in the store and queues the nodes' tasks; when it will
not, it raises :class:`Refused` with a sentence that says what was wrong and what to do.

- :mod:`controller.services.tasks`: queueing a task on a node, waiting for its end;
- :mod:`controller.services.instances`: placing, operating and deleting instances;
- :mod:`controller.services.migrations`: checkpoint, restore, migration (stop-and-copy,
  and the placing, starting and ending of every migration) and drain;
- :mod:`controller.services.live`: the steps of a live migration, its options and which
  nodes can be its ends;
- :mod:`controller.services.inflight`: what the controller holds of the migrations it
  drives (the image relay, the live tunnels) and the steps both ways of moving share;
- :mod:`controller.services.checkpoints`: an instance's checkpoints on its node, listed,
  removed and pruned;
- :mod:`controller.services.rebalance`: sampling usage, planning and carrying out rebalancing.
"""

from __future__ import annotations

import datetime
from typing import Any


class Refused(Exception):
    """An action the controller will not take. ``status`` is the HTTP status it answers with
    (404 nothing of that name, 409 not in this state, 400 not a valid request); ``extra``
    carries details a client can act on (the scheduler's reasons, a pre-flight's blockers)."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def iso(ts: float | None) -> str | None:
    """Epoch seconds as the API and the records write a time: UTC, to the second, with Z."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
