"""The ``rsyslog`` plugin: forward every log line of the node to the fleet's collector.

The controller sends the fleet setting as an ``rsyslog.configure`` task (``kumoctl logging
set``). The plugin renders one RainerScript snippet into rsyslog's include directory and
applies it in three steps: the new snippet is checked with ``rsyslogd -N1`` against a copy
of the main config that reads a staging directory (the live snippet untouched), then renamed
over the live one, then rsyslog is restarted (rsyslog 8 reads its config only at start-up;
SIGHUP just reopens files). A snippet rsyslog rejects is never installed: the task fails
with rsyslog's own complaint and the previous snippet keeps forwarding.

Zero loss. The forwarding action has a pure disk queue (``queue.type="Disk"``) sized by bytes
(``max_disk_space``) rather than by a small message count, and retries forever. Each setting
closes a loss measured against rsyslog 8.2302 / librelp 1.11 (tests/test_rsyslog.py):

- ``queue.size``: the default (1000 messages) fills during an outage of a few seconds, and
  rsyslog then drops what it cannot enqueue within two seconds;
- ``queue.type="Disk"`` and ``queue.dequeueBatchSize="1"``: a worker that is retrying when
  rsyslog stops is cancelled and its batch is gone (a whole dequeue batch, 128 messages, with
  a disk-assisted in-memory queue); from a disk queue the batch is one message;
- omrelp ``windowSize="1"``: the messages librelp wrote to a connection that died are resent
  only by the same process, so a restart loses its whole window (128 by default).

A collector stopped, unreachable or killed with SIGKILL costs nothing, though RELP may then
deliver what was in flight twice (at least once, never lost). All of this is RELP's (the
default): plain TCP has no acknowledgement, so what it wrote to a connection that had just
died is lost.

What remains, and no setting closes it: a sender restarted (SIGTERM, then start) during an
outage that began while its RELP connection was open loses the first two messages queued
after the collector went away, whether the collector was stopped or SIGKILLed (exactly those
two in every trial). Both are already deleted from the disk queue when rsyslog stops:

1. The first is written to the dead connection. librelp reads the collector's replies only
   on the next send (relpsess.c: relpSessSendCommand, one non-blocking read in
   relpSessWaitState), and a TLS read yields one record: it gets the pending ack of the
   previous message, not the "serverclose" hint or the EOF behind it, and sends. omrelp's
   doAction counts a written frame as done (RS_RET_PREVIOUS_COMMITTED; endTransaction only
   uncorks the socket), so rsyslog commits it; it lives on only in librelp's unacked list,
   which the same process resends after reconnecting and a restart drops. (Without TLS, the
   ack and the hint are read together and a stopped collector costs one message, not two.)
2. The second is the one the queue worker is retrying. For a transactional output like
   omrelp, processBatchMain (action.c) marks a message committed (BATCH_STATE_COMM) once it is
   buffered, before doAction runs, and the retries happen inside actionCommit. At shutdown
   actionCommit ignores the RS_RET_FORCE_TERM of its first actionTryCommit and keeps retrying
   until queue.timeoutActionCompletion, then the worker is cancelled; the cleanup
   (wti.c: wtiWorkerCancelCleanup, queue.c: DeleteProcessedBatch) re-enqueues only elements
   still ready and deletes this one. A cooperative exit calls the same cleanup.

Measured with rsyslog 8.2302 / librelp 1.11, 3 to 5 restarts each, all still losing those two:
queue.timeoutShutdown and queue.timeoutActionCompletion of 5000 ms (the stop then takes 10 s),
queue.checkpointInterval="1", action.resumeInterval 1 or 10, action.resumeRetryCount="3"
(finite retries also discard what arrives while the action is suspended), omrelp timeout="1",
and a disk-queued ruleset calling the action with a Direct queue (ruleset.c marks messages
committed before its commit phase too). omrelp rebindInterval="1" lost nothing on that
restart (3 trials), since no connection stays open between messages, but it delivered a few
messages a second (a TLS session and a close handshake per message), and by its code doRebind
ignores a close whose ack never came, after librelp has freed that message. omrelp 8.2302 has
no option to wait for a message's ack before reporting it sent.

TLS uses the node's own Kumo certificate and the Kumo CA; the forwarder checks the
collector's certificate name (``peer``, by default the target's host). The collector role
(``collector:`` in the plugin config) renders the receiving side: imrelp or imtcp, TLS
accepting any certificate of the Kumo CA, one file per sending host.

Metrics come from rsyslog's impstats (queue size, enqueued, discarded, action failures and
resumes), read every ``stats_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from agent.sdk import (
    ConfigError,
    Fingerprint,
    PluginContext,
    TaskError,
    atomic_write,
    hookimpl,
    parse_payload,
    parse_section,
    run_command,
    start_time,
)

log = logging.getLogger(__name__)

SNIPPET = "60-kumo.conf"
ACTION = "kumo-forward"
HOST_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
STOP_TIMEOUT = 30.0


@dataclasses.dataclass
class CollectorConfig:
    """The receiving side, for a node that is the fleet's log host."""

    listen: str = "0.0.0.0:2514"
    protocol: Literal["relp", "tcp"] = "relp"
    tls: bool = True
    directory: Path = Path("/var/log/kumo-remote")


@dataclasses.dataclass
class RsyslogConfig:
    """``plugins.rsyslog``: where rsyslog's config lives and how to restart it."""

    config_dir: Path = Path("/etc/rsyslog.d")
    main_config: Path = Path("/etc/rsyslog.conf")
    rsyslogd: Path = Path("/usr/sbin/rsyslogd")
    pid_file: Path = Path("/run/rsyslogd.pid")
    # A command that restarts rsyslog; by default systemctl under systemd, else the daemon
    # in pid_file is stopped with SIGTERM and started again with main_config and pid_file.
    restart: list[str] | None = None
    spool_dir: Path = Path("/var/spool/rsyslog")
    max_disk_space: str = "1g"
    stats_interval: int = 10
    collector: CollectorConfig | None = None


@dataclasses.dataclass(frozen=True)
class Forwarding:
    """The ``rsyslog.configure`` payload, kept as ``forwarding.json``; no target: no forwarding."""

    target: str | None = None
    protocol: Literal["relp", "tcp"] = "relp"
    tls: bool = True
    peer: str | None = None


@dataclasses.dataclass(frozen=True)
class Configure(Forwarding):
    """The whole ``rsyslog.configure`` payload: the setting, and ``force`` to restart rsyslog
    even while its forwarding action is suspended (what it holds in flight is then lost)."""

    force: bool = False


def quote(value: str | Path) -> str:
    """A RainerScript string literal."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TaskError(f"target must be HOST:PORT with a port from 1 to 65535, got {target!r}", code="bad-request")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_RE.match(host):
            raise TaskError(f"target host {host!r} is not a valid host name or address", code="bad-request") from None
    return host, int(port)


class RsyslogPlugin:
    def __init__(self) -> None:
        self.config = RsyslogConfig()
        self.context: PluginContext | None = None
        self.forwarding: Forwarding | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self._stats_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self.config = parse_section(RsyslogConfig, section, source)
        if self.config.collector is not None:
            host, sep, port = self.config.collector.listen.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{source}.collector.listen: expected HOST:PORT, got {self.config.collector.listen!r}")
        if self.config.stats_interval < 1:
            raise ConfigError(f"{source}.stats_interval: expected at least 1 second")

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self.context = context
        if not self._installed():
            return
        self.forwarding = await asyncio.to_thread(_load_forwarding, self._forwarding_file())
        if self.forwarding is not None or self.config.collector is not None:
            try:
                await self._apply()
            except TaskError as exc:
                log.error("rsyslog: could not apply the saved setting at start-up: %s", exc)
        self._stats_task = asyncio.create_task(self._stats_loop(), name="rsyslog-stats")

    @hookimpl
    async def kumo_shutdown(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task

    def _installed(self) -> bool:
        return os.access(self.config.rsyslogd, os.X_OK)

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        if not self._installed():
            return Fingerprint(
                available=False,
                reason=f"{self.config.rsyslogd} not found: apt install rsyslog rsyslog-relp rsyslog-gnutls",
            )
        attributes: dict[str, Any] = {"forwarding": self.forwarding.target if self.forwarding else None}
        if self.config.collector is not None:
            attributes["collector"] = f"{self.config.collector.protocol}://{self.config.collector.listen}"
        return Fingerprint(available=True, attributes=attributes)

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return ("rsyslog.configure",)

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        if kind != "rsyslog.configure":
            raise TaskError(f"the rsyslog plugin does not handle {kind!r}", code="unknown-kind")
        if not self._installed():
            raise TaskError(f"rsyslog is not installed here ({self.config.rsyslogd} is missing)", code="unavailable")
        asked = parse_payload(Configure, payload)
        wanted = Forwarding(asked.target, asked.protocol, asked.tls, asked.peer)
        if wanted.target is not None:
            host, port = split_target(wanted.target)
            try:
                await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise TaskError(f"target host {host!r} does not resolve here: {exc.strerror}", code="unresolvable") from None
            if wanted.peer is not None and not HOST_RE.match(wanted.peer):
                raise TaskError(f"peer {wanted.peer!r} is not a certificate name", code="bad-request")
        previous, self.forwarding = self.forwarding, wanted
        try:
            changed = await self._apply(asked.force)
        except TaskError:
            self.forwarding = previous
            raise
        await asyncio.to_thread(atomic_write, self._forwarding_file(), json.dumps(dataclasses.asdict(wanted)))
        return {"target": wanted.target, "changed": changed}

    # -- rendering ------------------------------------------------------------------------

    def _tls_files(self) -> tuple[Path, Path, Path]:
        identity = self.context.identity if self.context else None
        if identity is None:
            raise TaskError(
                "TLS needs this node's Kumo certificate, and there is none (join the node first, or use --no-tls)",
                code="no-certificate",
            )
        for path in (identity.ca, identity.certificate, identity.key):
            if not path.exists():
                raise TaskError(f"TLS needs {path}, which is missing: re-join the node", code="no-certificate")
        return identity.ca, identity.certificate, identity.key

    def render(self) -> str:
        """The whole snippet for the current setting and collector role."""
        c = self.config
        lines = [
            "# Written by the Kumo agent (rsyslog plugin): do not edit, `kumoctl logging set` rewrites it.",
            f'module(load="impstats" interval="{c.stats_interval}" format="json" log.syslog="off" '
            f'resetCounters="off" log.file={quote(self._stats_file())})',
        ]
        fwd, col = self.forwarding, c.collector
        if fwd is not None and fwd.target:
            if fwd.protocol == "relp":
                lines.append('module(load="omrelp")')
            lines += self._forward_lines(fwd)
        if col is not None:
            lines += self._collector_lines(col)
        return "\n".join(lines) + "\n"

    def _forward_lines(self, fwd: Forwarding) -> list[str]:
        assert fwd.target is not None
        host, port = split_target(fwd.target)
        queue = [
            'queue.type="Disk"', 'queue.size="1000000"', 'queue.dequeueBatchSize="1"', f'queue.filename="{ACTION}"', f"queue.spoolDirectory={quote(self.config.spool_dir)}",
            f"queue.maxDiskSpace={quote(self.config.max_disk_space)}", 'queue.saveOnShutdown="on"',
            'action.resumeRetryCount="-1"', 'action.resumeInterval="2"',
        ]
        params = [f'name="{ACTION}"', f"target={quote(host)}", f'port="{port}"']
        if fwd.protocol == "relp":
            params[1:1] = ['type="omrelp"', 'windowSize="1"']
            if fwd.tls:
                ca, cert, key = self._tls_files()
                params += [
                    'tls="on"', f"tls.caCert={quote(ca)}", f"tls.myCert={quote(cert)}", f"tls.myPrivKey={quote(key)}",
                    'tls.authMode="name"', f"tls.permittedPeer=[{quote(fwd.peer or host)}]",
                ]
        else:
            params[1:1] = ['type="omfwd"', 'protocol="tcp"']
            if fwd.tls:
                ca, cert, key = self._tls_files()
                params += [
                    'StreamDriver="gtls"', 'StreamDriverMode="1"', 'StreamDriverAuthMode="x509/name"',
                    f"StreamDriverPermittedPeers={quote(fwd.peer or host)}", f"streamDriver.CAFile={quote(ca)}",
                    f"streamDriver.CertFile={quote(cert)}", f"streamDriver.KeyFile={quote(key)}",
                ]
        return ["action(" + "\n       ".join(params + queue) + ")"]

    def _collector_lines(self, col: CollectorConfig) -> list[str]:
        host, _, port = col.listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        lines = [
            f"template(name=\"kumo-per-host\" type=\"string\" string={quote(str(col.directory) + '/%fromhost:::secpath-replace%.log')})",
            # Direct: the input acknowledges (RELP) a message after omfile wrote it, so a
            # collector killed with SIGKILL has lost nothing it confirmed.
            'ruleset(name="kumo-collect" queue.type="Direct") {',
            '  action(type="omfile" dynaFile="kumo-per-host" template="RSYSLOG_FileFormat" '
            'dirCreateMode="0750" fileCreateMode="0640")',
            "}",
        ]
        params = [f"address={quote(host)}", f'port="{port}"', 'ruleset="kumo-collect"']
        if col.protocol == "relp":
            lines.insert(0, 'module(load="imrelp")')
            if col.tls:
                ca, cert, key = self._tls_files()
                # Every certificate of the Kumo CA is a Kumo node: any of them may send.
                params += ['tls="on"', f"tls.caCert={quote(ca)}", f"tls.myCert={quote(cert)}",
                           f"tls.myPrivKey={quote(key)}", 'tls.authMode="certvalid"']
            lines.append('input(type="imrelp" ' + " ".join(params) + ")")
        else:
            lines.insert(0, 'module(load="imtcp")')
            if col.tls:
                ca, cert, key = self._tls_files()
                params += ['streamDriver.name="gtls"', 'streamDriver.mode="1"', 'streamDriver.authMode="x509/certvalid"',
                           f"streamDriver.CAFile={quote(ca)}", f"streamDriver.CertFile={quote(cert)}",
                           f"streamDriver.KeyFile={quote(key)}"]
            lines.append('input(type="imtcp" ' + " ".join(params) + ")")
        return lines

    def _stats_file(self) -> Path:
        assert self.context is not None
        return self.context.state_dir / "impstats.json"

    def _forwarding_file(self) -> Path:
        assert self.context is not None
        return self.context.state_dir / "forwarding.json"

    # -- applying ---------------------------------------------------------------------------

    async def _apply(self, force: bool = False) -> bool:
        """Check, install and activate the snippet; False when it was already live."""
        async with self._lock:
            text = self.render()
            live = self.config.config_dir / SNIPPET
            if await asyncio.to_thread(lambda: live.exists() and live.read_text() == text):
                return False
            if not force:
                self._refuse_while_suspended()
            await asyncio.to_thread(self.config.spool_dir.mkdir, parents=True, exist_ok=True)
            if self.config.collector is not None:
                await asyncio.to_thread(self.config.collector.directory.mkdir, parents=True, exist_ok=True)
            await self._check(text)
            # 0644, as every other file in rsyslog.d (not atomic_write's default 0600).
            await asyncio.to_thread(atomic_write, live, text, 0o644)
            await self._restart()
            log.info("rsyslog: %s installed and rsyslog restarted", live)
            return True

    def _refuse_while_suspended(self) -> None:
        """A restart while the forwarding action is suspended (the collector away, messages
        queued) is the one case that loses messages (see above): refuse it, from the latest
        impstats (at most ``stats_interval`` old)."""
        queue, action = self.stats.get(f"{ACTION} queue", {}), self.stats.get(ACTION, {})
        waiting = queue.get("size", 0)
        if waiting or action.get("suspended", 0) > action.get("resumed", 0):
            raise TaskError(
                f"log forwarding is suspended ({waiting} message(s) queued, the collector not taking them):"
                " restarting rsyslog now would lose what it holds in flight, so the new setting is not applied;"
                " set it again once the collector is back, or force it (kumoctl logging set --force)",
                code="rsyslog-restart")

    async def _check(self, text: str) -> None:
        """``rsyslogd -N1`` on the main config as it would be with this snippet, live files untouched."""
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="kumo-rsyslog-"))
        try:
            conf = await asyncio.to_thread(self._stage, tmp, text)
            result = await run_command(str(self.config.rsyslogd), "-N1", "-f", str(conf))
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            complaint = " / ".join(
                line.strip() for line in output.splitlines()
                if "error" in line.lower() or "could not" in line.lower()
            ) or result.error
            raise TaskError(f"rsyslog rejected the new configuration (the previous one stays): {complaint}", code="rsyslog-config")

    def _stage(self, tmp: Path, text: str) -> Path:
        """A copy of the main config reading ``tmp/rsyslog.d``: the other snippets and this one."""
        c = self.config
        staging = tmp / "rsyslog.d"
        staging.mkdir()
        for other in c.config_dir.glob("*.conf"):
            if other.name != SNIPPET:
                (staging / other.name).symlink_to(other)
        (staging / SNIPPET).write_text(text)
        try:
            main = c.main_config.read_text()
        except OSError as exc:
            raise TaskError(f"cannot read {c.main_config}: {exc.strerror}", code="rsyslog-config") from None
        if str(c.config_dir) not in main:
            raise TaskError(
                f"{c.main_config} does not include {c.config_dir}, so rsyslog would never read the snippet: "
                "set plugins.rsyslog.config_dir to the directory it includes",
                code="rsyslog-config",
            )
        conf = tmp / "rsyslog.conf"
        conf.write_text(main.replace(str(c.config_dir), str(staging)))
        return conf

    async def _restart(self) -> None:
        c = self.config
        if c.restart is not None:
            command = list(c.restart)
        elif Path("/run/systemd/system").is_dir():
            command = ["systemctl", "restart", "rsyslog"]
        else:
            await self._stop_daemon()
            command = [str(c.rsyslogd), "-f", str(c.main_config), "-i", str(c.pid_file)]
        try:
            result = await run_command(*command)
        except FileNotFoundError:
            raise TaskError(f"the snippet is installed but {command[0]} is missing to restart rsyslog",
                            code="rsyslog-restart") from None
        if result.returncode != 0:
            raise TaskError(
                f"the snippet is installed but restarting rsyslog failed ({' '.join(command)}): {result.error}",
                code="rsyslog-restart",
            )

    async def _stop_daemon(self) -> None:
        """SIGTERM the rsyslogd in pid_file and wait until it is gone (it still holds its ports)."""
        try:
            pid = int(self.config.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        while start_time(pid) is not None:
            if loop.time() > deadline:
                raise TaskError(f"rsyslogd ({pid}) did not stop within {STOP_TIMEOUT:.0f} s", code="rsyslog-restart")
            await asyncio.sleep(0.1)

    # -- metrics --------------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval)
            try:
                self.stats.update(await asyncio.to_thread(_read_stats, self._stats_file()))
            except FileNotFoundError:
                pass  # rsyslog has not written its first statistics yet
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("rsyslog: cannot read impstats from %s: %s", self._stats_file(), exc)

    @hookimpl
    def kumo_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        queue = self.stats.get(f"{ACTION} queue", {})
        action = self.stats.get(ACTION, {})
        if not queue and not action:
            return []
        size = GaugeMetricFamily("kumo_rsyslog_queue_messages", "Messages waiting in the forwarding queue.")
        size.add_metric([], queue.get("size", 0))
        enqueued = CounterMetricFamily("kumo_rsyslog_enqueued_messages", "Messages put into the forwarding queue.")
        enqueued.add_metric([], queue.get("enqueued", 0))
        discarded = CounterMetricFamily("kumo_rsyslog_discarded_messages", "Messages the forwarding queue discarded.")
        discarded.add_metric([], queue.get("discarded.full", 0) + queue.get("discarded.nf", 0))
        failed = CounterMetricFamily("kumo_rsyslog_action_failures", "Forwarding attempts that failed (then retried).")
        failed.add_metric([], action.get("failed", 0))
        resumed = CounterMetricFamily("kumo_rsyslog_action_resumes", "Times forwarding resumed after the collector came back.")
        resumed.add_metric([], action.get("resumed", 0))
        return [size, enqueued, discarded, failed, resumed]


def _load_forwarding(path: Path) -> Forwarding | None:
    try:
        return Forwarding(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def _read_stats(path: Path) -> dict[str, dict[str, int]]:
    """The latest impstats record per object; the file is emptied after reading (it only grows)."""
    latest: dict[str, dict[str, int]] = {}
    with path.open("r+") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                record = json.loads(line[line.find("{"):])  # each line starts with a timestamp
                latest[record.get("name", "")] = {k: v for k, v in record.items() if isinstance(v, int)}
        f.truncate(0)
    return latest

