"""The disk sink: <output_dir>/<StudyInstanceUID>.json, merged with what is there, written atomically.

`write_study` is the study writer, shared with `convert` (scp.sources.folder), which
writes the same files: an existing file is parsed and merged (union of series and instances), the result
goes to a temporary file, is fsync'ed and renamed. Temporary files whose writer is gone
(a node killed while writing) are removed when the sink is created.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mapping import StudyResources, merge_resources, parse_resources, render
from mapping.errors import DicomFhirError, PatientMismatchError
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.store.files import write_atomically
from scp.store.layout import output_file, temp_file_writer

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
    """Write (or merge into) out_dir/<StudyInstanceUID>.json atomically; return (path, changed)."""
    path = out_dir / output_file(resources.study_uid)
    existing_doc = _read_json(path)
    if existing_doc is not None:
        try:
            existing = parse_resources(existing_doc)
        except Exception as exc:  # MappingError, or the models' validation error
            raise UnusableOutputError(f"{path}: not a study this tool wrote ({type(exc).__name__}: {exc})") from exc
        resources = merge_resources(existing, resources)
    doc = render(resources, shape)
    if doc == existing_doc:
        return path, False
    write_atomically(path, json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    return path, True


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
