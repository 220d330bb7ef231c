"""The kvm plugin: domain XML (unit) and real guests through the real libvirtd.

The guest is Debian's kernel with a busybox initramfs (tests/harness/guest.py) whose /init
prints the cidata seed it finds on the serial console; with ``kumo.hold`` it stays up until
an ACPI power-button press.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from agent.sdk import ConfigError, TaskError
from plugins import kvm
from plugins.kvm import (
    METADATA_NS,
    CreateSpec,
    KvmPlugin,
    _Acceleration,
    _metadata_directory,
    domain_xml,
)
from tests.harness import REPO, require
from tests.harness.guest import Guest
from tests.harness.libvirt import KvmTestBed, wait_for

# ---- unit -------------------------------------------------------------------------------


def _spec(**kw: Any) -> CreateSpec:
    base = dict(image="/i.qcow2", image_sha256=None, vcpus=2, memory_mib=256, kernel=None, initrd=None, cmdline=None)
    base.update(kw)
    return CreateSpec(**base)


def _xml(spec: CreateSpec, network: str = "none", accel: str = "qemu") -> ET.Element:
    text = domain_xml(
        name="vm-1",
        spec=spec,
        accel=_Acceleration(accel, "tcg" if accel == "qemu" else "kvm", "test"),  # type: ignore[arg-type]
        disk=Path("/d/vm-1/disk.qcow2"),
        seed=Path("/d/vm-1/cidata.iso"),
        console_log=Path("/d/vm-1/console.log"),
        directory=Path("/d/vm-1"),
        network=network,
    )
    assert _metadata_directory(text) == Path("/d/vm-1")
    return ET.fromstring(text)


def test_domain_xml_direct_kernel_boot_keeps_user_strings_as_text() -> None:
    hostile = "console=ttyS0 '\"/><evil/>&amp;"
    root = _xml(_spec(kernel="/k", initrd="/i", cmdline=hostile))
    assert root.get("type") == "qemu"
    assert root.findtext("os/cmdline") == hostile
    assert root.find(".//evil") is None
    assert root.findtext("os/kernel") == "/k" and root.findtext("os/initrd") == "/i"
    assert root.findtext("memory") == "256" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom.find("readonly") is not None and cdrom.find("source").get("file") == "/d/vm-1/cidata.iso"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == "/d/vm-1/console.log"
    assert root.find(f"metadata/{{{METADATA_NS}}}instance") is not None
    assert root.find("devices/interface") is None


def test_domain_xml_disk_boot_and_networks() -> None:
    root = _xml(_spec(), network="user", accel="kvm")
    assert root.get("type") == "kvm"
    assert root.find("os/boot").get("dev") == "hd" and root.find("os/kernel") is None
    assert root.find("devices/interface").get("type") == "user"
    bridged = _xml(_spec(), network="bridge:br-x")
    assert bridged.find("devices/interface/source").get("bridge") == "br-x"


def test_foreign_domain_has_no_kumo_metadata() -> None:
    assert _metadata_directory("<domain type='qemu'><name>x</name></domain>") is None


@pytest.mark.parametrize(
    "section",
    [{"network": "bridge:"}, {"acceleration": "fast"}, {"shutdown_timeout": 0}, {"urii": "x"}],
)
def test_bad_config_is_refused(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        KvmPlugin().kumo_configure(section=section, source="agent.yaml: plugins.kvm")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"name": "Bad_Name", "image": "/x", "memory_mib": 64}, "name must be"),
        ({"name": "a", "memory_mib": 64}, "image is required"),
        ({"name": "a", "image": "/x", "memory_mib": 8}, "memory_mib must be"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "vcpus": 0}, "vcpus must be"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "image_sha256": "abc"}, "64 hexadecimal"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "options": {"bios": 1}}, "options.bios"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "options": {"initrd": "/i"}}, "need options.kernel"),
    ],
)
async def test_bad_payload_is_refused_before_libvirt(payload: dict[str, Any], message: str) -> None:
    plugin = KvmPlugin()
    with pytest.raises(TaskError, match=message):
        await plugin.kumo_handle_task(kind="kvm.create", payload=payload, task_id="t")


# A fresh interpreter (this one has libvirt imported already) starts one kvm plugin, and
# reports what it fingerprints and whether libvirt is in sys.modules and mapped, before and
# after a kvm task.
_LAZY_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from agent.sdk import PluginContext, TaskError
from plugins.kvm import KvmPlugin

def loaded():
    with open("/proc/self/maps") as maps:
        return {"module": "libvirt" in sys.modules, "mapped": "libvirt.so" in maps.read()}

async def main(uri, instance_dir, state_dir):
    plugin = KvmPlugin()
    plugin.kumo_configure(section={"uri": uri, "instance_dir": instance_dir, "acceleration": "tcg"}, source="t")
    async def no_controller(*args, **kwargs):
        raise AssertionError
    context = PluginContext("kvm", Path(state_dir), None, None, lambda: None, no_controller)
    await plugin.kumo_startup(context=context)
    report = {"startup": loaded(), "fingerprint": (await plugin.kumo_fingerprint()).to_json()}
    report["idle"] = loaded()
    try:
        await plugin.kumo_handle_task(kind="kvm.start", payload={"name": "nope"}, task_id="t")
    except TaskError as exc:
        report["task"] = exc.code
    report["after_task"] = loaded()
    report["fingerprint_after_task"] = (await plugin.kumo_fingerprint()).to_json()
    await plugin.kumo_shutdown()
    print(json.dumps(report))

asyncio.run(main(*sys.argv[1:]))
"""


def _lazy_run(tmp_path: Path, uri: str, instances: tuple[str, ...] = ()) -> dict[str, Any]:
    require(_has_binding(), "the libvirt Python binding (pip install -e '.[libvirt]')")
    for name in instances:
        (tmp_path / "instances" / name).mkdir(parents=True)
    result = subprocess.run(  # noqa: S603 - an argv list
        [sys.executable, "-c", _LAZY_SCRIPT, uri, str(tmp_path / "instances"), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _has_binding() -> bool:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    return True


def test_idle_and_loaded_agree_when_libvirtd_is_down(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path / 'no-libvirtd.sock'}"
    report = _lazy_run(tmp_path, uri)
    assert report["idle"] == {"module": False, "mapped": False}
    assert not report["fingerprint"]["available"]
    assert report["fingerprint"]["reason"].startswith(f"cannot connect to {uri}: ")
    assert report["task"] == "unavailable" and report["after_task"]["module"]
    # The child's answer and the in-process connection's say the same.
    assert report["fingerprint_after_task"] == report["fingerprint"]


def test_instance_directories_from_before_load_libvirt_at_startup(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path / 'no-libvirtd.sock'}"
    report = _lazy_run(tmp_path, uri, instances=("vm-1",))
    assert report["startup"] == {"module": True, "mapped": True}


@pytest.mark.integration
def test_idle_node_fingerprints_libvirt_without_loading_it(libvirtd: str, tmp_path: Path) -> None:
    report = _lazy_run(tmp_path, libvirtd)
    assert report["startup"] == report["idle"] == {"module": False, "mapped": False}
    fingerprint = report["fingerprint"]
    assert fingerprint["available"] and fingerprint["kinds"] == ["kvm"]
    attrs = fingerprint["attributes"]
    assert attrs["acceleration"] == "tcg" and "set by configuration" in attrs["acceleration_reason"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", attrs["libvirt_version"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", attrs["qemu_version"])
    assert attrs["instances"] == 0 and attrs["uri"] == libvirtd
    # The first kvm task loads libvirt in the agent (no such domain here, so it fails).
    assert report["task"] == "not-found"
    assert report["after_task"] == {"module": True, "mapped": True}
    assert report["fingerprint_after_task"] == fingerprint


# ---- against the real libvirtd ----------------------------------------------------------


def _payload(bed: KvmTestBed, guest: Guest, name: str, hold: bool = False, **extra: Any) -> dict[str, Any]:
    payload = {
        "name": name,
        "kind": "kvm",
        "image": str(guest.disk),
        "image_sha256": guest.disk_sha256,
        "vcpus": 1,
        "memory_mib": 192,
        "user_data": f"#cloud-config {name}-marker\nruncmd:\n  - echo hello\n",
        "options": {
            "kernel": str(guest.kernel),
            "initrd": str(guest.initrd),
            "cmdline": guest.cmdline + (" kumo.hold" if hold else ""),
        },
    }
    payload.update(extra)
    return payload


async def _task(plugin: KvmPlugin, task_kind: str, /, **payload: Any) -> Any:
    return await plugin.kumo_handle_task(kind=task_kind, payload=payload, task_id=f"{task_kind}-test")


async def _console(plugin: KvmPlugin, name: str) -> str:
    return (await _task(plugin, "kvm.console", name=name))["log"]


def _state(plugin: KvmPlugin, name: str) -> str | None:
    return next((i.state for i in plugin.kumo_instances() if i.name == name), None)


def _leftovers(bed: KvmTestBed, name: str) -> list[str]:
    files = [str(p) for p in (bed.root / "images").glob("*")] + [str(p) for p in (bed.root / "instances").glob(f"{name}*")]
    return bed.domains() + files


async def _fingerprint_until(plugin: KvmPlugin, available: bool) -> Any:
    for _ in range(150):
        fingerprint = await plugin.kumo_fingerprint()
        if fingerprint.available == available:
            return fingerprint
        await asyncio.sleep(0.2)
    pytest.fail(f"the kvm plugin never became {'available' if available else 'unavailable'}")


@pytest.mark.integration
async def test_create_boots_with_the_users_seed(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("seed")
    result = await plugin.kumo_handle_task(kind="kvm.create", payload=_payload(kvm_bed, kvm_guest, name), task_id="t1")
    assert result["state"] == "running" and result["name"] == name
    assert kvm_bed.domains() == [name]
    # The guest powers itself off after printing the seed: the STOPPED lifecycle event says so.
    await wait_for(lambda: _state(plugin, name) == "stopped")
    lines = (await _console(plugin, name)).splitlines()  # the serial line ends in CRLF
    assert f"CIDATA-META: instance-id: {name}" in lines
    assert f"CIDATA-USERDATA-FIRSTLINE: #cloud-config {name}-marker" in lines
    assert "GUEST-DONE" in lines
    assert kvm_bed.changes >= 2


@pytest.mark.integration
async def test_stop_start_delete(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("life")
    await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))
    async def holding(count: int) -> None:
        for _ in range(300):
            if (await _console(plugin, name)).count("GUEST-HOLDING") >= count:
                return
            await asyncio.sleep(0.2)
        pytest.fail(f"guest did not reach GUEST-HOLDING #{count}: {await _console(plugin, name)}")

    await holding(1)
    stopped = await _task(plugin, "kvm.stop", name=name)
    assert stopped == {"name": name, "state": "stopped", "forced": False}  # ACPI power button obeyed
    assert "GUEST-POWER-BUTTON" in await _console(plugin, name)

    started = await _task(plugin, "kvm.start", name=name)
    assert started["state"] == "running" and _state(plugin, name) == "running"
    await holding(2)
    # A zero timeout leaves no time for the guest: the plugin destroys it.
    forced = await _task(plugin, "kvm.stop", name=name, timeout=0)
    assert forced["forced"] is True and forced["state"] == "stopped"

    directory = kvm_bed.root / "instances" / name
    assert (directory / "disk.qcow2").exists()
    assert await _task(plugin, "kvm.delete", name=name) == {"name": name, "state": "deleted"}
    assert kvm_bed.domains() == [] and not directory.exists()
    assert _state(plugin, name) is None
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.start", name=name)
    assert err.value.code == "not-found"


@pytest.mark.integration
async def test_acceleration_is_proven_not_assumed(kvm_bed: KvmTestBed) -> None:
    fingerprint = await (await kvm_bed.plugin()).kumo_fingerprint()
    assert fingerprint.available and fingerprint.kinds == ("kvm",)
    attrs = fingerprint.attributes
    cpu_flags = Path("/proc/cpuinfo").read_text().split()
    if "vmx" not in cpu_flags and "svm" not in cpu_flags:
        # These machines: /dev/kvm is software (PVM); guests crawl or fault (RECIPES.md 1b).
        assert attrs["acceleration"] == "tcg"
        assert "falling back to TCG" in attrs["acceleration_reason"]
        assert "probe guest" in attrs["acceleration_reason"] or "/dev/kvm" in attrs["acceleration_reason"]
    else:
        assert attrs["acceleration"] in ("kvm", "tcg") and attrs["acceleration_reason"]
    forced = await (await kvm_bed.plugin(acceleration="tcg")).kumo_fingerprint()
    assert forced.attributes["acceleration"] == "tcg"
    assert "set by configuration" in forced.attributes["acceleration_reason"]


@pytest.mark.integration
async def test_adoption_leaves_the_running_domain_alone(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    import libvirt

    first = await kvm_bed.plugin()  # idle: its create loads libvirt; the second loads it at startup
    name = kvm_bed.name("adopt")
    await _task(first, "kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))
    conn = libvirt.open("qemu:///system")
    try:
        before = conn.lookupByName(name).ID()
        await first.kumo_shutdown()  # the agent stops; the VM must not

        second = await kvm_bed.plugin()
        adopted = await second.kumo_adopt()
        assert [(s.name, s.kind, s.state) for s in adopted if s.name.startswith(kvm_bed.prefix)] == [
            (name, "kvm", "running")
        ]
        dom = conn.lookupByName(name)
        assert dom.isActive() and dom.ID() == before  # same qemu process: never restarted
        # The adopted instance is fully managed: events and tasks work.
        await _task(second, "kvm.stop", name=name, timeout=0)
        assert _state(second, name) == "stopped"
    finally:
        conn.close()


@pytest.mark.integration
async def test_missing_image_leaves_nothing(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("noimg")
    payload = _payload(kvm_bed, kvm_guest, name, image=str(kvm_bed.root / "nope.qcow2"), image_sha256=None)
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.create", **payload)
    assert err.value.code == "image-missing" and "does not exist" in str(err.value)
    assert _leftovers(kvm_bed, name) == []


@pytest.mark.integration
async def test_checksum_mismatch_leaves_nothing(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("badsum")
    wrong = hashlib.sha256(b"not the image").hexdigest()
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, name, image_sha256=wrong))
    assert err.value.code == "image-checksum"
    assert kvm_guest.disk_sha256 in str(err.value) and wrong in str(err.value)
    assert _leftovers(kvm_bed, name) == []


@pytest.mark.integration
async def test_duplicate_name_is_refused_and_the_first_survives(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("dup")
    await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, name))
    assert err.value.code == "exists"
    assert kvm_bed.domains() == [name] and _state(plugin, name) == "running"
    assert (kvm_bed.root / "instances" / name / "disk.qcow2").exists()


@pytest.mark.integration
async def test_invalid_user_data_leaves_nothing(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("baduser")
    payload = _payload(kvm_bed, kvm_guest, name, user_data="#cloud-config\nhostname: x\npackagez: [vim]\n")
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.create", **payload)
    assert err.value.code == "invalid-seed"
    assert "user_data line 3" in str(err.value) and "'packagez'" in str(err.value)
    assert _leftovers(kvm_bed, name) == []


@pytest.mark.integration
async def test_idle_and_loaded_fingerprints_agree(kvm_bed: KvmTestBed) -> None:
    idle = await (await kvm_bed.plugin()).kumo_fingerprint()  # no instance directory yet
    (kvm_bed.root / "instances" / kvm_bed.name("before")).mkdir(parents=True)
    managing = await (await kvm_bed.plugin()).kumo_fingerprint()  # loads libvirt at startup
    assert idle.available and idle.attributes["libvirt_version"] and idle.attributes["qemu_version"]
    assert idle == managing


@pytest.mark.integration
@pytest.mark.parametrize("managing", [False, True], ids=["idle", "managing"])
async def test_libvirtd_down_then_back(
    kvm_bed: KvmTestBed, kvm_guest: Guest, libvirt_proxy: Any, monkeypatch: pytest.MonkeyPatch, managing: bool
) -> None:
    # Idle, the outage is seen by the probe child at the next fingerprint; managing VMs, by
    # the connection closing. Either way the create loads libvirt and reconnects by itself.
    monkeypatch.setattr(kvm, "IDLE_PROBE_INTERVAL", 0.0)
    if managing:
        (kvm_bed.root / "instances" / kvm_bed.name("before")).mkdir(parents=True)
    plugin = await kvm_bed.plugin(uri=libvirt_proxy.uri)
    assert (await plugin.kumo_fingerprint()).available

    libvirt_proxy.stop()  # to the plugin, libvirtd just died
    fingerprint = await _fingerprint_until(plugin, available=False)
    assert libvirt_proxy.uri in fingerprint.reason
    name = kvm_bed.name("down")
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, name))
    assert err.value.code == "unavailable" and "start libvirtd" in str(err.value)
    assert _leftovers(kvm_bed, name) == []

    assert plugin.kumo_probes()[0].run().status == "critical"
    metrics = {m.name: m for m in plugin.kumo_metrics()}
    assert metrics["kumo_kvm_libvirt_up"].samples[0].value == 0.0

    libvirt_proxy.start()  # libvirtd is back: the plugin reconnects by itself
    await _fingerprint_until(plugin, available=True)
    assert plugin.kumo_probes()[0].run().status == "ok"
    result = await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))
    assert result["state"] == "running"
    running = [s for s in plugin.kumo_metrics()[1].samples if s.labels["state"] == "running"]
    assert running[0].value == 1.0


@pytest.fixture
async def https_image_server(tmp_path: Path, kvm_guest: Guest) -> Any:
    """Serves the guest disk over HTTPS with a throwaway self-signed CA (``tmp_path/cert.pem``)."""
    import datetime
    import ipaddress
    import ssl

    from aiohttp import web
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tests.harness import free_port

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kumo-test-images")])
    now = datetime.datetime.utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    app = web.Application()
    async def disk(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(kvm_guest.disk)

    app.router.add_get("/disk.qcow2", disk)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield f"https://127.0.0.1:{port}/disk.qcow2", tmp_path / "cert.pem"
    await runner.cleanup()


@pytest.mark.integration
async def test_image_from_https_is_verified_and_cached(
    kvm_bed: KvmTestBed, kvm_guest: Guest, https_image_server: tuple[str, Path]
) -> None:
    url, ca = https_image_server
    untrusting = await kvm_bed.plugin()
    with pytest.raises(TaskError) as err:
        await _task(untrusting, "kvm.create", **_payload(kvm_bed, kvm_guest, kvm_bed.name("url0"), image=url))
    assert err.value.code == "image-download" and "certificate verify failed" in str(err.value)

    plugin = await kvm_bed.plugin(image_ca_file=str(ca))
    bad = kvm_bed.name("urlbad")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, bad, image=url, image_sha256=wrong))
    assert err.value.code == "image-checksum", str(err.value)
    assert _leftovers(kvm_bed, bad) == []

    good = kvm_bed.name("url")
    payload = _payload(kvm_bed, kvm_guest, good, hold=True, image=url)
    assert (await _task(plugin, "kvm.create", **payload))["state"] == "running"
    assert [p.name for p in (kvm_bed.root / "images").iterdir()] == [f"{kvm_guest.disk_sha256}.img"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "code"), [({"memory_mib": 1 << 30}, "insufficient-memory"), ({"vcpus": 4096}, "insufficient-cpu")]
)
async def test_resources_are_checked(kvm_bed: KvmTestBed, kvm_guest: Guest, extra: dict[str, int], code: str) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("big")
    with pytest.raises(TaskError) as err:
        await _task(plugin, "kvm.create", **_payload(kvm_bed, kvm_guest, name, **extra))
    assert err.value.code == code and "this node" in str(err.value)
    assert _leftovers(kvm_bed, name) == []
