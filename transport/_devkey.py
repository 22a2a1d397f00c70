"""The API key of the ``conveyor dev`` running here, found without being pasted.

``conveyor dev`` keeps its admin key in ``.conveyor/dev/admin.key`` of the folder it runs
in (its default ``--data-dir``) and writes its pid and listen address into
``.conveyor/dev/dev.lock`` while it runs. A client, worker or CLI command that was given
no key (``api_key=``, ``--api-key``, ``CONVEYOR_API_KEY`` all win) looks for that folder
in its working directory and the ones above it, and takes the key only when that dev is
alive and listens on an address it is about to dial: a dev key is never sent anywhere
else. It logs where it found the key, once per process.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEV_DATA_DIR", "DevKey", "find_dev_key"]

logger = logging.getLogger("conveyor.transport")

#: ``conveyor dev``'s default data directory, relative to where it runs.
DEV_DATA_DIR = Path(".conveyor") / "dev"
_KEY_FILE = "admin.key"
_LOCK_FILE = "dev.lock"


@dataclass(frozen=True)
class DevKey:
    """A running ``conveyor dev``'s admin key and the file it was read from."""

    key: str
    path: Path
    address: str


def find_dev_key(addresses: Sequence[str], cwd: Path | None = None) -> DevKey | None:
    """The key of a live ``conveyor dev`` listening on one of ``addresses``, found in
    ``cwd`` (the working directory) or a folder above it; None when there is none."""
    return _find(tuple(addresses), (cwd or Path.cwd()).resolve())


@functools.cache
def _find(addresses: tuple[str, ...], here: Path) -> DevKey | None:
    for folder in (here, *here.parents):
        data = folder / DEV_DATA_DIR
        try:
            pid_line, _, note = (data / _LOCK_FILE).read_text().partition("\n")
            key = (data / _KEY_FILE).read_text().strip()
        except OSError:
            continue
        address = note.strip()
        if key and address in addresses and _alive(pid_line.strip()):
            found = DevKey(key, data / _KEY_FILE, address)
            logger.info("using conveyor dev's API key from %s", found.path)
            return found
    return None


def _alive(pid: str) -> bool:
    """Whether the process ``pid`` (text from the lock file) still runs."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it runs
    return True
