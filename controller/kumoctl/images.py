"""``kumoctl images``: the controller's image catalogue: import, list, show, delete, alias.

An import hashes the file first (the controller refuses bytes that do not match what was
declared), then streams it in one PUT; a transfer that breaks is resumed from the offset
the controller holds, here or by running the same import again. An http(s) URL is
downloaded to a temporary file first, since the size and digest must be known up front.
Progress goes to stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode

from .arguments import OUTPUT, Group
from .client import Client
from .errors import CommandError
from .output import mib, print_fields, print_json, print_table

NAME = "images"
HELP = "the image catalogue: disks (kvm) and root filesystems (lxc) instances are made from"
CHUNK = 1 << 20
RESUME_ATTEMPTS = 5


class Progress:
    """One self-rewriting line on stderr, at most ten times a second; nothing when not a terminal."""

    def __init__(self, doing: str, total: int):
        self.doing, self.total, self.done = doing, total, 0
        self.show = sys.stderr.isatty()
        self._shown = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.show and (now - self._shown > 0.1 or self.done >= self.total):
            self._shown = now
            percent = 100 * self.done // self.total if self.total else 100
            sys.stderr.write(f"\r{self.doing}: {mib(self.done)}/{mib(self.total)} MiB ({percent}%) ")
            sys.stderr.flush()

    def end(self) -> None:
        if self.show:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _hash(f: BinaryIO, size: int, what: str) -> str:
    digest = hashlib.sha256()
    progress = Progress(f"hashing {what}", size)
    try:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            progress(len(chunk))
    finally:
        progress.end()
    return digest.hexdigest()


def _download(url: str, into: BinaryIO) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as answer:  # noqa: S310 - http(s) only, checked by the caller
            progress = Progress(f"downloading {url}", int(answer.headers.get("Content-Length") or 0))
            try:
                while chunk := answer.read(CHUNK):
                    into.write(chunk)
                    progress(len(chunk))
            finally:
                progress.end()
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None
    into.flush()


def cmd_images_import(client: Client, args: argparse.Namespace) -> int:
    if args.source.startswith(("http://", "https://")):
        with tempfile.NamedTemporaryFile(prefix="kumoctl-image-") as temporary:
            _download(args.source, temporary)
            return _import(client, args, Path(temporary.name))
    return _import(client, args, Path(args.source))


def _import(client: Client, args: argparse.Namespace, path: Path) -> int:
    try:
        f = path.open("rb")
    except OSError as exc:
        raise CommandError(f"cannot read {args.source}: {exc.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            raise CommandError(f"{args.source} is empty")
        kind = args.kind or ("lxc" if tarfile.is_tarfile(path) else "kvm")
        sha256 = _hash(f, size, args.source)
        declared = {"name": args.name, "kind": kind, "size_bytes": size, "sha256": sha256,
                    "description": args.description or ""}
        if args.version:
            declared["version"] = args.version
        upload = client.call("POST", "/v1/images/uploads", declared)
        image = _send(client, upload, f, size)
    if args.output == "json":
        print_json(image)
    else:
        print(f"imported {image['name']}:{image['version']} ({image['kind']}, {image['format']}, "
              f"{mib(image['size_bytes'])} MiB, sha256 {image['sha256']})")
    return 0


def _send(client: Client, upload: dict[str, Any], f: BinaryIO, size: int) -> dict[str, Any]:
    """Stream the file from the offset the upload holds, resuming after a broken transfer."""
    path = f"/v1/images/uploads/{quote(upload['id'], safe='')}"
    progress = Progress(f"uploading {upload['name']}", size)
    progress(upload["offset"])
    try:
        for attempt in range(RESUME_ATTEMPTS):
            offset = upload["offset"]
            f.seek(offset)
            try:
                answer = client.send_file(f"{path}?{urlencode({'offset': offset})}", f, size - offset, progress)
            except OSError as exc:
                if attempt + 1 == RESUME_ATTEMPTS:
                    raise CommandError(f"{exc}; run the same import again to resume it") from None
                time.sleep(min(2 ** attempt, 10))
                upload = client.call("GET", path)
                progress.done = upload["offset"]
                continue
            if "image" in answer:
                return answer["image"]
            upload = answer
        raise CommandError(f"upload {upload['id']} is still incomplete; run the same import again to resume it")
    finally:
        progress.end()


def cmd_images_list(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", "/v1/images")
    if args.output == "json":
        print_json(answer)
        return 0
    aliases: dict[str, list[str]] = {}
    for alias in answer["aliases"]:
        aliases.setdefault(alias["target"], []).append(alias["alias"])
    rows = [[i["name"], i["version"], i["kind"], i["format"], mib(i["size_bytes"]), i["sha256"][:12],
             ",".join(aliases.get(i["name"], []) + aliases.get(f"{i['name']}:{i['version']}", [])), i["created_at"]]
            for i in answer["images"]]
    print_table(["NAME", "VERSION", "KIND", "FORMAT", "MIB", "SHA256", "ALIASES", "CREATED"], rows,
                empty="no images: kumoctl images import --help")
    return 0


def _ref(args: argparse.Namespace) -> str:
    query = f"?{urlencode({'kind': args.kind})}" if args.kind else ""
    return f"/v1/images/{quote(args.ref, safe=':')}{query}"


def cmd_images_show(client: Client, args: argparse.Namespace) -> int:
    images = client.call("GET", _ref(args))["images"]
    if args.output == "json":
        print_json(images)
        return 0
    for index, image in enumerate(images):
        if index:
            print()
        print_fields(sorted(image.items()))
    return 0


def cmd_images_delete(client: Client, args: argparse.Namespace) -> int:
    for image in client.call("DELETE", _ref(args))["deleted"]:
        print(f"deleted image {image['name']}:{image['version']} ({image['kind']})")
    return 0


def cmd_images_alias(client: Client, args: argparse.Namespace) -> int:
    path = f"/v1/images/aliases/{quote(args.alias, safe='')}"
    if args.delete:
        client.call("DELETE", path)
        print(f"alias {args.alias} deleted")
        return 0
    if not args.target:
        raise CommandError("give the TARGET (NAME or NAME:VERSION) the alias points at, or --delete")
    client.call("PUT", path, {"target": args.target})
    print(f"alias {args.alias} -> {args.target}")
    return 0


def register(group: Group) -> None:
    sub = group.leaf("import", cmd_images_import, "import a disk image (kvm) or rootfs tarball (lxc) from a file "
                     "or http(s) URL; an interrupted import resumes when run again", [OUTPUT])
    sub.add_argument("source", metavar="FILE|URL")
    sub.add_argument("--name", required=True, help="the image's name (instances ask for it with --image NAME)")
    sub.add_argument("--version", help="default: the current UTC time; a name means its newest version")
    sub.add_argument("--kind", choices=("kvm", "lxc"), help="default: lxc for a tarball, else kvm")
    sub.add_argument("--description", help="free text shown with the image")
    group.leaf("list", cmd_images_list, "list the catalogue and its aliases", [OUTPUT])
    for name, func, help in (("show", cmd_images_show, "show the images NAME, NAME:VERSION, an alias or a sha256 "
                                                         "names"),
                             ("delete", cmd_images_delete, "delete them (refused while instances use them)")):
        sub = group.leaf(name, func, help, [OUTPUT] if name == "show" else [])
        sub.add_argument("ref", metavar="IMAGE", help="NAME, NAME:VERSION, alias or sha256")
        sub.add_argument("--kind", choices=("kvm", "lxc"), help="only this form")
    sub = group.leaf("alias", cmd_images_alias, "point an alias at NAME or NAME:VERSION (or --delete it)")
    sub.add_argument("alias")
    sub.add_argument("target", nargs="?", metavar="TARGET", help="NAME (its newest version) or NAME:VERSION")
    sub.add_argument("--delete", action="store_true", help="remove the alias")
