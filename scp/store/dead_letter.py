"""Studies set aside because they cannot be delivered as they are.

Layout (scp/__init__.py)::

    <dead_letter_dir>/<StudyInstanceUID>/
        reason.txt          first line: the reason (no patient names or IDs); then details
        instances/<SOPInstanceUID>.dcm   the spooled instance headers, moved here
        bundle.json, outcome.json, ...   documents explaining the reason (from the sink)

A study lands here when a sink raises DeliveryRejected or its instances disagree on
PatientID. Further parts of a study already set aside join it here (never delivered
half a study). `dicom-fhir-scp retry` delivers a study again with
scp.pipeline.delivery.redeliver (which removes the folder once every sink took it), or puts its
instances back into the spool with `DeadLetterBox.requeue` for the node to pick up on
its next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from scp.store.spool import SUFFIX, FileSpool, Spool, SpooledInstance, _fsync_folder, _move, is_safe_uid

log = logging.getLogger("scp.store.dead_letter")

REASON = "reason.txt"
INSTANCES = "instances"


@dataclass(frozen=True)
class DeadLetter:
    study_uid: str
    folder: Path
    reason: str  # first line of reason.txt
    details: str  # the rest of reason.txt
    since: float  # epoch seconds (reason.txt's mtime)
    instances: tuple[Path, ...]
    documents: dict[str, Path] = field(default_factory=dict)


class DeadLetterBox:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def folder(self, study_uid: str) -> Path:
        if not is_safe_uid(study_uid):
            raise ValueError(f"study_uid: not a valid UID: {study_uid!r}")
        return self.root / study_uid

    def contains(self, study_uid: str) -> bool:
        return (self.folder(study_uid) / REASON).exists()

    def put(self, study_uid: str, reason: str, *, details: str = "", documents: dict[str, bytes] | None = None,
            spool: Spool, versions: dict[str, tuple[int, int]]) -> Path:
        """Move the given spooled instances here and record why (reason.txt is rewritten)."""
        # The reason is written before the instances move: a crash in between leaves them in
        # the spool (delivered or set aside again after the restart), never in a folder that
        # list() and `retry` would not show.
        folder = self.record(study_uid, reason, details=details, documents=documents)
        moved = spool.remove(study_uid, versions, move_to=folder / INSTANCES)
        log.debug("study %s: %d instance(s) moved to %s", study_uid, moved, folder)
        return folder

    def record(self, study_uid: str, reason: str, *, details: str = "",
               documents: dict[str, bytes] | None = None) -> Path:
        """Write the documents and reason.txt (first line: the reason) into the study's folder."""
        folder = self.folder(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in (documents or {}).items():
            safe = Path(name).name
            if safe in (REASON, INSTANCES) or not safe:
                safe = f"document-{safe or 'unnamed'}"
            _write_atomically(folder / safe, data)
        text = reason.strip().replace("\n", " ") + "\n"
        if details:
            text += details.rstrip() + "\n"
        _write_atomically(folder / REASON, text.encode("utf-8"))
        return folder

    def get(self, study_uid: str) -> DeadLetter:
        folder = self.folder(study_uid)
        try:
            text = (folder / REASON).read_text(encoding="utf-8", errors="replace")
            since = (folder / REASON).stat().st_mtime
        except FileNotFoundError:
            raise KeyError(f"study {study_uid} is not in the dead-letter folder {self.root}") from None
        first, _, rest = text.partition("\n")
        instances = tuple(sorted((folder / INSTANCES).glob(f"*{SUFFIX}"))) if (folder / INSTANCES).is_dir() else ()
        documents = {p.name: p for p in sorted(folder.iterdir())
                     if p.is_file() and p.name != REASON and not p.name.startswith(".")}
        return DeadLetter(study_uid, folder, first, rest.strip(), since, instances, documents)

    def list(self) -> list[DeadLetter]:
        """Every set-aside study, oldest first."""
        if not self.root.is_dir():
            return []
        letters = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and (entry / REASON).exists():
                try:
                    letters.append(self.get(entry.name))
                except (KeyError, ValueError):
                    continue
        return sorted(letters, key=lambda d: d.since)

    def read_instances(self, study_uid: str) -> list[SpooledInstance]:
        """The set-aside instance headers, as scp.pipeline.delivery.deliver_study takes them."""
        result = []
        for path in self.get(study_uid).instances:
            st = path.stat()
            result.append(SpooledInstance(path.name[:-len(SUFFIX)], path.read_bytes(), (st.st_ino, st.st_mtime_ns)))
        return result

    def remove_delivered(self, study_uid: str, versions: dict[str, tuple[int, int]]) -> bool:
        """Drop the delivered instances (still at the versions read); the folder goes when none is left.

        Instances set aside meanwhile (the node dead-lettered a further part while `retry`
        ran) stay, with the reason. Returns True when the study's folder is gone.
        """
        folder = self.folder(study_uid) / INSTANCES
        for sop_uid, version in versions.items():
            path = folder / f"{sop_uid}{SUFFIX}"
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if (st.st_ino, st.st_mtime_ns) == version:
                path.unlink()
        if folder.is_dir() and any(folder.glob(f"*{SUFFIX}")):
            return False
        self.remove(study_uid)
        return True

    def remove(self, study_uid: str) -> None:
        """Drop a set-aside study with everything in its folder."""
        folder = self.folder(study_uid)
        # Rename first: a reader never sees half a folder, and a crash leaves a hidden leftover.
        trash = self.root / f".removing-{study_uid}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def requeue(self, study_uid: str, spool: FileSpool) -> int:
        """Move the study's instances back into the spool (delivered when the node next starts).

        An instance already waiting in the spool (sent again meanwhile) is kept, the
        set-aside copy dropped. Returns how many were moved.
        """
        letter = self.get(study_uid)
        target = spool.root / study_uid
        target.mkdir(parents=True, exist_ok=True)
        moved = 0
        for path in letter.instances:
            if not (target / path.name).exists():
                _move(path, target / path.name)
                moved += 1
        _fsync_folder(target)
        self.remove(study_uid)
        return moved


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
