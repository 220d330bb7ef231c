"""bench/bench_tls.py needs root-sized descriptor limits and a minute; this only keeps it
loadable and its options documented, since nothing else imports it. bench_tls_openssl.py is
quick: it runs, small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_tls.py"


def test_bench_tls_help_lists_its_options() -> None:
    result = subprocess.run(  # noqa: S603 - a fixed argv list
        [sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    for option in ("--connections", "--upload-mib", "--rounds"):
        assert option in result.stdout


def test_bench_tls_openssl_measures_the_controllers_context() -> None:
    result = subprocess.run(  # noqa: S603 - a fixed argv list
        [sys.executable, str(BENCH.with_name("bench_tls_openssl.py")), "--connections", "20"],
        capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    # CPython sets the mode on every context, and the bench can read it from the controller's.
    assert "SSL_MODE_RELEASE_BUFFERS on the controller's context: set" in result.stdout, result.stdout
    assert "mode cleared" in result.stdout, result.stdout
