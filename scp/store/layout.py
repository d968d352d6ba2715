"""The node's on-disk layout: every folder, file name and suffix, in one place.

The node writes it; `status` and `retry` read it, also while a node runs. Changing a
name here changes the format that existing spools, dead letters and outputs are in:
don't, without reading the old names too.

    <spool_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm
        one header-only DICOM Part 10 file per received instance (scp.store.part10),
        fsync'ed before the success status
    <spool_dir>/<StudyInstanceUID>/.<SOPInstanceUID>.<pid>-<thread>.tmp
        an instance being written (never acknowledged; removed at the next start)
    <spool_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm.corrupt
        a spooled file that could not be read, kept aside by older versions (never delivered;
        now quarantine/, below)
    <spool_dir>/.lock
        holds the PID of the node that owns the spool, flock'ed while it runs: a second node
        on the same spool refuses to start (scp.store.spool.SpoolLock)
    <spool_dir>/ itself is flock'ed for each rename into the spool and each removal from it:
        the receive workers and the coordinator (node.workers > 1) never interleave a resend
        with its removal
    <spool_dir>/quarantine/<StudyInstanceUID>/<SOPInstanceUID>.dcm
        a spool entry that could not be read (permissions, an I/O error, a folder or a FIFO
        named like an instance), set aside so that the rest of its study is delivered
    <spool_dir>/quarantine/<StudyInstanceUID>/<SOPInstanceUID>.dcm.reason.txt
        why (one line); `status` lists them. Fix the cause, move the file back into
        <spool_dir>/<StudyInstanceUID>/ and restart the node to deliver it
    <spool_dir>/deliveries.jsonl
        the journal: one JSON line per finished delivery (scp.store.journal)
    <spool_dir>/deliveries.jsonl.1
        the journal before its last rotation (node.journal_max_bytes, 10 MiB); one is kept
    <archive_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm
        the complete instances as received (node.archive_dir), same naming as the spool
    <dead_letter_dir>/<StudyInstanceUID>/reason.txt
        first line: why the study is set aside (no patient names or IDs); then details
    <dead_letter_dir>/<StudyInstanceUID>/instances/<SOPInstanceUID>.dcm
        its spooled instance headers, moved here
    <dead_letter_dir>/<StudyInstanceUID>/<document>
        what explains the reason (bundle.json sent, outcome.json received, ...)
    <dead_letter_dir>/<StudyInstanceUID>/delivered.json
        {"<destination>": "<its result>"}: the destinations that took every instance in the
        folder; they are never sent it again (`retry` skips them). No file: none took it
        (a dead letter of an older version, or a study no destination took)
    <dead_letter_dir>/<StudyInstanceUID>/destinations/<destination>/reason.txt
        why that destination refused it (same format as reason.txt), with its documents
        beside it; one folder per refusing destination. No destinations/ folder: the study
        was refused as a whole (reason.txt: it could not be mapped, or an older version)
        — every destination not in delivered.json waits for it
    <dead_letter_dir>/.removing-<StudyInstanceUID>-<pid>-<ns>
        a set-aside study being removed (renamed first, so no reader sees half of it)
    <output_dir>/<StudyInstanceUID>.json
        the disk sink's output (and `convert`'s)
    <output_dir>/.<StudyInstanceUID>.json.lock
        flock'ed by the writer reading, merging and writing that file (several nodes may share
        an output folder); removed by the writer when done
    <any folder>/.<name>.<pid>.tmp
        a file being written atomically by process <pid> (scp.store.files)

Names starting with "." are the node's temporary files: every reader leaves them out.
In the spool and the dead-letter folder only entries named like a UID are studies; anything
else (lost+found, dotfiles, an operator's notes) is left alone, never read nor removed.
"""

from __future__ import annotations

import re

INSTANCE_SUFFIX = ".dcm"
CORRUPT_SUFFIX = ".corrupt"
TEMP_SUFFIX = ".tmp"
JOURNAL = "deliveries.jsonl"
ROTATED_SUFFIX = ".1"
REASON = "reason.txt"
INSTANCES = "instances"
DELIVERED = "delivered.json"
DESTINATIONS = "destinations"
OUTPUT_SUFFIX = ".json"
REMOVING_PREFIX = ".removing-"

QUARANTINE = "quarantine"
QUARANTINE_REASON_SUFFIX = ".reason.txt"
LOCK = ".lock"
LOCK_SUFFIX = ".lock"

# fullmatch, not match with "$": "$" also matches before a final "\n", which a file name
# (and the `status` table) must never get.
_UID = re.compile(r"[0-9][0-9.]{0,63}")


def is_safe_uid(uid: str) -> bool:
    """A UID usable as a file name: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return isinstance(uid, str) and bool(_UID.fullmatch(uid)) and ".." not in uid


def is_study_folder_name(name: str) -> bool:
    """A spool or dead-letter entry the node may have made for a study (a UID); any other entry
    (lost+found, an operator's notes, a folder of another program) is never read nor removed."""
    return is_safe_uid(name)


def is_hidden(name: str) -> bool:
    """A temporary or internal entry (readers skip it)."""
    return name.startswith(".")


def instance_file(sop_uid: str) -> str:
    return f"{sop_uid}{INSTANCE_SUFFIX}"


def instance_uid(name: str) -> str | None:
    """The SOP Instance UID an instance file name stands for; None for any other entry."""
    if is_hidden(name) or not name.endswith(INSTANCE_SUFFIX):
        return None
    return name[:-len(INSTANCE_SUFFIX)]


def corrupt_file(sop_uid: str) -> str:
    return instance_file(sop_uid) + CORRUPT_SUFFIX


def spool_temp_file(sop_uid: str, writer: int | str) -> str:
    """The name an instance is written under before its rename (writer: the process and thread)."""
    return f".{sop_uid}.{writer}{TEMP_SUFFIX}"


def is_temp_file(name: str) -> bool:
    return is_hidden(name) and name.endswith(TEMP_SUFFIX)


def temp_file(name: str, pid: int) -> str:
    """The name a file is written under, by process pid, before it is renamed to name."""
    return f".{name}.{pid}{TEMP_SUFFIX}"


def temp_file_writer(name: str) -> int | None:
    """The pid in a temp_file name; None when name is not one."""
    if not is_temp_file(name):
        return None
    try:
        return int(name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return None


def quarantine_reason(name: str) -> str:
    """The file beside a quarantined entry that says why it was set aside."""
    return f"{name}{QUARANTINE_REASON_SUFFIX}"


def output_lock_file(name: str) -> str:
    """The lock file writers of the output file `name` hold while they read, merge and write it."""
    return f".{name}{LOCK_SUFFIX}"


def rotated_journal(name: str = JOURNAL) -> str:
    """The name the journal is renamed to when it is full (the previous one is replaced)."""
    return f"{name}{ROTATED_SUFFIX}"


def output_file(study_uid: str) -> str:
    return f"{study_uid}{OUTPUT_SUFFIX}"


def removing_folder(study_uid: str, pid: int, ns: int) -> str:
    return f"{REMOVING_PREFIX}{study_uid}-{pid}-{ns}"
