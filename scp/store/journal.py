"""<spool_dir>/deliveries.jsonl: one JSON line per finished delivery, written and read here.

A line, as `Journal.append` writes it::

    {"time": "2027-01-15T08:00:00+00:00", "study": "<StudyInstanceUID>", "instances": 12,
     "result": "delivered" | "delivered (retry)" | "dead-lettered: <reason>",
     "sinks": {"disk": "wrote ...", "fhir": "ImagingStudy/17 created at ..."},
     ...further fields of the writer's: series, attempts, seconds, senders (calling AE titles)}

Lines are appended with one write on an O_APPEND descriptor, so lines of concurrent
writers (the node and `retry`) never interleave. When a line would take the file past
`max_bytes` (node.journal_max_bytes, 10 MiB by default: some 30 000 deliveries), the
file is first renamed to deliveries.jsonl.1 (replacing the previous one), so the
journal never holds more than about twice the limit. The reader (`recent`) reads only
the end of the file, continues into deliveries.jsonl.1 when the current file holds
fewer lines than asked for, and leaves out a last line without its newline (a record
being written right now).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scp.store.layout import JOURNAL, rotated_journal

DEFAULT_MAX_BYTES = 10 * 1024 * 1024

log = logging.getLogger("scp.store.journal")


@dataclass(frozen=True)
class JournalEntry:
    """One line of the journal, as read back."""

    time: str  # ISO 8601 with its UTC offset
    study: str
    instances: int
    result: str
    sinks: dict[str, str]


class Journal:
    """The writer: `append` one line per finished delivery (a failure to write is logged, not raised)."""

    def __init__(self, path: Path, wall_clock: Callable[[], float] = time.time, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self.rotated = self.path.with_name(rotated_journal(self.path.name))
        self.max_bytes = max_bytes
        self._wall_clock = wall_clock
        self._lock = threading.Lock()

    @classmethod
    def in_spool(cls, spool_dir: Path | str, wall_clock: Callable[[], float] = time.time, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> "Journal":
        return cls(Path(spool_dir) / JOURNAL, wall_clock, max_bytes=max_bytes)

    def append(self, study_uid: str, instances: int, result: str, sinks: dict[str, str] | None = None,
               **extra: Any) -> None:
        line = {"time": datetime.fromtimestamp(self._wall_clock(), timezone.utc).isoformat(timespec="seconds"),
                "study": study_uid, "instances": instances, "result": result, "sinks": dict(sinks or {}), **extra}
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with self._lock:
                self._rotate_before(len(data))
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, data)  # one write with O_APPEND: lines never interleave
                finally:
                    os.close(fd)
        except OSError as exc:  # a journal is a record, not a reason to fail a delivery
            log.warning("cannot append to %s: %s", self.path, exc)


    def _rotate_before(self, size: int) -> None:
        """Rename a full journal to <name>.1 (the one before is dropped), so that size bytes fit."""
        try:
            current = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if current and current + size > self.max_bytes:
            # Another writer (`retry`) may have rotated just now: then the file is small and stays.
            os.replace(self.path, self.rotated)


def recent(path: Path, n: int) -> tuple[list[JournalEntry], list[str]]:
    """The last n complete lines of the journal: (entries, problems — one text per line not understood).

    Reads on into the rotated file (<name>.1) when the current one holds fewer than n.
    FileNotFoundError when there is no journal yet; other OSErrors as raised.
    """
    lines = _last_lines(Path(path), n)
    entries, problems = [], []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(parse_line(line))
        except ValueError as exc:
            problems.append(f"{path}: line {number} of the last {len(lines)} is not a delivery record ({exc})")
    return entries, problems


def _last_lines(path: Path, n: int) -> list[str]:
    rotated = path.with_name(rotated_journal(path.name))
    try:
        lines = tail_lines(path, n)
    except FileNotFoundError:
        if not rotated.exists():
            raise
        lines = []  # renamed this instant, not yet written again
    if len(lines) < n:
        try:
            lines = tail_lines(rotated, n - len(lines)) + lines
        except FileNotFoundError:
            pass
    return lines


def parse_line(line: str) -> JournalEntry:
    """One journal line; ValueError naming what is wrong."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    fields = {"time": str, "study": str, "instances": int, "result": str, "sinks": dict}
    for name, kind in fields.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    if not record["study"]:
        raise ValueError("study: empty")
    sinks = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in record["sinks"].items()}
    return JournalEntry(record["time"], record["study"], record["instances"], record["result"], sinks)


def tail_lines(path: Path, n: int, block: int = 64 * 1024) -> list[str]:
    """The last n non-empty complete lines of a text file, read from the end."""
    with open(path, "rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        data = b""
        while True:
            complete = data[:data.rfind(b"\n") + 1]
            if pos > 0:  # the first piece may start mid-line
                complete = complete[complete.find(b"\n") + 1:] if b"\n" in complete else b""
            lines = [line for line in complete.split(b"\n") if line.strip()]
            if pos == 0 or len(lines) >= n:
                break
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    return [line.decode("utf-8", errors="replace") for line in lines[-n:]]
