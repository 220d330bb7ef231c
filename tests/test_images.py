"""The image catalogue: what an import must be, uploads that resume, nodes pulling over mutual
TLS, placement by image, and a second controller serving what the first imported.

The forms are checked against real files (qemu-img, tar); the rest runs a real controller,
real agents and real LXC containers made from a catalogue image by name.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from controller.services.imageforms import BadImage, check
from tests.harness import require
from tests.harness.agents import running_on, wait_for
from tests.harness.libvirt import TEST_INSTANCE_ROOT
from tests.test_instances import kumoctl
from tests.test_lxc import rootfs_tarball

integration = pytest.mark.integration


def qcow2(path: Path, *extra: str) -> Path:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt install qemu-utils)")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "16M"], check=True)  # noqa: S603, S607
    return path


def text_file(path: Path) -> Path:
    path.write_text("a text file is no image\n")
    return path


def tarball(path: Path, *members: tuple[str, bytes, str]) -> Path:
    """A tarball of (name, type, link target or data) members."""
    with tarfile.open(path, "w") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE):
                info.linkname = value
                tar.addfile(info)
            else:
                info.size = len(value.encode())
                tar.addfile(info, io.BytesIO(value.encode()) if kind == tarfile.REGTYPE else None)
    return path


# ---- what an image must be ------------------------------------------------------------


def test_a_qcow2_or_a_bootable_raw_disk_is_a_kvm_image(tmp_path: Path) -> None:
    assert check(qcow2(tmp_path / "disk.qcow2"), "kvm") == "qcow2"
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * 512)
    assert check(raw, "kvm") == "raw"


@pytest.mark.parametrize(("make", "reason"), [
    (lambda d: text_file(d / "notes.txt"), "neither qcow2 nor a raw disk"),
    (lambda d: qcow2(d / "overlay.qcow2", "-b", str(qcow2(d / "base.qcow2")), "-F", "qcow2"), "has a backing file"),
])
def test_what_is_not_a_bootable_disk_is_refused_as_kvm(tmp_path: Path, make: Any, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        check(make(tmp_path), "kvm")


def test_a_rootfs_tarball_is_an_lxc_image(tmp_path: Path) -> None:
    good = tarball(tmp_path / "good.tar", ("bin", tarfile.DIRTYPE, ""), ("bin/busybox", tarfile.REGTYPE, "x"),
                   ("bin/sh", tarfile.LNKTYPE, "bin/busybox"), ("sbin", tarfile.SYMTYPE, "/bin"))
    assert check(good, "lxc") == "tar"


@pytest.mark.parametrize(("member", "reason"), [
    (("../etc/passwd", tarfile.REGTYPE, "x"), "outside the root filesystem"),
    (("/etc/passwd", tarfile.REGTYPE, "x"), "outside the root filesystem"),
    (("dev/sda", tarfile.BLKTYPE, ""), "is a device node"),
    (("dev/mem", tarfile.CHRTYPE, ""), "is a device node"),
    (("etc/shadow", tarfile.LNKTYPE, "../../etc/shadow"), "outside the root filesystem"),
    (("etc/shadow", tarfile.LNKTYPE, "etc/not-in-the-archive"), "not an earlier member"),
])
def test_a_tarball_reaching_outside_its_root_is_refused_as_lxc(tmp_path: Path, member: Any, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        check(tarball(tmp_path / "bad.tar", ("etc", tarfile.DIRTYPE, ""), member), "lxc")


def test_a_text_file_is_no_tarball(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="not a tar archive"):
        check(text_file(tmp_path / "notes.txt"), "lxc")


def test_a_controller_prunes_files_the_catalogue_no_longer_lists_and_abandoned_uploads(tmp_path: Path) -> None:
    from controller.services.images import Blobs, prune_blobs

    blobs = Blobs(tmp_path)
    blobs.prepare()
    kept, gone = "a" * 64, "b" * 64
    for digest in (kept, gone):
        blobs.path(digest).write_bytes(b"x")
    (blobs.uploads / "u-1.json").write_text(json.dumps({"id": "u-1", "created_at": 0, "size_bytes": 1}))
    (blobs.uploads / "u-1.part").write_bytes(b"")
    assert prune_blobs(blobs, {kept}, time.time() - 3600) == []  # just written: maybe an import finishing
    assert sorted(prune_blobs(blobs, {kept}, time.time() + 1)) == [gone, "u-1"]
    assert [p.name for p in blobs.blobs.iterdir()] == [kept] and not list(blobs.uploads.iterdir())


# ---- a real controller and real agents ------------------------------------------------


def raw_call(controller: Any, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, cert: tuple[Path, Path] | None = None) -> tuple[int, Any, bytes]:
    """(status, headers, body bytes) of one request with any identity and a binary body."""
    request = urllib.request.Request(f"https://127.0.0.1:{controller.port}{path}", data=body, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, context=controller.context(cert or controller.admin_cert),  # noqa: S310
                                    timeout=60) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def declare(controller: Any, path: Path, name: str, kind: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    data = path.read_bytes()
    return controller.call("POST", "/v1/images/uploads", {
        "name": name, "kind": kind, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra},
        cert=controller.admin_cert)


def cut_off_upload(controller: Any, upload_id: str, data: bytes, sent: int) -> int:
    """Start a PUT of all of ``data``, and drop the connection once the controller has kept
    some of the first ``sent`` bytes; how many it kept."""
    context = controller.context(controller.admin_cert)
    path = f"/v1/images/uploads/{upload_id}"
    with socket.create_connection(("127.0.0.1", controller.port)) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"PUT {path}?offset=0 HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        tls.sendall(data[:sent])
        wait_for(lambda: controller.admin("GET", path)["offset"], "the controller to write what it received")
    broken = wait_for(lambda: [e for e in controller.admin("GET", "/v1/audit")["entries"]
                               if e["method"] == "PUT" and e["path"] == path], "the broken PUT to end")
    assert broken[0]["status"] == 400 and "the transfer broke after" in broken[0]["error"], broken
    return controller.admin("GET", path)["offset"]


def node_cert(agent: Any) -> tuple[Path, Path]:
    return agent.state_dir / "node.crt", agent.state_dir / "node.key"


@integration
def test_an_upload_cut_off_resumes_and_bad_or_oversized_imports_are_refused(controller_factory, tmp_path) -> None:
    controller = controller_factory(images_quota_bytes=4 << 20)
    disk = qcow2(tmp_path / "disk.qcow2")
    data = disk.read_bytes()
    status, upload = declare(controller, disk, "tiny", "kvm", version="1")
    assert status == 201 and upload["offset"] == 0, upload
    held = cut_off_upload(controller, upload["id"], data, len(data) // 2)
    assert 0 < held <= len(data) // 2
    path = f"/v1/images/uploads/{upload['id']}"
    # The same import again finds the upload under way, from where it stopped.
    status, again = declare(controller, disk, "tiny", "kvm", version="1")
    assert (status, again["id"], again["offset"]) == (200, upload["id"], held)
    status, answer = controller.call("PUT", f"{path}?offset=0", {}, cert=controller.admin_cert)
    assert status == 409 and answer["offset"] == held, answer
    status, _, body = raw_call(controller, "PUT", f"{path}?offset={held}", data[held:],
                               {"Content-Type": "application/octet-stream"})
    image = json.loads(body)["image"]
    assert status == 201 and (image["name"], image["version"], image["format"]) == ("tiny", "1", "qcow2"), body
    assert image["sha256"] == hashlib.sha256(data).hexdigest()

    status, answer = declare(controller, disk, "again", "kvm")
    assert status == 409 and "already image tiny:1" in answer["error"], answer
    big = tmp_path / "big.raw"
    big.write_bytes(b"\0" * (5 << 20))
    status, answer = declare(controller, big, "big", "kvm")
    assert status == 413 and "quota" in answer["error"], answer
    # Declared one way, sent another: the bytes are discarded.
    text = text_file(tmp_path / "notes.txt")
    status, upload = declare(controller, text, "notes", "kvm")
    status, _, body = raw_call(controller, "PUT", f"/v1/images/uploads/{upload['id']}?offset=0",
                               text.read_bytes(), {"Content-Type": "application/octet-stream"})
    assert status == 422 and "neither qcow2 nor a raw disk" in json.loads(body)["error"], body
    result = kumoctl(controller, "images", "import", str(text), "--name", "notes", "--kind", "kvm", check=False)
    assert result.returncode == 1 and "not a kvm image" in result.stderr, result.stderr
    assert [i["name"] for i in controller.admin("GET", "/v1/images")["images"]] == ["tiny"]
    assert not list((controller.dir / "images/uploads").iterdir())


@integration
def test_a_container_made_from_a_catalogue_image_by_name(controller, kumo_agent, lxc_required, lxcpath_factory,
                                                         tmp_path) -> None:
    rootfs = tmp_path / "rootfs.tar.gz"
    sha = rootfs_tarball(rootfs)
    result = kumoctl(controller, "images", "import", str(rootfs), "--name", "box", "--description", "busybox")
    assert "imported box:" in result.stdout and "lxc" in result.stdout and sha in result.stdout, result.stdout
    kumoctl(controller, "images", "alias", "stable", "box")
    listed = json.loads(kumoctl(controller, "images", "list", "--output", "json").stdout)
    assert listed["aliases"] == [{"alias": "stable", "target": "box"}]
    assert listed["images"][0]["kind"] == "lxc"

    first, second = (kumo_agent(plugins={"lxc": {"lxcpath": str(lxcpath_factory()), "poll_interval": 0.5}})
                     for _ in range(2))
    kumoctl(controller, "instances", "create", "one", "--kind", "lxc", "--image", "stable", "--vcpus", "1",
            "--memory", "64", "--node", first.node_id)
    wait_for(lambda: running_on(first, "one"), "one to run")
    shown = json.loads(kumoctl(controller, "instances", "show", "one", "--output", "json").stdout)
    assert shown["catalogue"]["sha256"] == sha and shown["catalogue"]["held"] is False, shown
    assert (first.workdir / "images" / sha).is_file()
    wait_for(lambda: sha in controller.admin("GET", f"/v1/nodes/{first.node_id}")["images"]["held"],
             "the node to report the image it holds")
    # Equally loaded nodes: the one that holds the image wins.
    kumoctl(controller, "instances", "create", "filler", "--kind", "lxc", "--vcpus", "1", "--memory", "64",
            "--node", second.node_id)
    kumoctl(controller, "instances", "create", "two", "--kind", "lxc", "--image", "box", "--vcpus", "1",
            "--memory", "64")
    shown = json.loads(kumoctl(controller, "instances", "show", "two", "--output", "json").stdout)
    assert shown["node"] == first.node_id and shown["catalogue"]["held"] is True, shown
    assert "already on the node" in kumoctl(controller, "instances", "show", "two").stdout

    refused = kumoctl(controller, "images", "delete", "box", check=False)
    assert refused.returncode == 1 and "used by instance(s) one, two" in refused.stderr, refused.stderr
    status, answer = controller.call("POST", "/v1/instances", {"name": "vm", "kind": "kvm", "image": "box"},
                                     cert=controller.admin_cert)
    assert status == 404 and "with a kvm form" in answer["error"], answer

    # A node pulls by Range: what a broken transfer resumes with.
    data = rootfs.read_bytes()
    status, headers, body = raw_call(controller, "GET", f"/v1/nodes/{second.node_id}/images/{sha}",
                                     headers={"Range": "bytes=100-"}, cert=node_cert(second))
    assert status == 206 and body == data[100:] and headers["Content-Range"].startswith("bytes 100-")
    status, _, _ = raw_call(controller, "GET", f"/v1/nodes/{first.node_id}/images/{sha}", cert=node_cert(second))
    assert status == 403  # a node pulls only as itself

    # A cached copy changed on the node's disk is found out before use and pulled again.
    cached = first.workdir / "images" / sha
    cached.chmod(0o644)
    cached.write_bytes(b"tampered" + data[8:])
    kumoctl(controller, "instances", "create", "three", "--kind", "lxc", "--image", "box", "--vcpus", "1",
            "--memory", "64", "--node", first.node_id)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha
    assert "it was changed on disk; fetching it again" in first.log_text()
    for name in ("one", "two", "three", "filler"):
        kumoctl(controller, "instances", "delete", name)
    kumoctl(controller, "images", "delete", "box")
    assert controller.admin("GET", "/v1/images") == {"images": [], "aliases": []}
    assert not list((controller.dir / "images/blobs").iterdir())


@integration
def test_an_image_imported_through_one_controller_is_served_by_another(postgres, controller_factory, kumo_agent,
                                                                        tmp_path) -> None:
    database = postgres.database()
    a = controller_factory(init_args=["--database", database])
    b = controller_factory(init_args=["--database", database, "--ca-from", str(a.pki)])
    disk = qcow2(tmp_path / "disk.qcow2")
    sha = hashlib.sha256(disk.read_bytes()).hexdigest()
    kumoctl(a, "images", "import", str(disk), "--name", "tiny", "--version", "1")
    assert [i["sha256"] for i in b.admin("GET", "/v1/images")["images"]] == [sha]
    agent = kumo_agent(controller=b, start=False)
    status, _, body = raw_call(b, "GET", f"/v1/nodes/{agent.node_id}/images/{sha}", cert=node_cert(agent))
    assert status == 200 and hashlib.sha256(body).hexdigest() == sha
    assert (b.dir / "images/blobs" / sha).is_file()  # fetched once from A, kept
    a.stop()
    status, _, body = raw_call(b, "GET", f"/v1/nodes/{agent.node_id}/images/{sha}", cert=node_cert(agent))
    assert status == 200 and hashlib.sha256(body).hexdigest() == sha


# ---- what a node reports about its cache (untrusted input) ----------------------------


def test_a_nodes_image_report_is_checked() -> None:
    from controller.api import ApiError, reports

    digest = "ab" * 32
    report = {"held": [digest], "pulling": {digest: {"bytes": 5, "total": 10}}}
    assert reports.images(report) == report
    for bad, where in (({"held": ["../../etc"]}, "images.held"), ({"held": [digest] * 10_001}, "images.held"),
                       ({"pulling": {digest: {"bytes": -1}}}, f"images.pulling.{digest}.bytes"),
                       ({"pulling": {"x": {}}}, "images.pulling"), ({"other": 1}, "images must be")):
        with pytest.raises(ApiError, match=where):
            reports.images(bad)


@integration
def test_one_name_holds_a_disk_for_vms_and_a_rootfs_for_containers(controller, kumo_agent, libvirtd, kvm_guest,
                                                                   lxc_required, lxcpath_factory, tmp_path) -> None:
    root = TEST_INSTANCE_ROOT / f"kumo-images-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, mode=0o711)
    try:
        agent = kumo_agent(plugins={
            "kvm": {"uri": libvirtd, "instance_dir": str(root / "instances"), "acceleration": "tcg",
                    "shutdown_timeout": 10},
            "lxc": {"lxcpath": str(lxcpath_factory()), "poll_interval": 0.5},
        }, settings={"image_cache": {"path": str(root / "images")}})  # qemu reads the VMs' base images there
        rootfs = tmp_path / "rootfs.tar.gz"
        rootfs_tarball(rootfs)
        kumoctl(controller, "images", "import", str(kvm_guest.disk), "--name", "both", "--version", "1")
        kumoctl(controller, "images", "import", str(rootfs), "--name", "both", "--version", "1")
        forms = json.loads(kumoctl(controller, "images", "show", "both", "--output", "json").stdout)
        assert sorted((i["kind"], i["format"]) for i in forms) == [("kvm", "qcow2"), ("lxc", "tar")]
        kumoctl(controller, "instances", "create", "vm", "--kind", "kvm", "--image", "both", "--vcpus", "1",
                "--memory", "128", "--option", f"kernel={kvm_guest.kernel}", "--option", f"initrd={kvm_guest.initrd}",
                "--option", f"cmdline={kvm_guest.cmdline} kumo.hold")
        kumoctl(controller, "instances", "create", "box", "--kind", "lxc", "--image", "both:1", "--vcpus", "1",
                "--memory", "64")
        for name in ("vm", "box"):
            wait_for(lambda name=name: running_on(agent, name), f"{name} to run")
        assert (root / "images" / kvm_guest.disk_sha256).is_file()
        shown = json.loads(kumoctl(controller, "instances", "show", "vm", "--output", "json").stdout)
        assert shown["catalogue"]["sha256"] == kvm_guest.disk_sha256 and shown["image"] == "catalogue:both:1"
        for name in ("vm", "box"):
            kumoctl(controller, "instances", "delete", name, "--timeout", "60s")
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)  # noqa: S603, S607
