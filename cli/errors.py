"""How the CLI reports failure: one readable line, never a traceback."""

from __future__ import annotations


class CLIError(Exception):
    """An error to print as one line (``conveyor: <message>``) before exiting with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
