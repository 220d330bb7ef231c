"""The task journal: what an agent remembers of the tasks it ran, so it never runs one twice."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.sdk import append_line, atomic_write

log = logging.getLogger(__name__)

# The journal keeps this many finished keys; the controller forgets delivered tasks long before.
JOURNAL_KEEP = 10_000


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one task ended, as reported to the controller and kept in the journal."""

    state: str
    result: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    code: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "result": dict(self.result), "error": self.error, "code": self.code}


class TaskJournal:
    """Idempotency key → outcome, as JSON lines in the state directory, fsynced before reporting.

    A ``started`` line is written before a task runs and a ``done`` line before its result is
    reported, so after any crash a redelivered key is either answered from the journal or,
    when it was cut off mid-run, reported as interrupted: a handler sees each key once.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, Outcome] = {}
        self.started: set[str] = set()
        self._lock = threading.Lock()

    def load(self) -> None:
        lines = 0
        try:
            with self.path.open() as f:
                for line in f:
                    lines += 1
                    try:
                        entry = json.loads(line)
                        key = entry["key"]
                        if entry["event"] == "started":
                            self.started.add(key)
                        else:
                            self.done[key] = Outcome(
                                entry["state"], entry.get("result") or {}, entry.get("error"), entry.get("code")
                            )
                            self.started.discard(key)
                    except (ValueError, KeyError, TypeError):
                        log.warning("%s: skipping a damaged journal line", self.path)
        except FileNotFoundError:
            pass
        if lines > 2 * JOURNAL_KEEP:
            self._compact()

    def _compact(self) -> None:
        keep = list(self.done.items())[-JOURNAL_KEEP:]
        self.done = dict(keep)
        lines = [json.dumps({"key": key, "event": "started"}) + "\n" for key in self.started]
        lines += [json.dumps({"key": key, "event": "done", **outcome.to_json()}) + "\n" for key, outcome in keep]
        atomic_write(self.path, "".join(lines))

    def _append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            append_line(self.path, json.dumps(entry, default=str) + "\n")

    def record_started(self, key: str, task_id: str, kind: str) -> None:
        self._append({"key": key, "event": "started", "task_id": task_id, "kind": kind})
        self.started.add(key)

    def record_done(self, key: str, task_id: str, outcome: Outcome) -> None:
        try:
            self._append({"key": key, "event": "done", "task_id": task_id, **outcome.to_json()})
        finally:
            # Known to this process even when the disk is full: a redelivery is answered with
            # the outcome, never taken for a task cut off mid-run (whose create would be undone).
            self.done[key] = outcome
            self.started.discard(key)
