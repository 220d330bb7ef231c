"""Files a plugin keeps: written whole or not at all, and read from the end."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

# The errors that mean "no room": a full filesystem or a user's quota.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write found no room on the filesystem holding ``filename``; nothing half-written was kept.

    Its message names the file and what to do, for a task's error or a log line: the writer
    catches it where a traceback would say less (the agent fails the task ``no-space``).
    """

    def __init__(self, path: Path, cause: OSError):
        super().__init__(
            cause.errno,
            f"cannot write {path}: {cause.strerror} (no room left on the filesystem holding {path.parent}): "
            "free space there and try again; what was there before is unchanged",
            str(path),
        )

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def room_for(path: Path) -> Iterator[None]:
    """Raise :class:`DiskFull` naming ``path`` for a write inside that found no room."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise DiskFull(path, exc) from exc
        raise


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new, never a mix.

    ``durable``: the data is fsynced before the rename and the directory after it, so the
    new content survives a power cut once this returns. Without it a crash of the agent
    still leaves a whole file, but a power cut may leave the old one; pass False where the
    file describes other data that is not fsynced either (an fsync on ext4 can wait for
    the writeback of everything written before). Blocking: call it through
    ``asyncio.to_thread``. A full filesystem raises :class:`DiskFull` and leaves ``path`` as
    it was.
    """
    raw = data.encode() if isinstance(data, str) else data
    # Unique per writer: two threads replacing one path must not share a temporary file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with room_for(path):
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


def append_line(path: Path, line: str, mode: int = 0o600) -> None:
    """Append ``line`` to ``path`` and fsync it: the whole line or, on any failure, nothing.

    A log of lines (a journal, an outbox) must never keep a torn line: the next append would
    run on from it and both would be lost. A full filesystem raises :class:`DiskFull`.
    Blocking: call it through ``asyncio.to_thread``.
    """
    with room_for(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            size = os.fstat(fd).st_size
            try:
                data = line.encode()
                while data:  # a short write on a nearly full disk is followed by ENOSPC
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of a file as text (bad UTF-8 replaced); "" when it does not exist."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - size))
            return f.read(size).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
