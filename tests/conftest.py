"""Loads every harness module under tests/harness/ so their fixtures serve all tests."""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.harness.{path.stem}"
    for path in (Path(__file__).parent / "harness").glob("*.py")
    if path.stem != "__init__"
)
