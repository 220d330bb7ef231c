"""bench/bench_rebalance.py --quick plans a simulated fleet in a second: run it, so a change to
the planner that makes it move more than it must, or never settle, shows in the unit tests
(its real part, with agents and CRIU, is a benchmark's run, not a unit test's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_rebalance.py"


def quick(*args: str) -> str:
    result = subprocess.run(  # noqa: S603 - a fixed argv list
        [sys.executable, str(BENCH), "--quick", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_planner_meets_its_targets_on_the_default_skewed_fleet() -> None:
    out = quick()
    assert "nodes still over 80%: 0" in out, out
    assert "(target <= 1.2x: met)" in out and "(target <= 3: met)" in out, out


@pytest.mark.parametrize("max_in_flight", ["4", "6"])
def test_the_planner_takes_the_fewest_rounds_the_limits_allow(max_in_flight: str) -> None:
    # Six skewed nodes must shed 14 instances: 4 at a time take 4 rounds, 6 at a time 3.
    out = quick("--hot", "6", "--seed", "2", "--max-in-flight", max_in_flight)
    assert "nodes still over 80%: 0" in out and "1.00x" in out, out
    found = re.search(r"rounds that moved something: (\d+);.* a round: (\d+) ", out)
    assert found and found[1] == found[2], out
    assert ("(target <= 3: met)" in out) == (max_in_flight == "6"), out
