"""Naming a file durably: a rename (or link) is a change to its directory, which an fsync of the file does not
write. Until the directory is fsynced too, a power cut can lose the new name, and with it the file, even though
its bytes were on disk and the caller was told they were stored (ext4 usually commits the name with the next
fsync of anything on the disk; other file systems, and POSIX, promise nothing of the kind)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Write ``directory``'s entries (names added, replaced or removed in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path | str, target: Path) -> None:
    """``os.replace(source, target)``, then the target's directory fsynced: once this returns, ``target`` names
    the new file after a power cut too (``source``'s bytes must have been fsynced before)."""
    os.replace(source, target)
    fsync_directory(target.parent)
