"""A real PostgreSQL 15 for the store's and the multi-controller tests: a private cluster
in a temporary directory, on its own port, run as the ``postgres`` user (the server refuses
root), with password authentication over TCP as a deployment has it.

    def test_x(postgres):
        url = postgres.database()          # a new empty database: postgresql://kumo:...@127.0.0.1:PORT/NAME
        postgres.restart()                 # the server goes away and comes back (same data)

One cluster serves the whole session; each test takes fresh databases from it.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import free_port, require

BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT = 30.0


class Postgres:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        user = pwd.getpwnam("postgres")
        self._uid, self._gid = user.pw_uid, user.pw_gid
        os.chown(root, self._uid, self._gid)
        pwfile = root / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, self._uid, self._gid)
        self._as_postgres([str(BIN / "initdb"), "-D", str(self.data), "-U", "kumo", "-E", "UTF8", "--no-sync",
                           "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"])
        pwfile.unlink()

    def _as_postgres(self, argv: list[str]) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *argv],  # noqa: S603,S607 - fixed list
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, f"{argv[0]} failed: {result.stdout}{result.stderr}"

    def start(self) -> None:
        log = (self.root / "postgres.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: S603,S607 - fixed list
            ["runuser", "-u", "postgres", "--", str(BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "max_connections=300"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready = subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],  # noqa: S603
                                   capture_output=True, check=False)
            if ready.returncode == 0:
                return
            assert self.proc.poll() is None, f"postgres exited: {self.log_tail()}"
            time.sleep(0.1)
        raise AssertionError(f"postgres did not accept connections in {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # "fast" shutdown: sessions are ended, not waited for
        self.proc.wait(60)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "postgres.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def url(self, name: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://kumo:{password or self.password}@127.0.0.1:{self.port}/{name}"

    def database(self) -> str:
        """A new, empty database's URL."""
        name = f"kumo_test_{os.getpid()}_{next(self._names)}"
        self.sql(self.url(), f"CREATE DATABASE {name}")
        return self.url(name)

    def sql(self, url: str, statement: str) -> None:
        """Run one statement in the database of ``url`` (as a DBA would, with psql)."""
        self._as_postgres([str(BIN / "psql"), "-h", str(self.root), "-p", str(self.port), "-U", "kumo",
                           "-d", url.rpartition("/")[2], "-q", "-v", "ON_ERROR_STOP=1", "-c", statement])


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    require((BIN / "postgres").exists() and shutil.which("runuser") is not None,
            "PostgreSQL 15 (postgresql-15)")
    # Not under pytest's temporary directory: that is root's alone, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="kumo-test-pg-"))
    server = Postgres(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
