"""Alert rules evaluated on the node, and the outbox that carries their transitions to the controller.

A rule watches one probe: a condition on its value (``op``, ``value``) or on its status,
held for ``for`` seconds. Statuses rank ok < warning < critical < unknown and a status rule
fires at its rank or above (``status: critical`` fires on critical and on a check that
could not tell, as Nagios notifies on both). A probe with several targets (disk mounts,
interfaces) gives one alert per target.

Each firing or resolved transition is appended to an on-disk outbox (fsync'd) and sent to
the controller until it says "ok", with the same id every time, so a controller outage or an
agent restart loses none and the controller stores each once. Firing alerts are remembered
on disk too, so a restarted agent does not fire them again, and an alert whose rule is
removed (config or controller) is resolved rather than left firing for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.sdk import (
    Backoff,
    ConfigError,
    ControllerUnavailable,
    DiskFull,
    append_line,
    atomic_write,
)

from .schedule import Sample
from .settings import RuleConfig, parse_rules

log = logging.getLogger(__name__)

SEVERITY = {"ok": 0, "warning": 1, "critical": 2, "unknown": 3}
OPERATORS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
SEND_BATCH = 100
RETRY_FIRST = 1.0
RETRY_MAX = 60.0

Alert = dict[str, Any]
Send = Callable[[list[Alert]], Awaitable[Any]]


def now_iso() -> str:
    """Now in UTC, ISO 8601 with a ``Z``, as the alerts contract writes times."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AlertFiles:
    """The plugin's state directory: ``rules.json`` (the controller's rules as it sent them),
    ``firing.json`` and ``outbox.jsonl``. Blocking: called through ``asyncio.to_thread``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def load(self) -> tuple[list[RuleConfig], dict[str, Alert], list[Alert]]:
        """The pushed rules, the firing alerts and the transitions not yet delivered."""
        pushed: list[RuleConfig] = []
        try:
            pushed = parse_rules(json.loads((self.directory / "rules.json").read_text()), "controller rules")
        except FileNotFoundError:
            pass
        except (ValueError, ConfigError) as exc:
            log.error("monitoring: ignoring the saved controller rules: %s", exc)
        try:
            firing = json.loads((self.directory / "firing.json").read_text())
        except FileNotFoundError:
            firing = {}
        outbox = []
        with contextlib.suppress(FileNotFoundError), (self.directory / "outbox.jsonl").open() as f:
            for line in f:
                try:
                    outbox.append(json.loads(line))
                except ValueError:
                    log.error("monitoring: skipping a torn line at the end of the alert outbox")
        return pushed, firing, outbox

    def record(self, alert: Alert, firing: dict[str, Alert]) -> None:
        """Append a transition to the outbox, synced before the firing set changes on disk."""
        append_line(self.directory / "outbox.jsonl", json.dumps(alert) + "\n")
        atomic_write(self.directory / "firing.json", json.dumps(firing))

    def rewrite_outbox(self, alerts: list[Alert]) -> None:
        atomic_write(self.directory / "outbox.jsonl", "".join(json.dumps(a) + "\n" for a in alerts))

    def save_rules(self, items: list[Any]) -> None:
        atomic_write(self.directory / "rules.json", json.dumps(items))


class Alerts:
    """The rules, what they hold pending and firing, and the outbox of transitions."""

    def __init__(self) -> None:
        self.config_rules: list[RuleConfig] = []
        self.pushed_rules: list[RuleConfig] = []
        self.pending: dict[tuple[str, str], float] = {}  # (rule, target) -> condition true since
        self.firing: dict[str, Alert] = {}  # "rule\0target" -> the firing transition
        self.outbox: list[Alert] = []
        self.sent_total = 0
        self.files: AlertFiles | None = None
        self._ready = asyncio.Event()
        self._file_lock = asyncio.Lock()
        self._writes: set[asyncio.Future[None]] = set()
        self._full_logged = False

    @property
    def rules(self) -> list[RuleConfig]:
        return self.config_rules + self.pushed_rules

    async def open(self, directory: Path) -> None:
        """Take up the state a previous run left, and resolve what lost its rule meanwhile."""
        self.files = AlertFiles(directory)
        self.pushed_rules, self.firing, self.outbox = await asyncio.to_thread(self.files.load)
        await self.resolve_removed_rules()
        self._ready.set()

    async def push_rules(self, rules: list[RuleConfig], items: list[Any]) -> None:
        """The controller's new rule set (``items`` as it sent them, kept on disk)."""
        assert self.files is not None
        files = self.files
        self.pushed_rules = rules

        async def save() -> None:
            await asyncio.to_thread(files.save_rules, items)

        await self._shielded(save)
        await self.resolve_removed_rules()

    # -- evaluation -----------------------------------------------------------------------

    async def evaluate(self, probe: str, target: str, sample: Sample) -> None:
        """A new sample of ``probe`` for ``target``: fire or resolve the rules watching it."""
        for rule in self.rules:
            if rule.probe != probe:
                continue
            if rule.condition is not None:
                if sample.value is None:
                    continue  # no number this time: neither fire nor resolve on a failed reading
                active = OPERATORS[rule.condition.op](sample.value, rule.condition.value)
            else:
                assert rule.status is not None
                active = SEVERITY[sample.status] >= SEVERITY[rule.status]
            key = f"{rule.name}\0{target}"
            if active:
                since = self.pending.setdefault((rule.name, target), time.monotonic())
                if key not in self.firing and time.monotonic() - since >= rule.for_:
                    await self._transition(rule, probe, target, sample, "firing")
            else:
                self.pending.pop((rule.name, target), None)
                if key in self.firing:
                    await self._transition(rule, probe, target, sample, "resolved")

    async def forget(self, probe: str, target: str) -> None:
        """``probe`` no longer reports ``target``: resolve its alerts."""
        gone = Sample("unknown", None, f"{target or probe} is no longer reported", time.time())
        for rule in self.rules:
            if rule.probe != probe:
                continue
            self.pending.pop((rule.name, target), None)
            if f"{rule.name}\0{target}" in self.firing:
                await self._transition(rule, probe, target, gone, "resolved")

    async def _transition(self, rule: RuleConfig, probe: str, target: str, sample: Sample, state: str) -> None:
        key = f"{rule.name}\0{target}"
        labels = {**rule.labels, "probe": probe, **({"target": target} if target else {})}
        now = now_iso()
        alert = {
            "id": uuid.uuid4().hex, "rule": rule.name, "state": state, "severity": rule.severity,
            "labels": labels, "annotations": {"summary": rule.summary or f"{rule.name}: {sample.message}"},
            "value": sample.value, "starts_at": self.firing[key]["starts_at"] if state == "resolved" else now,
            "ends_at": now if state == "resolved" else None,
        }
        await self._commit(key, alert)

    async def resolve_removed_rules(self) -> None:
        """Resolve firing alerts whose rule is gone: nothing would ever resolve them otherwise."""
        names = {rule.name for rule in self.rules}
        for key, alert in list(self.firing.items()):
            if alert["rule"] not in names:
                resolved = {**alert, "id": uuid.uuid4().hex, "state": "resolved", "ends_at": now_iso(),
                            "annotations": {"summary": f"{alert['rule']}: the rule was removed"}}
                await self._commit(key, resolved)

    # -- the outbox -----------------------------------------------------------------------

    async def _commit(self, key: str, alert: Alert) -> None:
        """Record a transition: the firing set, the disk and the outbox, or none of them."""
        assert self.files is not None
        files = self.files
        before = self.firing.get(key)
        if alert["state"] == "firing":
            self.firing[key] = alert
        else:
            del self.firing[key]

        async def record() -> None:
            await asyncio.to_thread(files.record, alert, dict(self.firing))
            self.outbox.append(alert)

        try:
            await self._shielded(record)
        except DiskFull as exc:
            # Not recorded, so it did not happen: the next sample tries again. Raising would
            # end the probe's loop, and a full disk is just when its alert matters.
            if before is None:
                self.firing.pop(key, None)
            else:
                self.firing[key] = before
            if not self._full_logged:  # once until a write works again, not at every sample
                self._full_logged = True
                log.error("alert %s %s not recorded, tried again at each sample: %s", alert["rule"], alert["state"], exc)
            return
        self._full_logged = False
        log.warning("alert %s %s: %s", alert["rule"], alert["state"], alert["annotations"]["summary"])
        self._ready.set()

    async def _shielded(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` (a state write and the in-memory change it stands for) under the file
        lock, to its end even when the caller is cancelled.

        A shutdown cancels probes and the sender mid-write; the step still finishes (and
        :meth:`flush` waits for it). Memory and disk change together under the lock, so the
        sender's rewrite of the outbox never drops a transition appended meanwhile.
        """
        async def locked() -> None:
            async with self._file_lock:
                await step()

        task = asyncio.ensure_future(locked())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        await asyncio.shield(task)

    async def flush(self) -> None:
        """Wait for the state writes a cancellation left running."""
        await asyncio.gather(*self._writes, return_exceptions=True)

    async def deliver(self, send: Send) -> None:
        """Send the outbox in order, for ever: each batch until the controller takes it."""
        assert self.files is not None
        files = self.files
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self.outbox:
                batch = self.outbox[:SEND_BATCH]
                try:
                    await send(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    level = logging.DEBUG if isinstance(exc, ControllerUnavailable) else logging.ERROR
                    log.log(level, "monitoring: %d alert(s) kept for the controller: %s", len(self.outbox), exc)
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                sent = {a["id"] for a in batch}
                self.sent_total += len(batch)

                async def remove(sent: set[str] = sent) -> None:
                    self.outbox = [a for a in self.outbox if a["id"] not in sent]
                    await asyncio.to_thread(files.rewrite_outbox, list(self.outbox))

                await self._shielded(remove)
