"""Small files a user names (configs, recipes, prompt lists), read with a cap and never blocking.

Opened non-blocking, so a FIFO cannot hang the open; then only a regular file is read, and at most one
byte past the cap (a symlink to /dev/zero has size 0 and no end). Callers turn the two refusals into
their own one-line messages; errors of the open itself (a missing file, no permission) reach them as
the ``OSError`` they are.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["FileTooLarge", "NotRegularFile", "read_capped"]


class NotRegularFile(ValueError):
    """The path is a folder, device or pipe."""


class FileTooLarge(ValueError):
    """The file holds more than the cap."""


def read_capped(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # checked before fdopen, which refuses a folder itself
        os.close(fd)
        raise NotRegularFile(str(path))
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(str(path))
    return data
