"""How a VM is checkpointed: the kvm kind's :class:`agent.sdk.NativeCheckpointer`.

A VM is not a process tree CRIU could dump: its memory state is written by libvirt's save
(``virDomainSaveFlags``), which stops the guest, and read back by its restore
(``virConnectRestoreFlags``). A checkpoint holds, in the image directory the checkpoint
plugin gives:

- ``memory.save``: libvirt's save file (the guest's RAM and device state);
- ``disk.qcow2``: a copy of the qcow2 overlay taken while the guest is stopped by the
  save, so the disk is at the very point the memory is: crash-consistent;
- ``seed.iso``: the first-boot seed, when the VM has one (it travels in a migration).

The base image the overlay is backed by is not copied: it is named in the record by its
path and, when it came through the image cache, its SHA-256 (:attr:`SavedState.images`), so a
migration carries it only to a node whose cache lacks it, and the restore takes it from
this node's cache.

A restore never trusts the domain XML inside the save file: the definition is rebuilt from
the record exactly as a create builds it (the same payload checks, this node's directories,
network and emulator), with only the saved UUID and machine type carried over, which
libvirt needs to accept the saved device state. The overlay it puts back must be a plain
qcow2 (no external data file), and is pointed at this node's base image without opening
the one it names. A checkpoint taken with ``leave_running``
is a save followed at once by a restore: the guest pauses for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.sdk import (
    CheckpointBlocker,
    CheckpointSubject,
    SavedState,
    TaskError,
    parse_payload,
    run_command,
)
from plugins.kvm.disks import CONSOLE_LOG, DISK, backing_file, image_format

if TYPE_CHECKING:
    from plugins.kvm import KvmPlugin
    from plugins.kvm.spec import CreateSpec

MEMORY = "memory.save"
DISK_COPY = "disk.qcow2"
SEED_COPY = "seed.iso"
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# The machine types the plugin's own definitions resolve to ("pc": i440fx, versioned by QEMU).
_MACHINE_RE = re.compile(r"^pc(-i440fx-[0-9]{1,3}\.[0-9]{1,3})?\Z")
_SEED_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")


@dataclasses.dataclass(frozen=True)
class SavedVm:
    """The manifest's ``instance`` of a VM checkpoint: what the restore rebuilds it from.

    ``spec`` is a create payload (checked as a create's); ``seed`` is the seed's file name
    in the instance directory, None without one; ``nic`` whether the VM had a network
    interface (the device set must match the saved state)."""

    spec: dict[str, Any]
    uuid: str
    machine: str
    domain_type: Literal["kvm", "qemu"]
    nic: bool
    seed: str | None = None


def save_blockers(xml: str, state: str, io_error: bool, directory: Path) -> list[CheckpointBlocker]:
    """What keeps the domain (its live ``xml``, its Kumo ``state``) from being saved now;
    ``io_error``: it is paused on a disk error. Every disk must be a file of the instance
    ``directory``, or its copy would not be the VM's disk at the point of the save."""
    import xml.etree.ElementTree as ET

    if state not in ("running", "paused"):
        return [CheckpointBlocker("not-running", f"the VM is {state}: only a running or paused VM has a state "
                                                 "to save; start it first")]
    found: list[CheckpointBlocker] = []
    if io_error:
        found.append(CheckpointBlocker("io-error", "the VM is paused on a disk I/O error: its disk is not at a "
                                                   "consistent point; fix the storage and resume it first"))
    devices = ET.fromstring(xml).find("devices")
    for hostdev in devices.iter("hostdev") if devices is not None else ():
        address = hostdev.find("source/address")
        what = " ".join(f"{k}={v}" for k, v in sorted((address if address is not None else hostdev).attrib.items()))
        found.append(CheckpointBlocker("host-device", f"a host device is passed through ({what}): its state "
                                                      "cannot be saved; detach it first"))
    for disk in devices.iter("disk") if devices is not None else ():
        target = next((t.get("dev", "?") for t in disk.iter("target")), "?")
        source = disk.find("source")
        if disk.find("shareable") is not None:
            found.append(CheckpointBlocker("shared-disk", f"disk {target} is shareable: other guests write it, so "
                                                          "no copy of it is a consistent point; detach it first"))
        elif source is None and disk.get("device") == "cdrom":
            continue  # an empty drive
        elif disk.get("type") != "file" or source is None or Path(source.get("file", "")).parent != directory:
            where = (source.attrib.get("file") or source.attrib.get("dev") or source.attrib.get("name")
                     if source is not None else None) or "nothing"
            found.append(CheckpointBlocker("foreign-disk", f"disk {target} ({where}) is not in the VM's directory "
                                                           f"{directory}: the checkpoint would not hold it; detach it"))
    return found


def device_blockers(xml: str, directory: Path) -> list[dict[str, str]]:
    """What in a domain's definition (its ``xml``) no checkpoint can hold, whatever its
    state: what the instance's details show (``checkpoint_blockers``)."""
    return [{"code": b.code, "message": b.message} for b in save_blockers(xml, "running", False, directory)]


def saved_vm(xml: str, base: Path | None, cache: Path) -> SavedVm:
    """The record of the running domain ``xml`` whose overlay is backed by ``base`` (in the
    image cache ``cache`` when it is named by its digest there)."""
    import xml.etree.ElementTree as ET

    from plugins.kvm.domain import METADATA_NS

    root = ET.fromstring(xml)
    image = root.findtext(f"metadata/{{{METADATA_NS}}}instance/{{{METADATA_NS}}}image") or str(base or "")
    digest = base.name if base is not None and base.parent == cache and _DIGEST_RE.match(base.name) else None
    options = {key: root.findtext(f"os/{key}") for key in ("kernel", "initrd", "cmdline")}
    spec: dict[str, Any] = {
        "name": root.findtext("name"), "kind": "kvm", "image": image, "image_sha256": digest,
        "memory_mib": int(root.findtext("memory") or 0) // 1024,  # libvirt writes KiB
        "vcpus": int(root.findtext("vcpu") or 1),
        "options": {key: value for key, value in options.items() if value is not None},
    }
    sources = [d.find("source") for d in root.iter("disk") if d.get("device") == "cdrom"]
    seed = next((Path(s.get("file", "")).name for s in sources if s is not None), None)
    os_type = root.find("os/type")
    return SavedVm(spec=spec, uuid=root.findtext("uuid") or "",
                   machine=(os_type.get("machine") if os_type is not None else None) or "pc",
                   domain_type="kvm" if root.get("type") == "kvm" else "qemu",
                   nic=root.find("devices/interface") is not None, seed=seed)


def parse_saved(record: Mapping[str, Any], instance: Mapping[str, Any] | None = None) -> tuple[SavedVm, CreateSpec]:
    """A checkpoint's record, checked as strictly as a create (it may come from another
    node), and the spec to build the VM from: the controller's create payload ``instance``
    when given (the source wrote the record's), which must describe the VM that was saved;
    ``import-refused`` naming what is wrong."""
    from plugins.kvm.spec import parse_create

    try:
        saved = parse_payload(SavedVm, record, "checkpoint record")
        spec = parse_create(saved.spec)
        trusted = parse_create(instance) if instance is not None else spec
    except TaskError as exc:
        raise TaskError(f"the VM checkpoint cannot be restored here: {exc}", code="import-refused") from exc
    differ = [key for key in ("name", "memory_mib", "vcpus") if getattr(spec, key) != getattr(trusted, key)]
    if differ:
        raise TaskError(f"the VM checkpoint is not of the instance the controller knows: its {', '.join(differ)} "
                        "differ", code="import-refused")
    for ok, what in ((_UUID_RE.match(saved.uuid), f"uuid {saved.uuid!r}"),
                     (_MACHINE_RE.match(saved.machine), f"machine type {saved.machine!r}"),
                     (saved.seed is None or (_SEED_RE.match(saved.seed) and saved.seed not in (DISK, CONSOLE_LOG)),
                      f"seed file name {saved.seed!r}")):
        if not ok:
            raise TaskError(f"the VM checkpoint cannot be restored here: its {what} is not one this node's kvm plugin "
                            "writes", code="import-refused")
    return saved, trusted


@dataclasses.dataclass(frozen=True)
class VmFacts:
    """What a save is decided from, read from libvirt at once: the domain's live ``xml``, its
    Kumo ``state`` and whether it is paused on an I/O error, its instance ``directory`` and
    overlay ``disk``, and the node's image ``cache`` directory."""

    xml: str
    state: str
    io_error: bool
    directory: Path
    disk: Path
    cache: Path


# Called by the restore once the instance's overlay path (in its directory) and base image
# are known, to put the checkpoint's files in place: (overlay, base image) -> None.
Place = Callable[[Path, Path], Awaitable[None]]


class KvmCheckpointer:
    """Save and restore of the VMs of ``plugin`` (the kvm plugin); see the module docstring."""

    kind = "kvm"

    def __init__(self, plugin: KvmPlugin):
        self.plugin = plugin

    async def subject(self, name: str) -> CheckpointSubject | None:
        state = next((s for s in self.plugin.list() if s.name == name), None)
        if state is None:
            return None
        return CheckpointSubject(name, state.state, None, {})

    async def blockers(self, name: str) -> Sequence[CheckpointBlocker]:
        facts = await self.plugin.save_facts(name)
        return save_blockers(facts.xml, facts.state, facts.io_error, facts.directory)

    async def save(self, name: str, image: Path, leave_running: bool) -> SavedState:
        plugin = self.plugin
        facts = await plugin.save_facts(name)
        refused = save_blockers(facts.xml, facts.state, facts.io_error, facts.directory)
        if refused:  # pre-flight passed moments ago, but the guest may have changed since
            raise TaskError("; ".join(b.message for b in refused), code=refused[0].code)
        base = await asyncio.to_thread(backing_file, facts.disk)
        saved = saved_vm(facts.xml, base, facts.cache)
        # Checked before the guest stops: a record no restore would accept is never made.
        record = dataclasses.asdict(saved)
        saved, spec = parse_saved(record)
        memory = image / MEMORY
        await plugin.save_domain(name, memory)
        try:
            # The guest is stopped: the overlay is exactly at the point of the memory state.
            await asyncio.to_thread(_copy, facts.disk, image / DISK_COPY)
            if saved.seed is not None:
                await asyncio.to_thread(_copy, facts.directory / saved.seed, image / SEED_COPY)
        except BaseException:
            await plugin.restore_saved(name, spec, saved, memory, None)
            raise
        if leave_running:
            await plugin.restore_saved(name, spec, saved, memory, None)
        # The base image is not copied into the checkpoint: a migration carries it only to a
        # node whose cache lacks it.
        return SavedState(record, [spec.image_sha256] if spec.image_sha256 else [])

    async def restore(self, name: str, record: Mapping[str, Any], image: Path,
                      instance: Mapping[str, Any] | None) -> None:
        saved, spec = parse_saved(record, instance)
        if spec.name != name:
            raise TaskError(f"the VM checkpoint is of {spec.name!r}, not {name!r}", code="image-mismatch")
        swapped: list[tuple[Path, Path]] = []  # (the disk, what it replaced)

        async def place(disk: Path, base: Path) -> None:
            directory, previous = disk.parent, disk.with_name(f".{disk.name}.before")
            # Copied beside the current overlay, which it replaces only once it names
            # this node's base image: a failure before leaves the disk as it was.
            incoming = disk.with_name(f".{disk.name}.restoring")
            try:
                await asyncio.to_thread(_copy, image / DISK_COPY, incoming)
                await _check_overlay(incoming)
                if await asyncio.to_thread(backing_file, incoming) != base:
                    await _rebase(incoming, base)
            except BaseException:
                await asyncio.to_thread(_unlink_quietly, incoming)
                raise
            await asyncio.to_thread(_swap, incoming, disk, previous)
            swapped.append((disk, previous))
            if saved.seed is not None:
                await asyncio.to_thread(_copy, image / SEED_COPY, directory / saved.seed)

        try:
            await self.plugin.restore_saved(name, spec, saved, image / MEMORY, place)
        except BaseException:
            for disk, previous in swapped:  # the instance keeps the disk it had
                await asyncio.to_thread(_put_back, previous, disk)
            raise
        for _, previous in swapped:
            await asyncio.to_thread(_unlink_quietly, previous)


def _copy(source: Path, target: Path) -> None:
    """Copy a file whole, in the kernel (sendfile). Not fsynced, as libvirt's save file is
    not: a checkpoint is as durable as the page cache makes it. Blocking.

    The target is 0600 before a byte lands, whatever mode the source had (one that came in a
    migration's stream has the mode its sender chose): it is a VM's disk or seed."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT leaves an existing file's mode as it was
    finally:
        os.close(fd)
    shutil.copyfile(source, target)


def _swap(incoming: Path, disk: Path, previous: Path) -> None:
    if disk.exists():
        os.replace(disk, previous)
    os.replace(incoming, disk)


def _put_back(previous: Path, disk: Path) -> None:
    if previous.exists():
        os.replace(previous, disk)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def _check_overlay(disk: Path) -> None:
    """Refuse a checkpoint's disk that is not a plain qcow2 overlay, as the plugin makes:
    one with an external data file would have qemu open a host path the source chose (its
    backing file is replaced by this node's base image, never opened)."""
    result = await run_command("qemu-img", "info", "-f", "qcow2", "--output=json", str(disk))
    if result.returncode != 0:
        raise TaskError(f"the checkpoint's disk is not a qcow2 image qemu-img can read: {result.error}",
                        code="image-corrupt")
    data_file = ((json.loads(result.stdout).get("format-specific") or {}).get("data") or {}).get("data-file")
    if data_file:
        raise TaskError(f"the checkpoint's disk keeps its data in another file, {data_file!r}: the kvm plugin never "
                        "makes such a disk; refused", code="import-refused")


async def _rebase(disk: Path, base: Path) -> None:
    """Point the copied overlay at this node's copy of its base image (no data moves: the
    base is the same image, by digest or path)."""
    result = await run_command("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", await image_format(base),
                               "-b", str(base), str(disk))
    if result.returncode != 0:
        raise TaskError(f"qemu-img could not point the restored disk {disk} at {base}: {result.error}",
                        code="restore-failed")
