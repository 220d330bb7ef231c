"""Writing into a container's root filesystem from the host, and reading its console log.

- Paths in a root filesystem are opened one component at a time without following
  symlinks, so an image cannot point a host-side write (or a console read) outside its root.
- Busybox containers get an inittab without getty or console entries (CRIU cannot take a
  terminal along); their boot output goes to ``/var/log/console.log`` inside the root
  filesystem, which is what ``lxc.console`` returns.
- The first-boot seed (a directory from ``kumo_instance_seed``) is copied to
  ``/var/lib/cloud/seed/nocloud/``.
- An unprivileged container's files must belong to its mapped ids: a tarball's owners are
  shifted into the container's range after extraction (a template shifts its own).

Every function here blocks: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from agent.sdk import TaskError, run_command_sync

from .spec import NetworkSpec

CONSOLE_LOG = "var/log/console.log"
SEED_DIR = "var/lib/cloud/seed/nocloud"
Owner = tuple[int, int]


def write_busybox_boot(rootfs: Path, name: str, network: NetworkSpec, owner: Owner) -> None:
    """Busybox init without terminals: rcS logs the boot to the console log."""
    write_in_root(rootfs, "etc/inittab", "::sysinit:/etc/init.d/rcS\n", 0o644, owner)
    write_in_root(rootfs, "etc/init.d/rcS", busybox_rcs(name, network), 0o755, owner)
    write_in_root(rootfs, CONSOLE_LOG, "", 0o640, owner)


def busybox_rcs(name: str, network: NetworkSpec) -> str:
    lines = [
        "#!/bin/sh",
        "# Written by Kumo: boot output goes to /var/log/console.log (lxc.console returns it).",
        "exec >>/var/log/console.log 2>&1",
        "/bin/mount -a",
    ]
    # The template's rcS always ran udhcpc, whose deconfig step flushes a static address.
    if network.mode == "veth" and network.dhcp:
        lines.append("/bin/udhcpc -b -t 5 -i eth0")
    lines.append(f"echo 'kumo: container {name} booted'")
    return "\n".join(lines) + "\n"


def copy_seed(rootfs: Path, seed: Path, owner: Owner) -> None:
    for path in sorted(seed.rglob("*")):
        if path.is_file():
            rel = f"{SEED_DIR}/{path.relative_to(seed).as_posix()}"
            write_in_root(rootfs, rel, path.read_text(), 0o600, owner)


def extract_tarball(image: Path, rootfs: Path, shown: str) -> None:
    """Unpack a root filesystem tarball with its numeric owners and modes; ``shown`` names it."""
    result = run_command_sync("tar", "--extract", "--numeric-owner", "--preserve-permissions",
                              "--file", str(image), "--directory", str(rootfs))
    if result.returncode != 0:
        raise TaskError(f"image {shown} is not a root filesystem tarball tar can extract: {result.error}",
                        code="image-invalid")
    if not any(rootfs.iterdir()):
        raise TaskError(f"image {shown} is an empty tarball", code="image-invalid")


def shift_ownership(root: Path, start: int, size: int) -> None:
    """Map an extracted tree's ids into the container's range (chown drops setuid: restore modes)."""
    # Each inode once: a directory is shifted as its parent's entry, never again as a dirpath,
    # and a file with several hardlinks under its first name only.
    entries = (os.path.join(dirpath, n) for dirpath, dirnames, filenames in os.walk(root)
               for n in dirnames + filenames)
    shifted: set[tuple[int, int]] = set()
    for entry in [str(root), *entries]:
        st = os.lstat(entry)
        if (st.st_dev, st.st_ino) in shifted:
            continue
        shifted.add((st.st_dev, st.st_ino))
        if st.st_uid >= size or st.st_gid >= size:
            raise TaskError(f"{entry} is owned by id {max(st.st_uid, st.st_gid)}, outside the container's "
                            f"{size} ids", code="image-invalid")
        os.chown(entry, start + st.st_uid, start + st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(entry, stat.S_IMODE(st.st_mode))


def write_in_root(root: Path, rel: str, text: str, mode: int, owner: Owner) -> None:
    """Replace ``root/rel`` with ``text``, creating missing directories, owned by ``owner``."""
    *dirs, leaf = rel.split("/")
    dfd = _open_dir_in_root(root, dirs, create=True, owner=owner)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leaf, dir_fd=dfd)
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
    finally:
        os.close(dfd)


def tail_in_root(root: Path, rel: str, size: int) -> str:
    """The last ``size`` bytes of the regular file ``root/rel``; "" when there is none."""
    *dirs, leaf = rel.split("/")
    try:
        dfd = _open_dir_in_root(root, dirs, create=False, owner=(0, 0))
    except (FileNotFoundError, TaskError):
        return ""
    try:
        # O_NONBLOCK: a FIFO planted at the log's path must not hang the read.
        fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return ""
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return ""
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace")


def _open_dir_in_root(root: Path, parts: list[str], create: bool, owner: Owner) -> int:
    """An fd of ``root/parts...`` reached without following any symlink inside the root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise TaskError(f"unsafe path component {part!r} in a root filesystem path", code="bad-request")
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, FileNotFoundError):
            raise
        raise TaskError(f"{root}/{'/'.join(parts)} is not a plain directory in the root filesystem "
                        f"(a symlink or a file): {exc.strerror}", code="failed") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd
