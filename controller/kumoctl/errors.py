"""What a command raises to fail: one sentence for stderr, never a traceback."""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure to report to the user as one sentence on stderr (no traceback)."""


class ApiError(CommandError):
    """The controller answered with an HTTP error; the message is its ``error`` sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
