"""Real rsyslogd daemons for the rsyslog plugin's tests, each with its own files and ports.

    def test_x(rsyslog_bed):
        collector = rsyslog_bed.daemon("collector")
        sender = rsyslog_bed.daemon("sender", input_port=True)   # logger -T -P sender.input_port
        plugin = await rsyslog_bed.plugin(sender, identity=rsyslog_bed.identity("sender"))

Daemons run as rsyslog runs on a node without systemd: ``rsyslogd -f CONF -i PIDFILE``,
daemonized; the plugin restarts them the same way. The system's own rsyslog is never
touched. Certificates are Kumo-shaped (``O=kumo, OU=node, CN=n-...``) from a throwaway CA.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port, require

RSYSLOGD = Path("/usr/sbin/rsyslogd")


class Daemon:
    """One rsyslogd: main config including ``confd``, a pid file, optionally a plain TCP input."""

    def __init__(self, root: Path, name: str, input_port: bool):
        self.dir = root / name
        self.confd = self.dir / "rsyslog.d"
        self.work = self.dir / "work"
        for d in (self.confd, self.work):
            d.mkdir(parents=True, exist_ok=True)
        self.main = self.dir / "rsyslog.conf"
        self.pid_file = self.dir / "rsyslogd.pid"
        self.input_port = free_port() if input_port else None
        lines = [f'global(workDirectory="{self.work}")']
        if self.input_port:
            lines += ['module(load="imtcp")', f'input(type="imtcp" address="127.0.0.1" port="{self.input_port}")']
        # Like /var/log/syslog on a node: rsyslog refuses to run without any action.
        lines.append(f'*.* action(type="omfile" file="{self.dir}/local.log")')
        lines.append(f'include(file="{self.confd}/*.conf" mode="optional")')
        self.main.write_text("\n".join(lines) + "\n")

    @property
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def start(self) -> None:
        subprocess.run([str(RSYSLOGD), "-f", str(self.main), "-i", str(self.pid_file)], check=True)  # noqa: S603
        deadline = time.monotonic() + 15
        while self.pid is None:
            assert time.monotonic() < deadline, f"rsyslogd {self.dir.name} did not start"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
            if stat and stat.rsplit(")", 1)[1].split()[0] == "Z":
                break
            assert time.monotonic() < deadline, f"rsyslogd {self.dir.name} did not stop"
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            self.pid_file.unlink(missing_ok=True)

    def send(self, lines: list[str], tag: str) -> None:
        """Each line one message, through the daemon's plain TCP input (as an app's syslog would)."""
        assert self.input_port is not None
        subprocess.run(  # noqa: S603
            ["logger", "-T", "-n", "127.0.0.1", "-P", str(self.input_port), "-t", tag],
            input="\n".join(lines) + "\n", text=True, check=True,
        )


class RsyslogBed:
    def __init__(self, root: Path):
        from controller.pki import CertificateAuthority, key_pem, new_key, pem

        self.root = root
        self.daemons: list[Daemon] = []
        self.plugins: list[Any] = []
        ca = CertificateAuthority.create("Kumo test CA")
        self.ca_path = root / "ca.crt"
        self.ca_path.write_text(pem(ca.cert))
        self._certs: dict[str, tuple[str, Path, Path]] = {}
        for name in ("sender", "collector"):
            node_id = "n-" + secrets.token_hex(6)
            key = new_key()
            cert = ca.issue(key.public_key(), "node", node_id, datetime.timedelta(days=1),
                            dns_names=(node_id, f"{name}.test", "localhost"), ips=("127.0.0.1",), server=True)
            (root / f"{name}.crt").write_text(pem(cert))
            (root / f"{name}.key").write_bytes(key_pem(key))
            (root / f"{name}.key").chmod(0o600)
            self._certs[name] = (node_id, root / f"{name}.crt", root / f"{name}.key")

    def identity(self, name: str) -> Any:
        from agent.sdk import Identity

        node_id, cert, key = self._certs[name]
        return Identity(node_id=node_id, key=key, certificate=cert, ca=self.ca_path)

    def daemon(self, name: str, input_port: bool = False) -> Daemon:
        daemon = Daemon(self.root, name, input_port)
        self.daemons.append(daemon)
        return daemon

    async def plugin(self, daemon: Daemon, identity: Any = None, **settings: Any) -> Any:
        """A configured and started RsyslogPlugin driving ``daemon``."""
        from agent.sdk import ImageCache, PluginContext
        from plugins.rsyslog import RsyslogPlugin

        async def no_controller(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the rsyslog plugin does not call the controller")

        plugin = RsyslogPlugin()
        section = {"config_dir": str(daemon.confd), "main_config": str(daemon.main), "pid_file": str(daemon.pid_file),
                   "spool_dir": str(daemon.dir / "spool"), "stats_interval": 1, **settings}
        plugin.kumo_configure(section=section, source="agent.yaml: plugins.rsyslog")
        state = daemon.dir / "plugin-state"
        state.mkdir(exist_ok=True)
        await plugin.kumo_startup(context=PluginContext(
            name="rsyslog", state_dir=state, agent_state_dir=daemon.dir, identity=identity, hooks=None,
            report_changed=lambda: None, call_controller=no_controller, images=ImageCache(daemon.dir / "images"),
        ))
        self.plugins.append(plugin)
        return plugin


def received(directory: Path, tag: str) -> list[str]:
    """The messages with ``tag`` in every per-host file of a collector directory, in order."""
    pattern = re.compile(rf" {re.escape(tag)}:? (.*)$")
    out = []
    for path in sorted(directory.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            match = pattern.search(line)
            if match:
                out.append(match.group(1))
    return out


@pytest.fixture
async def rsyslog_bed(tmp_path: Path) -> AsyncIterator[RsyslogBed]:
    require(RSYSLOGD.exists(), "rsyslogd (apt install rsyslog rsyslog-relp rsyslog-gnutls; make deps)")
    require(Path("/usr/lib/x86_64-linux-gnu/rsyslog/omrelp.so").exists(), "rsyslog-relp (make deps)")
    require(Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists(), "rsyslog-gnutls (make deps)")
    tmp_path.chmod(0o755)
    bed = RsyslogBed(tmp_path)
    yield bed
    for plugin in bed.plugins:
        await plugin.kumo_shutdown()
    for daemon in bed.daemons:
        daemon.stop()
