"""kumoctl.yaml: where the controller is and the admin's credentials.

The file has four keys (``controller``, ``ca``, ``cert``, ``key``; ``kumo-controller init``
writes one as ``DIR/kumoctl.yaml``); paths in it are relative to the file.
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

    def __init__(self, source: Path, controller: str, ca: Path, cert: Path, key: Path):
        self.source = source
        self.controller = controller
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
    for key in CONFIG_KEYS:
        if not isinstance(data.get(key), str) or not data[key]:
            raise CommandError(f"{path}: {key}: expected a non-empty string, got {data.get(key)!r}")
    url = urlsplit(data["controller"])
    if url.scheme != "https" or not url.hostname:
        raise CommandError(
            f"{path}: controller: expected an https://HOST:PORT URL, got {data['controller']!r}"
        )
    base = path.parent
    return Config(
        source=path,
        controller=data["controller"].rstrip("/"),
        ca=base / data["ca"],
        cert=base / data["cert"],
        key=base / data["key"],
    )
