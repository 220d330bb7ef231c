"""How kumoctl prints: aligned tables, ``key: value`` fields, JSON for ``--output json``,
and the small formats the tables share (ages, GiB, MiB)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

GIB = 1024**3
MIB = 1024**2
# C0 and C1 control characters but newline and tab: what moves a terminal's cursor, rewrites
# its title or its colours. Guests and nodes choose much of what kumoctl prints.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters written out as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class PrintableStream:
    """A text stream that writes :func:`printable` text: kumoctl's stdout, so that no guest
    console, node name or error reaches the admin's terminal as escape sequences."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(printable(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> None:
    """Left-aligned columns, two spaces apart; ``empty`` is printed when there are no rows."""
    cells = [[cell(v) for v in row] for row in rows]
    if not cells:
        print(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_fields(pairs: Iterable[tuple[str, Any]]) -> None:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs) + 1
    for key, value in pairs:
        print(f"{key + ':':<{width}} {cell(value)}")


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def ago(timestamp: str | None, now: dt.datetime | None = None) -> str:
    """``2026-01-01T10:00:00Z`` → ``5s ago``; unparsable timestamps are shown as they are."""
    if not timestamp:
        return "never"
    try:
        then = dt.datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.UTC)
    seconds = int(((now or dt.datetime.now(dt.UTC)) - then).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def gib(value: Any) -> str:
    return f"{value / GIB:.1f}" if isinstance(value, int | float) else "?"


def mib(value: Any) -> str:
    return f"{(value or 0) / MIB:.1f}"


def short(text: str | None, limit: int = 60) -> str | None:
    """``text`` cut to ``limit`` characters with an ellipsis, for a table cell."""
    if not text or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def print_block(key: str, value: Any) -> None:
    """``key:`` then ``value`` as indented JSON, for the nested parts of a record."""
    print(f"{key}:")
    for line in json.dumps(value, indent=2, sort_keys=True).splitlines():
        print(f"  {line}")
