"""The node's image cache: the disk images and rootfs tarballs instances are made from.

The agent keeps one per node (``image_cache`` in agent.yaml) and hands it to every plugin
as ``context.images``, so an image two hundred instances use, of any kind, is fetched and
stored once. Images are named by their SHA-256: a name is a promise about the content, so
a hit needs no rehash and a verified copy can never be confused with another image of the
same file name. Downloads are the slow, fragile part, so a transfer that breaks leaves
``<sha256>.partial`` behind and the next attempt continues it with an HTTP Range request
instead of starting over. The cache is bounded: past ``max_bytes`` the least recently used
images no instance still needs are removed. What is needed is a node-wide question (a
qcow2 overlay's backing file is needed for the overlay's whole life, a container's
tarball only while it is unpacked), so each plugin whose instances keep using an image
answers for its own with :meth:`ImageCache.add_in_use`.

An image from the controller's catalogue (``image: catalogue:NAME:VERSION`` with its
``image_sha256``, as the controller writes it into a create payload) is pulled from the
controller the agent is connected to, over the agent's own mutual TLS
(:meth:`ImageCache.pull_from`), with the same resume. A cached image is hashed again before
each use: a copy changed on the node's disk is removed and fetched again rather than handed to
an instance. While pulls run, :attr:`ImageCache.pulling` says how far each has come (the
agent's heartbeats carry it, so ``kumoctl`` can show it).

Every file operation runs in a worker thread; aiohttp is imported only when a download
starts, since most agents never download an image.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

from agent.sdk.types import TaskError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A partial file written to within this long may belong to a transfer still running
# (in this agent or one that is restarting): removing it would waste or corrupt it.
PARTIAL_GRACE = 3600.0
# No total timeout: a multi-gigabyte image may take hours over a slow link. A stalled one
# is cut by the read timeout instead, and the next attempt resumes where it stopped.
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 60.0

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_PARTIAL_SUFFIX = ".partial"
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-")
CATALOGUE_PREFIX = "catalogue:"
# (the controller's URL, this node's API path under it, TLS as this node): read at each pull,
# since the agent moves to another controller when its own fails.
ControllerSource = Callable[[], tuple[str, str, ssl.SSLContext]]


class ImageCache:
    """Images instances are made from, kept once per node by content (sha256)."""

    def __init__(self, directory: Path, max_bytes: int | None = None, ca_file: Path | None = None):
        # Absolute, because callers write these paths into things that outlive the
        # agent's working directory (qcow2 backing file names, container configs).
        self.directory = Path(directory).absolute()
        self.max_bytes = max_bytes
        self.ca_file = ca_file
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        # Digests a get() is working on; evict() runs in a thread, hence the lock.
        self._busy: collections.Counter[str] = collections.Counter()
        self._busy_lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._in_use: list[Callable[[], set[Path]]] = []
        self._controller: ControllerSource | None = None
        # digest -> [bytes held, bytes in all] of each pull running now
        self.pulling: dict[str, list[int]] = {}

    def add_in_use(self, in_use: Callable[[], set[Path]]) -> None:
        """Have eviction keep what ``in_use()`` returns: the cached images a plugin's
        instances still need. Called on the event loop, before each eviction."""
        self._in_use.append(in_use)

    def pull_from(self, controller: ControllerSource) -> None:
        """Where catalogue images come from: the agent's controller session."""
        self._controller = controller

    # ---- fetching --------------------------------------------------------------------

    async def get(self, source: str, sha256: str | None) -> Path:
        """The local path of the image ``source`` (an absolute path on the node, an https://
        URL, or ``catalogue:NAME:VERSION`` of the controller's catalogue), verified against
        ``sha256`` when one is given (an URL or a catalogue image needs one).

        Adding an image evicts others past ``max_bytes``, never one an ``in_use`` function
        returns. Raises :class:`TaskError` with code ``bad-request``, ``image-missing``,
        ``image-download`` or ``image-checksum``.
        """
        if sha256 is not None:
            sha256 = valid_sha256(sha256)
        if source.startswith(("https://", CATALOGUE_PREFIX)):
            if sha256 is None:
                what = "an image URL" if source.startswith("https://") else f"catalogue image {source}"
                raise TaskError(f"{what} needs image_sha256 to verify the download", code="bad-request")
            async with self._hold(sha256):
                cached = self.directory / sha256
                if await self._verified_hit(cached, sha256):
                    return cached
                if source.startswith(CATALOGUE_PREFIX):
                    await self._pull(source, sha256)
                else:
                    await self._download(source, sha256, source, None)
                await self._evict_after_adding()
                return cached
        if not source.startswith("/"):
            raise TaskError(
                f"image must be an absolute path on the node, an https:// URL or a catalogue image, got {source!r}",
                code="bad-request",
            )
        path = Path(source)
        if not await asyncio.to_thread(path.is_file):
            raise TaskError(
                f"image {source} does not exist on this node: copy it there or give an https URL",
                code="image-missing",
            )
        if sha256 is None:
            return path
        async with self._hold(sha256):
            cached = self.directory / sha256
            if await self._verified_hit(cached, sha256):
                return cached
            await asyncio.to_thread(self._copy_in, path, sha256)
            await self._evict_after_adding()
            return cached

    async def cached(self, sha256: str) -> Path | None:
        """The image whose SHA-256 is ``sha256`` when the cache holds it (now its most
        recently used), else None. For an instance that arrives from another node naming its
        image by digest: the path or URL it was made from may not be reachable here."""
        path = self.directory / valid_sha256(sha256)
        return path if await asyncio.to_thread(_touch, path) else None

    async def _verified_hit(self, cached: Path, sha256: str) -> bool:
        """Whether the cache holds ``sha256`` intact (now its most recently used). A copy whose
        bytes no longer hash to its name (changed on disk) is removed, to be fetched again."""
        if not await asyncio.to_thread(_touch, cached):
            return False
        actual = await asyncio.to_thread(_hash_file, cached)
        if actual == sha256:
            return True
        log.warning("cached image %s hashes to %s: it was changed on disk; fetching it again", sha256, actual)
        await asyncio.to_thread(cached.unlink, True)
        return False

    @contextlib.asynccontextmanager
    async def _hold(self, sha256: str) -> AsyncIterator[None]:
        """Serialise work on one digest in this process, and shield it from eviction meanwhile."""
        lock, holders = self._locks.setdefault(sha256, (asyncio.Lock(), [0]))
        holders[0] += 1
        with self._busy_lock:
            self._busy[sha256] += 1
        try:
            async with lock:
                yield
        finally:
            with self._busy_lock:
                self._busy[sha256] -= 1
                if self._busy[sha256] <= 0:
                    del self._busy[sha256]
            holders[0] -= 1
            if holders[0] == 0:
                del self._locks[sha256]

    async def _evict_after_adding(self) -> None:
        if self.max_bytes is None:
            return
        # in_use functions read their plugin's state: call them on the event loop, not in the thread.
        needed = set().union(*(in_use() for in_use in self._in_use))
        try:
            removed = await asyncio.to_thread(self.evict, needed)
        except OSError as exc:
            # The image is in place; a full cache is a problem for later, not this task's.
            log.warning("could not evict images from %s: %s", self.directory, exc)
            return
        for path in removed:
            log.info("evicted image %s from the cache", path.name)

    def _copy_in(self, source: Path, sha256: str) -> None:
        """Copy a local image into the cache, hashing on the way. Blocking."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f"{sha256}{_PARTIAL_SUFFIX}"
        digest = hashlib.sha256()
        try:
            with source.open("rb") as src, _open_partial(partial) as dst:
                dst.truncate(0)
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            _check_digest(digest.hexdigest(), sha256, str(source))
            _install(partial, self.directory / sha256)
        except BaseException:
            # Unlike a download, a local copy is cheap to redo: leave nothing half-made.
            partial.unlink(missing_ok=True)
            raise

    async def _pull(self, source: str, sha256: str) -> None:
        """Fetch a catalogue image from the controller, as this node."""
        if self._controller is None:
            raise TaskError(f"image {source} is in the controller's catalogue, and this agent has no controller "
                            "session to pull it through", code="image-download")
        base, node_path, tls = self._controller()
        await self._download(f"{base}{node_path}/images/{sha256}", sha256, source, tls)

    async def _download(self, url: str, sha256: str, source: str, tls: ssl.SSLContext | None) -> None:
        """Download ``url`` into the cache as ``sha256``, continuing a partial transfer;
        ``tls`` None: the system's CAs or ``ca_file``. Messages name ``source``."""
        partial = self.directory / f"{sha256}{_PARTIAL_SUFFIX}"
        if tls is None:
            # Always a context of our own: aiohttp 3.8 (Debian 12) reads ssl=True as "do not verify".
            try:
                tls = await asyncio.to_thread(
                    ssl.create_default_context, cafile=str(self.ca_file) if self.ca_file is not None else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise TaskError(f"could not download {source}: the CA file {self.ca_file} is unusable: {exc}",
                                code="image-download") from exc
        try:
            await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
            out = await asyncio.to_thread(_open_partial, partial)
        except OSError as exc:
            raise TaskError(f"could not download {source}: {exc}", code="image-download") from exc
        progress = self.pulling.setdefault(sha256, [0, 0])
        try:
            offset, digest = await asyncio.to_thread(_hash_prefix, out)
            # A transfer that finished but was not renamed (the agent stopped in between)
            # needs no request at all.
            if not (offset and digest.hexdigest() == sha256):
                digest = await _fetch(url, source, tls, out, offset, digest, progress)
            await asyncio.to_thread(_sync, out)
        finally:
            self.pulling.pop(sha256, None)
            await asyncio.to_thread(out.close)
        try:
            _check_digest(digest.hexdigest(), sha256, source)
        except TaskError:
            await asyncio.to_thread(partial.unlink, True)
            raise
        await asyncio.to_thread(_install, partial, self.directory / sha256)

    # ---- bookkeeping -----------------------------------------------------------------

    def evict(self, in_use: set[Path]) -> list[Path]:
        """Remove least recently used images until the cache holds at most ``max_bytes``.

        Never removes an image in ``in_use``, one a get() of this cache is working on, or
        a ``.partial`` written to within the last hour; abandoned partials go first.
        Returns the removed paths. Blocking: call it through ``asyncio.to_thread``.
        """
        if self.max_bytes is None:
            return []
        with self._evict_lock:
            with self._busy_lock:
                busy = set(self._busy)
            keep = {_real(p) for p in in_use}
            now = time.time()
            total = 0
            stale_partials: list[tuple[float, int, Path]] = []
            images: list[tuple[float, int, Path]] = []
            for entry, st in _entries(self.directory):
                total += st.st_size
                digest, _, suffix = entry.name.partition(".")
                if digest in busy:
                    continue
                if suffix:
                    if now - st.st_mtime > PARTIAL_GRACE:
                        stale_partials.append((st.st_mtime, st.st_size, Path(entry.path)))
                elif _real(Path(entry.path)) not in keep:
                    images.append((st.st_mtime, st.st_size, Path(entry.path)))
            removed: list[Path] = []
            for _, size, path in sorted(stale_partials) + sorted(images):
                if total <= self.max_bytes:
                    break
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass  # someone else removed it; it no longer counts either way
                total -= size
                removed.append(path)
            return removed

    def held(self) -> list[dict]:
        """The complete images in the cache: ``[{"sha256", "size_bytes"}]``, by digest.

        Blocking (one directory listing): call it through ``asyncio.to_thread``.
        """
        return sorted(
            ({"sha256": entry.name, "size_bytes": st.st_size}
             for entry, st in _entries(self.directory) if "." not in entry.name),
            key=lambda image: image["sha256"],
        )


# ---- helpers (blocking unless async) -------------------------------------------------


def valid_sha256(sha256: str) -> str:
    """``sha256`` in lower case, or ``TaskError(code="bad-request")`` unless it is 64 hex digits.

    A create spec checks its ``image_sha256`` with it before any work; the cache checks again
    because the digest becomes a file name, and anything but hex could escape its directory.
    """
    if not isinstance(sha256, str) or not _DIGEST_RE.fullmatch(sha256.lower()):
        raise TaskError(f"image_sha256 must be 64 hexadecimal digits, got {sha256!r}", code="bad-request")
    return sha256.lower()


def _check_digest(actual: str, expected: str, source: str) -> None:
    if actual != expected:
        raise TaskError(
            f"image {source} has SHA-256 {actual}, not the expected {expected}: "
            "check the image_sha256 you sent and the image itself",
            code="image-checksum",
        )


def _entries(directory: Path) -> list[tuple[os.DirEntry[str], os.stat_result]]:
    """The cache's images and partials with their stat; other files are not the cache's."""
    found = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                digest, dot, suffix = entry.name.partition(".")
                if not _DIGEST_RE.fullmatch(digest) or (dot and "." + suffix != _PARTIAL_SUFFIX):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        found.append((entry, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return []
    return found


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _touch(path: Path) -> bool:
    """Mark a cached image as just used (eviction goes by mtime); False when it is not there."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _open_partial(path: Path) -> IO[bytes]:
    # No O_TRUNC: a partial left by a broken transfer is continued, not thrown away.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "r+b")


def _hash_prefix(f: IO[bytes]) -> tuple[int, Any]:
    """The length and running SHA-256 of what a partial already holds."""
    digest = hashlib.sha256()
    size = 0
    f.seek(0)
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest


def _hash_file(path: Path) -> str | None:
    """The SHA-256 of a file's bytes; None when it is gone."""
    try:
        with path.open("rb") as f:
            return _hash_prefix(f)[1].hexdigest()
    except FileNotFoundError:
        return None


def _seek(f: IO[bytes], offset: int) -> None:
    f.seek(offset)
    f.truncate()


def _append(f: IO[bytes], digest: Any, chunk: bytes) -> None:
    f.write(chunk)
    digest.update(chunk)


def _sync(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _install(partial: Path, cached: Path) -> None:
    """Rename a verified partial into place, durably: a hit is never rehashed, so a name
    must not survive a power cut pointing at half a file."""
    os.chmod(partial, 0o644)  # the umask may have narrowed it; qemu and containers read it
    os.replace(partial, cached)
    dirfd = os.open(cached.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    os.utime(cached)


async def _fetch(url: str, source: str, tls: ssl.SSLContext, out: IO[bytes], offset: int, digest: Any,
                 progress: list[int]) -> Any:
    """Write ``url`` into ``out`` from ``offset`` on (whose first ``offset`` bytes hash to
    ``digest``), asking for the rest only when there is a prefix; the final digest.
    ``progress`` is kept at [bytes held, bytes in all] as they arrive."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                # identity: Range offsets must count the bytes we store, not gzip's.
                headers = {"Accept-Encoding": "identity"}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                async with session.get(url, ssl=tls, headers=headers) as response:
                    status = response.status
                    start = _range_start(response.headers.get("Content-Range"))
                    if offset and (status == 416 or (status == 206 and start != offset)):
                        # What we hold is no prefix the server will continue (the file
                        # changed, or it was complete but wrong): start over.
                        offset, digest = 0, hashlib.sha256()
                        continue
                    if status == 200:
                        # A server without Range support sends the whole file again.
                        offset, digest = 0, hashlib.sha256()
                    elif not (status == 206 and offset):
                        raise TaskError(f"could not download {source}: HTTP {status} {response.reason or ''}".rstrip()
                                        + _error_of(await response.read()), code="image-download")
                    await asyncio.to_thread(_seek, out, offset)
                    progress[:] = [offset, offset + (response.content_length or 0)]
                    async for chunk in response.content.iter_chunked(CHUNK):
                        await asyncio.to_thread(_append, out, digest, chunk)
                        progress[0] += len(chunk)
                    return digest
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        # The partial stays: the next get() continues from where this one stopped.
        raise TaskError(f"could not download {source}: {exc or type(exc).__name__}", code="image-download") from exc


def _error_of(body: bytes) -> str:
    """The controller's ``{"error": sentence}`` of a refused pull, as ``": sentence"``."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {error}" if isinstance(error, str) else ""


def _range_start(content_range: str | None) -> int | None:
    match = _CONTENT_RANGE_RE.match(content_range or "")
    return int(match.group(1)) if match else None
