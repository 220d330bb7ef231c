"""Checking cloud-init seed data the way cloud-init will read it: user data, vendor data and
network config, with the line and the reason of what is wrong.

The cloudinit plugin checks a create's seed with these before it writes anything, and the
controller checks user data with the same functions for the web interface's editor
(``POST /v1/cloud-config/check``), so a typo is caught in the browser by the very rule the
node applies. ``#!`` scripts and ``#cloud-boothook`` are passed through as they are; MIME multipart
archives and Jinja templates are accepted unchecked (their parts only exist once cloud-init
assembles or renders them in the guest).

``#cloud-config`` is checked against cloud-init's own JSON schema (:mod:`.schema`), with
Kumo's extras: a top-level key no module reads, and an unknown key in a section that lists
its keys, are errors naming the closest known key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from agent.sdk.cloudconfig import schema
from agent.sdk.types import ErrorCode, TaskError

CODE: ErrorCode = "invalid-seed"  # what is wrong is the seed data the create sent

NETWORK_V1_KEYS = frozenset({"version", "config"})
NETWORK_V2_KEYS = frozenset(
    {"version", "renderer", "ethernets", "wifis", "bonds", "bridges", "vlans", "tunnels", "vrfs"}
)
# First lines cloud-init recognises as a user-data type that is not YAML to check here.
PASSTHROUGH_PREFIXES = ("#!", "#cloud-boothook", "#include", "#part-handler", "## template: jinja")


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


def problem_line(error: TaskError) -> int | None:
    """The line a check's error names (``... line 3...``), None when it names none."""
    found = re.search(r"\bline (\d+)", str(error))
    return int(found.group(1)) if found else None
