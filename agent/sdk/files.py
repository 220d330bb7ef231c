"""Files a plugin keeps: written whole or not at all, and read from the end."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new, never a mix.

    ``durable``: the data is fsynced before the rename and the directory after it, so the
    new content survives a power cut once this returns. Without it a crash of the agent
    still leaves a whole file, but a power cut may leave the old one; pass False where the
    file describes other data that is not fsynced either (an fsync on ext4 can wait for
    the writeback of everything written before). Blocking: call it through
    ``asyncio.to_thread``.
    """
    raw = data.encode() if isinstance(data, str) else data
    # Unique per writer: two threads replacing one path must not share a temporary file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of a file as text (bad UTF-8 replaced); "" when it does not exist."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - size))
            return f.read(size).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
