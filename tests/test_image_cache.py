"""The node's image cache: local and https sources, resumed downloads, LRU eviction."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.sdk.images import ImageCache
from agent.sdk.types import TaskError

IMAGE = os.urandom(3 * (1 << 20) + 12345)  # over a few read chunks, not a whole number of them
DIGEST = hashlib.sha256(IMAGE).hexdigest()
ROOT = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- a throwaway CA and an https server on 127.0.0.1 ----------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """(CA bundle for the client, server context with a certificate for 127.0.0.1)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "image cache test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return ca_file, server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve(aiohttp_server: Any, tls: tuple[Path, ssl.SSLContext]) -> Callable[[Handler], Awaitable[str]]:
    """Start an https server on 127.0.0.1 with ``handler`` at /image; its URL."""

    async def start(handler: Handler) -> str:
        async def route(request: web.Request) -> web.StreamResponse:
            return await handler(request)

        app = web.Application()
        app.router.add_get("/image", route)
        server = await aiohttp_server(app, ssl=tls[1])
        return f"https://127.0.0.1:{server.port}/image"

    return start


class Origin:
    """An image server that honours Range, counts requests and can misbehave on request."""

    def __init__(self, body: bytes = IMAGE):
        self.body = body
        self.ranges: list[str | None] = []
        self.cut_after: int | None = None  # send this many bytes of the next response, then drop
        self.ignore_range = False
        self.delay = 0.0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        requested = request.headers.get("Range")
        self.ranges.append(requested)
        if self.delay:
            await asyncio.sleep(self.delay)
        start = 0
        response = web.StreamResponse(status=200)
        if requested and not self.ignore_range:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            if start >= len(self.body):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(self.body)}"})
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{len(self.body) - 1}/{len(self.body)}"
        response.content_length = len(self.body) - start
        await response.prepare(request)
        if self.cut_after is None:
            await response.write(self.body[start:])
            await response.write_eof()
            return response
        await response.write(self.body[start:start + self.cut_after])
        self.cut_after = None
        await asyncio.sleep(0.05)  # let the client take what was sent before the line drops
        assert request.transport is not None
        request.transport.abort()
        return response


# ---- local images ---------------------------------------------------------------------


async def test_a_local_image_without_a_digest_is_used_where_it_is(tmp_path: Path) -> None:
    source = tmp_path / "disk.img"
    source.write_bytes(b"not copied")
    cache = ImageCache(tmp_path / "cache")

    assert await cache.get(str(source), None) == source
    assert not (tmp_path / "cache").exists()


async def test_a_local_image_with_a_digest_is_copied_in_and_verified(tmp_path: Path) -> None:
    source = tmp_path / "disk.img"
    source.write_bytes(IMAGE)
    cache = ImageCache(tmp_path / "cache")
    old = os.umask(0o077)  # the copy is 0644 whatever the agent's umask
    try:
        path = await cache.get(str(source), DIGEST.upper())
    finally:
        os.umask(old)

    assert path == tmp_path / "cache" / DIGEST
    assert path.read_bytes() == IMAGE
    assert path.stat().st_mode & 0o777 == 0o644
    assert cache.held() == [{"sha256": DIGEST, "size_bytes": len(IMAGE)}]
    source.unlink()  # a hit does not read the source again, but the source must still exist
    with pytest.raises(TaskError) as missing:
        await cache.get(str(source), DIGEST)
    assert missing.value.code == "image-missing"


async def test_a_local_image_with_the_wrong_digest_is_refused_and_not_kept(tmp_path: Path) -> None:
    source = tmp_path / "disk.img"
    source.write_bytes(IMAGE)
    cache = ImageCache(tmp_path / "cache")
    wrong = sha(b"something else")

    with pytest.raises(TaskError) as refused:
        await cache.get(str(source), wrong)

    assert refused.value.code == "image-checksum"
    assert str(refused.value) == (f"image {source} has SHA-256 {DIGEST}, not the expected {wrong}: "
                                  "check the image_sha256 you sent and the image itself")
    assert list((tmp_path / "cache").iterdir()) == []


async def test_a_missing_local_image_says_what_to_do(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    for digest in (None, DIGEST):
        with pytest.raises(TaskError) as missing:
            await cache.get(str(tmp_path / "nope.img"), digest)
        assert missing.value.code == "image-missing"
        assert str(missing.value) == (f"image {tmp_path / 'nope.img'} does not exist on this node: "
                                      "copy it there or give an https URL")


@pytest.mark.parametrize(("source", "digest", "message"), [
    ("disk.img", None, "image must be an absolute path on the node, an https:// URL or a catalogue image, got 'disk.img'"),
    ("http://example.invalid/disk.img", DIGEST, "image must be an absolute path on the node, an https:// URL or a catalogue image"),
    ("https://example.invalid/disk.img", None, "an image URL needs image_sha256 to verify the download"),
    ("/srv/disk.img", "../../etc/passwd", "image_sha256 must be 64 hexadecimal digits"),
])
async def test_a_bad_source_or_digest_is_a_bad_request(tmp_path: Path, source: str, digest: str | None,
                                                        message: str) -> None:
    with pytest.raises(TaskError) as bad:
        await ImageCache(tmp_path / "cache").get(source, digest)
    assert bad.value.code == "bad-request"
    assert str(bad.value).startswith(message)


# ---- downloads ------------------------------------------------------------------------


async def test_an_image_is_downloaded_over_verified_tls_once(tmp_path: Path, serve: Any, tls: Any) -> None:
    origin = Origin()
    url = await serve(origin)
    cache = ImageCache(tmp_path / "cache", ca_file=tls[0])

    path = await cache.get(url, DIGEST)
    again = await cache.get(url, DIGEST)

    assert path == again == tmp_path / "cache" / DIGEST
    assert path.read_bytes() == IMAGE
    assert path.stat().st_mode & 0o777 == 0o644
    assert origin.ranges == [None]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [DIGEST]


async def test_an_untrusted_server_is_a_download_error(tmp_path: Path, serve: Any) -> None:
    url = await serve(Origin())
    with pytest.raises(TaskError) as failed:
        await ImageCache(tmp_path / "cache").get(url, DIGEST)  # no ca_file: the system CAs
    assert failed.value.code == "image-download"
    assert str(failed.value).startswith(f"could not download {url}: ")
    assert "certificate" in str(failed.value)


async def test_a_broken_download_is_resumed_with_a_range_request(tmp_path: Path, serve: Any, tls: Any) -> None:
    origin = Origin()
    origin.cut_after = 2 * (1 << 20) + 100
    url = await serve(origin)
    cache = ImageCache(tmp_path / "cache", ca_file=tls[0])

    with pytest.raises(TaskError) as broken:
        await cache.get(url, DIGEST)
    assert broken.value.code == "image-download"
    assert str(broken.value).startswith(f"could not download {url}: ")
    partial = tmp_path / "cache" / f"{DIGEST}.partial"
    have = partial.stat().st_size
    assert 0 < have < len(IMAGE)
    assert partial.read_bytes() == IMAGE[:have]

    path = await cache.get(url, DIGEST)

    assert origin.ranges == [None, f"bytes={have}-"]
    assert sha(path.read_bytes()) == DIGEST
    assert not partial.exists()


async def test_a_server_that_ignores_range_is_downloaded_from_the_start(tmp_path: Path, serve: Any,
                                                                         tls: Any) -> None:
    origin = Origin()
    origin.ignore_range = True
    url = await serve(origin)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{DIGEST}.partial").write_bytes(IMAGE[:1000])

    path = await ImageCache(tmp_path / "cache", ca_file=tls[0]).get(url, DIGEST)

    assert origin.ranges == ["bytes=1000-"]
    assert path.read_bytes() == IMAGE


async def test_a_partial_that_is_not_a_prefix_is_thrown_away(tmp_path: Path, serve: Any, tls: Any) -> None:
    origin = Origin()
    url = await serve(origin)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{DIGEST}.partial").write_bytes(b"x" * (len(IMAGE) + 1))

    path = await ImageCache(tmp_path / "cache", ca_file=tls[0]).get(url, DIGEST)

    assert origin.ranges == [f"bytes={len(IMAGE) + 1}-", None]  # 416, then from the start
    assert path.read_bytes() == IMAGE


async def test_a_finished_partial_is_installed_without_a_request(tmp_path: Path, serve: Any, tls: Any) -> None:
    origin = Origin()
    url = await serve(origin)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{DIGEST}.partial").write_bytes(IMAGE)  # the agent stopped before the rename

    path = await ImageCache(tmp_path / "cache", ca_file=tls[0]).get(url, DIGEST)

    assert origin.ranges == []
    assert path.read_bytes() == IMAGE


async def test_a_download_with_the_wrong_digest_is_refused_and_not_kept(tmp_path: Path, serve: Any,
                                                                         tls: Any) -> None:
    url = await serve(Origin(body=b"tampered" + IMAGE))
    with pytest.raises(TaskError) as refused:
        await ImageCache(tmp_path / "cache", ca_file=tls[0]).get(url, DIGEST)
    assert refused.value.code == "image-checksum"
    assert str(refused.value).startswith(f"image {url} has SHA-256 {sha(b'tampered' + IMAGE)}, not the expected")
    assert list((tmp_path / "cache").iterdir()) == []


async def test_an_http_error_is_a_download_error(tmp_path: Path, serve: Any, tls: Any) -> None:
    async def gone(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)

    url = await serve(gone)
    with pytest.raises(TaskError) as failed:
        await ImageCache(tmp_path / "cache", ca_file=tls[0]).get(url, DIGEST)
    assert failed.value.code == "image-download"
    assert str(failed.value) == f"could not download {url}: HTTP 404 Not Found"


async def test_concurrent_gets_of_one_image_download_it_once(tmp_path: Path, serve: Any, tls: Any) -> None:
    origin = Origin()
    origin.delay = 0.1
    url = await serve(origin)
    cache = ImageCache(tmp_path / "cache", ca_file=tls[0])

    paths = await asyncio.gather(*(cache.get(url, DIGEST) for _ in range(3)))

    assert paths == [tmp_path / "cache" / DIGEST] * 3
    assert origin.ranges == [None]
    assert cache._locks == {}  # nothing kept per digest once the gets are done


async def test_importing_the_cache_does_not_load_aiohttp() -> None:
    code = "import sys, agent.sdk.images; sys.exit('aiohttp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0  # noqa: S603


# ---- eviction -------------------------------------------------------------------------


def _image(cache: Path, data: bytes, age: float) -> Path:
    path = cache / sha(data)
    path.write_bytes(data)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


async def test_eviction_removes_the_least_recently_used_images_no_instance_needs(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    oldest = _image(directory, b"a" * 100, age=400)
    needed = _image(directory, b"b" * 100, age=300)
    older = _image(directory, b"c" * 100, age=200)
    newer = _image(directory, b"d" * 100, age=100)
    young_partial = directory / f"{sha(b'e')}.partial"
    young_partial.write_bytes(b"e" * 100)
    stale_partial = directory / f"{sha(b'f')}.partial"
    stale_partial.write_bytes(b"f" * 50)
    os.utime(stale_partial, (time.time() - 7200, time.time() - 7200))
    (directory / "README").write_bytes(b"not an image" * 100)  # not the cache's: ignored
    cache = ImageCache(directory, max_bytes=300)

    # 550 bytes held: the stale partial goes first, then images oldest first, skipping `needed`
    removed = cache.evict({needed})

    assert removed == [stale_partial, oldest, older]
    assert needed.exists() and newer.exists() and young_partial.exists()
    assert cache.held() == sorted([{"sha256": needed.name, "size_bytes": 100},
                                   {"sha256": newer.name, "size_bytes": 100}], key=lambda i: i["sha256"])
    assert ImageCache(directory).evict(set()) == []  # no limit, nothing removed


async def test_a_hit_makes_an_image_recent_and_adding_one_evicts_the_stalest(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    first = _image(directory, b"a" * 100, age=300)
    second = _image(directory, b"b" * 100, age=200)
    source = tmp_path / "third.img"
    source.write_bytes(b"c" * 100)
    cache = ImageCache(directory, max_bytes=200)

    assert await cache.get("https://127.0.0.1:1/never-asked", first.name) == first  # a hit: no request
    third = await cache.get(str(source), sha(source.read_bytes()))

    assert first.exists() and third.exists()
    assert not second.exists()


async def test_adding_an_image_never_evicts_it_or_what_any_plugins_instances_use(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    used = _image(directory, b"a" * 100, age=300)
    unpacking = _image(directory, b"c" * 100, age=400)
    spare = _image(directory, b"d" * 100, age=200)
    # A symlinked path to the image still protects it.
    (tmp_path / "link").symlink_to(directory)
    source = tmp_path / "big.img"
    source.write_bytes(b"b" * 500)
    cache = ImageCache(directory, max_bytes=200)
    cache.add_in_use(lambda: {tmp_path / "link" / used.name})  # a VM's backing file, say
    cache.add_in_use(lambda: {unpacking})  # a container's tarball being unpacked

    added = await cache.get(str(source), sha(b"b" * 500))

    assert used.exists() and unpacking.exists() and added.exists()  # over the limit, but all needed
    assert not spare.exists()
