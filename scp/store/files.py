"""Durable file operations, written once: atomic writes, folder fsyncs, moves across file systems.

A file is durable when its content and its name are on disk: the content by fsync of
the file, the name (a create or rename) by fsync of the folder holding it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from scp.store.layout import output_lock_file, temp_file


def fsync_folder(folder: Path | str) -> None:
    """Make the names in folder (creates, renames, unlinks) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync of the folder: a reader (or a crash) never sees half a file.

    The temp file (layout.temp_file: named after this process) is removed when anything fails.
    """
    tmp = path.with_name(temp_file(path.name, os.getpid()))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def move_durably(src: Path, dst: Path) -> None:
    """Rename src to dst; across file systems copy, fsync, then drop the original.

    The caller fsyncs dst's folder once after a batch of moves.
    """
    try:
        os.replace(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        os.unlink(src)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock of path (an exclusive flock on .<name>.lock beside it) for a read-modify-write.

    Every writer of path on this file system (threads, other nodes, `convert`, `retry`) that
    takes it sees the others' writes: a merge never loses what another writer merged meanwhile.
    The lock file is removed on the way out while still locked; a waiter that then holds the
    lock of a removed file notices (its inode is no longer the name's) and locks anew.
    """
    lock = path.with_name(output_lock_file(path.name))
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
            break
        os.close(fd)  # removed by the writer before us: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)
