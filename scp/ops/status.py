"""What the node holds right now, read from its on-disk layout (see scp/__init__.py).

`build_report(spool_dir, dead_letter_dir, now)` is a pure read of the folders: it
never opens a DICOM file (no patient data reaches the report: studies are named
by StudyInstanceUID only), never writes, and tolerates a node running beside it
(a study delivered while it is being listed simply disappears from the report).

What it reads:

    <spool_dir>/<StudyInstanceUID>/*.dcm       waiting study; instances = number of
                                               .dcm files, last instance = newest mtime
    <dead_letter_dir>/<StudyInstanceUID>/      set-aside study; reason = first line of
        reason.txt, instances/*.dcm            reason.txt, since = its mtime
    <spool_dir>/deliveries.jsonl               the last N lines, each a JSON object
        (scp.pipeline.delivery.Journal): {"time": ISO 8601 or epoch seconds, "study": UID,
        "instances": int, "result": "delivered" | "dead-lettered: why" | ...,
        "sinks": {"<sink>": "<what it did>", ...}, ...}

Hidden entries (names starting with ".") are the node's temporary files and are
left out.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DELIVERIES = "deliveries.jsonl"
REASON = "reason.txt"
INSTANCE_SUFFIX = ".dcm"
MAX_REASON = 300  # characters of a reason's first line shown


@dataclass(frozen=True)
class WaitingStudy:
    study: str
    instances: int
    last_instance: float  # epoch seconds (mtime of the newest instance file)
    idle_seconds: float


@dataclass(frozen=True)
class DeadLetteredStudy:
    study: str
    reason: str
    since: float  # epoch seconds (mtime of reason.txt, else of the folder)
    instances: int


@dataclass(frozen=True)
class Delivery:
    time: str
    study: str
    instances: int | None
    result: str


@dataclass(frozen=True)
class StatusReport:
    spool_dir: str
    dead_letter_dir: str
    now: float
    waiting: tuple[WaitingStudy, ...] = ()
    dead_lettered: tuple[DeadLetteredStudy, ...] = ()
    deliveries: tuple[Delivery, ...] = ()
    notes: tuple[str, ...] = field(default=())  # unreadable lines, missing folders

    def to_json(self) -> dict[str, Any]:
        return {
            "spool_dir": self.spool_dir,
            "dead_letter_dir": self.dead_letter_dir,
            "now": iso(self.now),
            "waiting": [dict(asdict(w), last_instance=iso(w.last_instance),
                             idle_seconds=round(w.idle_seconds, 1)) for w in self.waiting],
            "dead_lettered": [dict(asdict(d), since=iso(d.since)) for d in self.dead_lettered],
            "recent_deliveries": [asdict(d) for d in self.deliveries],
            "notes": list(self.notes),
        }


def build_report(spool_dir: Path, dead_letter_dir: Path, now: float, recent: int = 10) -> StatusReport:
    """The spool, dead-letter and delivery-log state at `now` (epoch seconds)."""
    notes: list[str] = []
    waiting = [WaitingStudy(uid, count, newest, max(0.0, now - newest))
               for uid, count, newest in _studies(Path(spool_dir), "spool", notes)]
    waiting.sort(key=lambda w: w.last_instance)
    dead = [d for uid, count, _ in _studies(Path(dead_letter_dir), "dead-letter", notes, instances_under="instances")
            if (d := _dead_lettered(Path(dead_letter_dir) / uid, uid, count)) is not None]
    dead.sort(key=lambda d: d.since)
    deliveries = _recent_deliveries(Path(spool_dir) / DELIVERIES, recent, notes)
    return StatusReport(str(spool_dir), str(dead_letter_dir), now, tuple(waiting), tuple(dead),
                        tuple(deliveries), tuple(notes))


def _studies(root: Path, what: str, notes: list[str], instances_under: str = "") -> list[tuple[str, int, float]]:
    """(UID, instance count, newest mtime) of each study folder under root."""
    try:
        with os.scandir(root) as it:
            entries = [e for e in it if not e.name.startswith(".") and e.is_dir()]
    except FileNotFoundError:
        if not instances_under:  # no dead-letter folder is the normal case: nothing was ever set aside
            notes.append(f"{what} folder {root} does not exist (nothing received yet, or another path configured)")
        return []
    except OSError as exc:
        notes.append(f"{what} folder {root}: cannot read: {exc.strerror or exc}")
        return []
    found = []
    for entry in entries:
        folder = Path(entry.path) / instances_under if instances_under else Path(entry.path)
        count, newest = 0, 0.0
        try:
            with os.scandir(folder) as files:
                for f in files:
                    if f.name.endswith(INSTANCE_SUFFIX) and not f.name.startswith(".") and f.is_file():
                        count += 1
                        newest = max(newest, f.stat().st_mtime)
        except FileNotFoundError:
            if not instances_under:
                continue  # delivered and removed while we looked
        except OSError as exc:
            notes.append(f"{what} study {entry.name}: cannot read: {exc.strerror or exc}")
            continue
        if count or instances_under:  # an empty spool folder waits for nothing
            found.append((entry.name, count, newest))
    return found


def _dead_lettered(folder: Path, uid: str, instances: int) -> DeadLetteredStudy | None:
    try:
        since = (folder / REASON).stat().st_mtime
        with open(folder / REASON, encoding="utf-8", errors="replace") as fh:
            reason = fh.readline().strip()
    except FileNotFoundError:
        try:
            since = folder.stat().st_mtime
        except FileNotFoundError:
            return None  # taken back by `retry` while we looked
        reason = f"({REASON} missing: being set aside right now, or that was interrupted)"
    if len(reason) > MAX_REASON:
        reason = reason[:MAX_REASON - 1] + "…"
    return DeadLetteredStudy(uid, reason or "(no reason given)", since, instances)


def _recent_deliveries(log: Path, recent: int, notes: list[str]) -> list[Delivery]:
    if recent <= 0:
        return []
    try:
        lines = tail_lines(log, recent)
    except FileNotFoundError:
        return []
    except OSError as exc:
        notes.append(f"{log}: cannot read: {exc.strerror or exc}")
        return []
    deliveries = []
    for number, line in enumerate(lines, 1):
        try:
            deliveries.append(_delivery(json.loads(line)))
        except (ValueError, TypeError, KeyError) as exc:
            notes.append(f"{log}: line {number} of the last {len(lines)} is not a delivery record ({exc})")
    return deliveries


def _delivery(record: Any) -> Delivery:
    if not isinstance(record, dict):
        raise TypeError("not a JSON object")
    study = record.get("study", record.get("study_uid"))
    if not isinstance(study, str) or not study:
        raise KeyError("study")
    when = record.get("time")
    time_text = iso(when) if isinstance(when, (int, float)) and not isinstance(when, bool) else str(when or "?")
    instances = record.get("instances")
    if isinstance(instances, list):
        instances = len(instances)
    if not isinstance(instances, int) or isinstance(instances, bool):
        instances = None
    return Delivery(time_text, study, instances, _result_text(record))


def _result_text(record: dict[str, Any]) -> str:
    """One line: the result ("delivered", "dead-lettered: why"), then what each sink said."""
    parts = []
    if "result" in record:
        parts.append(_one_line(record["result"]))
    elif isinstance(record.get("ok"), bool):
        parts.append("ok" if record["ok"] else "failed")
    sinks = record.get("sinks", record.get("results"))
    if isinstance(sinks, dict) and sinks:
        parts.append("; ".join(f"{name}: {_one_line(value)}" for name, value in sinks.items()))
    elif isinstance(sinks, list) and sinks:
        parts.append("; ".join(_one_line(value) for value in sinks))
    if not parts:
        return "?"
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({parts[1]})"


def _one_line(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("result", value.get("status", value))
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = text.splitlines()[0] if text else ""
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 1] + "…"


def tail_lines(path: Path, n: int, block: int = 64 * 1024) -> list[str]:
    """The last n non-empty complete lines of a text file, read from the end.

    The log grows for the node's whole life, so only its end is read. A final
    line without its newline is a record being written right now: left out.
    """
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


def iso(epoch: float) -> str:
    """Local time with its UTC offset, to the second."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).astimezone().isoformat(timespec="seconds")


def format_age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_report(report: StatusReport) -> list[str]:
    """The report as text lines for a terminal."""
    out: list[str] = []
    n = len(report.waiting)
    out.append(f"Waiting in the spool ({report.spool_dir}): {n} stud{'y' if n == 1 else 'ies'}")
    out += _table(("STUDY", "INSTANCES", "LAST INSTANCE", "IDLE"),
                  [(w.study, str(w.instances), iso(w.last_instance), format_age(w.idle_seconds))
                   for w in report.waiting])
    n = len(report.dead_lettered)
    out.append("")
    out.append(f"Dead-lettered ({report.dead_letter_dir}): {n} stud{'y' if n == 1 else 'ies'}"
               + (" — fix the cause, then `dicom-fhir-scp retry`" if n else ""))
    out += _table(("STUDY", "INSTANCES", "SINCE", "REASON"),
                  [(d.study, str(d.instances), iso(d.since), d.reason) for d in report.dead_lettered])
    out.append("")
    out.append(f"Recent deliveries ({Path(report.spool_dir) / DELIVERIES}): {len(report.deliveries)} shown")
    out += _table(("TIME", "STUDY", "INSTANCES", "RESULT"),
                  [(d.time, d.study, "?" if d.instances is None else str(d.instances), d.result)
                   for d in report.deliveries])
    if report.notes:
        out.append("")
        out += [f"note: {note}" for note in report.notes]
    return out


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  " + "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths)), r[-1]]) for r in [header, *rows]]
