"""Durable per-study store of received instance headers.

Layout (scp.store.layout, read by `status` and `retry` too)::

    <root>/<StudyInstanceUID>/<SOPInstanceUID>.dcm

One header-only DICOM Part 10 file per instance (scp.store.part10), written to a
hidden temporary name, renamed into place, fsync'ed. `store` returns only when the file and the
rename are on disk, so the C-STORE success status can follow.

Removal is exact: `remove` deletes a file only when it is still the version
that was read for delivery (same inode), so an instance received again while
its study was being delivered survives for the next completion.

Two implementations share the interface (`Spool`): `FileSpool` (the node) and
`MemorySpool` (tests of the layers above).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from scp.store.files import fsync_folder, move_durably
from scp.store.layout import (corrupt_file, instance_file, instance_uid, is_hidden, is_safe_uid, is_temp_file,
                              spool_temp_file)

log = logging.getLogger("scp.store.spool")

Version = tuple[int, int]  # (st_ino, st_mtime_ns) of a spool file: which version of an instance was read
MakeDurable = Callable[[], None]


@dataclass(frozen=True)
class SpooledInstance:
    """One spooled instance as read for delivery: its bytes and which file version they came from."""

    sop_uid: str
    data: bytes
    version: Version  # of the file read


class Spool(Protocol):
    """What the receiver, the delivery worker and the dead letter need of a spool.

    Every method is safe to call from several threads at once.
    """

    def store(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> None:
        """Store one instance durably before returning (ValueError: unsafe UID; OSError: disk)."""

    def store_deferred(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> MakeDurable:
        """Store now, durable once the returned function returned (it raises OSError when it fails)."""

    def store_file(self, study_uid: str, sop_uid: str, path: Path) -> None:
        """Move a whole instance file in (rename; the caller fsync'ed it), durably before returning."""

    def recover(self) -> int:
        """At start: drop what a killed node left half-written; returns how many."""

    def studies(self) -> dict[str, set[str]]:
        """Every waiting study with its SOP Instance UIDs."""

    def read(self, study_uid: str, sop_uids: Iterable[str]) -> Iterable[SpooledInstance]:
        """The current version of each instance (missing ones left out)."""

    def remove(self, study_uid: str, versions: dict[str, Version], move_to: Path | None = None) -> int:
        """Delete (or move into move_to) the instances still at these versions; returns how many."""

    def adopt(self, study_uid: str, files: Iterable[Path]) -> int:
        """Move instance files (named <SOPInstanceUID>.dcm) in, unless the spool holds that instance."""

    def mark_corrupt(self, study_uid: str, sop_uid: str, version: Version) -> None:
        """Set an unreadable instance aside (at that version only) so it is not delivered again."""

    def depth(self) -> int:
        """Studies waiting."""


class FileSpool:
    """The node's spool on disk (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Serialises "rename into place" against "is this still the delivered version? unlink":
        # without it a resend landing between the check and the unlink would be lost.
        self._lock = threading.Lock()

    def path(self, study_uid: str, sop_uid: str) -> Path:
        return self.root / study_uid / instance_file(sop_uid)

    def store(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> None:
        """Write one instance's file durably (temp file, rename, fsync) before returning.

        Raises ValueError for a UID that is not safe as a file name, OSError when the
        disk refuses (the caller answers "out of resources").
        """
        self.store_deferred(study_uid, sop_uid, chunks)()

    def store_deferred(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> MakeDurable:
        """Write and rename now; return the function that makes it durable (fsync, close).

        Until that function returned, the instance must not be acknowledged: the C-STORE
        handler runs it while pynetdicom encodes the response, and holds the response
        back until it is done (scp.receive.handlers). Errors of the write and rename are raised
        here; the returned function raises OSError when the fsync fails.
        """
        if not is_safe_uid(study_uid) or not is_safe_uid(sop_uid):
            raise ValueError(f"not a valid UID for a spool file name: study {study_uid!r}, instance {sop_uid!r}")
        folder = self.root / study_uid
        tmp = folder / spool_temp_file(sop_uid, threading.get_ident())
        fd = self._open_temp(folder, tmp)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            with self._lock:
                os.replace(tmp, folder / instance_file(sop_uid))
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

        def make_durable() -> None:
            # One fsync after the rename makes both the content and the new name durable on
            # journalling file systems (ext4, XFS: the rename changed this inode's ctime, so its
            # fsync commits the journal transaction holding the rename): half the cost of
            # fsync(file) + fsync(folder), the largest part of the per-instance time.
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        return make_durable

    def store_file(self, study_uid: str, sop_uid: str, path: Path) -> None:
        """Rename a whole instance file (already fsync'ed, on this file system) into place; fsync the folder.

        The archive takes a large received instance this way: no second copy of its bytes.
        Raises ValueError for an unsafe UID, OSError when the rename fails (another file system:
        the caller copies instead).
        """
        if not is_safe_uid(study_uid) or not is_safe_uid(sop_uid):
            raise ValueError(f"not a valid UID for a spool file name: study {study_uid!r}, instance {sop_uid!r}")
        folder = self.root / study_uid
        for attempt in range(3):
            try:
                with self._lock:
                    os.replace(path, folder / instance_file(sop_uid))
                break
            except FileNotFoundError:
                if attempt == 2 or not path.exists():
                    raise
                folder.mkdir(parents=True, exist_ok=True)
                fsync_folder(self.root)
        fsync_folder(folder)

    def _open_temp(self, folder: Path, tmp: Path) -> int:
        for attempt in range(3):
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # New study, or its emptied folder was just removed after a delivery.
                folder.mkdir(parents=True, exist_ok=True)
                fsync_folder(self.root)
        raise AssertionError("unreachable")

    def recover(self) -> int:
        """At start: drop temporary files a killed node left (never acknowledged) and empty folders.

        Returns how many temporary files were removed.
        """
        removed = 0
        with os.scandir(self.root) as entries:
            folders = [Path(e.path) for e in entries if not is_hidden(e.name) and e.is_dir(follow_symlinks=False)]
        for folder in folders:
            for name in os.listdir(folder):
                if is_temp_file(name):
                    (folder / name).unlink(missing_ok=True)
                    removed += 1
            self._drop_folder_if_empty(folder)
        if removed:
            log.info("removed %d incomplete instance file(s) left by an interrupted node (none was acknowledged)",
                     removed)
        return removed

    def studies(self) -> dict[str, set[str]]:
        """Every study in the spool with its instances (SOP Instance UIDs); temp files ignored."""
        found: dict[str, set[str]] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if is_hidden(entry.name) or not entry.is_dir(follow_symlinks=False):
                    continue
                sops = {uid for uid in map(instance_uid, os.listdir(entry.path)) if uid is not None}
                if sops:
                    found[entry.name] = sops
        return found

    def read(self, study_uid: str, sop_uids: Iterable[str]) -> Iterator[SpooledInstance]:
        """The current files of these instances, one at a time; instances whose file is gone are left out."""
        for sop_uid in sop_uids:
            path = self.path(study_uid, sop_uid)
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    data = f.read()
            except FileNotFoundError:
                log.warning("study %s: instance %s is no longer in the spool", study_uid, sop_uid)
                continue
            yield SpooledInstance(sop_uid, data, (st.st_ino, st.st_mtime_ns))

    def remove(self, study_uid: str, versions: dict[str, Version], move_to: Path | None = None) -> int:
        """Delete (or move into folder move_to) the files still at the given versions.

        A file replaced since it was read (the instance was sent again) is kept.
        The study's folder goes when it is empty. Returns how many files were taken.
        """
        folder = self.root / study_uid
        if move_to is not None:
            move_to.mkdir(parents=True, exist_ok=True)
        taken = 0
        for sop_uid, version in versions.items():
            path = folder / instance_file(sop_uid)
            with self._lock:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if (st.st_ino, st.st_mtime_ns) != version:
                    log.debug("study %s: instance %s was received again meanwhile; kept", study_uid, sop_uid)
                    continue
                if move_to is None:
                    os.unlink(path)
                else:
                    move_durably(path, move_to / path.name)
            taken += 1
        if move_to is not None:
            fsync_folder(move_to)
        self._drop_folder_if_empty(folder)
        return taken

    def mark_corrupt(self, study_uid: str, sop_uid: str, version: Version) -> None:
        """Keep an unreadable spool file aside (<sop>.dcm.corrupt) so it is not delivered again.

        Only the version that was read: an instance received again meanwhile is a new file, kept.
        """
        path = self.path(study_uid, sop_uid)
        with self._lock:
            try:
                st = os.stat(path)
                if (st.st_ino, st.st_mtime_ns) == version:
                    os.replace(path, path.with_name(corrupt_file(sop_uid)))
            except FileNotFoundError:
                pass

    def _drop_folder_if_empty(self, folder: Path) -> None:
        with self._lock:
            try:
                folder.rmdir()  # fails while anything (a temp file of an arriving instance) is inside
            except OSError:
                return
        fsync_folder(self.root)

    def adopt(self, study_uid: str, files: Iterable[Path]) -> int:
        """Move instance files in (`retry --requeue`); an instance the spool holds already is kept.

        The files are moved durably (the study's folder is fsync'ed once); the ones not
        taken are left where they are. Returns how many were taken.
        """
        if not is_safe_uid(study_uid):
            raise ValueError(f"study_uid: not a valid UID for a spool folder: {study_uid!r}")
        folder = self.root / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        taken = 0
        for path in files:
            sop_uid = instance_uid(path.name)
            if sop_uid is None or not is_safe_uid(sop_uid):
                continue
            target = folder / instance_file(sop_uid)
            with self._lock:
                if target.exists():
                    continue
                move_durably(path, target)
            taken += 1
        fsync_folder(folder)
        return taken

    def depth(self) -> int:
        """Studies waiting in the spool."""
        with os.scandir(self.root) as entries:
            return sum(1 for e in entries if not is_hidden(e.name) and e.is_dir(follow_symlinks=False))

    def size_bytes(self) -> int:
        """Bytes of the instance files waiting in the spool (temp and corrupt files left out)."""
        total = 0
        with os.scandir(self.root) as studies:
            for study in studies:
                if is_hidden(study.name) or not study.is_dir(follow_symlinks=False):
                    continue
                try:
                    with os.scandir(study.path) as files:
                        total += sum(f.stat(follow_symlinks=False).st_size for f in files
                                     if instance_uid(f.name) is not None)
                except FileNotFoundError:  # delivered (removed) while we counted
                    continue
        return total


class MemorySpool:
    """The spool's interface in memory, for tests of completion and delivery."""

    def __init__(self) -> None:
        self._files: dict[str, dict[str, tuple[bytes, Version]]] = {}
        self._lock = threading.Lock()
        self._counter = 0

    def store(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> None:
        if not is_safe_uid(study_uid) or not is_safe_uid(sop_uid):
            raise ValueError(f"not a valid UID for a spool file name: study {study_uid!r}, instance {sop_uid!r}")
        data = b"".join(chunks)
        with self._lock:
            self._counter += 1
            self._files.setdefault(study_uid, {})[sop_uid] = (data, (self._counter, 0))

    def store_deferred(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> MakeDurable:
        self.store(study_uid, sop_uid, chunks)
        return lambda: None

    def store_file(self, study_uid: str, sop_uid: str, path: Path) -> None:
        self.store(study_uid, sop_uid, [path.read_bytes()])
        path.unlink()

    def recover(self) -> int:
        return 0

    def adopt(self, study_uid: str, files: Iterable[Path]) -> int:
        taken = 0
        for path in files:
            sop_uid = instance_uid(path.name)
            if sop_uid is None or sop_uid in self._files.get(study_uid, {}):
                continue
            self.store(study_uid, sop_uid, [path.read_bytes()])
            path.unlink()
            taken += 1
        return taken

    def studies(self) -> dict[str, set[str]]:
        with self._lock:
            return {uid: set(files) for uid, files in self._files.items() if files}

    def read(self, study_uid: str, sop_uids: Iterable[str]) -> list[SpooledInstance]:
        with self._lock:
            files = self._files.get(study_uid, {})
            return [SpooledInstance(sop, *files[sop]) for sop in sop_uids if sop in files]

    def remove(self, study_uid: str, versions: dict[str, Version], move_to: Path | None = None) -> int:
        taken = 0
        with self._lock:
            files = self._files.get(study_uid, {})
            for sop_uid, version in versions.items():
                if sop_uid in files and files[sop_uid][1] == version:
                    data, _ = files.pop(sop_uid)
                    if move_to is not None:
                        move_to.mkdir(parents=True, exist_ok=True)
                        (move_to / instance_file(sop_uid)).write_bytes(data)
                    taken += 1
            if not files:
                self._files.pop(study_uid, None)
        return taken

    def mark_corrupt(self, study_uid: str, sop_uid: str, version: Version) -> None:
        with self._lock:
            files = self._files.get(study_uid, {})
            if sop_uid in files and files[sop_uid][1] == version:
                del files[sop_uid]

    def depth(self) -> int:
        with self._lock:
            return sum(1 for files in self._files.values() if files)
