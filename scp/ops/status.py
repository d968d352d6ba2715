"""What the node holds right now, read from its on-disk layout (scp.store.layout).

`build_report(spool_dir, dead_letter_dir, now)` is a pure read of the folders: of a
DICOM file it reads only the file meta (the sender: calling AE title), never the data
set (no patient data reaches the report: studies are named by StudyInstanceUID only),
never writes, and tolerates a node running beside it
(a study delivered while it is being listed simply disappears from the report).

What it reads:

    <spool_dir>/<StudyInstanceUID>/*.dcm       waiting study; instances = number of
                                               .dcm files, last instance = newest mtime,
                                               senders = the calling AE titles in the file
                                               meta of the oldest and the newest file
    <dead_letter_dir>/<StudyInstanceUID>/      set-aside study; reason = first line of
        reason.txt, instances/*.dcm            reason.txt, since = its mtime, senders as above
        delivered.json                         the destinations that took it
        destinations/<name>/reason.txt         the destinations that refused it, and why
    <spool_dir>/deliveries.jsonl (and .1)      the last N lines (across a rotation), read with
                                               scp.store.journal (the format it writes)

    <spool_dir>/quarantine/<StudyInstanceUID>/ spool entries the node could not read, set
        <name>.reason.txt                      aside (the rest of their study was delivered);
                                               reason = first line of the reason file

Hidden entries (names starting with ".") are the node's temporary files and are
left out, and so is every entry not named like a UID (lost+found, ...).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scp.store import journal
from scp.store.dead_letter import read_delivered, read_refusals
from scp.store.layout import INSTANCES, JOURNAL, REASON, instance_uid, is_study_folder_name
from scp.store.spool import list_quarantined
from scp.store.part10 import read_source

MAX_REASON = 300  # characters of a reason's first line shown


@dataclass(frozen=True)
class WaitingStudy:
    study: str
    instances: int
    last_instance: float  # epoch seconds (mtime of the newest instance file)
    idle_seconds: float
    senders: tuple[str, ...] = ()  # calling AE titles (file meta of the oldest and newest file)


@dataclass(frozen=True)
class DeadLetteredStudy:
    study: str
    reason: str
    since: float  # epoch seconds (mtime of reason.txt, else of the folder)
    instances: int
    senders: tuple[str, ...] = ()  # calling AE titles (file meta of the oldest and newest file)
    delivered: dict[str, str] = field(default_factory=dict)  # destination -> result: took it
    refused: dict[str, str] = field(default_factory=dict)  # destination -> first line of its reason


@dataclass(frozen=True)
class QuarantinedInstance:
    study: str
    entry: str  # its name in <spool_dir>/quarantine/<study>/
    reason: str
    since: float  # epoch seconds (mtime of its reason file)


@dataclass(frozen=True)
class Delivery:
    time: str
    study: str
    instances: int
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
    quarantined: tuple[QuarantinedInstance, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "spool_dir": self.spool_dir,
            "dead_letter_dir": self.dead_letter_dir,
            "now": iso(self.now),
            "waiting": [dict(asdict(w), last_instance=iso(w.last_instance),
                             idle_seconds=round(w.idle_seconds, 1), senders=list(w.senders)) for w in self.waiting],
            "dead_lettered": [dict(asdict(d), since=iso(d.since), senders=list(d.senders))
                              for d in self.dead_lettered],
            "recent_deliveries": [asdict(d) for d in self.deliveries],
            "notes": list(self.notes),
            "quarantined": [dict(asdict(q), since=iso(q.since)) for q in self.quarantined],
        }


def build_report(spool_dir: Path, dead_letter_dir: Path, now: float, recent: int = 10) -> StatusReport:
    """The spool, dead-letter and delivery-log state at `now` (epoch seconds)."""
    notes: list[str] = []
    waiting = [WaitingStudy(uid, count, newest, max(0.0, now - newest), senders)
               for uid, count, newest, senders in _studies(Path(spool_dir), "spool", notes)]
    waiting.sort(key=lambda w: w.last_instance)
    dead = [d for uid, count, _, senders in _studies(Path(dead_letter_dir), "dead-letter", notes,
                                                     instances_under=INSTANCES)
            if (d := _dead_lettered(Path(dead_letter_dir) / uid, uid, count, senders)) is not None]
    dead.sort(key=lambda d: d.since)
    deliveries = _recent_deliveries(Path(spool_dir) / JOURNAL, recent, notes)
    quarantined = tuple(QuarantinedInstance(q.study_uid, q.name, _one_line(q.reason), q.since)
                        for q in list_quarantined(spool_dir))
    return StatusReport(str(spool_dir), str(dead_letter_dir), now, tuple(waiting), tuple(dead),
                        tuple(deliveries), tuple(notes), quarantined)


def _studies(root: Path, what: str, notes: list[str],
             instances_under: str = "") -> list[tuple[str, int, float, tuple[str, ...]]]:
    """(UID, instance count, newest mtime, senders) of each study folder under root."""
    try:
        with os.scandir(root) as it:
            # Study folders only: lost+found, quarantine/ and an operator's notes are no studies.
            entries = [e for e in it if is_study_folder_name(e.name) and e.is_dir()]
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
        oldest: tuple[float, str] | None = None
        newest_path = ""
        try:
            with os.scandir(folder) as files:
                for f in files:
                    if instance_uid(f.name) is not None and f.is_file():
                        count += 1
                        mtime = f.stat().st_mtime
                        if mtime >= newest:
                            newest, newest_path = mtime, f.path
                        if oldest is None or mtime < oldest[0]:
                            oldest = (mtime, f.path)
        except FileNotFoundError:
            if not instances_under:
                continue  # delivered and removed while we looked
        except OSError as exc:
            notes.append(f"{what} study {entry.name}: cannot read: {exc.strerror or exc}")
            continue
        if count or instances_under:  # an empty spool folder waits for nothing
            paths = [] if oldest is None else [oldest[1], newest_path]
            found.append((entry.name, count, newest, _senders(paths)))
    return found


def _senders(paths: list[str]) -> tuple[str, ...]:
    """The calling AE titles recorded in these files' meta (each once). Two files per study, the oldest
    and the newest, keep `status` cheap on a large spool and still show a study split across two
    associations; a file without a sender (written by hand, being replaced) is left out."""
    titles: dict[str, None] = {}
    for path in paths:
        try:
            ae_title, _address = read_source(path)
        except (OSError, ValueError):
            continue
        if ae_title:
            titles[ae_title] = None
    return tuple(titles)


def _dead_lettered(folder: Path, uid: str, instances: int, senders: tuple[str, ...] = ()) -> DeadLetteredStudy | None:
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
    return DeadLetteredStudy(uid, reason or "(no reason given)", since, instances, senders,
                             {k: _one_line(v) for k, v in read_delivered(folder).items()},
                             {k: _one_line(v) for k, v in read_refusals(folder).items()})


def _recent_deliveries(log: Path, recent: int, notes: list[str]) -> list[Delivery]:
    if recent <= 0:
        return []
    try:
        entries, problems = journal.recent(log, recent)
    except FileNotFoundError:
        return []
    except OSError as exc:
        notes.append(f"{log}: cannot read: {exc.strerror or exc}")
        return []
    notes.extend(problems)
    return [Delivery(e.time, e.study, e.instances, _result_text(e)) for e in entries]


def _result_text(entry: journal.JournalEntry) -> str:
    """One line: the result ("delivered", "dead-lettered: why"), then what each sink said."""
    result = _one_line(entry.result) or "?"
    if not entry.sinks:
        return result
    return f"{result} ({'; '.join(f'{name}: {_one_line(value)}' for name, value in entry.sinks.items())})"


def _one_line(text: str) -> str:
    text = text.splitlines()[0] if text else ""
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 1] + "…"


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
    out += _table(("STUDY", "SENDER", "INSTANCES", "LAST INSTANCE", "IDLE"),
                  [(w.study, _sender_column(w.senders), str(w.instances), iso(w.last_instance),
                    format_age(w.idle_seconds)) for w in report.waiting])
    n = len(report.dead_lettered)
    out.append("")
    out.append(f"Dead-lettered ({report.dead_letter_dir}): {n} stud{'y' if n == 1 else 'ies'}"
               + (" — fix the cause, then `dicom-fhir-scp retry`" if n else ""))
    out += _table(("STUDY", "SENDER", "INSTANCES", "SINCE", "REASON"),
                  [(d.study, _sender_column(d.senders), str(d.instances), iso(d.since), d.reason)
                   for d in report.dead_lettered])
    for d in report.dead_lettered:  # per destination, when the study was refused by some only
        if d.delivered or d.refused:
            out.append(f"  {d.study}:")
            out += [f"    {name}: took it ({result})" for name, result in d.delivered.items()]
            out += [f"    {name}: refused: {reason}" for name, reason in d.refused.items()]
    if report.quarantined:
        out.append("")
        out.append(f"Quarantined spool entries ({Path(report.spool_dir) / 'quarantine'}): {len(report.quarantined)}"
                   " — not delivered; fix the cause, move the entry back into its study folder, restart the node")
        out += _table(("STUDY", "ENTRY", "SINCE", "REASON"),
                      [(q.study, q.entry, iso(q.since), q.reason) for q in report.quarantined])
    out.append("")
    out.append(f"Recent deliveries ({Path(report.spool_dir) / JOURNAL}): {len(report.deliveries)} shown")
    out += _table(("TIME", "STUDY", "INSTANCES", "RESULT"),
                  [(d.time, d.study, str(d.instances), d.result)
                   for d in report.deliveries])
    if report.notes:
        out.append("")
        out += [f"note: {note}" for note in report.notes]
    return out


def _sender_column(senders: tuple[str, ...]) -> str:
    return ",".join(senders) or "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  " + "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths)), r[-1]]) for r in [header, *rows]]
