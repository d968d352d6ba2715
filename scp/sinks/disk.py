"""The disk sink: <output_dir>/<StudyInstanceUID>.json, merged with what is there, written atomically.

`write_study` is the study writer, shared with `convert` (scp.sources.folder), which
writes the same files: an existing file is parsed and merged (union of series and instances), the result
goes to a temporary file, is fsync'ed and renamed, all under the file's lock
(scp.store.files.locked), so several nodes may share one output folder. Temporary files whose writer is gone
(a node killed while writing) are removed when the sink is created.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mapping import StudyResources, merge_resources, parse_resources, render, validate_resources
from mapping.errors import DicomFhirError, MappingError, PatientMismatchError
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.store.files import locked, write_atomically
from scp.store.layout import TEMP_SUFFIX, output_file, temp_file_writer

log = logging.getLogger("scp.sinks.disk")


class DiskSink:
    name = "disk"

    def __init__(self, output_dir: Path | str, shape: str = "bundle") -> None:
        self.output_dir = Path(output_dir)
        self.shape = shape
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temp_files(self.output_dir)

    def deliver(self, resources) -> str:
        path = self.output_dir / output_file(resources.study_uid)
        try:
            path, changed = write_study(resources, self.output_dir, self.shape)
        except PatientMismatchError as exc:
            log.debug("study %s: %s", resources.study_uid, exc)  # may quote patient IDs
            raise DeliveryRejected(f"{path} already holds this study for another patient "
                                   f"(PatientMismatchError); not merged") from exc
        except UnusableOutputError as exc:
            raise DeliveryRejected(f"{exc}; move it away, then retry") from exc
        except MappingError as exc:  # the study does not validate: it would not validate on a retry either
            raise DeliveryRejected(f"MappingError: {exc}; {path} not written") from exc
        except OSError as exc:
            raise DeliveryRetryable(f"writing {path} failed: {exc}") from exc
        return f"wrote {path}" if changed else f"{path} unchanged"


def remove_orphaned_temp_files(folder: Path) -> int:
    """Remove temp files (scp.store.files.write_atomically's) whose writing process is gone; returns how many."""
    removed = 0
    for path in folder.glob(".*"):
        pid = temp_file_writer(path.name)
        if pid is None or _running(pid):
            continue  # a live writer (another node, `convert`, `retry`): its file, its rename
        # A writer's temp file exists only while it holds its output file's lock: with the lock,
        # a temp file still there is an orphan, even when its PID is another host's (a shared folder).
        target = path.with_name(path.name[1:-len(f".{pid}{TEMP_SUFFIX}")])
        with locked(target):
            if not path.exists():
                continue  # the writer (on another host) renamed it meanwhile
            path.unlink(missing_ok=True)
        removed += 1
        log.info("removed %s, left by a writer that stopped before renaming it", path, extra={"destination": "disk"})
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class UnusableOutputError(DicomFhirError):
    """An existing output file cannot be parsed, so it cannot be merged (it is kept as is)."""


def write_study(resources: StudyResources, out_dir: Path, shape: str = "bundle") -> tuple[Path, bool]:
    """Write (or merge into) out_dir/<StudyInstanceUID>.json atomically; return (path, changed).

    What is written is validated against its FHIR release (R4 or R5) first (MappingError naming the study, resource
    and elements; the file is left as it was); an unchanged study is not, it is not written.
    UnusableOutputError when the existing file is not a study this tool wrote.
    """
    path = out_dir / output_file(resources.study_uid)
    # Read, merge and write under the file's lock: another writer of this study (a second node
    # on a shared output folder, `convert`, `retry`) merging meanwhile would otherwise be lost.
    with locked(path):
        existing_doc = _read_json(path)
        existing = _parsed(existing_doc, path, resources.fhir_version) if existing_doc is not None else None
        if existing is not None:
            resources = merge_resources(existing, resources)
        doc = render(resources, shape)
        if doc == existing_doc:
            return path, False
        _validate(resources, existing, path)
        write_atomically(path, json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    return path, True


def _parsed(doc: dict, path: Path, fhir_version: str = "R4") -> StudyResources:
    # In the release being written: an R4 file meeting an R5 study becomes R5 (an R5 file
    # meeting R4 is refused, the file kept as it is).
    try:
        return parse_resources(doc, fhir_version)
    except MappingError as exc:
        raise UnusableOutputError(f"{path}: not a study this tool wrote (MappingError: {exc})") from exc


def _validate(merged: StudyResources, existing: StudyResources | None, path: Path) -> None:
    """The edge: MappingError when the merged study is not valid R4, UnusableOutputError when
    that is the existing file's fault (its values are checked only now, when it failed)."""
    try:
        validate_resources(merged)
    except MappingError as exc:
        if existing is not None:
            try:
                validate_resources(existing)
            except MappingError as existing_exc:
                raise UnusableOutputError(f"{path}: not a study this tool wrote "
                                          f"(MappingError: {existing_exc})") from exc
        raise


def _read_json(path: Path) -> dict | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UnusableOutputError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise UnusableOutputError(f"{path}: not a FHIR resource")
    return doc
