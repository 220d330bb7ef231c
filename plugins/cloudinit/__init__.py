"""The ``cloudinit`` plugin: NoCloud first-boot seeds for the kvm and lxc plugins.

Instance plugins never import this module: they call the ``kumo_instance_seed`` hook, and
this plugin answers with a seed built from the create payload — an ISO (volume label
``cidata``) to attach as a read-only cdrom, or a directory tree for a container's
``/var/lib/cloud/seed/nocloud/``. The seed holds ``meta-data`` (instance-id,
local-hostname), ``user-data``, and when given ``network-config`` (v1 or v2) and
``vendor-data``.

User data and network config are validated before anything is written, so a typo fails
the create with the line and the reason instead of a guest that silently ignores it. The
rules are the SDK's (``agent.sdk.validate_user_data``, ``validate_network_config``: YAML
that cloud-init's own schema accepts), which the controller applies too, so the web
interface shows the same error before a create.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.sdk import (
    ErrorCode,
    Fingerprint,
    TaskError,
    hookimpl,
    validate_network_config,
    validate_user_data,
)

CODE: ErrorCode = "invalid-seed"  # what is wrong is the seed data the create sent
VOLUME_LABEL = "cidata"


class CloudInitPlugin:
    """Builds NoCloud seeds; has no settings and runs no instances itself."""

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        tool = _iso_tool()
        attributes = {"iso_tool": tool[0] if tool else None, "media": ["iso", "directory"]}
        if tool is None:
            return Fingerprint(
                available=True,
                reason="neither genisoimage nor xorriso is installed: only directory seeds (LXC) work",
                attributes=attributes,
            )
        return Fingerprint(available=True, attributes=attributes)

    @hookimpl
    async def kumo_instance_seed(
        self, instance: Mapping[str, Any], medium: str, workdir: Path
    ) -> Path | None:
        """Validate the payload's seed data and write it under ``workdir`` as ``medium``."""
        files = seed_files(instance)
        if medium == "directory":
            target = workdir / "nocloud"
            await asyncio.to_thread(_write_tree, target, files)
            return target
        if medium != "iso":
            raise TaskError(f"unknown seed medium {medium!r}: expected 'iso' or 'directory'", code=CODE)
        tool = _iso_tool()
        if tool is None:
            raise TaskError(
                "cannot build a cidata ISO: install genisoimage (or xorriso) on this node", code="seed-build"
            )
        # user-data may hold passwords and keys, and the instance directory's path is easy to
        # guess: the files and the ISO are made in a directory only root can enter, and the
        # ISO leaves it 0600 (libvirt hands it to qemu's user when the VM starts).
        staging = workdir / ".cidata"
        iso = workdir / "cidata.iso"
        await asyncio.to_thread(_private_dir, staging)
        try:
            await asyncio.to_thread(_write_tree, staging, files)
            await _make_iso(tool, staging, sorted(files), staging / iso.name)
            await asyncio.to_thread(_publish, staging / iso.name, iso)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        return iso


def seed_files(instance: Mapping[str, Any]) -> dict[str, str]:
    """The NoCloud files for ``instance``, validated; raises TaskError naming line and reason."""
    name = instance.get("name")
    if not isinstance(name, str) or not name:
        raise TaskError("the instance has no name to use as its hostname", code=CODE)
    meta = {
        "instance-id": str(instance.get("instance_id") or name),
        "local-hostname": str(instance.get("hostname") or name),
    }
    files = {"meta-data": yaml.safe_dump(meta, default_flow_style=False, sort_keys=False)}
    user_data = instance.get("user_data")
    if user_data is None:
        user_data = ""
    if not isinstance(user_data, str):
        raise TaskError("user_data must be a string (a #cloud-config document or a script)", code=CODE)
    validate_user_data(user_data)
    files["user-data"] = user_data
    network = instance.get("network_config")
    if network is not None:
        files["network-config"] = validate_network_config(network)
    vendor = instance.get("vendor_data")
    if vendor is not None:
        if not isinstance(vendor, str):
            raise TaskError("vendor_data must be a string", code=CODE)
        validate_user_data(vendor, what="vendor_data")
        files["vendor-data"] = vendor
    return files


def _private_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a crashed build's leftovers, whatever their mode
    path.mkdir(mode=0o700)


def _publish(built: Path, target: Path) -> None:
    built.chmod(0o600)
    os.replace(built, target)


def _write_tree(target: Path, files: Mapping[str, str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (target / name).write_text(text)


# Why an external tool rather than pycdlib in-process: genisoimage is one small Debian
# package that builds a seed ISO in about 10 ms, while pycdlib would be a new runtime
# dependency for a ten-millisecond job; the subprocess is an asyncio one, so the event loop
# never waits on it. xorriso's mkisofs emulation is the fallback.
def _iso_tool() -> list[str] | None:
    if path := shutil.which("genisoimage"):
        return [path]
    if path := shutil.which("xorriso"):
        return [path, "-as", "mkisofs"]
    return None


async def _make_iso(tool: list[str], source: Path, names: list[str], iso: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *tool, "-quiet", "-output", str(iso), "-volid", VOLUME_LABEL, "-joliet", "-rock",
        *names,
        cwd=source,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        await asyncio.to_thread(iso.unlink, True)
        raise TaskError(
            f"{tool[0]} failed to build the cidata ISO: {err.decode(errors='replace').strip()[-300:]}",
            code="seed-build",
        )
