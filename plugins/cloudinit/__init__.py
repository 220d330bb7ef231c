"""The ``cloudinit`` plugin: NoCloud first-boot seeds for the kvm and lxc plugins.

Instance plugins never import this module: they call the ``kumo_instance_seed`` hook, and
this plugin answers with a seed built from the create payload — an ISO (volume label
``cidata``) to attach as a read-only cdrom, or a directory tree for a container's
``/var/lib/cloud/seed/nocloud/``. The seed holds ``meta-data`` (instance-id,
local-hostname), ``user-data``, and when given ``network-config`` (v1 or v2) and
``vendor-data``.

User data and network config are validated before anything is written, so a typo fails
the create with the line and the reason instead of a guest that silently ignores it:
``#cloud-config`` must be YAML that cloud-init's own schema accepts, whose top-level keys
are keys cloud-init reads (:mod:`plugins.cloudinit.schema`), ``#!``
scripts and ``#cloud-boothook`` are passed through as they are, and MIME multipart
archives and Jinja templates are accepted unvalidated (their parts only exist once
cloud-init assembles or renders them in the guest).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.sdk import ErrorCode, Fingerprint, TaskError, hookimpl

from . import schema

CODE: ErrorCode = "invalid-seed"  # what is wrong is the seed data the create sent
VOLUME_LABEL = "cidata"

NETWORK_V1_KEYS = frozenset({"version", "config"})
NETWORK_V2_KEYS = frozenset(
    {"version", "renderer", "ethernets", "wifis", "bonds", "bridges", "vlans", "tunnels", "vrfs"}
)
# First lines cloud-init recognises as a user-data type that is not YAML to check here.
PASSTHROUGH_PREFIXES = ("#!", "#cloud-boothook", "#include", "#part-handler", "## template: jinja")


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
        staging = workdir / ".cidata"
        iso = workdir / "cidata.iso"
        await asyncio.to_thread(_write_tree, staging, files)
        try:
            await _make_iso(tool, staging, sorted(files), iso)
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


def validate_user_data(text: str, what: str = "user_data") -> None:
    """Check user data the way cloud-init will read it; raise TaskError naming the line."""
    if not text.strip():
        return
    first = text.lstrip().splitlines()[0].strip()
    if first.startswith(PASSTHROUGH_PREFIXES):
        return
    lowered = text.lstrip()[:200].lower()
    if lowered.startswith(("content-type: multipart/", "mime-version:")):
        return
    if not first.startswith("#cloud-config"):
        raise TaskError(
            f"{what} line 1: unknown format {first[:40]!r}: start it with '#cloud-config' "
            "(YAML), '#!' (a script) or send a MIME multipart archive",
            code=CODE,
        )
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TaskError(f"{what} {_yaml_where(exc)}: invalid YAML: {_yaml_problem(exc)}", code=CODE) from exc
    if node is None:
        return
    if not isinstance(node, yaml.MappingNode):
        raise TaskError(
            f"{what} line {node.start_mark.line + 1}: #cloud-config must be a mapping of keys, "
            f"got a {node.id}",
            code=CODE,
        )
    try:
        schema.check(node, data)
    except schema.SchemaError as exc:
        raise TaskError(f"{what} {exc}", code=CODE) from exc


def validate_network_config(value: Any) -> str:
    """Check a network-config (v1 or v2, a mapping or YAML text); return it as YAML text."""
    if isinstance(value, str):
        try:
            data = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise TaskError(
                f"network_config {_yaml_where(exc)}: invalid YAML: {_yaml_problem(exc)}", code=CODE
            ) from exc
    else:
        data = value
    if not isinstance(data, Mapping):
        raise TaskError("network_config must be a mapping with 'version: 1' or 'version: 2'", code=CODE)
    body = data["network"] if set(data) == {"network"} else data
    if not isinstance(body, Mapping):
        raise TaskError("network_config.network must be a mapping", code=CODE)
    version = body.get("version")
    allowed = {1: NETWORK_V1_KEYS, 2: NETWORK_V2_KEYS}.get(version)
    if allowed is None:
        raise TaskError(f"network_config.version must be 1 or 2, got {version!r}", code=CODE)
    unknown = sorted(set(map(str, body)) - allowed)
    if unknown:
        raise TaskError(
            f"network_config: unknown key {unknown[0]!r} for version {version} "
            f"(allowed: {', '.join(sorted(allowed))})",
            code=CODE,
        )
    if isinstance(value, str):
        return value
    return yaml.safe_dump(_plain(data), default_flow_style=False, sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(unknown line)"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    return getattr(exc, "problem", None) or str(exc)


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
