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

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from scp.errors import ConfigurationError
from scp.store.files import fsync_folder, move_durably, write_atomically
from scp.store.layout import (LOCK, QUARANTINE, QUARANTINE_REASON_SUFFIX, instance_file, instance_uid,
                              is_safe_uid, is_study_folder_name, is_temp_file, quarantine_reason, spool_temp_file)

log = logging.getLogger("scp.store.spool")

READ_ATTEMPTS = 3  # reads of a spool file before it is quarantined (a transient I/O error gets another chance)

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


class RenameGuard:
    """A lock held by one thread of one process at a time: a thread lock, then an exclusive
    flock on the spool's folder itself (no lock file: the folder holds only what the layout
    names; flock alone does not exclude the threads of one process, which share the open folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> "RenameGuard":
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            assert self._fd is not None
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class FileSpool:
    """The node's spool on disk (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Serialises "rename into place" against "is this still the delivered version? unlink":
        # without it a resend landing between the check and the unlink would be lost. Across
        # processes too: receive workers rename, the coordinator unlinks (node.workers > 1).
        self._lock = RenameGuard(self.root)
        self._unreadable_lock = threading.Lock()
        self._unreadable: set[str] = set()  # study folders reported unreadable (reported once)

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
        tmp = folder / spool_temp_file(sop_uid, f"{os.getpid()}-{threading.get_ident()}")
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
            self._drop_folder_if_empty(folder)  # a refused first instance leaves no empty study folder
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
        """At start: drop temporary files a killed node left (never acknowledged) and empty study folders.

        Only study folders (named like a UID) are looked into: lost+found, dotfiles and anything
        else an operator or the file system put there is left alone.

        Returns how many temporary files were removed.
        """
        removed = 0
        for folder in self._study_folders():
            names = self._list(folder)
            if names is None:
                continue
            for name in names:
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
        for folder in self._study_folders():
            names = self._list(folder)
            sops = {uid for uid in map(instance_uid, names or ()) if uid is not None}
            if sops:
                found[folder.name] = sops
        return found

    def _study_folders(self) -> list[Path]:
        """The study folders (named like a UID; not lost+found, dotfiles, quarantine, ...)."""
        with os.scandir(self.root) as entries:
            return [Path(e.path) for e in entries if is_study_folder_name(e.name) and e.is_dir(follow_symlinks=False)]

    def _list(self, folder: Path) -> list[str] | None:
        """The names in a study folder; None (reported once per folder, not at every scan) when unreadable."""
        try:
            names = os.listdir(folder)
        except FileNotFoundError:  # delivered (removed) meanwhile
            return None
        except OSError as exc:
            with self._unreadable_lock:
                first = folder.name not in self._unreadable
                self._unreadable.add(folder.name)
            if first:
                log.error("spool folder %s cannot be read (%s); its study waits until it can",
                          folder, _os_reason(exc), extra={"study_uid": folder.name})
            return None
        with self._unreadable_lock:
            self._unreadable.discard(folder.name)
        return names

    def read(self, study_uid: str, sop_uids: Iterable[str]) -> Iterator[SpooledInstance]:
        """The current files of these instances, one at a time; instances whose file is gone are left out.

        An entry that cannot be read READ_ATTEMPTS times in a row (permissions, an I/O error), or
        that is no regular file at all (a folder, FIFO or symbolic link named like an instance), is
        quarantined with its reason and left out: the rest of its study is delivered, and no study
        waits forever for one file.
        """
        for sop_uid in sop_uids:
            instance = self._read_one(study_uid, sop_uid)
            if instance is not None:
                yield instance

    def _read_one(self, study_uid: str, sop_uid: str) -> SpooledInstance | None:
        path = self.path(study_uid, sop_uid)
        problem = ""
        for _ in range(READ_ATTEMPTS):
            try:
                # O_NONBLOCK: a FIFO named like an instance would block open() for ever;
                # O_NOFOLLOW: the node never writes links, so a link is not its file.
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                log.warning("study %s: instance %s is no longer in the spool", study_uid, sop_uid)
                return None
            except OSError as exc:
                problem = _os_reason(exc)
                if exc.errno == errno.ELOOP:
                    problem = "a symbolic link, not a file the node wrote"
                    break
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    problem = f"not a regular file ({_kind(st.st_mode)})"
                    break
                with os.fdopen(fd, "rb") as f:
                    fd = -1
                    data = f.read()
                return SpooledInstance(sop_uid, data, (st.st_ino, st.st_mtime_ns))
            except OSError as exc:
                problem = _os_reason(exc)
            finally:
                if fd >= 0:
                    os.close(fd)
        self.quarantine(study_uid, sop_uid, f"cannot be read: {problem}")
        return None

    def quarantine(self, study_uid: str, sop_uid: str, reason: str, version: Version | None = None) -> Path | None:
        """Move a spool entry to <root>/quarantine/<study>/ with <name>.reason.txt beside it; the
        quarantined path, or None when the entry is gone (or, with `version`, was received again)."""
        path = self.path(study_uid, sop_uid)
        folder = self.root / QUARANTINE / study_uid
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with self._lock:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    return None
                if version is not None and (st.st_ino, st.st_mtime_ns) != version:
                    return None
                target = folder / path.name
                if os.path.lexists(target):  # quarantined before: both are kept
                    target = folder / f"{path.name}.{time.time_ns()}"
                write_atomically(folder / quarantine_reason(target.name), (reason.replace("\n", " ") + "\n").encode())
                os.replace(path, target)
            fsync_folder(folder)
        except OSError as exc:
            log.error("study %s: spool entry %s %s, and it cannot be quarantined (%s); left out of the delivery",
                      study_uid, path.name, reason, _os_reason(exc),
                      extra={"study_uid": study_uid, "instance_uid": sop_uid})
            return None
        log.error("study %s: spool entry %s %s; quarantined in %s (the rest of the study is delivered)",
                  study_uid, path.name, reason, folder, extra={"study_uid": study_uid, "instance_uid": sop_uid})
        self._drop_folder_if_empty(path.parent)
        return target

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

    def mark_corrupt(self, study_uid: str, sop_uid: str, version: Version,
                     reason: str = "cannot be used: not a DICOM header the node can parse") -> None:
        """Quarantine an unusable spool file (see `quarantine`) so it is not delivered again.

        Only the version that was read: an instance received again meanwhile is a new file, kept.
        """
        self.quarantine(study_uid, sop_uid, reason, version)

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
        return len(self._study_folders())

    def size_bytes(self) -> int:
        """Bytes of the instance files waiting in the spool (temp and corrupt files left out)."""
        total = 0
        for study in self._study_folders():
            try:
                with os.scandir(study) as files:
                    total += sum(f.stat(follow_symlinks=False).st_size for f in files
                                 if instance_uid(f.name) is not None)
            except OSError:  # delivered (removed) while we counted, or unreadable (reported by studies())
                continue
        return total


@dataclass(frozen=True)
class QuarantinedEntry:
    """A spool entry set aside because it could not be read (scp.store.layout: quarantine/)."""

    study_uid: str
    name: str  # the entry's name in the quarantine folder (<SOPInstanceUID>.dcm, or with a suffix)
    reason: str
    since: float  # epoch seconds (mtime of its reason file)


def list_quarantined(spool_dir: Path | str) -> list[QuarantinedEntry]:
    """Every quarantined spool entry, oldest first (a pure read: `status` calls it beside a node)."""
    root = Path(spool_dir) / QUARANTINE
    found = []
    try:
        studies = sorted(e for e in os.listdir(root) if is_safe_uid(e))
    except OSError:
        return []
    for study_uid in studies:
        try:
            names = os.listdir(root / study_uid)
        except OSError:
            continue
        for name in names:
            if not name.endswith(QUARANTINE_REASON_SUFFIX) or name.startswith("."):
                continue
            reason_path = root / study_uid / name
            try:
                reason = reason_path.read_text(encoding="utf-8", errors="replace").partition("\n")[0]
                since = reason_path.stat().st_mtime
            except OSError:
                continue
            found.append(QuarantinedEntry(study_uid, name[:-len(QUARANTINE_REASON_SUFFIX)], reason, since))
    return sorted(found, key=lambda q: q.since)


class SpoolBusyError(ConfigurationError):
    """Another process (a node, `retry --requeue`) holds the spool's lock; `pid` is its PID (None: unknown)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class SpoolLock:
    """The spool's owner: an exclusive flock on <spool_dir>/.lock, which holds the owner's PID.

    A spool belongs to one node: two would deliver the same studies twice and remove each
    other's files. The lock goes with the process (the kernel drops it when the process
    ends, even by SIGKILL), so a stale lock file never blocks a restart.
    """

    def __init__(self, root: Path | str, fd: int) -> None:
        self.root = Path(root)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: Path | str, what: str = "node.spool_dir (--spool-dir)",
                advice: str = "a spool belongs to one node: stop that one, or give this one its own spool folder"
                ) -> "SpoolLock":
        """Take the lock (never waits); SpoolBusyError naming the holder's PID when another process has it."""
        root = Path(root)
        path = root / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise SpoolBusyError(f"{what}: {root} is in use by another node (PID {holder or 'unknown'}); {advice}",
                                 holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(root, fd)

    def release(self) -> None:
        """Let go (the file stays: removing a lock file races with the next process opening it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SpoolLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _os_reason(exc: OSError) -> str:
    return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else str(exc)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "unknown kind"


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
