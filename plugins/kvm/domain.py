"""A Kumo VM as libvirt sees it: the domain XML it is defined from, the metadata that marks
it as Kumo's, its state in Kumo's words, and how a half-made one is removed.

- The XML is built element by element with ``xml.etree``: user strings only ever become
  element text or attribute values, never markup.
- Kumo's domains carry ``<metadata><kumo:instance>`` (their directory, image and
  accelerator): that is how an agent restart finds (adopts) them among other domains of
  the same libvirtd.
- ``xml.etree`` is imported where it is used: an idle node with no VMs never builds or
  reads domain XML (~0.3 MB).

The functions taking a connection or a domain are blocking libvirt calls: call them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugins.kvm.acceleration import Acceleration

if TYPE_CHECKING:
    from plugins.kvm.spec import CreateSpec

METADATA_NS = "https://kumo.dev/xmlns/kvm/1"


@dataclasses.dataclass(frozen=True)
class DomainFiles:
    """Where a domain's files are: all inside its instance directory."""

    directory: Path
    disk: Path
    seed: Path | None
    console_log: Path


def domain_xml(name: str, spec: CreateSpec, accel: Acceleration, files: DomainFiles, network: str,
               uuid: str | None = None, machine: str = "pc") -> str:
    """The libvirt domain definition of a new instance; or, with the ``uuid`` and the
    resolved ``machine`` type of a saved one, of the instance its saved state restores into
    (libvirt refuses a definition whose guest-visible hardware differs from the saved)."""
    import xml.etree.ElementTree as ET

    ET.register_namespace("kumo", METADATA_NS)
    domain = ET.Element("domain", type=accel.domain_type)
    ET.SubElement(domain, "name").text = name
    if uuid is not None:
        ET.SubElement(domain, "uuid").text = uuid
    metadata = ET.SubElement(ET.SubElement(domain, "metadata"), f"{{{METADATA_NS}}}instance")
    ET.SubElement(metadata, f"{{{METADATA_NS}}}directory").text = str(files.directory)
    ET.SubElement(metadata, f"{{{METADATA_NS}}}image").text = spec.image
    ET.SubElement(metadata, f"{{{METADATA_NS}}}acceleration").text = accel.name
    ET.SubElement(metadata, f"{{{METADATA_NS}}}created").text = (
        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    _boot(ET.SubElement(domain, "os"), spec, machine)
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(domain, "clock", offset="utc")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(domain, event).text = action
    _devices(ET.SubElement(domain, "devices"), files, network)
    return ET.tostring(domain, encoding="unicode")


def _boot(os_el: Any, spec: CreateSpec, machine: str) -> None:
    import xml.etree.ElementTree as ET

    ET.SubElement(os_el, "type", arch="x86_64", machine=machine).text = "hvm"
    options = spec.options
    if options.kernel:
        ET.SubElement(os_el, "kernel").text = options.kernel
        if options.initrd:
            ET.SubElement(os_el, "initrd").text = options.initrd
        ET.SubElement(os_el, "cmdline").text = options.cmdline or "console=ttyS0"
    else:
        ET.SubElement(os_el, "boot", dev="hd")


def _devices(devices: Any, files: DomainFiles, network: str) -> None:
    import xml.etree.ElementTree as ET

    root = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(root, "driver", name="qemu", type="qcow2")
    ET.SubElement(root, "source", file=str(files.disk))
    ET.SubElement(root, "target", dev="vda", bus="virtio")
    if files.seed is not None:
        cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cdrom, "driver", name="qemu", type="raw")
        ET.SubElement(cdrom, "source", file=str(files.seed))
        ET.SubElement(cdrom, "target", dev="hdc", bus="ide")
        ET.SubElement(cdrom, "readonly")
    kind, _, target = network.partition(":")
    if kind == "user":
        nic = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(nic, "model", type="virtio")
    elif kind in ("network", "bridge"):
        nic = ET.SubElement(devices, "interface", type=kind)
        ET.SubElement(nic, "source", {kind: target})
        ET.SubElement(nic, "model", type="virtio")
    # The serial port writes straight to a file that survives the guest and the agent.
    for tag, target_attrs in (("serial", {"port": "0"}), ("console", {"type": "serial", "port": "0"})):
        port = ET.SubElement(devices, tag, type="file")
        ET.SubElement(port, "source", path=str(files.console_log), append="on")
        ET.SubElement(port, "target", target_attrs)
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(ET.SubElement(devices, "video"), "model", type="none")
    ET.SubElement(devices, "memballoon", model="none")


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What a domain's Kumo metadata records."""

    directory: Path
    acceleration: str | None


def read_metadata(xml: str) -> Metadata | None:
    """The Kumo metadata of a domain's XML; None when the domain is not Kumo's."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    instance = root.find(f"metadata/{{{METADATA_NS}}}instance")
    if instance is None:
        return None
    directory = instance.findtext(f"{{{METADATA_NS}}}directory")
    if not directory:
        return None
    return Metadata(Path(directory), instance.findtext(f"{{{METADATA_NS}}}acceleration") or None)


def lookup(libvirt: Any, conn: Any, name: str) -> Any:
    """The domain named ``name``, or None."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def kumo_domains(libvirt: Any, conn: Any) -> dict[str, tuple[Metadata, str, str]]:
    """Every Kumo domain of the connection: name -> (metadata, state, XML)."""
    found = {}
    for dom in conn.listAllDomains():
        try:
            xml = dom.XMLDesc(0)
            metadata = read_metadata(xml)
            if metadata is not None:
                found[dom.name()] = (metadata, domain_state(libvirt, dom), xml)
        except libvirt.libvirtError:
            continue  # undefined while we listed
    return found


def domain_state(libvirt: Any, dom: Any) -> str:
    """The domain's state as one of Kumo's instance states."""
    state, _reason = dom.state()
    return {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_BLOCKED: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "running",
        libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
        libvirt.VIR_DOMAIN_CRASHED: "failed",
    }.get(state, "unknown")


def event_state(libvirt: Any, event: int, detail: int) -> str | None:
    """The state a lifecycle event leaves the domain in: an instance state, ``"deleted"``
    (undefined), or None for events that change nothing Kumo reports. Not blocking."""
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        return "deleted"
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        failed = (libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)
        return "failed" if detail in failed else "stopped"
    return {
        libvirt.VIR_DOMAIN_EVENT_STARTED: "running",
        libvirt.VIR_DOMAIN_EVENT_RESUMED: "running",
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
        libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "paused",
        libvirt.VIR_DOMAIN_EVENT_CRASHED: "failed",
    }.get(event)


def undo_create(libvirt: Any, conn: Any, name: str, directory: Path, defined: bool) -> None:
    """Remove what a failed create or restore made: the domain ``name`` if it was
    ``defined``, and its instance ``directory``."""
    if defined:
        dom = lookup(libvirt, conn, name)
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    shutil.rmtree(directory, ignore_errors=True)
