"""Completed study → mapping → every sink, on a worker thread off the receiving path.

One worker thread takes completed parts (`submit`, called by the completion timer) and
delivers them one at a time, so reception never waits for conversion or a FHIR server.

Per part: the spooled headers are read back, turned into mapping.InstanceHeader one by
one (memory stays flat), converted with mapping.convert_study, and handed to each sink.

- every sink took it: the delivered spool files are removed (only the versions that
  were read: an instance received again meanwhile stays for the next completion), and
  one line is appended to <spool_dir>/deliveries.jsonl;
- DeliveryRetryable (or an unexpected error): the part stays in the spool and is tried
  again after an exponential backoff with jitter, capped at fhir.max_backoff, without
  an attempt limit; sinks that already took this part are not asked again;
- DeliveryRejected, or instances that disagree on PatientID: the part is set aside in
  the dead-letter folder (scp.store.dead_letter) with the reason and the sink's documents.

A part completing while an earlier part of the same study waits for a retry joins it.

`deliver_study` is the pipeline without threads or spool; `redeliver` runs it for a
dead-lettered study (the `retry` command).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.sinks import Sink
from scp.store.spool import Spool, SpooledInstance

log = logging.getLogger("scp.pipeline.delivery")

DELIVERIES = "deliveries.jsonl"
BASE_BACKOFF = 1.0  # seconds before the first retry
QUIET = 0.1  # seconds without any arrival before headers of waiting studies are parsed ahead
PREPARE_BATCH = 100  # instances parsed ahead before checking again for due parts and arrivals


@dataclass
class DeliveryReport:
    """What one delivery of a part did (also the deliveries.jsonl line)."""

    study_uid: str
    instances: int = 0
    series: int = 0
    versions: dict[str, tuple[int, int]] = field(default_factory=dict)  # SOP UID -> spool file version read
    unreadable: dict[str, tuple[int, int]] = field(default_factory=dict)  # SOP UID -> version that could not be used
    sinks: dict[str, str] = field(default_factory=dict)  # sink name -> result text
    warnings: tuple[str, ...] = ()
    parsed_ahead: int = 0  # headers taken from the HeaderCache


def read_header(instance: SpooledInstance):
    """The InstanceHeader of one spooled header file."""
    from mapping import InstanceHeader

    from scp.receive.dataset import header_dataset

    try:
        ds = header_dataset(instance.data)
    except ValueError:  # not written by this node's spool (an older file, a copy): let pydicom read it
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(instance.data))
    return InstanceHeader.from_dataset(ds)


class HeaderCache:
    """Work done ahead of a study's completion, while the node is quiet.

    InstanceHeaders keyed by spool file version (an instance received again is parsed
    again), and the study's conversion keyed by the exact set of instance versions it
    was made from (used only when the completed part is exactly that set).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._studies: dict[str, dict[str, tuple[tuple[int, int], Any]]] = {}
        self._converted: dict[str, tuple[frozenset, Any]] = {}

    def converted(self, study_uid: str, versions: dict[str, tuple[int, int]]):
        with self._lock:
            entry = self._converted.get(study_uid)
        return entry[1] if entry is not None and entry[0] == frozenset(versions.items()) else None

    def put_converted(self, study_uid: str, versions: dict[str, tuple[int, int]], resources) -> None:
        with self._lock:
            self._converted[study_uid] = (frozenset(versions.items()), resources)

    def is_converted(self, study_uid: str, sop_uids: Iterable[str]) -> bool | None:
        """True: converted for exactly these instances; False: all parsed, not converted; None: not all parsed."""
        with self._lock:
            known = self._studies.get(study_uid, {})
            versions = {}
            for sop in sop_uids:
                entry = known.get(sop)
                if entry is None or entry[1] is None:
                    return None
                versions[sop] = entry[0]
            converted = self._converted.get(study_uid)
            return converted is not None and converted[0] == frozenset(versions.items())

    def headers(self, study_uid: str, sop_uids: Iterable[str]) -> tuple[dict[str, tuple[int, int]], list]:
        with self._lock:
            known = self._studies.get(study_uid, {})
            entries = [(sop, known[sop]) for sop in sop_uids]
        return {sop: e[0] for sop, e in entries}, [e[1] for _, e in entries]

    def get(self, study_uid: str, sop_uid: str, version: tuple[int, int]):
        with self._lock:
            entry = self._studies.get(study_uid, {}).get(sop_uid)
        return entry[1] if entry is not None and entry[0] == version else None

    def put(self, study_uid: str, sop_uid: str, version: tuple[int, int], header) -> None:
        with self._lock:
            self._studies.setdefault(study_uid, {})[sop_uid] = (version, header)

    def missing(self, study_uid: str, sop_uids: Iterable[str]) -> list[str]:
        with self._lock:
            known = self._studies.get(study_uid, {})
            return [sop for sop in sop_uids if sop not in known]

    def drop(self, study_uid: str) -> None:
        with self._lock:
            self._studies.pop(study_uid, None)
            self._converted.pop(study_uid, None)

    def __len__(self) -> int:
        with self._lock:
            return sum(map(len, self._studies.values()))


def deliver_study(study_uid: str, instances: Iterable[SpooledInstance], sinks: Sequence[Sink], options,
                  *, done: dict[str, str] | None = None, report: DeliveryReport | None = None,
                  cache: HeaderCache | None = None) -> DeliveryReport:
    """Convert one study's spooled headers and hand them to every sink not in `done`.

    Raises DeliveryRetryable / DeliveryRejected from a sink, and DeliveryRejected when
    the instances cannot be mapped together (PatientMismatchError, MappingError).
    `done` (sink name -> result) is updated as sinks succeed, so a retry skips them.
    `report`, when given, is filled in as the work goes (the caller sees what was read
    even when an exception ends the delivery).
    """
    from mapping import convert_study
    from mapping.errors import MappingError, PatientMismatchError

    report = DeliveryReport(study_uid) if report is None else report
    done = {} if done is None else done
    headers = []
    series: set[str] = set()
    ahead = 0
    for instance in instances:
        header = None if cache is None else cache.get(study_uid, instance.sop_uid, instance.version)
        ahead += header is not None
        try:
            if header is None:
                header = read_header(instance)
            series.add(header.series_uid)
        except Exception as exc:  # a spool file is written atomically; this is a bug or a disk fault
            log.error("study %s: spooled instance %s cannot be used (%s); set aside as .corrupt",
                      study_uid, instance.sop_uid, type(exc).__name__)
            log.debug("study %s instance %s", study_uid, instance.sop_uid, exc_info=True)
            report.unreadable[instance.sop_uid] = instance.version
            continue
        headers.append(header)
        report.versions[instance.sop_uid] = instance.version
    report.instances, report.series = len(headers), len(series)
    report.parsed_ahead = ahead
    if not headers:
        return report
    resources = None if cache is None else cache.converted(study_uid, report.versions)
    try:
        if resources is None:
            resources = convert_study(headers, options)
    except PatientMismatchError as exc:
        log.debug("study %s: %s", study_uid, exc)  # the text may quote patient IDs
        raise DeliveryRejected("PatientMismatchError: the study's instances disagree on PatientID; "
                               "fix the data at the sender, then retry") from exc
    except MappingError as exc:
        raise DeliveryRejected(f"MappingError: {exc}") from exc
    del headers
    report.warnings = tuple(resources.warnings)
    for warning in resources.warnings:
        log.warning("study %s: %s", study_uid, warning)
    for sink in sinks:
        if sink.name not in done:
            done[sink.name] = sink.deliver(resources)
    report.sinks = dict(done)
    return report


def backoff_delay(attempt: int, max_backoff: float, *, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random, base: float = BASE_BACKOFF) -> float:
    """Seconds before attempt+1: base·2^(attempt-1), jittered to 50-100 %, at least retry_after, at most max_backoff."""
    delay = min(max_backoff, base * 2 ** min(attempt - 1, 62))
    delay *= 0.5 + rand() / 2
    if retry_after:
        delay = max(delay, retry_after)
    return min(delay, max_backoff)


class Journal:
    """<spool_dir>/deliveries.jsonl: one JSON line per finished delivery (read by `status`)."""

    def __init__(self, path: Path, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._wall_clock = wall_clock
        self._lock = threading.Lock()

    def append(self, study_uid: str, instances: int, result: str, sinks: dict[str, str] | None = None,
               **extra: Any) -> None:
        line = {"time": datetime.fromtimestamp(self._wall_clock(), timezone.utc).isoformat(timespec="seconds"),
                "study": study_uid, "instances": instances, "result": result, "sinks": dict(sinks or {}), **extra}
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, data)  # one write with O_APPEND: lines never interleave
                finally:
                    os.close(fd)
        except OSError as exc:  # a journal is a record, not a reason to fail a delivery
            log.warning("cannot append to %s: %s", self.path, exc)


@dataclass
class _Part:
    study_uid: str
    sop_uids: set[str]
    due_at: float
    completed_at: float
    attempts: int = 0
    done: dict[str, str] = field(default_factory=dict)


class DeliveryWorker:
    """The delivery thread (see the module docstring). `run_once(now)` drives it in tests."""

    def __init__(self, spool: Spool, sinks: Sequence[Sink], options, *, dead_letters, journal: Journal | None,
                 max_backoff: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random, metrics=None,
                 base_backoff: float = BASE_BACKOFF,
                 waiting: Callable[[], tuple[float, dict[str, frozenset[str]]]] | None = None) -> None:
        """waiting: () -> (seconds since the last arrival, study UID -> SOP UIDs not yet completed);
        with it, the worker parses those instances' headers ahead while the node is quiet, so
        a completed study is delivered sooner (see HeaderCache)."""
        self.spool = spool
        self.sinks = list(sinks)
        self.options = options
        self.dead_letters = dead_letters
        self.journal = journal
        self.max_backoff = max_backoff
        self.base_backoff = base_backoff
        self._clock = clock
        self._rand = rand
        self._metrics = metrics
        self._waiting = waiting
        self.cache = HeaderCache()
        self._pending: dict[str, _Part] = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- input ------------------------------------------------------------------------------

    def submit(self, study_uid: str, sop_uids: Iterable[str]) -> None:
        """A completed part: deliver it as soon as the worker is free (never blocks on delivery)."""
        now = self._clock()
        with self._changed:
            part = self._pending.get(study_uid)
            if part is None:
                self._pending[study_uid] = _Part(study_uid, set(sop_uids), now, now)
            else:  # an earlier part waits for a retry: deliver both together, to every sink
                part.sop_uids.update(sop_uids)
                part.done.clear()
            self._changed.notify()

    # --- the worker -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the delivery in progress (parts not delivered stay in the spool)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("a delivery is still in progress; its study stays in the spool")

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._stopping:
                    return
                part = self._next_due_locked()
            if isinstance(part, _Part):
                self._deliver(part)
                continue
            try:
                prepared = self._prepare_some()
            except Exception:  # only work ahead: the delivery reports what is wrong with the study
                log.debug("parsing waiting studies ahead failed", exc_info=True)
                prepared = False
            if prepared:
                continue
            with self._changed:
                if self._stopping:
                    return
                if self._waiting is not None:  # arrivals don't wake this thread: look again soon
                    part = QUIET / 2 if part is None else min(part, QUIET / 2)
                self._changed.wait(part)

    def _prepare_some(self) -> bool | None:
        """Parse a batch of waiting instances' headers into the cache while the node is quiet.

        True: did some; False: studies are waiting (instances arriving, or all done for now):
        look again soon; None: no study is waiting.
        """
        if self._waiting is None:
            return None
        quiet_for, waiting = self._waiting()
        todo = []
        for study_uid, sop_uids in waiting.items():
            todo += [(study_uid, sop) for sop in self.cache.missing(study_uid, sop_uids)]
            if len(todo) >= PREPARE_BATCH:
                break
        if todo and quiet_for < QUIET:
            return False
        for study_uid, sop_uid in todo[:PREPARE_BATCH]:
            for instance in self.spool.read(study_uid, [sop_uid]):
                try:
                    header = read_header(instance)
                except Exception:  # reported when the study is delivered
                    header = None
                self.cache.put(study_uid, sop_uid, instance.version, header)
        if todo:
            return True
        # Every header is parsed: convert the waiting studies too, so that completion only
        # leaves the sinks to run (the conversion is used only if no instance came meanwhile).
        for study_uid, sop_uids in waiting.items():
            if self.cache.is_converted(study_uid, sop_uids) is False:
                if quiet_for < QUIET:
                    return False
                versions, headers = self.cache.headers(study_uid, sop_uids)
                try:
                    from mapping import convert_study
                    resources = convert_study(headers, self.options)
                except Exception:  # PatientMismatchError and the like: reported when it is delivered
                    resources = None
                self.cache.put_converted(study_uid, versions, resources)
                return True
        return False if waiting else None  # more may arrive: look again

    def run_once(self, now: float | None = None) -> bool:
        """Deliver the next part due at `now`; False when none is due."""
        with self._changed:
            part = self._next_due_locked(now)
        if not isinstance(part, _Part):
            return False
        self._deliver(part)
        return True

    def _next_due_locked(self, now: float | None = None) -> _Part | float | None:
        """The due part (taken out of pending), else seconds until one is due (None: nothing)."""
        if not self._pending:
            return None
        part = min(self._pending.values(), key=lambda p: p.due_at)
        wait = part.due_at - (self._clock() if now is None else now)
        if wait > 0:
            return wait
        del self._pending[part.study_uid]
        return part

    def _deliver(self, part: _Part) -> None:
        uid = part.study_uid
        part.attempts += 1
        requeue = False
        try:
            requeue = not self._attempt(part)
        except Exception as exc:
            # A bug or a disk fault, in the delivery or in what follows it (the spool's removal,
            # the dead-letter folder): keep the study in the spool and try again later, and keep
            # this thread alive for the other studies.
            log.exception("study %s: delivery failed unexpectedly", uid)
            requeue = True
            self._retry_later(part, exc, None)
        finally:
            with self._changed:
                if requeue:
                    again = self._pending.get(uid)
                    if again is None:
                        self._pending[uid] = part
                    else:  # a new part completed meanwhile: one delivery of both, to every sink
                        again.sop_uids.update(part.sop_uids)
                        again.done.clear()
                        again.attempts = part.attempts
                        again.due_at = part.due_at
                self._changed.notify_all()

    def _attempt(self, part: _Part) -> bool:
        """One delivery attempt: True when the part is finished with, False when it waits for a retry."""
        uid = part.study_uid
        report = DeliveryReport(uid)
        try:
            if self.dead_letters is not None and self.dead_letters.contains(uid):
                # Never deliver half a study whose other half was set aside.
                raise DeliveryRejected(f"study already in the dead-letter folder: "
                                       f"{self.dead_letters.get(uid).reason}")
            deliver_study(uid, self.spool.read(uid, sorted(part.sop_uids)), self.sinks,
                          self.options, done=part.done, report=report, cache=self.cache)
        except DeliveryRetryable as exc:
            self._retry_later(part, exc, exc.retry_after)
            return False
        except DeliveryRejected as exc:
            self._dead_letter(part, report, exc)
            return True
        for sop_uid, version in report.unreadable.items():
            self.spool.mark_corrupt(uid, sop_uid, version)
        if report.instances == 0:
            log.warning("study %s: nothing left to deliver", uid)
            return True
        self.spool.remove(uid, report.versions)
        self.cache.drop(uid)
        self._count("deliveries_ok")
        seconds = self._clock() - part.completed_at
        where = "; ".join(f"{name}: {result}" for name, result in report.sinks.items()) or "no sink configured"
        log.info("study %s delivered: %d instance(s) in %d series -> %s (%.1f s after completion)", uid,
                 report.instances, report.series, where, seconds)
        log.debug("study %s: %d header(s) parsed ahead, attempt %d", uid, report.parsed_ahead, part.attempts)
        if self.journal is not None:
            self.journal.append(uid, report.instances, "delivered", report.sinks, series=report.series,
                                attempts=part.attempts, seconds=round(seconds, 3))
        return True

    def _retry_later(self, part: _Part, exc: Exception, retry_after: float | None) -> None:
        self._count("deliveries_failed")
        self.cache.drop(part.study_uid)  # parsed again on the next attempt: memory stays flat while it waits
        delay = backoff_delay(part.attempts, self.max_backoff, retry_after=retry_after, rand=self._rand,
                              base=self.base_backoff)
        part.due_at = self._clock() + delay
        log.warning("study %s: delivery attempt %d failed, next in %.1f s (the study stays in the spool): %s",
                    part.study_uid, part.attempts, delay, exc)

    def _dead_letter(self, part: _Part, report: DeliveryReport, exc: DeliveryRejected) -> None:
        uid = part.study_uid
        self._count("deliveries_failed")
        versions = report.versions or {i.sop_uid: i.version for i in self.spool.read(uid, sorted(part.sop_uids))}
        folder = self.dead_letters.put(uid, str(exc), documents=exc.documents, spool=self.spool,
                                       versions=versions,
                                       details=f"instances: {len(versions)}\nattempts: {part.attempts}\n"
                                               f"sinks that took it: {', '.join(part.done) or 'none'}")
        self.cache.drop(uid)
        log.error("study %s set aside in %s: %s", uid, folder, exc)
        if self.journal is not None:
            self.journal.append(uid, len(versions), f"dead-lettered: {exc}", part.done, attempts=part.attempts)

    def _count(self, name: str) -> None:
        if self._metrics is not None:
            self._metrics.inc(name)


def redeliver(study_uid: str, sinks: Sequence[Sink], options, *, dead_letters, journal: Journal | None = None
              ) -> DeliveryReport:
    """Deliver a dead-lettered study again (the `retry` command), with the node's pipeline.

    On success the delivered instances leave the dead-letter folder (the folder goes with
    the last; instances set aside meanwhile stay) and a deliveries.jsonl line is appended.
    DeliveryRejected: the folder stays; reason.txt and the documents are updated, and the
    exception is raised again. DeliveryRetryable: the folder stays untouched; raised.
    KeyError when the study is not in the dead-letter folder.
    """
    instances = dead_letters.read_instances(study_uid)
    try:
        report = deliver_study(study_uid, instances, sinks, options)
    except DeliveryRejected as exc:
        dead_letters.record(study_uid, str(exc), documents=exc.documents)
        raise
    if not dead_letters.remove_delivered(study_uid, report.versions):
        log.warning("study %s: more instances were set aside while it was delivered; they stay in %s",
                    study_uid, dead_letters.folder(study_uid))
    log.info("study %s delivered from the dead-letter folder: %d instance(s) in %d series -> %s", study_uid,
             report.instances, report.series, "; ".join(f"{k}: {v}" for k, v in report.sinks.items()))
    if journal is not None:
        journal.append(study_uid, report.instances, "delivered (retry)", report.sinks, series=report.series)
    return report
