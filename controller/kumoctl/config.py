"""kumoctl.yaml: where the controller is and the admin's credentials.

The file has four keys (``controller``, ``ca``, ``cert``, ``key``; ``kumo-controller init``
writes one as ``DIR/kumoctl.yaml``); paths in it are relative to the file. ``controller`` is
one URL or a list of them: GET requests move to the next when one cannot be reached.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from .errors import CommandError

CONFIG_ENV = "KUMOCTL_CONFIG"
CONFIG_KEYS = ("controller", "ca", "cert", "key")


class Config:
    """Where the controller is and the admin's credentials; paths resolved next to the file."""

    def __init__(self, source: Path, controllers: list[str], ca: Path, cert: Path, key: Path):
        self.source = source
        self.controllers = controllers
        self.ca = ca
        self.cert = cert
        self.key = key


def config_candidates(explicit: str | None) -> list[Path]:
    """The config files to try, in order: --config, $KUMOCTL_CONFIG, ./, ~/.config/kumo/."""
    if explicit:
        return [Path(explicit)]
    if os.environ.get(CONFIG_ENV):
        return [Path(os.environ[CONFIG_ENV])]
    return [Path("kumoctl.yaml"), Path.home() / ".config" / "kumo" / "kumoctl.yaml"]


def load_config(explicit: str | None) -> Config:
    """Find and validate the config; every problem is a CommandError naming the file."""
    import yaml

    candidates = config_candidates(explicit)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if explicit or os.environ.get(CONFIG_ENV):
            source = "--config" if explicit else f"${CONFIG_ENV}"
            raise CommandError(f"config file {candidates[0]} (from {source}) does not exist")
        tried = " or ".join(str(p) for p in candidates)
        raise CommandError(
            f"no kumoctl config found at {tried}: pass --config FILE or set {CONFIG_ENV} "
            "(kumo-controller init writes DIR/kumoctl.yaml)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CommandError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or "not YAML"
        raise CommandError(f"{path}:{where} invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise CommandError(f"{path}: expected a mapping with the keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(CONFIG_KEYS))
    if unknown:
        raise CommandError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(CONFIG_KEYS)}")
    for key in CONFIG_KEYS[1:]:
        if not isinstance(data.get(key), str) or not data[key]:
            raise CommandError(f"{path}: {key}: expected a non-empty string, got {data.get(key)!r}")
    controllers = data.get("controller")
    listed = isinstance(controllers, list) and bool(controllers)
    urls = controllers if listed else [controllers]
    for i, url in enumerate(urls):
        key, wanted = (f"controller[{i}]", "an https://HOST:PORT URL") if listed else (
            "controller", "an https://HOST:PORT URL or a list of them")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme != "https" or not parts.hostname:
            raise CommandError(f"{path}: {key}: expected {wanted}, got {url!r}")
    base = path.parent
    return Config(
        source=path,
        controllers=[url.rstrip("/") for url in urls],
        ca=base / data["ca"],
        cert=base / data["cert"],
        key=base / data["key"],
    )
