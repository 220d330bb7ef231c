"""Kumo's record of a container: ``kumo.json`` in its directory, what liblxc does not keep
(when and from what it was made, its limits and address), shown in the instance's details."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import atomic_write

if TYPE_CHECKING:
    from .spec import CreateSpec

RECORD_FILE = "kumo.json"
SHOWN = ("address", "privileged", "source")  # what the instance's details carry


def new_record(spec: CreateSpec) -> dict[str, Any]:
    record = {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": f"template:{spec.template}" if spec.image is None else f"image:{spec.image_sha256 or spec.image}",
        "privileged": spec.privileged,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "network": spec.network.mode,
    }
    if spec.network.address:
        record["address"] = spec.network.address
    return record


def write_record(directory: Path, record: dict[str, Any]) -> None:
    atomic_write(directory / RECORD_FILE, json.dumps(record, indent=1) + "\n", mode=0o644)


def read_record(directory: Path) -> dict[str, Any]:
    """The record, or {} for a container Kumo did not make (or whose record is unreadable)."""
    try:
        data = json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
