"""The disk sink: <output_dir>/<StudyInstanceUID>.json, merged with what is there, written atomically.

The writing itself is scp.convert.write_study (the same file `convert` produces):
an existing file is parsed and merged (union of series and instances), the result
goes to a temporary file, is fsync'ed and renamed. Temporary files whose writer is gone
(a node killed while writing) are removed when the sink is created.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mapping.errors import PatientMismatchError
from scp.errors import DeliveryRejected, DeliveryRetryable

log = logging.getLogger("scp.disk_sink")


class DiskSink:
    name = "disk"

    def __init__(self, output_dir: Path | str, shape: str = "bundle") -> None:
        self.output_dir = Path(output_dir)
        self.shape = shape
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temp_files(self.output_dir)

    def deliver(self, resources) -> str:
        from scp.convert import UnusableOutputError, write_study

        path = self.output_dir / f"{resources.study_uid}.json"
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
    """Remove .<name>.<pid>.tmp files (scp.convert's) whose writing process is gone; returns how many."""
    removed = 0
    for path in folder.glob(".*.tmp"):
        try:
            pid = int(path.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if _running(pid):
            continue  # a live writer (another node, `convert`, `retry`): its file, its rename
        path.unlink(missing_ok=True)
        removed += 1
        log.info("removed %s, left by a writer that stopped before renaming it", path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
