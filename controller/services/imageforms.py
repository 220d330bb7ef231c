"""What an imported image must be, checked before it enters the catalogue.

An image is handed to every node that asks for it, so the controller refuses one that is
not what its kind makes of it, with the reason, rather than let each node fail on it later:

- a **kvm** image is a disk qemu can boot from as a backing file: a qcow2 image without a
  backing file of its own (it would name a file on the importer's machine), or a raw disk
  with a boot sector (a whole multiple of 512 bytes, ending its first sector with 0x55AA, as
  MBR and GPT disks do; any file at all is "raw" to qemu-img, a text file too);
- an **lxc** image is a root filesystem tarball (plain, gzip, bzip2 or xz) whose members all
  stay inside the root: no absolute or ``..`` names, no device nodes (a container must not
  be handed the host's disks) and no hard links to anything outside the archive.

Both checks block (a subprocess, a whole archive read): call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

KINDS = ("kvm", "lxc")
QEMU_IMG_TIMEOUT = 60.0
SECTOR = 512


class BadImage(Exception):
    """The file is not an image of the kind it was imported as; the message says why."""


def check(path: Path, kind: str) -> str:
    """The image's format (``qcow2``, ``raw``, ``tar``), or :class:`BadImage`."""
    return check_disk(path) if kind == "kvm" else check_rootfs(path)


def check_disk(path: Path) -> str:
    try:
        result = subprocess.run(  # noqa: S603 - fixed argument list, the path is ours
            ["qemu-img", "info", "--output=json", str(path)],  # noqa: S607 - qemu-img from PATH
            capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False,
        )
    except FileNotFoundError:
        raise BadImage("qemu-img is not installed on the controller (apt install qemu-utils): "
                       "it is needed to check kvm images") from None
    if result.returncode != 0:
        raise BadImage(f"qemu-img cannot read it as a disk image: {result.stderr.strip()[:300]}")
    info = json.loads(result.stdout)
    form = info.get("format")
    if form == "qcow2":
        if info.get("backing-filename"):
            raise BadImage(f"the qcow2 image has a backing file ({info['backing-filename']}); "
                           "import a standalone image (qemu-img convert -O qcow2 IN OUT)")
        return "qcow2"
    if form != "raw":
        raise BadImage(f"a kvm image must be qcow2 or raw, and this one is {form}")
    size = path.stat().st_size
    with path.open("rb") as f:
        first = f.read(SECTOR)
    if size == 0 or size % SECTOR or first[510:512] != b"\x55\xaa":
        raise BadImage("it is neither qcow2 nor a raw disk (no boot sector ending in 0x55AA, or a size that is "
                       "not a whole number of 512-byte sectors): a kvm image is a bootable disk")
    return "raw"


def check_rootfs(path: Path) -> str:
    try:
        with tarfile.open(path, "r:*") as tar:
            names: set[str] = set()
            count = 0
            for member in tar:
                count += 1
                name = _inside(member.name, "member")
                names.add(name)
                if member.ischr() or member.isblk():
                    raise BadImage(f"member {member.name} is a device node; a container's /dev is made by LXC, "
                                   "so a rootfs tarball must not carry any")
                if member.islnk():
                    target = _inside(member.linkname, f"hard link {member.name} ->")
                    if target not in names:
                        raise BadImage(f"hard link {member.name} points at {member.linkname}, which is not "
                                       "an earlier member of the archive")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadImage(f"it is not a tar archive: {exc}") from None
    if not count:
        raise BadImage("the tarball is empty")
    return "tar"


def _inside(name: str, what: str) -> str:
    """``name`` normalised, or BadImage when it is absolute or climbs out with ``..``."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise BadImage(f"{what} {name} is outside the root filesystem (absolute or with '..'); "
                       "build the tarball from inside the root (tar -C ROOT -c .)")
    return str(path)
