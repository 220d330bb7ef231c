"""What a node reports about itself, checked as the untrusted input it is.

A node's register and heartbeat feed the scheduler (CPUs, memory), the Prometheus target
list (where its metrics are) and every admin's view. A node may be compromised, so each
field is checked against what an agent really sends and bounded to what a machine can
have: a wrong type or an absurd claim is a 400 naming the field, never a 500 later in a
placement or a scrape. Facts an agent of a newer version adds are dropped, not refused,
so a controller keeps working with agents newer than itself.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from agent.sdk import INSTANCE_STATES, KIND_RE
from agent.sdk import NAME_RE as INSTANCE_NAME_RE
from controller.api import ApiError

MAX_CPUS = 4096
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB
MAX_OVERCOMMIT = 64.0
MAX_TEXT = 256
MAX_REASON = 2000
MAX_PLUGINS = 64
MAX_KINDS = 32
MAX_ATTRIBUTES_BYTES = 16 << 10
MAX_INSTANCES = 10_000
MAX_DETAILS_BYTES = 4 << 10
PLUGIN_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}\Z")


def _integer(low: int, high: int) -> Callable[[str, Any], int]:
    def check(where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ApiError(400, f"{where} must be an integer from {low} to {high}, got {value!r:.60}")
        return value
    return check


def text(limit: int) -> Callable[[str, Any], str]:
    def check(where: str, value: Any) -> str:
        if not isinstance(value, str) or len(value) > limit:
            raise ApiError(400, f"{where} must be a string of at most {limit} characters, got {value!r:.60}")
        return value
    return check


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{where} must be true or false, got {value!r:.60}")
    return value


def _overcommit(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_OVERCOMMIT:
        raise ApiError(400, f"{where} must be a number above 0 and at most {MAX_OVERCOMMIT:g}, got {value!r:.60}")
    return float(value)


FACTS: Mapping[str, Callable[[str, Any], Any]] = {
    "cpus": _integer(1, MAX_CPUS),
    "memory_bytes": _integer(1, MAX_MEMORY_BYTES),
    "memory_available_bytes": _integer(0, MAX_MEMORY_BYTES),
    "vcpu_overcommit": _overcommit,
    "arch": text(MAX_TEXT),
    "kernel": text(MAX_TEXT),
    "hostname": text(MAX_TEXT),
    "kvm_device": _flag,
}


def facts(value: Any) -> dict[str, Any]:
    """The node's facts, each checked; unknown keys dropped."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"facts must be an object, got {type(value).__name__}")
    checked = {key: FACTS[key](f"facts.{key}", item) for key, item in value.items() if key in FACTS}
    if checked.get("memory_available_bytes", 0) > checked.get("memory_bytes", MAX_MEMORY_BYTES):
        raise ApiError(400, "facts.memory_available_bytes is more than facts.memory_bytes")
    return checked


def plugins(value: Any) -> dict[str, Any] | None:
    """The plugins' fingerprints: ``{name: {available, reason, kinds, attributes}}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_PLUGINS:
        raise ApiError(400, f"plugins must be an object of at most {MAX_PLUGINS} fingerprints")
    out = {}
    for name, fingerprint in value.items():
        where = f"plugins.{name:.64}"
        if not PLUGIN_NAME_RE.match(name):
            raise ApiError(400, f"{where}: a plugin name is 1 to 64 of a-z, 0-9, '_' and '-'")
        if not isinstance(fingerprint, dict) or set(fingerprint) - {"available", "reason", "kinds", "attributes"}:
            raise ApiError(400, f"{where} must be an object with available, reason, kinds and attributes")
        kinds = fingerprint.get("kinds", [])
        if not isinstance(kinds, list) or len(kinds) > MAX_KINDS or not all(
                isinstance(k, str) and KIND_RE.match(k) for k in kinds):
            raise ApiError(400, f"{where}.kinds must be a list of at most {MAX_KINDS} kind names")
        attributes = fingerprint.get("attributes", {})
        if not isinstance(attributes, dict) or len(json.dumps(attributes)) > MAX_ATTRIBUTES_BYTES:
            raise ApiError(400, f"{where}.attributes must be an object of at most {MAX_ATTRIBUTES_BYTES} bytes")
        out[name] = {
            "available": _flag(f"{where}.available", fingerprint.get("available", False)),
            "reason": text(MAX_REASON)(f"{where}.reason", fingerprint.get("reason", "")),
            "kinds": kinds,
            "attributes": attributes,
        }
    return out


def instances(value: Any) -> list[dict[str, Any]]:
    """The node's instances: ``[{name, kind, state, details}]``."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_INSTANCES:
        raise ApiError(400, f"instances must be a list of at most {MAX_INSTANCES} items")
    out = []
    for item in value:
        if (not isinstance(item, dict) or not isinstance(item.get("name"), str)
                or not INSTANCE_NAME_RE.match(item["name"]) or item.get("state") not in INSTANCE_STATES
                or not isinstance(item.get("kind", ""), str) or not KIND_RE.match(item.get("kind") or "x")):
            raise ApiError(400, f"instances: each item needs a valid name, kind and a state from "
                                f"{sorted(INSTANCE_STATES)}, got {item!r:.200}")
        details = item.get("details", {})
        if not isinstance(details, dict) or len(json.dumps(details)) > MAX_DETAILS_BYTES:
            raise ApiError(400, f"instances: {item['name']}: details must be an object of at most "
                                f"{MAX_DETAILS_BYTES} bytes")
        out.append({"name": item["name"], "kind": item.get("kind"), "state": item["state"], "details": details})
    return out


def _number(low: float, high: float) -> Callable[[str, Any], float]:
    def check(where: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ApiError(400, f"{where} must be a number from {low:g} to {high:g}, got {value!r:.60}")
        return value
    return check


MAX_LOAD = 1e6
MAX_CPU_SECONDS = 1e15  # a counter: centuries of thousands of CPUs
NODE_USAGE: Mapping[str, Callable[[str, Any], Any]] = {
    "cpu_busy": _number(0, 1),
    "cpus": _integer(1, MAX_CPUS),
    "memory_used_bytes": _integer(0, MAX_MEMORY_BYTES),
    "memory_total_bytes": _integer(1, MAX_MEMORY_BYTES),
    "load1": _number(0, MAX_LOAD),
    "load5": _number(0, MAX_LOAD),
    "load15": _number(0, MAX_LOAD),
}
INSTANCE_USAGE: Mapping[str, Callable[[str, Any], Any]] = {
    "cpu_seconds": _number(0, MAX_CPU_SECONDS),
    "memory_bytes": _integer(0, MAX_MEMORY_BYTES),
    "memory_limit_bytes": _integer(0, MAX_MEMORY_BYTES),
}


def usage(value: Any) -> dict[str, Any] | None:
    """What the node measures: ``{"node": {cpu_busy, memory_used_bytes...}, "instances":
    {name: {kind, cpu_seconds, memory_bytes, memory_limit_bytes}}}``; unknown keys dropped."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("node", {}), dict) or not isinstance(
            value.get("instances", {}), dict) or len(value.get("instances", {})) > MAX_INSTANCES:
        raise ApiError(400, f"usage must be an object with a node object and an instances object of at most "
                            f"{MAX_INSTANCES} entries")
    node = {key: NODE_USAGE[key](f"usage.node.{key}", item)
            for key, item in value.get("node", {}).items() if key in NODE_USAGE}
    out: dict[str, Any] = {}
    for name, item in value.get("instances", {}).items():
        if not isinstance(name, str) or not INSTANCE_NAME_RE.match(name) or not isinstance(item, dict) or not (
                isinstance(item.get("kind"), str) and KIND_RE.match(item["kind"])):
            raise ApiError(400, f"usage.instances: each entry needs a valid instance name and kind, got {name!r:.80}")
        out[name] = {"kind": item["kind"], **{key: INSTANCE_USAGE[key](f"usage.instances.{name}.{key}", figure)
                                               for key, figure in item.items() if key in INSTANCE_USAGE}}
    return {"node": node, "instances": out}


MAX_IMAGES = 10_000
MAX_PULLS = 64
_DIGEST_RE = re.compile(r"[0-9a-f]{64}\Z")


def images(value: Any) -> dict[str, Any] | None:
    """The node's image cache: ``{"held": [sha256...], "pulling": {sha256: {bytes, total}}}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"held", "pulling"}:
        raise ApiError(400, "images must be an object with held and pulling")
    held = value.get("held", [])
    if not isinstance(held, list) or len(held) > MAX_IMAGES or not all(
            isinstance(d, str) and _DIGEST_RE.match(d) for d in held):
        raise ApiError(400, f"images.held must be a list of at most {MAX_IMAGES} sha256 digests (64 lowercase hex)")
    pulling = value.get("pulling", {})
    if not isinstance(pulling, dict) or len(pulling) > MAX_PULLS:
        raise ApiError(400, f"images.pulling must be an object of at most {MAX_PULLS} pulls")
    out = {}
    for digest, pull in pulling.items():
        if not _DIGEST_RE.match(digest) or not isinstance(pull, dict):
            raise ApiError(400, f"images.pulling: each key is a sha256 digest and each value an object, "
                                f"got {digest!r:.80}")
        out[digest] = {key: _integer(0, MAX_MEMORY_BYTES)(f"images.pulling.{digest}.{key}", pull.get(key, 0))
                       for key in ("bytes", "total")}
    return {"held": held, "pulling": out}


def metrics_url(value: Any, remote: str | None) -> str | None:
    """Where Prometheus scrapes the node: the scheme and port it reported, at the address the
    controller sees it connect from (never a host of its choosing, which would turn every
    Prometheus into a client of whatever the node names)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ApiError(400, "metrics_url must be a string")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or port is None or parts.path != "/metrics" or (
            parts.query or parts.fragment or parts.username or parts.password):
        raise ApiError(400, f"metrics_url must be http(s)://HOST:PORT/metrics, got {value!r:.100}")
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return None  # not over IP (a Unix socket in tests): nowhere Prometheus could reach
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{parts.scheme}://{host}:{port}/metrics"
