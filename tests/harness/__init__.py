"""Shared test harness: real components started by the tests, and the rule for missing ones.

Each component has a module here (``tests/harness/libvirt.py``...) whose fixtures start the
real daemon. They are loaded for every test by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[2]
# Slow fixtures (guest kernels and images, the criu build) are built once per machine here.
CACHE_DIR = Path(os.environ.get("KUMO_TEST_CACHE", "/var/cache/kumo-test"))


def require(condition: bool, what: str) -> None:
    """Skip on a developer's machine when a real component is missing; fail in CI (CI=true).

    ``what`` says what is missing and how to get it (usually ``make deps``).
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing in CI: {what}", pytrace=False)
    pytest.skip(f"missing: {what} (run `make deps`)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_counter(path: Path) -> int:
    """The number a test workload keeps writing to ``path`` (0 before it wrote one).

    A writer that truncates before it writes (a shell's ``echo $i > file``) leaves the file
    empty for an instant: an empty read is that instant, not a count, so read again.
    """
    for _ in range(100):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return 0
        if text.strip():
            return int(text)
        time.sleep(0.01)
    return 0
