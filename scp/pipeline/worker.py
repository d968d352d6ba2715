"""The delivery threads: completed parts → scp.pipeline.delivery, off the receiving path.

A pool of `workers` threads (``node.delivery_workers``) takes completed parts (`submit`,
called by the completion timer) and delivers them, one study per thread at a time, so
reception never waits for conversion or a FHIR server, and a slow destination holds up
only the studies being delivered to it: the others, and their disk output, go on in the
other threads. A study is never delivered by two threads at once (a part completing while
its study is being delivered waits for that delivery), so a study's parts reach each
destination in order.

Each sink is a destination, and each of a study's destinations (`route`, see
scp.pipeline.delivery) has its own outcome:

- every destination took it: the delivered spool files are removed (only the versions
  that were read: an instance received again meanwhile stays for the next completion),
  and one line is appended to the journal, then the `on_delivered` observer is told (the
  end-of-study hook, scp.pipeline.hooks: it runs on a thread of its own);
- DeliveryRetryable at a destination (or an unexpected error): the part stays in the
  spool and is tried again later (scp.pipeline.retry), without an attempt limit, at the
  destinations that have neither taken nor refused it (`done`, `refused`: those are never
  asked again);
- DeliveryRejected at a destination: once no destination waits any more, the part is set
  aside in the dead-letter folder (scp.store.dead_letter) for the refusing destinations,
  with each one's reason and documents, and delivered.json naming the ones that took it.
  Instances that disagree on PatientID (no destination asked) are set aside for all.

A study already in the dead-letter folder is set aside there for the destinations not in
its delivered.json (never half a study at one destination); its further parts still go to
the destinations that took the rest.

A part completing while an earlier part of the same study waits for a retry joins it.
While nothing is due, the worker parses and converts ahead (`work_ahead`, with the
ParseAheadCache the node feeds with arrivals).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mapping import MappingOptions, convert_study
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.ops.metrics import Metrics
from scp.pipeline.cache import ParseAheadCache
from scp.pipeline.delivery import (DeliveryReport, Route, deliver_study, read_instance, study_destinations,
                                   study_options, table_for)
from scp.pipeline.retry import RetryPolicy
from scp.senders import SenderTable
from scp.sinks import Sink
from scp.store.dead_letter import DeadLetterBox, DestinationRefusal
from scp.store.journal import Journal
from scp.store.spool import Spool

log = logging.getLogger("scp.pipeline.worker")

QUIET = 0.1  # seconds without any arrival before headers of waiting studies are parsed ahead
# (or converted ahead: a conversion is redone whenever an instance arrives, so it always waits)
PREPARE_BATCH = 100  # instances parsed ahead before checking again for due parts and arrivals


@dataclass
class _Part:
    study_uid: str
    sop_uids: set[str]
    due_at: float
    completed_at: float
    attempts: int = 0
    done: dict[str, str] = field(default_factory=dict)  # destination -> result: took this part
    refused: dict[str, DeliveryRejected] = field(default_factory=dict)  # destination -> its refusal of this part


class DeliveryWorker:
    """The delivery thread (see the module docstring). `run_once(now)` drives it in tests."""

    def __init__(self, spool: Spool, sinks: Sequence[Sink], options: MappingOptions | None = None, *,
                 dead_letters: DeadLetterBox | None, journal: Journal | None, senders: SenderTable | None = None,
                 retry: RetryPolicy = RetryPolicy(), clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random, metrics: Metrics | None = None,
                 on_delivered: Callable[[DeliveryReport], None] | None = None,
                 route: Route | None = None, workers: int = 1,
                 parse_while_receiving: Callable[[], bool] | None = None) -> None:
        """parse_while_receiving: when given and true, parse the waiting instances' headers as they
        arrive, not only once the node is quiet. For a node whose receivers run in other processes
        (node.workers > 1) while a core is spare: in one process the receive threads would wait for
        the GIL, and with every core receiving the parsing takes their CPU (a sixth of 4 concurrent
        senders' throughput on 2 cores)."""
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers: expected an int, got {type(workers).__name__}")
        if workers < 1:
            raise ValueError(f"workers: expected at least 1 delivery thread, got {workers}")
        self.workers = workers
        self.parse_while_receiving = parse_while_receiving
        self.spool = spool
        self.route = route  # a study's senders -> its destinations (None: every sink)
        self.sinks = list(sinks)
        # Each study is mapped with its senders' options ([[senders]]); without a table, `options` for all.
        self.senders = table_for(options, senders)
        self.options = self.senders.base
        self.dead_letters = dead_letters
        self.journal = journal
        self.retry = retry
        self._clock = clock
        self._rand = rand
        self._metrics = metrics
        self._on_delivered = on_delivered
        # sink name -> clock time of its last successful delivery (read by the readiness checks)
        self.last_delivered: dict[str, float] = {}
        self.cache = ParseAheadCache(clock)
        self._pending: dict[str, _Part] = {}
        self._in_flight: set[str] = set()  # studies a thread is delivering now: not taken by another
        self._changed = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # --- input ------------------------------------------------------------------------------

    def arrived(self, study_uid: str, sop_uid: str) -> None:
        """An instance was stored: worth parsing ahead once the node is quiet (the receiver's hot path)."""
        if self.cache.arrived(study_uid, sop_uid):
            with self._changed:  # a new study: the thread that works ahead may be asleep until the next due part
                self._changed.notify_all()  # (notify() could wake another delivery thread instead)

    def submit(self, study_uid: str, sop_uids: Iterable[str]) -> None:
        """A completed part: deliver it as soon as the worker is free (never blocks on delivery)."""
        sop_uids = set(sop_uids)
        self.cache.completed(study_uid, sop_uids)
        now = self._clock()
        with self._changed:
            part = self._pending.get(study_uid)
            if part is None:
                self._pending[study_uid] = _Part(study_uid, set(sop_uids), now, now)
            else:  # an earlier part waits for a retry: deliver both together, to every sink
                part.sop_uids.update(sop_uids)
                part.done.clear()
                part.refused.clear()
            self._changed.notify()

    # --- the worker -------------------------------------------------------------------------

    def start(self) -> None:
        # The first thread also works ahead while nothing is due (one is enough: it only fills a cache).
        self._threads = [threading.Thread(target=self._run, args=(number == 0,),
                                          name="delivery" if number == 0 else f"delivery-{number + 1}", daemon=True)
                         for number in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the deliveries in progress (parts not delivered stay in the spool); `timeout`
        bounds the wait for all of them together."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        until = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if until is None else max(0.0, until - time.monotonic()))
        busy = sum(thread.is_alive() for thread in self._threads)
        if busy:
            log.warning("a delivery is still in progress (%d thread(s)); its study stays in the spool", busy)

    def _run(self, works_ahead: bool = True) -> None:
        while True:
            with self._changed:
                if self._stopping:
                    return
                part = self._next_due_locked()
            if isinstance(part, _Part):
                self._deliver(part)
                continue
            if not works_ahead:
                with self._changed:
                    if self._stopping:
                        return
                    self._changed.wait(part)
                continue
            try:
                worked = self.work_ahead()
            except Exception:  # only work ahead: the delivery reports what is wrong with the study
                log.debug("parsing waiting studies ahead failed", exc_info=True)
                worked = False
            if worked:
                continue
            with self._changed:
                if self._stopping:
                    return
                if worked is False:  # studies wait while instances arrive: look again soon
                    part = QUIET / 2 if part is None else min(part, QUIET / 2)
                self._changed.wait(part)

    def work_ahead(self) -> bool | None:
        """One step of the work done while nothing is due: parse a batch of waiting instances'
        headers, or convert a waiting study whose headers are all parsed (see ParseAheadCache).

        Done only when no instance arrived for QUIET seconds (the parsing: also whenever
        parse_while_receiving says so). True: did some; False: studies are waiting (instances arriving,
        or all done for now): look again soon; None: no study is waiting.
        """
        waiting = self.cache.waiting()
        if not waiting:
            return None
        quiet_for = self.cache.quiet_for()
        todo = []
        for study_uid, sop_uids in waiting.items():
            todo += [(study_uid, sop) for sop in self.cache.unparsed(study_uid, sop_uids)]
            if len(todo) >= PREPARE_BATCH:
                break
        if todo and quiet_for < QUIET and not (self.parse_while_receiving and self.parse_while_receiving()):
            return False
        for study_uid, sop_uid in todo[:PREPARE_BATCH]:
            for instance in self.spool.read(study_uid, [sop_uid]):
                try:
                    parsed = read_instance(instance)  # the header and its sender, kept together
                except Exception:  # reported when the study is delivered
                    parsed = None
                self.cache.put(study_uid, sop_uid, instance.version, parsed)
        if todo:
            return True
        # Every header is parsed: convert the waiting studies too, so that completion only
        # leaves the sinks to run (the conversion is used only if no instance came meanwhile).
        for study_uid, sop_uids in waiting.items():
            if self.cache.is_converted(study_uid, sop_uids) is False:
                if quiet_for < QUIET:
                    return False
                versions, parsed = self.cache.parsed(study_uid, sop_uids)
                try:
                    # The options the delivery will use: those of these instances' senders.
                    options = study_options(study_uid, [sender for _, sender in parsed], self.senders)
                    resources = convert_study([header for header, _ in parsed], options)
                except Exception:  # SenderConflict, PatientMismatchError and the like: reported when it is delivered
                    resources = None
                self.cache.put_converted(study_uid, versions, resources)
                return True
        return False  # more may arrive: look again

    def run_once(self, now: float | None = None) -> bool:
        """Deliver the next part due at `now`; False when none is due."""
        with self._changed:
            part = self._next_due_locked(now)
        if not isinstance(part, _Part):
            return False
        self._deliver(part)
        return True

    def _next_due_locked(self, now: float | None = None) -> _Part | float | None:
        """The due part (taken out of pending, its study now in flight), else seconds until one is due
        (None: nothing, or only studies in flight: their delivery's end wakes the threads)."""
        waiting = [p for p in self._pending.values() if p.study_uid not in self._in_flight]
        if not waiting:
            return None
        part = min(waiting, key=lambda p: p.due_at)
        wait = part.due_at - (self._clock() if now is None else now)
        if wait > 0:
            return wait
        del self._pending[part.study_uid]
        self._in_flight.add(part.study_uid)
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
            log.exception("study %s: delivery failed unexpectedly", uid, extra={"study_uid": uid})
            requeue = True
            self._retry_later(part, exc, None, None)
        finally:
            with self._changed:
                self._in_flight.discard(uid)
                if requeue:
                    again = self._pending.get(uid)
                    if again is None:
                        self._pending[uid] = part
                    else:  # a new part completed meanwhile: one delivery of both, to every sink
                        again.sop_uids.update(part.sop_uids)
                        again.done.clear()
                        again.refused.clear()
                        again.attempts = part.attempts
                        again.due_at = part.due_at
                self._changed.notify_all()

    def _attempt(self, part: _Part) -> bool:
        """One delivery attempt: True when the part is finished with, False when it waits for a retry."""
        uid = part.study_uid
        report = DeliveryReport(uid)
        held = self._held_in_dead_letter(uid)
        refused = {**held, **part.refused}
        took_before = set(part.done)
        try:
            deliver_study(uid, self.spool.read(uid, sorted(part.sop_uids)), self.sinks, senders=self.senders,
                          done=part.done, report=report, cache=self.cache, route=self.route, refused=refused)
        except DeliveryRetryable as exc:
            self._took(set(part.done) - took_before)  # a destination that took it is up, whatever the others do
            part.refused.update(report.refused)
            for name, refusal in report.refused.items():
                log.error("study %s refused by %s: %s; set aside for it once the other destinations are done",
                          uid, name, refusal, extra={"study_uid": uid, "destination": name,
                                                     "exc_type": type(refusal).__name__})
            self._retry_later(part, exc, exc.retry_after, report.sink, report)
            return False
        except DeliveryRejected as exc:
            self._took(set(part.done) - took_before)
            part.refused.update(report.refused)
            if not report.refused:  # not mapped: no destination was asked, every one not done refuses
                for sink in study_destinations(self.sinks, report.senders, self.route):
                    if sink.name not in part.done and sink.name not in held:
                        part.refused[sink.name] = exc
            self._dead_letter(part, report, exc, held, whole_study=not report.refused)
            return True
        self._took(set(part.done) - took_before)
        if held or part.refused:  # what was done is done; the rest is set aside for the others
            first = next(iter({**part.refused, **held}.values()))
            self._dead_letter(part, report, first, held)
            return True
        for sop_uid, version in report.unreadable.items():
            self.spool.mark_corrupt(uid, sop_uid, version)
        if report.instances == 0:
            log.warning("study %s: nothing left to deliver", uid, extra={"study_uid": uid})
            return True
        self.spool.remove(uid, report.versions)
        self.cache.drop(uid)
        now = self._clock()
        seconds = now - part.completed_at
        if self._metrics is not None:
            self._metrics.delivered(seconds, _study_sender(report))
        where = "; ".join(f"{name}: {result}" for name, result in report.sinks.items()) or "no sink configured"
        log.info("study %s delivered: %d instance(s) in %d series -> %s (%.1f s after completion)", uid,
                 report.instances, report.series, where, seconds,
                 extra={"study_uid": uid, "destination": ", ".join(report.sinks) or None})
        log.debug("study %s: %d header(s) parsed ahead, attempt %d", uid, report.parsed_ahead, part.attempts,
                  extra={"study_uid": uid})
        if self.journal is not None:
            self.journal.append(uid, report.instances, "delivered", report.sinks, series=report.series,
                                attempts=part.attempts, seconds=round(seconds, 3), senders=report.sender_titles())
        self._notify_delivered(report)
        return True

    def _notify_delivered(self, report: DeliveryReport) -> None:
        """Tell the observer (the end-of-study hook): after the journal line, so the study counts as
        delivered whatever the observer does; its errors are logged, never a reason to deliver again."""
        if self._on_delivered is None:
            return
        try:
            self._on_delivered(report)
        except Exception:
            log.exception("study %s: delivered, but telling the end-of-study hook failed", report.study_uid)

    def _retry_later(self, part: _Part, exc: Exception, retry_after: float | None, sink: str | None,
                     report: DeliveryReport | None = None) -> None:
        self._count("deliveries_failed", report)
        self.cache.drop(part.study_uid)  # parsed again on the next attempt: memory stays flat while it waits
        delay = self.retry.delay(part.attempts, retry_after=retry_after, rand=self._rand)
        part.due_at = self._clock() + delay
        log.warning("study %s: delivery attempt %d failed, next in %.1f s (the study stays in the spool): %s",
                    part.study_uid, part.attempts, delay, exc,
                    extra={"study_uid": part.study_uid, "destination": sink, "exc_type": type(exc).__name__})

    def _took(self, names: set[str]) -> None:
        """These destinations just took a delivery (the readiness checks read when)."""
        now = self._clock()
        for name in names:
            self.last_delivered[name] = now

    def _held_in_dead_letter(self, uid: str) -> dict[str, DeliveryRejected]:
        """The destinations a study already in the dead-letter folder is set aside for: its
        further parts join it there (a destination never holds half a study); {} when it is not."""
        if self.dead_letters is None or not self.dead_letters.contains(uid):
            return {}
        letter = self.dead_letters.get(uid)
        exc = DeliveryRejected(f"study already in the dead-letter folder: {letter.reason}")
        return {sink.name: exc for sink in self.sinks if sink.name not in letter.delivered}

    def _dead_letter(self, part: _Part, report: DeliveryReport, exc: DeliveryRejected,
                     held: dict[str, DeliveryRejected], *, whole_study: bool = False) -> None:
        uid = part.study_uid
        self._count("deliveries_failed", report)
        versions = report.versions or {i.sop_uid: i.version for i in self.spool.read(uid, sorted(part.sop_uids))}
        # A whole-study refusal (not mapped, or joining a dead letter) keeps reason.txt alone; a
        # destination's refusal also gets destinations/<name>/ (its own documents: two FHIR
        # servers' outcome.json must not overwrite each other).
        per_destination = {} if whole_study else {name: DestinationRefusal(str(e), e.details, e.documents)
                                                  for name, e in part.refused.items()}
        # One reason for the whole study (not mapped: every destination refused it alike), else each one's.
        reason = str(exc) if whole_study or len(part.refused) <= 1 else \
            "; ".join(f"{n}: {e}" for n, e in part.refused.items())
        folder = self.dead_letters.put(uid, reason, documents=exc.documents, spool=self.spool,
                                       versions=versions, delivered=part.done, refused=per_destination,
                                       details=f"instances: {len(versions)}\nattempts: {part.attempts}\n"
                                               f"sinks that took it: {', '.join(part.done) or 'none'}\n"
                                               f"refused by: {', '.join([*part.refused, *held]) or 'none'}"
                                               + (f"\n{exc.details}" if exc.details else ""))
        self.cache.drop(uid)
        log.error("study %s set aside in %s: %s", uid, folder, exc,
                  extra={"study_uid": uid, "destination": report.sink, "exc_type": type(exc).__name__})
        if exc.details:
            log.debug("study %s: %s", uid, exc.details, extra={"study_uid": uid})  # may quote patient IDs
        if self.journal is not None:
            self.journal.append(uid, len(versions), f"dead-lettered: {exc}", part.done, attempts=part.attempts,
                                senders=report.sender_titles())

    def _count(self, name: str, report: DeliveryReport | None = None) -> None:
        if self._metrics is not None:
            self._metrics.inc(name, calling_aet=_study_sender(report))


def _study_sender(report: DeliveryReport | None) -> str | None:
    """The label of a study's delivery counters: its sender (the first by AE title when several)."""
    titles = sorted(report.sender_titles()) if report is not None else []
    return titles[0] if titles else None

