"""The reliability table: each test that injects a fault says which, and the suite prints them all.

A test marked ``@pytest.mark.reliability("scenario", "fault injected")`` breaks something real
in the middle of ``scenario`` and asserts that nothing was lost: every task ran once, every
instance runs exactly once, every message arrived. At the end of the run the suite prints
one row per such test: ``lost: 0`` when its assertions held, ``FAILED`` when they did not.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

ROWS = pytest.StashKey[dict[str, tuple[str, str, str]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability(scenario, fault): a fault-injection test, listed in the reliability table"
    )
    config.stash[ROWS] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    marker = item.get_closest_marker("reliability")
    report = outcome.get_result()
    if marker is None or (report.when != "call" and not report.failed):
        return
    scenario, fault = marker.args
    rows = item.config.stash[ROWS]
    if report.when == "call" or item.nodeid not in rows:
        rows[item.nodeid] = (scenario, fault, "lost: 0" if report.passed else "FAILED")
    elif report.failed:
        rows[item.nodeid] = (scenario, fault, "FAILED")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = sorted(config.stash[ROWS].values())
    if not rows:
        return
    widths = [max(len(row[i]) for row in [("scenario", "fault injected", "result"), *rows]) for i in range(3)]
    terminalreporter.section("reliability: faults injected into real components")
    for row in [("scenario", "fault injected", "result"), *rows]:
        terminalreporter.write_line("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
