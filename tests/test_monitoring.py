"""The monitoring plugin: probes, Nagios checks, rules, the alert outbox, Prometheus."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.sdk import (
    ConfigError,
    ControllerUnavailable,
    ImageCache,
    PluginContext,
    Probe,
    ProbeResult,
    TaskError,
)
from plugins.monitoring import MonitoringPlugin
from plugins.monitoring.alerts import AlertFiles
from plugins.monitoring.probes import nagios_result
from tests.harness import require


class FakeHooks:
    """Other plugins' ``kumo_probes``, as ``context.hooks.probes()`` answers: with their plugin's name."""

    def __init__(self, probes: dict[str, list[Probe]] | None = None):
        self._probes = probes or {}

    async def probes(self) -> list[tuple[str, Probe]]:
        return [(plugin, probe) for plugin, probes in sorted(self._probes.items()) for probe in probes]


def context(state: Path, controller: Any, probes: dict[str, list[Probe]] | None = None) -> PluginContext:
    return PluginContext(name="monitoring", state_dir=state, agent_state_dir=state.parent, identity=None,
                         hooks=FakeHooks(probes), report_changed=lambda: None, call_controller=controller,
                         images=ImageCache(state / "images"))


class FakeController:
    """Records alert batches; raises ControllerUnavailable while ``down``.

    ``lose_answers`` many batches are stored but answered with ControllerUnavailable, as
    when the connection drops after the controller committed: the node must re-send them.
    """

    def __init__(self) -> None:
        self.down = False
        self.lose_answers = 0
        self.received: list[dict[str, Any]] = []

    async def __call__(self, method: str, path: str, json: Any = None) -> Any:
        if self.down:
            raise ControllerUnavailable("connection refused")
        assert (method, path) == ("POST", "alerts")
        self.received.extend(json["alerts"])
        if self.lose_answers:
            self.lose_answers -= 1
            raise ControllerUnavailable("connection reset after the request was sent")
        return {"ok": True}


async def started(state: Path, section: dict[str, Any], controller: Any = None,
                  probes: dict[str, list[Probe]] | None = None) -> MonitoringPlugin:
    plugin = MonitoringPlugin()
    plugin.kumo_configure(section=section, source="agent.yaml: plugins.monitoring")
    state.mkdir(exist_ok=True)
    await plugin.kumo_startup(context=context(state, controller or FakeController(), probes))
    return plugin


async def until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def metric_lines(plugin: MonitoringPlugin) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class Collector:
        def collect(self) -> Any:
            return plugin.kumo_metrics()

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()


@pytest.mark.parametrize(
    "section, message",
    [
        ({"probez": []}, "plugins.monitoring.probez: unknown key"),
        ({"probes": [{"name": "t", "type": "tcp", "host": "x"}]}, r"probes\[0\].port: required for a tcp probe"),
        ({"probes": [{"name": "t", "type": "ping"}]}, r"probes\[0\].type: expected one of"),
        ({"probes": [{"name": "h", "type": "http", "url": "ftp://x"}]}, r"probes\[0\].url: expected an http"),
        ({"rules": [{"name": "r", "probe": "nosuch", "status": "critical"}]}, r"rules\[0\].probe: no probe named 'nosuch'"),
        ({"rules": [{"name": "r", "probe": "cpu"}]}, r"rules\[0\]: give either condition"),
        ({"rules": [{"name": "r", "probe": "cpu", "status": "critical", "fro": 3}]}, r"rules\[0\].fro: unknown key"),
        ({"rules": [{"name": "r", "probe": "cpu", "condition": {"op": ">", "value": "high"}}]},
         r"rules\[0\].condition.value: expected a number"),
        ({"rules": [{"name": "r", "probe": "cpu", "status": "critical", "for": -1}]}, r"rules\[0\].for: expected seconds >= 0"),
        ({"rules": [{"name": "r", "probe": "cpu", "status": "critical", "for": "5m"}]}, r"rules\[0\].for: expected a number, got '5m'"),
        ({"rules": [{"name": "r", "probe": "cpu", "status": "page"}]}, r"rules\[0\].status: expected one of 'warning'"),
        ({"probes": [{"name": "t", "type": "tcp", "host": "x", "port": 1, "url": "http://x"}]},
         r"probes\[0\].url: not an option of a tcp probe \(options: critical, host, interval, name, port"),
        ({"probes": [{"name": "c", "type": "command", "command": ["true"], "warning": 1}]},
         r"probes\[0\].warning: not an option of a command probe"),
        ({"probes": [{"name": "c", "type": "command", "command": "check_disk -w 10"}]}, r"probes\[0\].command: expected a list"),
        ({"probes": [{"name": "a.b", "type": "load"}]}, r"probes\[0\].name: expected a name without dots"),
        ({"probes": [{"name": "l", "type": "load"}, {"name": "l", "type": "cpu"}]}, r"probes\[1\].name: probe name 'l' is used twice"),
        ({"probes": [{"name": "l", "type": "load", "timeout": 0}]}, r"probes\[0\].timeout: expected seconds > 0"),
        ({"probes": [{"name": "h", "type": "http", "url": "https://x", "ca_file": "/nonexistent/ca.pem"}]},
         r"probes\[0\].ca_file: /nonexistent/ca.pem is not a file"),
    ],
)
def test_bad_config_names_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MonitoringPlugin().kumo_configure(section=section, source="agent.yaml: plugins.monitoring")


@pytest.mark.parametrize("code, status", [(0, "ok"), (1, "warning"), (2, "critical"), (3, "unknown"), (7, "unknown")])
def test_nagios_exit_codes(code: int, status: str) -> None:
    result = nagios_result(code, "DISK OK - free space: / 3326 MB | /=2643MB;5948;5958;0;5968\nmore\n")
    assert result.status == status
    assert result.value == 2643.0
    assert result.message.startswith("DISK OK") or "not a Nagios status" in result.message


async def test_a_hung_check_never_delays_the_others(tmp_path: Path) -> None:
    marker = tmp_path / "hung.pids"
    # A check that hangs in a child of its own: the whole process group must go.
    hung = f'sleep 60 & echo "$$ $!" > {marker}; wait'
    section = {"default_probes": False, "probes": [
        {"name": "hung", "type": "command", "interval": 0.2, "timeout": 0.5, "command": ["/bin/sh", "-c", hung]},
        {"name": "quick", "type": "command", "interval": 0.1, "timeout": 5, "command": ["/bin/true"]},
    ]}
    plugin = await started(tmp_path / "state", section)
    try:
        await until(lambda: plugin.scheduler.timeouts.get("hung", 0) >= 1)
        runs_before = plugin.scheduler.samples[("quick", "")].at
        await asyncio.sleep(0.6)
        assert plugin.scheduler.samples[("quick", "")].at > runs_before
        assert plugin.scheduler.samples[("hung", "")].status == "unknown"
        assert "timed out after 0.5 s" in plugin.scheduler.samples[("hung", "")].message
        shell, child = map(int, marker.read_text().split())
        await until(lambda: gone(shell) and gone(child))
    finally:
        await plugin.kumo_shutdown()


async def test_shutdown_ends_even_a_probe_that_swallows_its_cancellation(tmp_path: Path) -> None:
    started_runs: list[float] = []

    async def stubborn() -> ProbeResult:
        started_runs.append(time.monotonic())
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # a badly written plugin
            pass
        return ProbeResult("ok", 1.0)

    plugin = await started(tmp_path / "state", {"default_probes": False}, probes={"bad": [Probe("stubborn", stubborn, timeout=60)]})
    await until(lambda: started_runs)
    await asyncio.wait_for(plugin.kumo_shutdown(), 30)
    assert all(task.done() for task in plugin.scheduler.tasks.values())


async def test_a_probe_stuck_in_the_kernel_holds_one_thread_and_nothing_else(tmp_path: Path, monkeypatch: Any) -> None:
    """statfs on a dead NFS server never returns: the disk probe must not pile threads or starve the agent."""
    import threading

    import psutil

    release = threading.Event()
    calls: list[str] = []
    real_disk_usage = psutil.disk_usage

    def disk_usage(path: str) -> Any:
        if path == "/mnt/dead-nfs":
            calls.append(path)
            release.wait(60)
        return real_disk_usage("/")

    monkeypatch.setattr(psutil, "disk_usage", disk_usage)
    section = {"default_probes": False, "probes": [
        {"name": "nfs", "type": "disk", "mount": "/mnt/dead-nfs", "interval": 0.1, "timeout": 0.2},
        {"name": "root", "type": "disk", "mount": "/", "interval": 0.1},
    ], "rules": [{"name": "nfs-unreadable", "probe": "nfs", "status": "unknown"}]}
    controller = FakeController()
    plugin = await started(tmp_path / "state", section, controller)
    try:
        await until(lambda: plugin.scheduler.timeouts.get("nfs", 0) >= 4)
        assert calls == ["/mnt/dead-nfs"], "one blocked thread, not one per interval"
        assert plugin.scheduler.samples[("nfs", "")].status == "unknown"
        assert "still blocked" in plugin.scheduler.samples[("nfs", "")].message
        root_before = plugin.scheduler.samples[("root", "/")].at
        await until(lambda: plugin.scheduler.samples[("root", "/")].at > root_before)
        release.set()  # the server comes back: the probe reads again
        await until(lambda: ("nfs", "/mnt/dead-nfs") in plugin.scheduler.samples)
        assert plugin.scheduler.samples[("nfs", "/mnt/dead-nfs")].status == "ok"
        assert ("nfs", "") not in plugin.scheduler.samples, "the placeholder of the failed runs is gone"
        await until(lambda: len(controller.received) == 2)
        assert [a["state"] for a in controller.received] == ["firing", "resolved"]
        assert "no longer reported" in controller.received[1]["annotations"]["summary"]
    finally:
        release.set()
        await plugin.kumo_shutdown()


@pytest.mark.reliability("alerting", "controller unreachable, agent restarted")
async def test_alerts_fire_and_resolve_offline_and_arrive_once_after_a_restart(tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    section = {"default_probes": False,
               "probes": [{"name": "svc", "type": "command", "interval": 0.1, "timeout": 5,
                           "command": ["/bin/sh", "-c", f'test -e {flag} && {{ echo "SVC CRITICAL"; exit 2; }}; echo OK']}],
               "rules": [{"name": "svc-down", "probe": "svc", "status": "critical", "for": 0.3, "severity": "critical",
                          "labels": {"team": "ops"}}]}
    controller = FakeController()
    controller.down = True
    plugin = await started(tmp_path / "state", section, controller)
    await until(lambda: len(plugin.alerts.outbox) == 1)
    flag.unlink()
    await until(lambda: len(plugin.alerts.outbox) == 2)
    await plugin.kumo_shutdown()
    outbox = [json.loads(line) for line in (tmp_path / "state" / "outbox.jsonl").read_text().splitlines()]
    assert [a["state"] for a in outbox] == ["firing", "resolved"]

    controller.down = False
    plugin = await started(tmp_path / "state", section, controller)
    try:
        await until(lambda: len(controller.received) == 2 and not plugin.alerts.outbox)
        firing, resolved = controller.received
        assert (firing["state"], resolved["state"]) == ("firing", "resolved")
        assert firing["labels"] == {"team": "ops", "probe": "svc"} and firing["annotations"]["summary"].endswith("SVC CRITICAL")
        assert resolved["starts_at"] == firing["starts_at"] and resolved["ends_at"]
        await asyncio.sleep(0.5)
        assert len(controller.received) == 2, "nothing is sent twice"
        assert (tmp_path / "state" / "outbox.jsonl").read_text() == ""
    finally:
        await plugin.kumo_shutdown()


@pytest.mark.reliability("alerting", "flapping probe and controller, agent restarted")
async def test_a_flapping_probe_and_a_flapping_controller_lose_nothing_across_a_restart(tmp_path: Path, monkeypatch: Any) -> None:
    runs, settled = [0], [False]

    def flapping() -> ProbeResult:
        runs[0] += 1
        critical = runs[0] % 2 and not settled[0]
        return ProbeResult("critical" if critical else "ok", 1.0 if critical else 0.0)

    section = {"default_probes": False, "rules": [{"name": "flap", "probe": "svc.flap", "status": "critical"}]}
    probes = {"svc": [Probe("flap", flapping, interval=0.02)]}
    controller = FakeController()
    committed: list[dict[str, Any]] = []
    record = AlertFiles.record

    def recording(files: AlertFiles, alert: dict[str, Any], firing: dict[str, Any]) -> None:
        record(files, alert, firing)
        committed.append(alert)  # every transition that reaches the disk

    monkeypatch.setattr(AlertFiles, "record", recording)

    async def start() -> MonitoringPlugin:
        plugin = MonitoringPlugin()
        plugin.kumo_configure(section=section, source="agent.yaml: plugins.monitoring")
        (tmp_path / "state").mkdir(exist_ok=True)
        await plugin.kumo_startup(context=context(tmp_path / "state", controller, probes))
        return plugin

    async def flap_controller() -> None:
        for i in range(1000):
            controller.down = i % 3 == 0
            controller.lose_answers = 1 if i % 5 == 0 else 0
            await asyncio.sleep(0.07)

    flapper = asyncio.create_task(flap_controller())
    plugin = await start()
    await until(lambda: len(committed) >= 20)
    await plugin.kumo_shutdown()
    plugin = await start()
    await until(lambda: len(committed) >= 40)
    flapper.cancel()
    controller.down, controller.lose_answers = False, 0
    settled[0] = True  # the probe stays ok from now on: the last alert resolves
    try:
        await until(lambda: not plugin.alerts.firing and not plugin.alerts.outbox)
    finally:
        await plugin.kumo_shutdown()

    unique = list({alert["id"]: alert for alert in controller.received}.values())
    assert [a["id"] for a in unique] == [a["id"] for a in committed], "every transition arrives, in order"
    states = [a["state"] for a in unique]
    assert states == ["firing", "resolved"] * (len(states) // 2), "never two firings or two resolutions in a row"
    for firing, resolved in zip(unique[::2], unique[1::2], strict=True):
        assert resolved["starts_at"] == firing["starts_at"]


async def test_a_firing_alert_is_not_fired_again_after_a_restart(tmp_path: Path) -> None:
    section = {"default_probes": False,
               "probes": [{"name": "bad", "type": "command", "interval": 0.1, "command": ["/bin/sh", "-c", "exit 2"]}],
               "rules": [{"name": "bad", "probe": "bad", "status": "critical"}]}
    controller = FakeController()
    plugin = await started(tmp_path / "state", section, controller)
    await until(lambda: len(controller.received) == 1)
    await plugin.kumo_shutdown()
    plugin = await started(tmp_path / "state", section, controller)
    await asyncio.sleep(0.5)
    await plugin.kumo_shutdown()
    assert len(controller.received) == 1


async def test_rules_pushed_by_the_controller_are_kept_and_checked(tmp_path: Path) -> None:
    section = {"default_probes": False, "probes": [{"name": "v", "type": "command", "interval": 0.1,
                                                     "command": ["/bin/echo", "OK | v=42"]}]}
    controller = FakeController()
    plugin = await started(tmp_path / "state", section, controller)
    with pytest.raises(TaskError, match=r"payload.rules\[0\].condition.op: expected one of"):
        await plugin.kumo_handle_task(kind="monitoring.rules", payload={"rules": [{"name": "x", "probe": "v",
                                      "condition": {"op": "~", "value": 1}}]}, task_id="t")
    rules = [{"name": "high", "probe": "v", "condition": {"op": ">", "value": 40}}]
    assert await plugin.kumo_handle_task(kind="monitoring.rules", payload={"rules": rules}, task_id="t") == {"rules": 1}
    await until(lambda: len(controller.received) == 1)
    assert controller.received[0]["value"] == 42.0
    await plugin.kumo_shutdown()
    plugin = await started(tmp_path / "state", section, controller)
    assert [r.name for r in plugin.rules] == ["high"]
    await plugin.kumo_shutdown()


async def test_textfiles_are_read_like_node_exporter(tmp_path: Path) -> None:
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    (textfiles / "backup.prom").write_text(
        "# HELP backup_age_seconds Age of the last backup.\n# TYPE backup_age_seconds gauge\n"
        'backup_age_seconds{set="home"} 12\n'
    )
    (textfiles / "backup-db.prom").write_text('# TYPE backup_age_seconds gauge\nbackup_age_seconds{set="db"} 30\n')
    (textfiles / "notes.txt").write_text("not a .prom file, not read\n")
    plugin = MonitoringPlugin()
    plugin.kumo_configure(section={"textfile_dir": str(textfiles)}, source="agent.yaml: plugins.monitoring")
    text = metric_lines(plugin)
    # One family for both files, as Prometheus rejects a metric announced twice.
    assert text.count("# TYPE backup_age_seconds gauge") == 1
    assert 'backup_age_seconds{set="home"} 12.0' in text and 'backup_age_seconds{set="db"} 30.0' in text
    assert "kumo_textfile_scrape_error 0.0" in text
    assert f'kumo_textfile_mtime_seconds{{file="{textfiles / "backup.prom"}"}}' in text
    # A bad file is reported and skipped whole, even the lines before its error; the others stay.
    (textfiles / "broken.prom").write_text('half_read{a="b"} 1\nthis is { not prometheus\n')
    (textfiles / "clash.prom").write_text("# TYPE backup_age_seconds counter\nbackup_age_seconds_total 3\n")
    text = metric_lines(plugin)
    assert "kumo_textfile_scrape_error 1.0" in text and "half_read" not in text
    assert 'backup_age_seconds{set="db"} 30.0' in text and "backup_age_seconds_total" not in text


async def test_contributed_probes_are_named_after_their_plugin(tmp_path: Path) -> None:
    contributed = {"kvm": [Probe("kvm-libvirtd", lambda: ProbeResult("ok", 1.0, "connected"), interval=0.1)],
                   "other": [Probe("thing", lambda: ProbeResult("critical", None, "broken"), interval=0.1)]}
    section = {"rules": [{"name": "libvirtd-down", "probe": "kvm.libvirtd", "status": "critical"},
                         {"name": "thing-broken", "probe": "other.thing", "status": "critical"}]}
    controller = FakeController()
    plugin = await started(tmp_path / "state", section, controller, probes=contributed)
    try:
        await until(lambda: ("kvm.libvirtd", "") in plugin.scheduler.samples and ("memory", "") in plugin.scheduler.samples)
        await until(lambda: len(controller.received) == 1)
        assert controller.received[0]["rule"] == "thing-broken"
        text = metric_lines(plugin)
        assert 'kumo_probe_value{probe="kvm.libvirtd",target=""} 1.0' in text
        assert 'kumo_probe_status{probe="other.thing",status="critical",target=""} 1.0' in text
        assert 'kumo_probe_status{probe="other.thing",status="ok",target=""} 0.0' in text
        assert 'kumo_probe_value{probe="other.thing"' not in text, "no number, no value series"
    finally:
        await plugin.kumo_shutdown()


@pytest.mark.integration
async def test_metrics_follow_prometheus_conventions(tmp_path: Path) -> None:
    require(shutil.which("promtool") is not None, "promtool (Debian's prometheus package; make deps)")
    section = {"probes": [{"name": "check", "type": "command", "interval": 0.1, "command": ["/bin/echo", "OK | x=1"]},
                          {"name": "network", "type": "network", "interval": 0.2}, {"name": "cpu", "type": "cpu", "interval": 0.2}]}
    plugin = await started(tmp_path / "state", section)
    try:
        await until(lambda: {("check", ""), ("network", "lo"), ("cpu", "")} <= set(plugin.scheduler.samples))
        assert 0 <= plugin.scheduler.samples[("cpu", "")].value <= 1
        text = metric_lines(plugin)
    finally:
        await plugin.kumo_shutdown()
    assert 'kumo_network_receive_bytes_total{device="lo"}' in text
    assert "kumo_alert_transitions_sent_total 0.0" in text
    # The linter Prometheus ships: help text, base units, counter suffixes.
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)  # noqa: S603, S607
    assert lint.returncode == 0, lint.stdout + lint.stderr


async def test_an_answer_lost_on_the_way_back_is_resent_with_the_same_id(tmp_path: Path) -> None:
    section = {"default_probes": False,
               "probes": [{"name": "bad", "type": "command", "interval": 0.1, "command": ["/bin/sh", "-c", "echo BAD; exit 2"]}],
               "rules": [{"name": "bad", "probe": "bad", "status": "critical"}]}
    controller = FakeController()
    controller.lose_answers = 2
    plugin = await started(tmp_path / "state", section, controller)
    try:
        await until(lambda: controller.received and not plugin.alerts.outbox, timeout=30)
        assert len(controller.received) == 3 and len({a["id"] for a in controller.received}) == 1
        assert plugin.alerts.sent_total == 1
    finally:
        await plugin.kumo_shutdown()


async def test_removing_a_rule_resolves_its_firing_alert(tmp_path: Path) -> None:
    section = {"default_probes": False,
               "probes": [{"name": "bad", "type": "command", "interval": 0.1, "command": ["/bin/sh", "-c", "exit 2"]}]}
    controller = FakeController()
    plugin = await started(tmp_path / "state", section, controller)
    try:
        rules = [{"name": "bad", "probe": "bad", "status": "critical", "labels": {"team": "ops"}}]
        await plugin.kumo_handle_task(kind="monitoring.rules", payload={"rules": rules}, task_id="t1")
        await until(lambda: len(controller.received) == 1)
        await plugin.kumo_handle_task(kind="monitoring.rules", payload={"rules": []}, task_id="t2")
        await until(lambda: len(controller.received) == 2)
        firing, resolved = controller.received
        assert resolved["state"] == "resolved" and resolved["id"] != firing["id"]
        assert resolved["starts_at"] == firing["starts_at"] and resolved["labels"] == firing["labels"]
        assert "the rule was removed" in resolved["annotations"]["summary"]
        assert not plugin.alerts.firing
    finally:
        await plugin.kumo_shutdown()


# ---- real probes, a real Prometheus, a real controller --------------------------------


@pytest.mark.integration
async def test_tcp_http_process_and_disk_probes_against_real_endpoints(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    open_port = listener.getsockname()[1]
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    app = web.Application()
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503)

    app.router.add_get("/ok", ok)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the port the OS chose
    cert = self_signed(tmp_path, "127.0.0.1")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, tmp_path / "server.key")
    tls_site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await tls_site.start()
    https = f"https://127.0.0.1:{tls_site._server.sockets[0].getsockname()[1]}/ok"  # noqa: SLF001
    sleeper = tmp_path / "kumo-test-long-named-sleeper"  # longer than the kernel's 15-character comm
    shutil.copy("/bin/sleep", sleeper)
    sleeping = subprocess.Popen([str(sleeper), "60"])  # noqa: S603
    check = tmp_path / "check_load"  # a Nagios plugin as such scripts are written: text | perfdata, exit code
    check.write_text('#!/bin/sh\necho "LOAD WARNING - load average 3.20 | load1=3.2;2;5;0 load5=1.1;2;5;0"\nexit 1\n')
    check.chmod(0o755)
    section = {"default_probes": False, "probes": [
        {"name": "open", "type": "tcp", "host": "127.0.0.1", "port": open_port, "interval": 0.2},
        {"name": "closed", "type": "tcp", "host": "127.0.0.1", "port": closed_port, "interval": 0.2},
        {"name": "web", "type": "http", "url": f"http://127.0.0.1:{http_port}/ok", "interval": 0.2},
        {"name": "web-broken", "type": "http", "url": f"http://127.0.0.1:{http_port}/broken", "interval": 0.2},
        {"name": "me", "type": "process", "process": Path(sys.executable).name, "interval": 0.2},
        {"name": "root", "type": "disk", "mount": "/", "interval": 0.2, "warning": 2.0},
        {"name": "nagios", "type": "command", "command": [str(check)], "interval": 0.2},
        {"name": "web-tls", "type": "http", "url": https, "ca_file": str(cert), "interval": 0.2},
        {"name": "long", "type": "process", "process": sleeper.name, "interval": 0.2},
        {"name": "truncated", "type": "process", "process": sleeper.name[:15] + "-other", "interval": 0.2},
        {"name": "web-tls-untrusted", "type": "http", "url": https, "interval": 0.2},
    ]}
    plugin = await started(tmp_path / "state", section)
    try:
        names = ("open", "closed", "web", "web-broken", "me", "root", "nagios", "web-tls", "web-tls-untrusted", "long", "truncated")
        await until(lambda: {p for p, _ in plugin.scheduler.samples} >= set(names))
        status = {p: s.status for (p, _), s in plugin.scheduler.samples.items()}
        assert status == {"open": "ok", "closed": "critical", "web": "ok", "web-broken": "critical", "me": "ok", "root": "ok",
                          "nagios": "warning", "web-tls": "ok", "web-tls-untrusted": "critical", "long": "ok", "truncated": "critical"}
        assert plugin.scheduler.samples[("long", "")].value == 1.0
        assert "certificate verify failed" in plugin.scheduler.samples[("web-tls-untrusted", https)].message
        nagios = plugin.scheduler.samples[("nagios", "")]
        assert (nagios.value, nagios.message) == (3.2, "LOAD WARNING - load average 3.20")
        assert 0 < plugin.scheduler.samples[("root", "/")].value < 1
        assert "HTTP 503, expected 200" in plugin.scheduler.samples[("web-broken", f"http://127.0.0.1:{http_port}/broken")].message
    finally:
        await plugin.kumo_shutdown()
        await runner.cleanup()
        listener.close()
        sleeping.kill()
        sleeping.wait()


@pytest.mark.integration
async def test_prometheus_scrapes_the_agent_metrics_endpoint(tmp_path: Path, prometheus: Any) -> None:
    """A real Prometheus with a static target reads a probe value and a textfile metric."""
    from agent.metrics import AgentMetrics, MetricsServer
    from tests.harness import free_port

    listener = socket.create_server(("127.0.0.1", 0))
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    (textfiles / "role.prom").write_text("# HELP node_role_info The role of this node.\n# TYPE node_role_info gauge\nnode_role_info{role=\"db\"} 1\n")
    section = {"textfile_dir": str(textfiles), "probes": [
        {"name": "listener", "type": "tcp", "host": "127.0.0.1", "port": listener.getsockname()[1], "interval": 0.5}]}
    plugin = await started(tmp_path / "state", section)
    port = free_port()
    server = MetricsServer(AgentMetrics(plugin.kumo_metrics), "127.0.0.1", port)
    await server.start()
    try:
        prom = await asyncio.to_thread(prometheus, {"scrape_configs": [
            {"job_name": "kumo", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]})
        [ok] = await asyncio.to_thread(prom.wait_for, 'kumo_probe_status{probe="listener",status="ok"} == 1')
        assert ok["metric"]["target"] == f"127.0.0.1:{listener.getsockname()[1]}"
        [connect] = await asyncio.to_thread(prom.query, 'kumo_probe_value{probe="listener"}')
        assert float(connect["value"][1]) > 0
        await asyncio.to_thread(prom.wait_for, 'node_role_info{role="db"} == 1')
        [up] = await asyncio.to_thread(prom.query, 'up{job="kumo"}')
        assert up["value"][1] == "1"
    finally:
        await server.stop()
        await plugin.kumo_shutdown()
        listener.close()


def self_signed(directory: Path, address: str) -> Path:
    """A self-signed server certificate for ``address`` (and its key, server.key), its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe-target")])
    now = datetime.datetime.utcnow()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path = directory / "server.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def kumoctl(controller: Any, *args: str) -> str:
    script = Path(sys.executable).with_name("kumoctl")
    env = {**os.environ, "KUMOCTL_CONFIG": str(controller.kumoctl_config)}
    result = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=60, check=False)  # noqa: S603
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.integration
def test_prometheus_discovers_and_scrapes_the_agents_over_mutual_tls(controller, kumo_agent, prometheus, tmp_path):
    scraper = tmp_path / "scraper"
    kumoctl(controller, "certificate", "create", "--role", "scraper", "--name", "prometheus", "--out", str(scraper))
    assert (scraper / "prometheus.key").stat().st_mode & 0o777 == 0o600
    ca = controller.pki / "ca.crt"
    agents = []
    for _ in range(2):
        agent = kumo_agent(start=False)
        config = __import__("yaml").safe_load(agent.config_path.read_text())
        config["metrics"] = {"listen": f"127.0.0.1:{agent.metrics_port}", "client_ca": str(ca)}
        config["plugins"] = {"monitoring": {"probes": [{"name": "answer", "type": "command", "interval": 1,
                                                        "command": ["/bin/echo", "OK | answer=42"]}]}}
        agent.config_path.write_text(__import__("yaml").safe_dump(config))
        agent.start()
        agents.append(agent)
    tls = {"ca_file": str(ca), "cert_file": str(scraper / "prometheus.crt"), "key_file": str(scraper / "prometheus.key")}
    discovery = [{"url": f"{controller.url}/v1/prometheus/targets", "refresh_interval": "2s", "tls_config": tls}]
    server = prometheus({"scrape_configs": [
        {"job_name": "kumo", "scheme": "https", "tls_config": tls, "http_sd_configs": discovery},
        # The negative control: the same targets scraped without a client certificate.
        {"job_name": "kumo-nocert", "scheme": "https", "tls_config": {"ca_file": str(ca)}, "http_sd_configs": discovery},
    ]})
    found = server.wait_for('kumo_probe_value{probe="answer"}', timeout=90, count=2)
    assert sorted(r["metric"]["node_id"] for r in found) == sorted(a.node_id for a in agents)
    assert {r["value"][1] for r in found} == {"42"}
    assert {r["metric"]["kumo_kinds"] for r in found} <= {"kvm,lxc,process", "lxc,process", "process", "kvm,process"}
    refused = server.wait_for('up{job="kumo-nocert"} == 0', count=2)
    assert sorted(r["metric"]["node_id"] for r in refused) == sorted(a.node_id for a in agents)
    targets = server.api("/api/v1/targets")["activeTargets"]
    errors = [t["lastError"] for t in targets if t["labels"]["job"] == "kumo-nocert"]
    assert len(errors) == 2 and all(errors), errors  # the handshake is refused ("EOF" to Prometheus)


@pytest.mark.integration
@pytest.mark.parametrize("section, key", [
    ({"probes": [{"name": "x", "type": "ping"}]}, "plugins.monitoring.probes[0].type: expected one of 'cpu'"),
    ({"rules": [{"name": "r", "probe": "cpu", "status": "critical", "severty": "page"}]},
     "plugins.monitoring.rules[0].severty: unknown key"),
])
def test_the_agent_refuses_to_start_with_a_bad_monitoring_config(controller, kumo_agent, section, key):
    from tests.harness.agents import agent_command

    agent = kumo_agent(plugins={"monitoring": section}, start=False)
    run = subprocess.run([*agent_command(), "run", "--config", str(agent.config_path)],  # noqa: S603
                         capture_output=True, text=True, env=agent.env, timeout=60, check=False)
    assert run.returncode == 2, run.stderr
    assert f"{agent.config_path}" in run.stderr and key in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.reliability("alerting", "controller outage")
@pytest.mark.integration
def test_a_check_script_alert_reaches_kumoctl_and_survives_a_controller_outage(controller, kumo_agent, tmp_path):
    flag = tmp_path / "broken"
    check = tmp_path / "check_flag"
    check.write_text(f'#!/bin/sh\nif [ -e {flag} ]; then echo "FLAG CRITICAL - {flag} exists"; exit 2; fi\necho "FLAG OK"\n')
    check.chmod(0o755)
    agent = kumo_agent(plugins={"monitoring": {
        "default_probes": False,
        "probes": [{"name": "flag", "type": "command", "interval": 0.5, "command": [str(check)]}],
        "rules": [{"name": "flag-set", "probe": "flag", "status": "critical", "for": 1, "severity": "critical"}],
    }})

    def alerts(state: str) -> list[dict[str, Any]]:
        return json.loads(kumoctl(controller, "alerts", "list", "--state", state, "--output", "json"))

    def wait(state: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 60
        while not alerts(state):
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.5)
        return alerts(state)

    flag.touch()
    [firing] = wait("firing")
    assert (firing["rule"], firing["node"], firing["severity"]) == ("flag-set", agent.node_id, "critical")
    assert "FLAG CRITICAL" in kumoctl(controller, "alerts", "list")
    # The controller is down while the alert resolves and fires again: the node keeps both.
    controller.kill()
    flag.unlink()
    agent.wait_log("alert flag-set resolved:")  # logged once recorded on the node
    flag.touch()
    agent.wait_log("alert flag-set firing:", count=2)
    controller.start()
    deadline = time.monotonic() + 60
    while True:
        rows = controller.admin("GET", "/v1/alerts")["alerts"]
        transitions = [row["state"] for row in controller.sql("SELECT state FROM alerts ORDER BY received_at")]
        if len(transitions) >= 3:
            break
        assert time.monotonic() < deadline, (transitions, agent.log_tail())
        time.sleep(0.5)
    assert transitions == ["firing", "resolved", "firing"]
    assert [r["state"] for r in rows] == ["firing"]


async def test_an_alert_the_full_disk_kept_from_recording_fires_once_space_returns(tmp_path: Path, monkeypatch) -> None:
    from agent.sdk import DiskFull
    from plugins.monitoring.alerts import AlertFiles

    section = {"default_probes": False,
               "probes": [{"name": "bad", "type": "command", "interval": 0.1, "command": ["/bin/sh", "-c", "exit 2"]}],
               "rules": [{"name": "bad", "probe": "bad", "status": "critical"}]}
    real_record = AlertFiles.record
    attempts: list[str] = []

    def full(self: AlertFiles, alert: dict[str, Any], firing: dict[str, Any]) -> None:
        attempts.append(alert["id"])
        if len(attempts) < 3:
            raise DiskFull(self.directory / "outbox.jsonl", OSError(28, "No space left on device"))
        real_record(self, alert, firing)

    monkeypatch.setattr(AlertFiles, "record", full)
    controller = FakeController()
    plugin = await started(tmp_path / "state", section, controller)
    try:
        # The probe's loop outlived the failed writes, and the alert fired once they worked.
        await until(lambda: len(controller.received) == 1)
        assert len(attempts) == 3 and [a["state"] for a in controller.received] == ["firing"]
        assert list(plugin.alerts.firing.values())[0]["id"] == attempts[-1]
    finally:
        await plugin.kumo_shutdown()
