"""The migration stream's format: a tar of the checkpoint, written and unpacked member by member.

Members, in order:

- ``image/kumo-manifest.json``, then, when the instance takes a directory along, that
  directory's definition (``instance/<definition>``, a container's lxc config): the
  destination checks it before a single memory page is sent, and refuses at once when it
  cannot run the instance;
- ``image/<file>`` for every file the manifest covers;
- each regular file the process tree had open (only a tree in the agent's mount namespace
  has them listed). Those under the source agent's state directory (a console log) are the
  instance's own: they travel as ``state/<path in the state directory>``, land in the
  destination's state directory, and CRIU restores the process with them in place of the
  originals (``--inherit-fd``), so two agents with different state directories (two on one
  machine) never write into each other's. Any other travels as ``files/<path>`` and must be
  at the same path and identical on the destination, or missing there and inside its
  state directory;
- the rest of the travelling directory, ``instance/...``, top down;
- ``cache/<sha256>`` for each image of the node's image cache that a native save said its
  restore needs (a VM's base image) and the destination does not hold: the destination
  checks its SHA-256 as it arrives and adds it to its own cache.

Every header is built before the first byte is sent, so the size is known for the
progress display and the stream never sits whole in memory or on disk. Ownership is
numeric (an unprivileged container's shifted ids); hardlinks, symlinks, device nodes and
FIFOs are kept, and extended attributes travel as PAX ``SCHILY.xattr.*`` records (file
capabilities included). The receiver unpacks it itself, never following a symlink or
writing outside the directory the instance's kind gave it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from agent.sdk import StagedDirectory, TaskError
from plugins.checkpoint.image import (
    CHUNK,
    MANIFEST,
    Checksum,
    checksummed,
    file_checksum,
    read_manifest,
)

log = logging.getLogger(__name__)

TAR_BLOCK = 512
MAX_DEFINITION_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20  # one member's extended header: its xattrs and long names
XATTR = "SCHILY.xattr."
# Character devices (major, minor) any container may have: null, zero, full, random,
# urandom, tty, console, ptmx. A migrated directory keeps no other device node.
SAFE_DEVICES = frozenset({(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)})
NOBODY = 65534  # what an id a user namespace does not map shows as inside it
CAPABILITY = "security.capability"
IMAGE, FILES, STATE, INSTANCE, CACHE = "image", "files", "state", "instance", "cache"
CACHED = "kumo-cache-"  # an image for the cache, as it lies in the received checkpoint
DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
# A checkpoint directory's name, and the name of a file in it.
IMAGE_NAME_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,100}\Z")

# What the unpacking thread calls when the travelling directory's definition arrives:
# (its name, its bytes) -> the empty directory to unpack the instance's directory into.
Stage = Callable[[str, bytes], StagedDirectory]


class Member(NamedTuple):
    header: bytes
    path: Path
    size: int  # bytes of content after the header (0 for directories, links and devices)


def padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def stream_size(members: list[Member]) -> int:
    """The exact length of the stream :func:`write_tar` makes of ``members``."""
    return sum(len(m.header) + padded(m.size) for m in members) + 2 * TAR_BLOCK


# -- sending -------------------------------------------------------------------------


def image_members(image: Path, manifest: Mapping[str, Any]) -> list[Member]:
    """The checkpoint's files and the files the tree had open; the manifest first. Blocking."""
    entries = [(f"{IMAGE}/{n}", image / n) for n in [MANIFEST, *sorted(manifest["files"])]]
    entries += [(carried_name(path, manifest), Path(path)) for path in manifest.get("open_files") or ()]
    members = []
    now = int(time.time())
    for arcname, path in entries:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise TaskError(f"{path} cannot be read for the migration: {exc.strerror}", code="missing-files") from exc
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = size, 0o600, now
        members.append(Member(info.tobuf(format=tarfile.PAX_FORMAT), path, size))
    return members


def cache_members(cache: Path, digests: list[str]) -> list[Member]:
    """The images of the node's image cache ``cache`` named by ``digests``. Blocking."""
    members = []
    now = int(time.time())
    for digest in digests:
        path = cache / digest
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise TaskError(f"image {digest}, which the instance's restore needs, is not in this node's image cache "
                            f"({exc.strerror}): it cannot travel", code="missing-files") from exc
        info = tarfile.TarInfo(f"{CACHE}/{digest}")
        info.size, info.mode, info.mtime = size, 0o600, now
        members.append(Member(info.tobuf(format=tarfile.PAX_FORMAT), path, size))
    return members


def directory_members(directory: Path, definition: str) -> list[Member]:
    """Everything in the travelling ``directory`` as it is, ``instance/<definition>`` first. Blocking."""
    if not (directory / definition).is_file():
        raise TaskError(f"{directory} holds no {definition}: the instance to migrate is not there", code="missing-files")
    paths = [directory / definition, directory]
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        paths += [Path(dirpath, n) for n in sorted(dirnames + filenames) if Path(dirpath, n) != directory / definition]
    members = []
    first_of: dict[tuple[int, int], str] = {}  # (device, inode) -> arcname, for hardlinks
    for path in paths:
        arcname = INSTANCE + ("/" + path.relative_to(directory).as_posix() if path != directory else "")
        try:
            info = _tarinfo(path, arcname, first_of)
        except OSError as exc:
            raise TaskError(f"{path} cannot be read for the migration: {exc.strerror}", code="missing-files") from exc
        if info is not None:
            members.append(Member(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), path, info.size))
    return members


def _tarinfo(path: Path, arcname: str, first_of: dict[tuple[int, int], str]) -> tarfile.TarInfo | None:
    """The header of one file as it is, or None for a socket (whoever bound it binds it again)."""
    st = os.lstat(path)
    info = tarfile.TarInfo(arcname)
    info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime
    info.uname = info.gname = ""  # ids are numeric: names differ between hosts, and shifted ids have none
    if stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in first_of:
            info.type, info.linkname = tarfile.LNKTYPE, first_of[key]
        else:
            first_of[key] = arcname
            info.size = st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        return None
    # BINARY: xattr values (security.capability) and file names need not be UTF-8.
    info.pax_headers = {"hdrcharset": "BINARY"}
    for attr in os.listxattr(path, follow_symlinks=False):
        value = os.getxattr(path, attr, follow_symlinks=False)
        info.pax_headers[XATTR + attr] = value.decode("utf-8", "surrogateescape")
    return info


def write_tar(members: list[Member], emit: Callable[[memoryview], None]) -> None:
    """Write the tar stream of ``members`` through ``emit``, CHUNK bytes at a time (the last
    piece shorter). The files are read straight into the one buffer every piece is a view
    of: ``emit`` must be done with a piece when it returns. Blocking."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    fill = 0

    def put(data: bytes) -> None:  # headers and padding: small
        nonlocal fill
        while data:
            n = min(len(data), CHUNK - fill)
            view[fill:fill + n] = data[:n]
            fill, data = fill + n, data[n:]
            if fill == CHUNK:
                emit(view)
                fill = 0

    for header, path, size in members:
        put(header)
        if not size:
            continue
        with open(path, "rb", buffering=0) as f:
            left = size
            while left:
                n = f.readinto(view[fill:fill + min(CHUNK - fill, left)])
                if not n:
                    raise TaskError(f"{path} shrank while it was being sent: the checkpoint changed underneath",
                                    code="image-changed")
                fill, left = fill + n, left - n
                if fill == CHUNK:
                    emit(view)
                    fill = 0
        put(b"\0" * (padded(size) - size))
    put(b"\0" * (2 * TAR_BLOCK))
    if fill:
        emit(view[:fill])


def carried_name(path: str, manifest: Mapping[str, Any]) -> str:
    """The stream name of an open file: relative to the agent's state directory when inside it."""
    state = manifest.get("state_dir")
    if state and Path(path).is_relative_to(state):
        return f"{STATE}/{Path(path).relative_to(state)}"
    return f"{FILES}{path}"


def local_path(path: str, manifest: Mapping[str, Any], own_state: Path) -> Path:
    """Where an open file of the checkpointed tree is on this node (see :func:`carried_name`)."""
    state = manifest.get("state_dir")
    if state and Path(path).is_relative_to(state):
        return own_state / Path(path).relative_to(state)
    return Path(path)


# -- receiving -----------------------------------------------------------------------


def unpack(body: BinaryIO, incoming: Path, own_root: Path, stage: Stage, name: str,
           placed: list[Path]) -> dict[str, Any]:
    """Write a migration stream into ``incoming`` (open files where they belong, the travelling
    directory where ``stage`` says); checksum the image's files as they arrive. Blocking.

    The source may be compromised, so nothing it sends lands outside this instance's own
    places: ``incoming``, the staged directory, and the files it held open under the agent's
    state in a plugin's directory for this very instance (``plugins/<plugin>/instances/<name>/``),
    each added to ``placed`` so that a failed receive can remove them. A file it held open
    anywhere else must already be here with the same content; nothing is written there.
    """
    checksums: dict[str, str] = {}
    carried: list[str] = []
    cached: list[str] = []
    directory = DirectoryWriter(stage)
    # "r:", not tarfile's stream mode "r|": that one buffers the body itself, copying every
    # byte three more times on its way to disk; "r:" reads members straight from the body,
    # and seeks in it only forward (_Forward).
    with tarfile.open(fileobj=_Forward(body), mode="r:", tarinfo=_BoundedTarInfo) as tar:
        for member in tar:
            top, _, rest = member.name.partition("/")
            if top == INSTANCE:
                directory.add(tar, member, rest)
                continue
            source = tar.extractfile(member) if member.isfile() else None
            if source is None:
                raise TaskError(f"the image stream holds {member.name!r}, which is not a regular file", code="image-corrupt")
            if top == IMAGE and IMAGE_NAME_RE.match(rest) and (rest == MANIFEST or checksummed(rest)):
                checksums[rest] = _copy_checked(source, incoming / rest)
            elif top == FILES and rest and os.path.normpath("/" + rest) == "/" + rest:
                carried.append(_check_carried(source, Path("/" + rest), incoming, own_root))
            elif top == STATE and _own_instance_file(rest, name, own_root):
                carried.append(_place_carried(source, own_root / rest, incoming, placed))
            elif top == CACHE and DIGEST_RE.match(rest) and rest in read_manifest(incoming).get("images", ()):
                _copy_digest_checked(source, incoming / f"{CACHED}{rest}", rest)
                cached.append(rest)
            else:
                raise TaskError(f"the image stream holds an unexpected entry {member.name!r}", code="image-corrupt")
        # tarfile stops at the end-of-archive blocks; what follows them must be nothing.
        while body.read(CHUNK):
            pass
    directory.finish()
    return {"checksums": checksums, "files": carried, "images": cached}


class _Forward:
    """The body as tarfile reads a file: read front to back, seeking (past a member's data or
    its padding) only forward."""

    def __init__(self, body: BinaryIO):
        self.body = body
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        data = self.body.read(size)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self.position:
            raise tarfile.ReadError(f"the image stream is read front to back: it cannot go back to byte {offset}")
        while self.position < offset:
            if not self.read(min(CHUNK, offset - self.position)):
                raise tarfile.ReadError("the image stream ended inside a member")
        return self.position


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended records (PAX, GNU long names) tarfile would read whole
    into memory: refused past MAX_HEADER_BYTES, before they are read."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _EXTENDED_HEADERS and info.size > MAX_HEADER_BYTES:
            raise TaskError(f"the image stream holds a tar header of {info.size} bytes (at most {MAX_HEADER_BYTES}): "
                            "the source sent a damaged or hostile stream; nothing was restored", code="image-corrupt")
        return info


_EXTENDED_HEADERS = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                     tarfile.GNUTYPE_LONGLINK}


class DirectoryWriter:
    """Unpacks the ``instance/`` members of a migration stream into the directory ``stage`` gives.

    Every member's parent must be a directory this writer made (the sender walks top
    down), so no symlink in the stream is ever followed; hardlinks may point only at files
    it wrote. Directories get their mode and times last, once nothing more is written in them.
    Owners, modes, extended attributes and device nodes are held to what the staged
    directory allows (:class:`agent.sdk.StagedDirectory`): the source may be compromised.
    """

    def __init__(self, stage: Stage):
        self.stage = stage
        self.root: Path | None = None
        self.ids: range | None = None
        self.dirs: dict[str, tarfile.TarInfo | None] = {}
        self.files: set[str] = set()

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str) -> None:
        if self.root is None:
            self._begin(tar, member, rel)
            return
        if rel == "" and member.isdir():
            self.dirs[""] = member
            return
        parent, _, leaf = rel.rpartition("/")
        if (not leaf or leaf in (".", "..") or parent not in self.dirs or rel in self.dirs or rel in self.files
                or os.path.normpath(rel) != rel):
            raise TaskError(f"the image stream holds an unexpected instance entry {member.name!r}", code="image-corrupt")
        if member.isfile():
            self._write(member, rel, tar.extractfile(member))
        elif member.isdir():
            os.mkdir(self.root / rel, 0o700)
            self.dirs[rel] = member
        elif member.islnk():
            self._link(member, rel)
        else:
            self._special(member, rel)

    def _begin(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str) -> None:
        """The first member is the definition: the kind checks it and gives the directory."""
        if not rel or "/" in rel or not member.isfile() or member.size > MAX_DEFINITION_BYTES:
            raise TaskError("the instance's directory in the image stream does not begin with its definition",
                            code="image-corrupt")
        source = tar.extractfile(member)
        assert source is not None
        data = source.read()
        staged = self.stage(rel, data)
        self.root, self.ids = staged.path, staged.ids
        self.dirs[""] = None
        self._write(member, rel, io.BytesIO(data))

    def _write(self, member: tarfile.TarInfo, rel: str, source: Any) -> None:
        assert self.root is not None
        target = self.root / rel
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
        self.files.add(rel)
        self._set_metadata(target, member)

    def _link(self, member: tarfile.TarInfo, rel: str) -> None:
        assert self.root is not None
        top, _, link = member.linkname.partition("/")
        if top != INSTANCE or link not in self.files:
            raise TaskError(f"the hardlink {member.name!r} in the image stream points at {member.linkname!r}, "
                            "which it did not carry", code="image-corrupt")
        os.link(self.root / link, self.root / rel, follow_symlinks=False)
        self.files.add(rel)  # the inode's metadata came with its first name

    def _special(self, member: tarfile.TarInfo, rel: str) -> None:
        assert self.root is not None
        target = self.root / rel
        if member.issym():
            os.symlink(member.linkname, target)
        elif member.ischr() and (member.devmajor, member.devminor) in SAFE_DEVICES:
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.ischr() or member.isblk():
            log.warning("migration: left out the device node %s (%s %d:%d), which no container here may have",
                        rel, "char" if member.ischr() else "block", member.devmajor, member.devminor)
            return
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise TaskError(f"the image stream holds {member.name!r} of a type a directory cannot hold",
                            code="image-corrupt")
        self._set_metadata(target, member)

    def finish(self) -> None:
        """Directories' modes and times, deepest first."""
        for rel in sorted(self.dirs, key=lambda r: -r.count("/") - bool(r)):
            member = self.dirs[rel]
            if member is not None and self.root is not None:
                self._set_metadata(self.root / rel if rel else self.root, member)

    def _set_metadata(self, path: Path, member: tarfile.TarInfo) -> None:
        uid, gid, mode = member.uid, member.gid, member.mode
        xattrs = {key[len(XATTR):]: value.encode("utf-8", "surrogateescape")
                  for key, value in member.pax_headers.items() if key.startswith(XATTR)}
        if self.ids is not None:
            # A host id outside the namespace (host root's, say) would make a setuid file or a
            # capability here a way up for anyone on the host who reaches the rootfs.
            nobody = self.ids.start + NOBODY if self.ids.start + NOBODY in self.ids else self.ids.start
            if uid not in self.ids:
                uid, mode = nobody, mode & ~stat.S_ISUID
            if gid not in self.ids:
                gid, mode = nobody, mode & ~stat.S_ISGID
            xattrs = {key: value for key, value in xattrs.items() if key.startswith("user.")
                      or (key == CAPABILITY and uid != nobody and _namespaced_capability(value) == self.ids.start)}
        # Order matters: chown clears setuid bits and file capabilities, so it comes first.
        os.chown(path, uid, gid, follow_symlinks=False)
        if not member.issym():
            os.chmod(path, mode)
        for key, value in xattrs.items():
            os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _namespaced_capability(value: bytes) -> int | None:
    """The namespace root id of a file capability (``vfs_ns_cap_data``, revision 3), None for
    any other form: a revision 2 capability holds in the host's namespace, for any user."""
    if len(value) != 24 or int.from_bytes(value[:4], "little") >> 24 != 3:
        return None
    return int.from_bytes(value[20:], "little")


def _copy_checked(source: BinaryIO, target: Path) -> str:
    """Copy ``source`` to the new file ``target``; its checksum."""
    checksum = Checksum()
    with open(target, "xb") as out:
        while chunk := source.read(CHUNK):
            checksum.update(chunk)
            out.write(chunk)
    return checksum.hexdigest()


def _copy_digest_checked(source: BinaryIO, target: Path, digest: str) -> None:
    """Copy an image for the cache to the new file ``target``, refusing it unless its
    SHA-256 is ``digest``."""
    sha = hashlib.sha256()
    with open(target, "xb") as out:
        while chunk := source.read(CHUNK):
            sha.update(chunk)
            out.write(chunk)
    if sha.hexdigest() != digest:
        raise TaskError(f"image {digest} arrived with SHA-256 {sha.hexdigest()}: the transfer damaged it; "
                        "nothing was restored", code="image-checksum")


def _own_instance_file(rest: str, name: str, own_root: Path) -> bool:
    """Whether ``rest`` (relative to the agent's state) lies in an installed plugin's
    directory for instance ``name``: ``plugins/<plugin>/instances/<name>/<file>``."""
    parts = rest.split("/")
    return (len(parts) >= 5 and parts[0] == "plugins" and parts[2] == "instances" and parts[3] == name
            and os.path.normpath(rest) == rest and not {"", ".", ".."} & set(parts)
            and (own_root / "plugins" / parts[1]).is_dir())


def _place_carried(source: BinaryIO, path: Path, incoming: Path, placed: list[Path]) -> str:
    """Put a file the tree had open in this instance's own directory, where CRIU expects it."""
    tmp = incoming / f"kumo-carried-{secrets.token_hex(4)}"
    received = _copy_checked(source, tmp)
    if path.is_file() and not path.is_symlink() and file_checksum(path) == received:
        tmp.unlink()
        return str(path)
    # A differing file here can only be a leftover of an earlier attempt (instance names
    # are unique in the fleet): replace it. rename() replaces a symlink, never follows it.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.rename(tmp, path)
    placed.append(path)
    return str(path)


def _check_carried(source: BinaryIO, path: Path, incoming: Path, own_root: Path) -> str:
    """A file the tree had open outside this instance's directory must be here already, the same."""
    if path.resolve().is_relative_to(own_root.resolve()):
        raise TaskError(f"the image stream carries {path}, inside the agent's state but not in the instance's own "
                        "directory: refused", code="image-corrupt")
    tmp = incoming / f"kumo-carried-{secrets.token_hex(4)}"
    received = _copy_checked(source, tmp)
    tmp.unlink()
    if path.is_file() and file_checksum(path) == received:
        return str(path)
    if path.exists():
        raise TaskError(f"{path}, which the process had open, exists on this node with other content: move it "
                        "away (or give both nodes the same file) and migrate again", code="file-conflict")
    raise TaskError(f"{path}, which the process had open, is missing on this node and lies outside the agent's "
                    f"state ({own_root}): provide it at the same path (shared storage) and migrate again",
                    code="missing-files")
