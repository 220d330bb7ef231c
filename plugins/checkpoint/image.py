"""Checkpoint images on disk: their directories, manifest and checksums, checked before use.

Layout (designed for migration, where the directory is copied to another node and
restored there)::

    <images_dir>/<kind>/<name>/<UTC time>-<random>/   one checkpoint; its name is its id
                                                       (agent.sdk.CHECKPOINT_ID_RE)
        *.img                   CRIU's images (or the files a kind's own save wrote)
        *.log, stats-*          logs and statistics (not checksummed)
        kumo-*                  this plugin's own files (not checksummed):
        kumo-manifest.json      written last: {"format", "name", "kind", "created_at", "kernel",
                                "criu_version", "leave_running", "pid", "pids", "shared_namespaces",
                                "instance", "definition", "state_dir", "open_files",
                                "files": {file: CRC-32}, "size_bytes"}, and after a native
                                save "images": [sha256 of cached images its restore needs]
        kumo-verified.json      this node only: the stat of each file when it was hashed here
        kumo-staged.json        a received image only: where its travelling directory was unpacked
    <images_dir>/<kind>/<name>/latest -> the newest complete checkpoint

A directory without a manifest is a dump that never finished. Before a restore every file
listed is checked against its checksum, by reading it again, unless ``kumo-verified.json``
shows the file untouched (same inode, size, mtime and ctime) since this node hashed it, as
after a local dump; a copied image has no valid stamp and is always hashed.

The checksums are CRC-32: they check for damage (a disk, a truncated or bad copy), not
against an attacker; a migration's stream is sha256-checked end to end, over mutual TLS.
zlib's CRC-32 runs at almost three times sha256's speed here, and is computed while criu
writes (:class:`TailHasher`), so a dump's checksums cost next to nothing after criu exits.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import shutil
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.sdk import CHECKPOINT_ID_RE, TaskError, atomic_write

log = logging.getLogger(__name__)

MANIFEST = "kumo-manifest.json"
STAMP = "kumo-verified.json"
STAGED = "kumo-staged.json"
# 2: the files' checksums are CRC-32 (format 1 had sha256). 3: "shared_namespaces" and
# "definition" say what the restore and the migration of the tree need, whatever its kind.
MANIFEST_FORMAT = 3
CHUNK = 1 << 20  # 1 MiB reads stay in the CPU cache between read and checksum
HASHER_POLL = 0.02  # seconds the hasher waits when it has caught up with criu


def checksummed(name: str) -> bool:
    """Which files of a checkpoint directory the manifest covers: not logs or our own files
    (nor a temporary file of ours, hidden, that a crash left behind)."""
    return not (name.startswith(("kumo-", "stats-", ".")) or name.endswith(".log"))


def new_image(base: Path) -> Path:
    """A new, empty checkpoint directory under ``base``. Its name is the checkpoint's id:
    ids sort by creation time (to the microsecond), which is how :func:`prune` finds the oldest."""
    now = datetime.datetime.now(datetime.UTC)
    image = base / (now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3))
    image.mkdir(parents=True)
    return image


class Checksum:
    """CRC-32 with hashlib's interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def file_checksum(path: Path, checksum: Checksum | None = None, start: int = 0) -> str:
    """The checksum of ``path``, continuing ``checksum`` (of its first ``start`` bytes) when given."""
    checksum = checksum or Checksum()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n := f.readinto(buffer):
            checksum.update(view[:n])
    return checksum.hexdigest()


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class TailHasher:
    """Checksums CRIU's page images while criu is still writing them, on another core.

    criu writes ``pages-*.img`` front to back in one pass (pagemap entries point at
    increasing offsets), so the bytes read so far are final. Memory pages are nearly the
    whole image, so this hides most of the checksumming behind the dump itself.
    """

    def __init__(self, image: Path):
        self.image = image
        self.done: dict[str, tuple[Checksum, int, int]] = {}  # name -> (checksum, bytes read, inode)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="checkpoint-hasher", daemon=True)
        self.buffer = bytearray(CHUNK)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Criu has exited: catch up with what it wrote last. Blocking: call it off the event loop."""
        self.stopping.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            stopping = self.stopping.is_set()
            progressed = False
            for path in self.image.glob("pages-*.img"):
                progressed |= self._advance(path)
            if stopping:
                return  # one last pass after criu exited: everything it wrote is read
            if not progressed:
                self.stopping.wait(HASHER_POLL)

    def _advance(self, path: Path) -> bool:
        view = memoryview(self.buffer)
        try:
            with open(path, "rb", buffering=0) as f:
                ino = os.fstat(f.fileno()).st_ino
                checksum, read, known = self.done.get(path.name, (Checksum(), 0, ino))
                if known != ino:
                    checksum, read = Checksum(), 0
                f.seek(read)
                start = read
                while n := f.readinto(self.buffer):
                    checksum.update(view[:n])
                    read += n
        except OSError:
            return False
        self.done[path.name] = (checksum, read, ino)
        return read > start

    def checksum(self, path: Path) -> str:
        """The checksum of ``path`` once criu has exited, reusing what was read meanwhile."""
        st = path.stat()
        checksum, read, ino = self.done.get(path.name, (Checksum(), 0, st.st_ino))
        if ino != st.st_ino or st.st_size < read:
            checksum, read = Checksum(), 0
        return file_checksum(path, checksum, read)


def finish_manifest(image: Path, hasher: TailHasher | None, manifest: dict[str, Any]) -> tuple[dict[str, str], int]:
    """Checksum what criu (or, with no ``hasher``, a kind's own save) wrote and write the
    stamp, then the manifest (last: it marks the image complete); the files' checksums and
    their total size. Blocking."""
    if hasher is not None:
        hasher.stop()
    files: dict[str, str] = {}
    stamp: dict[str, list[int]] = {}
    size = 0
    for path in sorted(image.iterdir()):
        if path.is_file() and checksummed(path.name):
            files[path.name] = hasher.checksum(path) if hasher is not None else file_checksum(path)
            stamp[path.name] = _stat(path)
            size += stamp[path.name][2]
    manifest.update(files=files, size_bytes=size)
    write_json(image / STAMP, stamp)
    write_json(image / MANIFEST, manifest)
    return files, size


def read_manifest(image: Path) -> dict[str, Any]:
    """The manifest of ``image``; TaskError when it is missing (``image-incomplete``) or not ours."""
    try:
        manifest = json.loads((image / MANIFEST).read_text())
    except FileNotFoundError:
        raise TaskError(f"{image} has no {MANIFEST}: the dump never finished (or this is not a Kumo checkpoint); "
                        "take a new checkpoint", code="image-incomplete") from None
    except (OSError, ValueError) as exc:
        raise TaskError(f"{image / MANIFEST} is unreadable ({exc}): the checkpoint is damaged",
                        code="image-corrupt") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise TaskError(f"{image / MANIFEST} is not a format-{MANIFEST_FORMAT} Kumo manifest: take a new checkpoint",
                        code="image-corrupt")
    return manifest


def _check_subject(image: Path, manifest: Mapping[str, Any], name: str, kind: str) -> None:
    if manifest.get("name") != name or manifest.get("kind") != kind:
        raise TaskError(f"{image} is a checkpoint of {manifest.get('kind')} instance {manifest.get('name')!r}, "
                        f"not of {kind} instance {name!r}", code="image-mismatch")


def verify_image(image: Path, name: str, kind: str) -> dict[str, Any]:
    """Read and check a checkpoint directory; its manifest, or TaskError naming what is wrong. Blocking."""
    if not image.is_dir():
        raise TaskError(f"checkpoint directory {image} does not exist", code="no-image")
    manifest = read_manifest(image)
    _check_subject(image, manifest, name, kind)
    files: dict[str, str] = manifest["files"]
    on_disk = {p.name for p in image.iterdir() if p.is_file() and checksummed(p.name)}
    missing, extra = sorted(set(files) - on_disk), sorted(on_disk - set(files))
    if missing or extra:
        what = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"
        raise TaskError(f"checkpoint {image} is incomplete or altered ({what}): restore refused, nothing was changed",
                        code="image-corrupt")
    try:
        stamp = json.loads((image / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    bad = [fname for fname, expected in files.items()
           if stamp.get(fname) != _stat(image / fname) and file_checksum(image / fname) != expected]
    if bad:
        raise TaskError(f"checkpoint {image} is corrupt: the checksum of {', '.join(sorted(bad))} does not match its "
                        "manifest; restore refused, nothing was changed: take a new checkpoint or copy the image again",
                        code="image-checksum")
    return manifest


def check_received(image: Path, name: str, kind: str, checksums: Mapping[str, str]) -> dict[str, Any]:
    """Check what arrived (``checksums``, computed as it arrived) against its manifest and
    stamp it, so the restore need not read it again; the manifest. Blocking."""
    try:
        manifest = read_manifest(image)
    except TaskError as exc:
        raise TaskError(f"the received checkpoint: {exc}", code="image-corrupt") from exc
    _check_subject(image, manifest, name, kind)
    got = {n: c for n, c in checksums.items() if n != MANIFEST}
    if got != manifest["files"]:
        bad = sorted(n for n in set(got) | set(manifest["files"]) if got.get(n) != manifest["files"].get(n))
        raise TaskError(f"the received checkpoint does not match its manifest ({', '.join(bad)}): the transfer "
                        "damaged it; nothing was restored", code="image-checksum")
    write_json(image / STAMP, {fname: _stat(image / fname) for fname in got})
    return manifest


def staged_directories(base: Path) -> list[Path]:
    """The directories staged for the checkpoints under ``base`` and not yet taken over. Blocking."""
    found = []
    for checkpoint in sorted(base.glob("*/" + STAGED)):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found.append(Path(json.loads(checkpoint.read_text())["directory"]))
    return found


def staged_directory(image: Path) -> Path | None:
    """Where the travelling directory of a received image was unpacked, if it had one and
    it has not been taken over yet."""
    try:
        return Path(json.loads((image / STAGED).read_text())["directory"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TaskError(f"{image / STAGED} is unreadable ({exc}): the checkpoint is damaged", code="image-corrupt") from exc


def publish(base: Path, image: Path) -> None:
    """Point ``latest`` at the new checkpoint."""
    tmp = base / f".latest-{secrets.token_hex(3)}"
    tmp.symlink_to(image.name)
    os.replace(tmp, base / "latest")


def checkpoint_path(base: Path, checkpoint: str) -> Path:
    """The directory of checkpoint ``checkpoint`` (an id, checked: never a path) under ``base``."""
    if not isinstance(checkpoint, str) or not CHECKPOINT_ID_RE.match(checkpoint):
        raise TaskError(f"payload.checkpoint must be a checkpoint id such as 20260101T000000.000000Z-0a1b2c "
                        f"(see checkpoint.list), got {checkpoint!r:.80}", code="bad-request")
    return base / checkpoint


def _complete(base: Path) -> list[str]:
    """The ids of the complete checkpoints under ``base``, oldest first (ids sort by age)."""
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir()
                  if CHECKPOINT_ID_RE.match(p.name) and not p.is_symlink() and (p / MANIFEST).exists())


def _latest(base: Path) -> str | None:
    try:
        return os.readlink(base / "latest")
    except OSError:
        return None


def listing(base: Path) -> list[dict[str, Any]]:
    """The complete checkpoints under ``base``, newest first, as ``checkpoint.list`` shows
    them; ``latest``: the one a restore takes when it names none. Blocking."""
    latest = _latest(base)
    shown = []
    for checkpoint in reversed(_complete(base)):
        try:
            manifest = json.loads((base / checkpoint / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}  # listed all the same, so that it can be removed; a restore names the damage
        if not isinstance(manifest, dict):
            manifest = {}
        shown.append({"id": checkpoint, "created_at": manifest.get("created_at"),
                      "size_bytes": manifest.get("size_bytes"), "kind": manifest.get("kind"),
                      "leave_running": manifest.get("leave_running"), "latest": checkpoint == latest})
    return shown


def _remove(base: Path, checkpoint: str) -> None:
    """Remove one checkpoint, with the directory a migration staged for it if it was never taken over."""
    staged = staged_directory(base / checkpoint) if (base / checkpoint / STAGED).exists() else None
    if staged is not None:
        shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(base / checkpoint, ignore_errors=True)


def _repoint_latest(base: Path) -> None:
    """The latest checkpoint was removed: ``latest`` names the newest left, or goes with the last."""
    left = _complete(base)
    if left:
        publish(base, base / left[-1])
    else:
        (base / "latest").unlink(missing_ok=True)


def remove(base: Path, checkpoint: str) -> str | None:
    """Remove checkpoint ``checkpoint`` (an id); the latest one afterwards. Blocking."""
    path = checkpoint_path(base, checkpoint)
    if checkpoint not in _complete(base):
        raise TaskError(f"no checkpoint {checkpoint} under {base.parent.name}/{base.name} on this node "
                        "(see checkpoint.list)", code="not-found")
    _remove(base, path.name)
    if _latest(base) == checkpoint:
        _repoint_latest(base)
    return _latest(base)


def prune(base: Path, keep: int) -> list[str]:
    """Keep ``keep`` complete checkpoints (``latest`` always among them, then the newest)
    and remove the others; the ids removed. Blocking."""
    latest = _latest(base)
    complete = _complete(base)
    order = [c for c in complete if c == latest] + [c for c in reversed(complete) if c != latest]
    for old in order[keep:]:
        _remove(base, old)
    return sorted(order[keep:])


def discard_incoming(images: Path) -> None:
    """Remove images half-received by an agent that stopped mid-transfer: the controller has
    rolled that migration back, and nothing else would ever finish or remove them."""
    for incoming in images.glob("*/*/.incoming-*"):
        log.warning("checkpoint: removing %s, left by a transfer that did not finish", incoming)
        shutil.rmtree(incoming, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` whole (never half-written), without fsync: the image it describes is
    not fsynced either (criu does not), and on ext4 an fsync here would wait for the
    writeback of criu's pages."""
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True), mode=0o644, durable=False)
