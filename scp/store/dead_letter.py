"""Studies set aside because they cannot be delivered as they are.

Layout (scp.store.layout)::

    <dead_letter_dir>/<StudyInstanceUID>/
        reason.txt          first line: the reason (no patient names or IDs); then details
        instances/<SOPInstanceUID>.dcm   the spooled instance headers, moved here
        bundle.json, outcome.json, ...   documents explaining the reason (from the sink)
        delivered.json      the destinations that took it (never sent it again)
        destinations/<name>/reason.txt   why that destination refused it (+ its documents)

Each destination has its own outcome: a study one destination took and another
refused is set aside for the one that refused only; `retry` delivers it to the
destinations not in delivered.json. A folder without delivered.json (an older
version's) waits for every destination.

A study lands here when a sink raises DeliveryRejected or its instances disagree on
PatientID. Further parts of a study already set aside join it here (never delivered
half a study). `dicom-fhir-scp retry` delivers a study again with
scp.pipeline.delivery.redeliver (which removes the folder once every sink took it), or puts its
instances back into a spool with `DeadLetterBox.requeue` (through the spool's own
`adopt`) for the node to pick up on its next start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scp.store.files import write_atomically
from scp.store.layout import (DELIVERED, DESTINATIONS, INSTANCES, INSTANCE_SUFFIX, REASON, instance_file,
                              instance_uid, is_hidden, is_safe_uid, is_study_folder_name, removing_folder)
from scp.store.spool import Spool, SpooledInstance, Version

log = logging.getLogger("scp.store.dead_letter")


@dataclass(frozen=True)
class DeadLetter:
    study_uid: str
    folder: Path
    reason: str  # first line of reason.txt
    details: str  # the rest of reason.txt
    since: float  # epoch seconds (reason.txt's mtime)
    instances: tuple[Path, ...]
    documents: dict[str, Path] = field(default_factory=dict)
    delivered: dict[str, str] = field(default_factory=dict)  # destination -> result: those that took it
    refused: dict[str, str] = field(default_factory=dict)  # destination -> the first line of its reason


@dataclass(frozen=True)
class DestinationRefusal:
    """Why one destination refused a study (written to destinations/<name>/)."""

    reason: str
    details: str = ""
    documents: Mapping[str, bytes] = field(default_factory=dict)


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
            spool: Spool, versions: dict[str, Version], delivered: Mapping[str, str] | None = None,
            refused: Mapping[str, DestinationRefusal] | None = None) -> Path:
        """Move the given spooled instances here and record why (reason.txt is rewritten).

        `delivered`: the destinations that took these instances. Joining a study already here,
        a destination counts as having taken it only if it had taken what was here too.
        """
        if delivered is not None and self.contains(study_uid):
            before = self.delivered(study_uid)
            delivered = {name: result for name, result in delivered.items() if name in before}
        # The reason is written before the instances move: a crash in between leaves them in
        # the spool (delivered or set aside again after the restart), never in a folder that
        # list() and `retry` would not show.
        folder = self.record(study_uid, reason, details=details, documents=documents, delivered=delivered,
                             refused=refused)
        moved = spool.remove(study_uid, versions, move_to=folder / INSTANCES)
        log.debug("study %s: %d instance(s) moved to %s", study_uid, moved, folder)
        return folder

    def record(self, study_uid: str, reason: str, *, details: str = "",
               documents: Mapping[str, bytes] | None = None, delivered: Mapping[str, str] | None = None,
               refused: Mapping[str, DestinationRefusal] | None = None) -> Path:
        """Write the documents and reason.txt (first line: the reason) into the study's folder;
        with `delivered`, delivered.json (the destinations that took it; their refusals go);
        with `refused`, each destination's reason and documents under destinations/<name>/."""
        folder = self.folder(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        for name, refusal in (refused or {}).items():
            _write_reason(folder / DESTINATIONS / _safe_name(name), refusal.reason, refusal.details,
                          refusal.documents)
        if delivered is not None:
            self.record_delivered(study_uid, delivered)
        _write_reason(folder, reason, details, documents or {})
        return folder

    def record_delivered(self, study_uid: str, delivered: Mapping[str, str]) -> None:
        """Rewrite delivered.json: these destinations took the study (a refusal of theirs is dropped)."""
        folder = self.folder(study_uid)
        write_atomically(folder / DELIVERED, json.dumps(dict(delivered), indent=2, sort_keys=True).encode("utf-8"))
        for name in delivered:
            shutil.rmtree(folder / DESTINATIONS / _safe_name(name), ignore_errors=True)

    def delivered(self, study_uid: str) -> dict[str, str]:
        """The destinations that took the study ({} for a folder without delivered.json)."""
        return read_delivered(self.folder(study_uid))

    def get(self, study_uid: str) -> DeadLetter:
        folder = self.folder(study_uid)
        try:
            text = (folder / REASON).read_text(encoding="utf-8", errors="replace")
            since = (folder / REASON).stat().st_mtime
        except FileNotFoundError:
            raise KeyError(f"study {study_uid} is not in the dead-letter folder {self.root}") from None
        first, _, rest = text.partition("\n")
        instances = tuple(sorted(p for p in (folder / INSTANCES).glob(f"*{INSTANCE_SUFFIX}")
                                 if instance_uid(p.name) is not None)) if (folder / INSTANCES).is_dir() else ()
        documents = {p.name: p for p in sorted(folder.iterdir())
                     if p.is_file() and p.name not in (REASON, DELIVERED) and not is_hidden(p.name)}
        return DeadLetter(study_uid, folder, first, rest.strip(), since, instances, documents,
                          read_delivered(folder), read_refusals(folder))

    def list(self) -> list[DeadLetter]:
        """Every set-aside study, oldest first."""
        if not self.root.is_dir():
            return []
        letters = []
        for entry in sorted(self.root.iterdir()):
            # Study folders only (lost+found and the like are not ours: never looked into).
            if is_study_folder_name(entry.name) and entry.is_dir() and os.path.exists(entry / REASON):
                try:
                    letters.append(self.get(entry.name))
                except (KeyError, ValueError):
                    continue
        return sorted(letters, key=lambda d: d.since)

    def count(self) -> int:
        """Set-aside studies (a cheap `len(list())`: no reason file is read)."""
        if not self.root.is_dir():
            return 0
        with os.scandir(self.root) as entries:
            return sum(1 for e in entries if is_study_folder_name(e.name) and e.is_dir(follow_symlinks=False)
                       and os.path.exists(os.path.join(e.path, REASON)))

    def read_instances(self, study_uid: str) -> list[SpooledInstance]:
        """The set-aside instance headers, as scp.pipeline.delivery.deliver_study takes them."""
        result = []
        for path in self.get(study_uid).instances:
            st = path.stat()
            result.append(SpooledInstance(instance_uid(path.name), path.read_bytes(), (st.st_ino, st.st_mtime_ns)))
        return result

    def remove_delivered(self, study_uid: str, versions: dict[str, Version]) -> bool:
        """Drop the delivered instances (still at the versions read); the folder goes when none is left.

        Instances set aside meanwhile (the node dead-lettered a further part while `retry`
        ran) stay, with the reason. Returns True when the study's folder is gone.
        """
        folder = self.folder(study_uid) / INSTANCES
        for sop_uid, version in versions.items():
            path = folder / instance_file(sop_uid)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if (st.st_ino, st.st_mtime_ns) == version:
                path.unlink()
        if folder.is_dir() and any(instance_uid(p.name) is not None for p in folder.iterdir()):
            return False
        self.remove(study_uid)
        return True

    def remove(self, study_uid: str) -> None:
        """Drop a set-aside study with everything in its folder."""
        folder = self.folder(study_uid)
        # Rename first: a reader never sees half a folder, and a crash leaves a hidden leftover.
        trash = self.root / removing_folder(study_uid, os.getpid(), time.monotonic_ns())
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def requeue(self, study_uid: str, spool: Spool) -> int:
        """Move the study's instances back into a spool (delivered when the node next starts).

        The spool takes them (Spool.adopt); an instance it already holds (sent again
        meanwhile) is kept there and the set-aside copy dropped with the folder.
        Returns how many were moved.
        """
        letter = self.get(study_uid)
        moved = spool.adopt(study_uid, letter.instances)
        self.remove(study_uid)
        return moved


def _safe_name(name: str) -> str:
    """A destination name as a folder name (config allows letters, digits, - and _ only)."""
    safe = Path(name).name
    if not safe or is_hidden(safe):
        raise ValueError(f"destination: not usable as a folder name: {name!r}")
    return safe


def _write_reason(folder: Path, reason: str, details: str, documents: Mapping[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in documents.items():
        safe = Path(name).name
        if safe in (REASON, INSTANCES, DELIVERED, DESTINATIONS) or not safe:
            safe = f"document-{safe or 'unnamed'}"
        write_atomically(folder / safe, data)
    text = reason.strip().replace("\n", " ") + "\n"
    if details:
        text += details.rstrip() + "\n"
    write_atomically(folder / REASON, text.encode("utf-8"))


def read_delivered(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / DELIVERED).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as exc:
        # Not knowing who took it must not lose a destination: as if none did (a resend is merged).
        log.warning("%s: unreadable (%s); the study goes to every destination", folder / DELIVERED, exc)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def read_refusals(folder: Path) -> dict[str, str]:
    """destination -> the first line of its reason, from destinations/<name>/reason.txt."""
    refusals: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(folder / DESTINATIONS), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return refusals
    for entry in entries:
        if is_hidden(entry.name) or not entry.is_dir():
            continue
        try:
            with open(os.path.join(entry.path, REASON), encoding="utf-8", errors="replace") as fh:
                refusals[entry.name] = fh.readline().strip()
        except FileNotFoundError:
            continue  # being written or removed right now
    return refusals
