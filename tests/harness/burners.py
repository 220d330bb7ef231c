"""Process instances that burn a fixed slice of CPU and count, for the rebalancer's tests and
bench/bench_rebalance.py.

``BURNER`` takes one argument, the file it counts into; the count goes on from where it was
when the process is moved. Each round burns a fixed ``DUTY / 10`` s of CPU time rather than
of wall time, so that when the machine is busy a burner's figure drops by far less than its
share of the CPUs would. A restored process's CPU clock starts again from naught: the
round it was dumped in ends there, rather than burning until the clock is back where it was
(seconds of a whole core, which the destination would measure as the burner's use).
"""

from __future__ import annotations

PY = "/usr/bin/python3"
DUTY = 0.2  # the cores each burner uses: 20 ms of CPU, then 80 ms asleep
BURNER = f"""
import sys, time
i = 0
while True:
    i += 1
    with open(sys.argv[1], "w") as f:
        f.write(str(i))
    start = time.process_time()
    while 0 <= time.process_time() - start < {DUTY / 10}:
        pass
    time.sleep({(1 - DUTY) / 10})
"""
