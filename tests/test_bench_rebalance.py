"""bench/bench_rebalance.py --quick plans a simulated fleet in a second: run it, so a change to
the planner that makes it move more than it must, or never settle, shows in the unit tests
(its real part, with agents and CRIU, is a benchmark's run, not a unit test's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_rebalance.py"


def test_the_planner_meets_its_targets_on_the_default_skewed_fleet() -> None:
    result = subprocess.run(  # noqa: S603 - a fixed argv list
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "nodes still over 80%: 0" in result.stdout, result.stdout
    assert "(target <= 1.2x: met)" in result.stdout and "(target <= 3: met)" in result.stdout, result.stdout
