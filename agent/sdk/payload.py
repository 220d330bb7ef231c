"""Strict task payloads: a dataclass says what a task takes, anything else is a bad request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from agent.sdk.config import ConfigError, parse_section
from agent.sdk.types import TaskError

T = TypeVar("T")


def parse_payload(cls: type[T], payload: Mapping[str, Any], where: str = "payload") -> T:
    """Build dataclass ``cls`` from a task payload, as :func:`parse_section` builds settings.

    Unknown keys, missing required keys and wrong types fail with
    ``TaskError(code="bad-request")`` naming the key (``payload.memory_mib: expected an
    integer, got 'lots'``). Validate ranges after parsing, with the same code.
    """
    try:
        return parse_section(cls, payload, where)
    except ConfigError as exc:
        raise TaskError(str(exc), code="bad-request") from None
