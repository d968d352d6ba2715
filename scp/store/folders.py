"""The node's folders, checked before use: created when missing, refused with one clear line when unusable.

A folder is usable when it exists (or can be created) and a file can be created in it.
The check writes and removes a hidden temp file (layout.temp_file: every reader skips
it) because permission bits alone do not say (root, ACLs, read-only mounts).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from mapping.errors import ConfigurationError
from scp.store.layout import temp_file


class UnusableFolderError(ConfigurationError):
    """A folder of the configuration cannot be used: what (the key or flag), where, why."""


def ensure_folder(path: Path | str, what: str) -> Path:
    """path as a writable folder (created with its parents when missing); UnusableFolderError when not.

    what names the setting in the message, e.g. "node.spool_dir (--spool-dir)".
    """
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under the file {blocker}"
        raise UnusableFolderError(f"{what}: {path} {where}, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / temp_file("write-check", os.getpid())
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UnusableFolderError(f"{what}: cannot write in {path}: {_reason(exc)}") from exc
    return path


def _file_in_the_way(path: Path) -> Path | None:
    """path itself or the nearest existing ancestor, when that is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)
