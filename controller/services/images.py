"""The image catalogue: the disk images and root filesystems instances are made from.

An image is immutable and named by the SHA-256 of its bytes. Its metadata (name, version,
kind, format, size, description) is in the store, so every controller of a fleet sees the
same catalogue; its bytes (the *blob*) are a file ``blobs/<sha256>`` under the controller's
``images_dir``. One name holds a version's two forms, a disk for kvm and a root filesystem
tarball for lxc; a name alone means its newest version of the form asked for, ``NAME:VERSION``
one version, and an *alias* is a moveable name for either.

Uploads stream to disk, never whole into memory: ``start_upload`` records what the client
declares (size, SHA-256, name...) and ``receive`` appends the bytes sent from an offset, so
a transfer that breaks resumes where the file ends. The last byte makes the controller
hash the file, check it is an image of its kind (:mod:`controller.services.imageforms`) and
move it into ``blobs/``; a mismatch with what was declared discards the upload. The
catalogue (what the store lists plus uploads under way) never exceeds ``images_quota_bytes``.

Several controllers: the one that imported an image holds its blob. Another one that is
asked for it (a node pulls through the controller it is connected to) fetches it once from
whichever live controller has it, over the controllers' own mutual TLS, verifies it and
keeps it; from then on it serves it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from controller.services import Refused, iso
from controller.services.imageforms import KINDS, BadImage, check
from controller.store.database import StoreError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
UPLOAD_RE = re.compile(r"^u-[0-9a-f]{32}\Z")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,200}\Z")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
CATALOGUE_PREFIX = "catalogue:"  # what the node's image cache pulls from its controller
MAX_DESCRIPTION = 1000


class Blobs:
    """The controller's image files: ``blobs/<sha256>`` and ``uploads/<id>.{json,part}``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.blobs = directory / "blobs"
        self.uploads = directory / "uploads"
        self._fetching: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def fetching(self, sha256: str) -> AsyncIterator[None]:
        """Held while this controller fetches ``sha256`` from another: one fetch however many
        nodes ask for it at once."""
        # Kept once made: one small lock per image the catalogue ever served.
        async with self._fetching.setdefault(sha256, asyncio.Lock()):
            yield

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def prepare(self) -> None:
        """Create the directories (mode 0700: images may hold secrets baked in). Blocking."""
        for directory in (self.directory, self.blobs, self.uploads):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def upload_doc(self, upload_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.uploads / f"{upload_id}.json").read_text())
        except FileNotFoundError:
            return None

    def pending(self) -> list[dict[str, Any]]:
        """Every upload under way on this controller, with the bytes it holds. Blocking."""
        out = []
        for doc_path in sorted(self.uploads.glob("u-*.json")):
            try:
                doc = json.loads(doc_path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            out.append({**doc, "offset": _size(self.uploads / f"{doc['id']}.part")})
        return out

    def drop_upload(self, upload_id: str) -> None:
        for suffix in (".part", ".json"):
            (self.uploads / f"{upload_id}{suffix}").unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ---- names ------------------------------------------------------------------------------


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """An image as the API shows it."""
    return {
        "name": row["name"], "version": row["version"], "kind": row["kind"], "format": row["format"],
        "sha256": row["sha256"], "size_bytes": row["size_bytes"], "description": row["description"],
        "created_at": iso(row["created_at"]),
    }


def _check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Refused(400, f"{what} must be 1-63 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit, "
                           f"got {name!r:.80}")
    return name


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise Refused(400, f"kind must be kvm (a disk image) or lxc (a root filesystem tarball), got {kind!r:.40}")
    return kind


async def resolve(ctl: Any, ref: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The images ``ref`` names (a digest, ``NAME:VERSION``, an alias or a name: its newest
    version), of ``kind`` only when given; 404 when there are none."""
    store = ctl.store
    if kind is not None:
        _check_kind(kind)
    if not REF_RE.match(ref):
        raise Refused(400, f"an image is named NAME, NAME:VERSION, an alias or its sha256, got {ref!r:.100}")
    if ref.startswith(CATALOGUE_PREFIX):
        ref = ref[len(CATALOGUE_PREFIX):]
    if DIGEST_RE.match(ref):
        rows = await store.find_images(sha256=ref)
    else:
        name, _, version = ref.partition(":")
        if not version:
            target = await store.get_image_alias(name)
            if target is not None:
                name, _, version = target.partition(":")
        rows = await store.find_images(name=name, version=version or None)
        if not version and rows:
            newest: dict[str, dict[str, Any]] = {}
            for row in rows:  # by created_at: the newest version that has each form
                newest[row["kind"]] = row
            rows = list(newest.values())
    if kind is not None:
        rows = [row for row in rows if row["kind"] == kind]
    if not rows:
        form = f" with a {kind} form" if kind else ""
        raise Refused(404, f"no image {ref!r:.100}{form} in the catalogue: see `kumoctl images list`")
    return rows


async def for_instance(ctl: Any, kind: str, image: str) -> dict[str, Any]:
    """The catalogue image a new ``kind`` instance asks for by name, alias or digest."""
    if kind not in KINDS:
        raise Refused(400, f"a {kind} instance cannot use catalogue image {image!r:.100}: the catalogue holds "
                           "kvm disks and lxc root filesystems")
    return (await resolve(ctl, image, kind))[0]


# ---- uploads ------------------------------------------------------------------------------


async def start_upload(ctl: Any, declared: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Begin an import (or find the one under way for the same bytes and name): the upload
    with the ``offset`` to send from, and whether it is new."""
    name = _check_name(declared["name"])
    kind = _check_kind(declared["kind"])
    version = declared.get("version") or datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    if not VERSION_RE.match(version):
        raise Refused(400, f"version must be 1-64 of A-Z, a-z, 0-9, '.', '_' and '-', got {version!r:.80}")
    sha256 = str(declared["sha256"]).lower()
    if not DIGEST_RE.match(sha256):
        raise Refused(400, f"sha256 must be 64 hexadecimal digits, got {declared['sha256']!r:.80}")
    size = declared["size_bytes"]
    if size < 1:
        raise Refused(400, f"size_bytes must be positive, got {size}")
    description = declared.get("description") or ""
    if len(description) > MAX_DESCRIPTION or CONTROL_RE.search(description):
        raise Refused(400, f"description must be text of at most {MAX_DESCRIPTION} characters, without control "
                           "characters")
    doc = {"name": name, "version": version, "kind": kind, "sha256": sha256, "size_bytes": size,
           "description": description}
    blobs: Blobs = ctl.blobs
    pending = await asyncio.to_thread(blobs.pending)
    for upload in pending:
        if all(upload[key] == value for key, value in doc.items() if key != "version" or declared.get("version")):
            return upload, False
    for row in await ctl.store.find_images(sha256=sha256):
        raise Refused(409, f"these bytes are already image {row['name']}:{row['version']} ({row['kind']}); "
                           f"give it another name with `kumoctl images alias NEW {row['name']}:{row['version']}`")
    if await ctl.store.find_images(name=name, version=version, kind=kind):
        raise Refused(409, f"image {name}:{version} already has a {kind} form; images are immutable: "
                           "import under a new --version")
    if await ctl.store.get_image_alias(name) is not None:
        raise Refused(409, f"{name} is an alias; choose another name or delete the alias")
    quota = ctl.settings.images_quota_bytes
    if quota is not None:
        used = await ctl.store.images_bytes() + sum(upload["size_bytes"] for upload in pending)
        if used + size > quota:
            raise Refused(413, f"the image ({size} bytes) does not fit the catalogue's quota: {used} of "
                               f"{quota} bytes are used (images_quota_bytes in controller.yaml); "
                               "delete images or raise the quota")
    upload = {"id": "u-" + uuid.uuid4().hex, **doc, "created_at": time.time()}
    await asyncio.to_thread(_write_upload, blobs, upload)
    return {**upload, "offset": 0}, True


def _write_upload(blobs: Blobs, upload: dict[str, Any]) -> None:
    blobs.prepare()
    (blobs.uploads / f"{upload['id']}.part").touch(mode=0o600)
    doc = blobs.uploads / f"{upload['id']}.json"
    doc.write_text(json.dumps(upload))
    doc.chmod(0o600)


async def get_upload(ctl: Any, upload_id: str) -> dict[str, Any]:
    blobs: Blobs = ctl.blobs
    doc = await asyncio.to_thread(blobs.upload_doc, upload_id) if UPLOAD_RE.match(upload_id) else None
    if doc is None:
        raise Refused(404, f"no upload {upload_id!r:.60} on this controller: start the import again")
    return {**doc, "offset": await asyncio.to_thread(_size, blobs.uploads / f"{upload_id}.part")}


async def cancel_upload(ctl: Any, upload_id: str) -> None:
    await get_upload(ctl, upload_id)
    await asyncio.to_thread(ctl.blobs.drop_upload, upload_id)


async def receive(ctl: Any, upload_id: str, offset: int, body: AsyncIterator[bytes]) -> dict[str, Any]:
    """Append ``body`` to the upload at ``offset`` (which must be where it ends); a body that
    breaks (ConnectionError) keeps what arrived. When the last declared byte has arrived, the image is checked and enters the catalogue: its
    record; until then the upload with its new ``offset``."""
    upload = await get_upload(ctl, upload_id)
    if offset != upload["offset"]:
        raise Refused(409, f"upload {upload_id} holds {upload['offset']} bytes: send from offset {upload['offset']}",
                      offset=upload["offset"])
    blobs: Blobs = ctl.blobs
    part = blobs.uploads / f"{upload_id}.part"
    size = upload["size_bytes"]
    out = await asyncio.to_thread(part.open, "ab")
    try:
        try:
            async for chunk in body:
                if offset + len(chunk) > size:
                    await asyncio.to_thread(out.truncate, offset)
                    raise Refused(400, f"the upload is longer than the {size} bytes declared; start again with "
                                       "its real size")
                await asyncio.to_thread(out.write, chunk)
                offset += len(chunk)
        except ConnectionError as exc:
            raise Refused(400, f"the transfer broke after {offset} bytes ({exc}): send the rest from offset "
                               f"{offset}", offset=offset) from None
    finally:
        # What arrived stays (flushed) even when the client went away: the next PUT resumes.
        await asyncio.to_thread(out.close)
    if offset < size:
        return {**upload, "offset": offset}
    return await _finish(ctl, upload, part)


async def _finish(ctl: Any, upload: dict[str, Any], part: Path) -> dict[str, Any]:
    blobs: Blobs = ctl.blobs
    actual = await asyncio.to_thread(_sha256_of, part)
    try:
        if actual != upload["sha256"]:
            raise Refused(400, f"the bytes received hash to {actual}, not the declared {upload['sha256']}: "
                               "the file changed or was damaged on the way; import it again")
        try:
            form = await asyncio.to_thread(check, part, upload["kind"])
        except BadImage as exc:
            raise Refused(422, f"not a {upload['kind']} image: {exc}") from None
        row = {key: upload[key] for key in ("name", "version", "kind", "sha256", "size_bytes", "description")}
        row.update(format=form, created_at=time.time())
        await asyncio.to_thread(_install, part, blobs.path(upload["sha256"]))
        try:
            await ctl.store.add_image(row)
        except StoreError as exc:
            # The same bytes imported under another name a moment ago share the file.
            if not await ctl.store.find_images(sha256=upload["sha256"]):
                await asyncio.to_thread(blobs.path(upload["sha256"]).unlink, True)
            raise Refused(409, str(exc)) from None
        log.info("image %s:%s (%s, %s) imported", row["name"], row["version"], row["kind"], row["sha256"])
        return row
    finally:
        await asyncio.to_thread(blobs.drop_upload, upload["id"])


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _install(source: Path, blob: Path) -> None:
    """Rename a verified file into ``blobs/`` durably, read-only (immutable)."""
    blob.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(source, 0o400)
    with source.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(source, blob)
    dirfd = os.open(blob.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


# ---- the catalogue ---------------------------------------------------------------------


async def delete(ctl: Any, ref: str, kind: str | None) -> list[dict[str, Any]]:
    """Remove the images ``ref`` names (both forms unless ``kind``): 409 with the instances
    that use them. Aliases pointing at them go too. The removed records."""
    rows = await resolve(ctl, ref, kind)
    users = await ctl.store.delete_images([row["sha256"] for row in rows])
    if users:
        raise Refused(409, f"image {ref} is used by instance(s) {', '.join(users)}: delete them first",
                      instances=users)
    for row in rows:
        await asyncio.to_thread(ctl.blobs.path(row["sha256"]).unlink, True)
    return rows


async def set_alias(ctl: Any, alias: str, target: str) -> dict[str, Any]:
    """Point ``alias`` at a name (its newest version) or ``NAME:VERSION``."""
    _check_name(alias, "an alias")
    if not REF_RE.match(target) or DIGEST_RE.match(target) or target.startswith(CATALOGUE_PREFIX):
        raise Refused(400, "an alias points at NAME or NAME:VERSION, not a digest")
    name, _, version = target.partition(":")
    if await ctl.store.find_images(name=alias):
        raise Refused(409, f"{alias} is the name of images; an alias cannot hide it")
    if not await ctl.store.find_images(name=name, version=version or None):
        raise Refused(404, f"no image {target!r:.100} in the catalogue: see `kumoctl images list`")
    await ctl.store.put_image_alias(alias, target)
    return {"alias": alias, "target": target}


async def delete_alias(ctl: Any, alias: str) -> None:
    if not NAME_RE.match(alias) or not await ctl.store.delete_image_alias(alias):
        raise Refused(404, f"no alias {alias!r:.80}: see `kumoctl images list`")


# ---- serving blobs --------------------------------------------------------------------


async def blob(ctl: Any, sha256: str) -> Path:
    """The file of catalogue image ``sha256`` on this controller, fetched from another
    controller first when only that one has it; 404 when it is not in the catalogue."""
    if not DIGEST_RE.match(sha256):
        raise Refused(400, f"an image is named by its 64-hex-digit sha256, got {sha256!r:.80}")
    if not await ctl.store.find_images(sha256=sha256):
        raise Refused(404, f"image {sha256} is not in the catalogue (deleted?)")
    blobs: Blobs = ctl.blobs
    path = blobs.path(sha256)
    if await asyncio.to_thread(path.is_file):
        return path
    async with blobs.fetching(sha256):
        if not await asyncio.to_thread(path.is_file):
            await _fetch_from_peers(ctl, sha256, path)
    return path


async def _fetch_from_peers(ctl: Any, sha256: str, path: Path) -> None:
    errors = []
    for url in (await ctl.controller_urls())[1:]:
        partial = path.with_name(f".{sha256}.{uuid.uuid4().hex[:8]}")
        try:
            async with ctl.peers().get(f"{url}/v1/images/{sha256}/blob") as answer:
                if answer.status != 200:
                    errors.append(f"{url}: HTTP {answer.status}")
                    continue
                await asyncio.to_thread(path.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
                out = await asyncio.to_thread(partial.open, "wb")
                digest = hashlib.sha256()
                try:
                    async for chunk in answer.content.iter_chunked(CHUNK):
                        digest.update(chunk)
                        await asyncio.to_thread(out.write, chunk)
                finally:
                    await asyncio.to_thread(out.close)
            if digest.hexdigest() != sha256:
                errors.append(f"{url}: the bytes hash to {digest.hexdigest()}")
                continue
            await asyncio.to_thread(_install, partial, path)
            log.info("image %s fetched from the controller at %s", sha256, url)
            return
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            errors.append(f"{url}: {exc or type(exc).__name__}")
        finally:
            await asyncio.to_thread(partial.unlink, True)
    raise Refused(503, f"image {sha256} is in the catalogue but no live controller has its file "
                       f"({'; '.join(errors) or 'this is the only controller'}): import it again")


async def local_blob(ctl: Any, sha256: str) -> Path:
    """This controller's own copy of ``sha256`` (for another controller's fetch): 404 when it has none."""
    path = ctl.blobs.path(sha256) if DIGEST_RE.match(sha256) else None
    if path is None or not await asyncio.to_thread(path.is_file):
        raise Refused(404, f"this controller has no file of image {sha256:.80}")
    return path


def prune_blobs(blobs: Blobs, known: set[str], before: float) -> list[str]:
    """Remove blobs of images no longer in the catalogue (deleted through another
    controller) and uploads, both untouched since ``before`` (a blob renamed into place a
    moment ago may be an import whose record is being written). Blocking."""
    removed = []
    if blobs.blobs.is_dir():
        for entry in os.scandir(blobs.blobs):
            if DIGEST_RE.match(entry.name) and entry.name not in known and entry.stat().st_ctime < before:
                Path(entry.path).unlink(missing_ok=True)
                removed.append(entry.name)
    for upload in blobs.pending():
        part = blobs.uploads / f"{upload['id']}.part"
        if max(upload["created_at"], part.stat().st_mtime if part.exists() else 0) < before:
            blobs.drop_upload(upload["id"])
            removed.append(upload["id"])
    return removed


