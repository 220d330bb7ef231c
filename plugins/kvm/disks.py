"""A VM's files on the node: its instance directory and its disk, a qcow2 overlay on a base
image from the node's image cache.

The overlay is only the guest's changes: the base image stays shared by every VM made from
it, which is why the image cache must never evict a base image an overlay still names
(:func:`backing_file` tells which).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
from pathlib import Path

from agent.sdk import TaskError, run_command

# An instance directory's files: the overlay and the serial console's log.
DISK = "disk.qcow2"
CONSOLE_LOG = "console.log"
_QCOW2_MAGIC = b"QFI\xfb"
# Formats by (path, mtime): a base image is probed once, not at every create.
_formats: dict[tuple[str, float], str] = {}


def has_instance_dirs(instance_dir: Path) -> bool:
    """Whether instances from before may exist: each Kumo domain has its directory here. Blocking."""
    try:
        with os.scandir(instance_dir) as entries:
            return any(entry.is_dir() for entry in entries)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: load libvirt and let adoption look


def fresh_dir(directory: Path) -> None:
    """A new, empty instance directory; leftovers of a crashed create (no domain) are dropped.
    Blocking. qemu (another user) must traverse it, hence 0711."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.parent.chmod(0o711)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o711)


async def image_format(path: Path) -> str:
    """qcow2 or raw, as qemu-img sees the image; TaskError ``image-invalid`` for any other
    format, and for an image that names another file (a backing file or an external data
    file): qemu would open that path on the node for the guest to read, and an image from
    a URL could name ``/etc/shadow`` or ``/dev/sda``."""
    stat = await asyncio.to_thread(path.stat)
    key = (str(path), stat.st_mtime)
    if key not in _formats:
        result = await run_command("qemu-img", "info", "--output=json", str(path))
        if result.returncode != 0:
            raise TaskError(f"image {path} is not a disk image qemu-img can read: {result.error}",
                            code="image-invalid")
        info = json.loads(result.stdout)
        if info.get("format") not in ("qcow2", "raw"):
            raise TaskError(f"image {path} is {info.get('format')!r}, not qcow2 or raw: convert it with "
                            "qemu-img convert -O qcow2", code="image-invalid")
        named = info.get("backing-filename") or ((info.get("format-specific") or {}).get("data") or {}).get("data-file")
        if named:
            raise TaskError(f"image {path} reads another file, {named!r}: give a self-contained image "
                            "(qemu-img convert -O qcow2 flattens it)", code="image-invalid")
        _formats[key] = info["format"]
    return _formats[key]


async def make_overlay(base: Path, disk: Path, size: int | None = None) -> None:
    """Create ``disk``, a qcow2 overlay backed by ``base``, of ``size`` bytes (None: the base's)."""
    base_format = await image_format(base)
    result = await run_command("qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(disk),
                               *([str(size)] if size is not None else []))
    if result.returncode != 0:
        raise TaskError(f"qemu-img could not create the disk {disk}: {result.error}", code="failed")
    # The guest's writes land here (its secrets too), at a path anyone can guess and
    # traverse to: root's alone until libvirt hands it to qemu's user at start. Empty until
    # then, so the umask's mode for the moment qemu-img creates it exposes nothing.
    await asyncio.to_thread(disk.chmod, 0o600)


def backing_file(disk: Path) -> Path | None:
    """The file a qcow2 overlay is backed by, from its header; None for none or no qcow2.
    Blocking (reads the first few KiB)."""
    try:
        with disk.open("rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 4096:
                return None
            f.seek(offset)
            name = os.fsdecode(f.read(size))
    except OSError:
        return None
    return disk.parent / name  # a relative name is relative to the overlay's directory
