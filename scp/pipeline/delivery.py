"""One study's delivery: spooled headers → mapping → its destinations (no threads, no spool).

`deliver_study` reads the headers one by one into mapping.InstanceHeader (memory stays
flat), noting each instance's sender (the calling AE title and address its file meta
records), converts them with mapping.convert_study under the mapping options of those
senders (scp.senders.SenderTable) and hands the result to each sink that has not taken
it yet, among the study's destinations.

Destinations: each sink is one destination, named by `sink.name` ("disk", "fhir", a
[fhir.destinations] NAME). `route`, when given, names a study's destinations from the
senders of its instances (scp.senders.SenderTable.destinations_for). Without `route`,
every sink is a destination. Each destination succeeds, waits or refuses on its own: a
refusal or a fault at one never keeps the study from the others. `redeliver` runs it
for a dead-lettered study (the `retry` command). The delivery thread around it, with
retries and the dead letter, is scp.pipeline.worker.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mapping import InstanceHeader, convert_study
from mapping.errors import MappingError, PatientMismatchError
from mapping.header import HEADER_TAGS
from mapping.options import MappingOptions
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.pipeline.cache import ParseAheadCache
from scp.senders import Sender, SenderConflict, SenderTable
from scp.sinks import Sink
from scp.store.dead_letter import DeadLetterBox, DestinationRefusal
from scp.store.journal import Journal
from scp.store.part10 import header_dataset, source_of
from scp.store.spool import SpooledInstance, Version

log = logging.getLogger("scp.pipeline.delivery")

Route = Callable[[Iterable[Sender]], Sequence[str]]  # a study's senders -> its destinations' names


@dataclass
class DeliveryReport:
    """What one delivery of a part did (also the deliveries.jsonl line)."""

    study_uid: str
    instances: int = 0
    series: int = 0
    versions: dict[str, Version] = field(default_factory=dict)  # SOP UID -> spool file version read
    unreadable: dict[str, Version] = field(default_factory=dict)  # SOP UID -> version that could not be used
    sinks: dict[str, str] = field(default_factory=dict)  # sink name -> result text
    warnings: tuple[str, ...] = ()
    parsed_ahead: int = 0  # headers taken from the ParseAheadCache
    sink: str | None = None  # the sink being delivered to; when an exception ends the delivery, the one that failed
    senders: tuple[Sender, ...] = ()  # who sent the instances read, each once, in the order first seen
    destinations: tuple[str, ...] = ()  # the study's destinations that have a sink (route applied)
    waiting: dict[str, DeliveryRetryable] = field(default_factory=dict)  # destination -> its retryable fault
    refused: dict[str, DeliveryRejected] = field(default_factory=dict)  # destination -> its refusal

    def sender_titles(self) -> list[str]:
        """The senders' AE titles, each once (the journal's "senders")."""
        return list(dict.fromkeys(s.ae_title for s in self.senders))


def table_for(options: MappingOptions | None, senders: SenderTable | None) -> SenderTable:
    """The sender table to deliver with: `senders`, else one without [[senders]] entries whose options
    are `options` (what callers that know only mapping options, like tests, mean)."""
    if senders is not None:
        return senders
    return SenderTable(base=options if options is not None else MappingOptions())


def read_header(instance: SpooledInstance) -> InstanceHeader:
    """The InstanceHeader of one spooled header file."""
    try:
        ds = header_dataset(instance.data, HEADER_TAGS)  # only what the mapping reads: a third of the time
    except ValueError:  # not written by this node's spool (an older file, a copy): let pydicom read it
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(instance.data))
    return InstanceHeader.from_dataset(ds)


def read_sender(instance: SpooledInstance) -> Sender:
    """Who sent one spooled instance, from its file meta; Sender("") for a file without one (a copy
    not written by the node: no [[senders]] entry matches it, so it is mapped with the global options)."""
    try:
        ae_title, address = source_of(instance.data)
    except ValueError:
        return Sender("")
    return Sender(ae_title, address)


def read_instance(instance: SpooledInstance) -> tuple[InstanceHeader, Sender]:
    """The header and the sender of one spooled instance (what the ParseAheadCache keeps)."""
    return read_header(instance), read_sender(instance)


def study_options(study_uid: str, senders: Sequence[Sender], table: SenderTable) -> MappingOptions:
    """The mapping options of a study whose instances came from `senders`; DeliveryRejected when their
    identity settings differ (the reason names the senders and the settings, never patient values)."""
    # In a fixed order: settings beyond identity come from the first sender, and the conversion made
    # ahead (scp.pipeline.worker, instances in another order) must use the same options.
    try:
        return table.options_for(sorted(set(senders), key=lambda s: (s.ae_title, s.address)))
    except SenderConflict as exc:
        raise DeliveryRejected(f"SenderConflict: {exc}; send the study from one of them, "
                               f"or give their [[senders]] entries the same identity settings, then retry") from exc


def deliver_study(study_uid: str, instances: Iterable[SpooledInstance], sinks: Sequence[Sink],
                  options: MappingOptions | None = None, *, senders: SenderTable | None = None,
                  done: dict[str, str] | None = None, report: DeliveryReport | None = None,
                  cache: ParseAheadCache | None = None, route: Route | None = None,
                  refused: dict[str, DeliveryRejected] | None = None) -> DeliveryReport:
    """Convert one study's spooled headers and hand them to each of its destinations not in
    `done` nor in `refused`; every one is tried, whatever the others do.

    The mapping options are the study's senders' (`senders.options_for`); without a table,
    `options` for every sender.
    Afterwards report.waiting and report.refused hold the destinations that raised
    DeliveryRetryable / DeliveryRejected, and the first of them is raised (a retryable
    fault first: the study then waits in the spool for it). DeliveryRejected too when the
    instances cannot be mapped together (PatientMismatchError, MappingError, or senders
    whose identity settings differ: SenderConflict): no destination was asked.
    `done` (destination -> result) is updated as sinks succeed, so a retry skips them;
    `refused` (destination -> refusal) likewise as they refuse, and is never asked again.
    `report`, when given, is filled in as the work goes (the caller sees what was read
    even when an exception ends the delivery).
    """
    report = DeliveryReport(study_uid) if report is None else report
    table = table_for(options, senders)
    done = {} if done is None else done
    refused = {} if refused is None else refused
    headers = []
    series: set[str] = set()
    seen: dict[Sender, None] = {}  # each sender once: a study's instances share a few (memory stays flat)
    ahead = 0
    for instance in instances:
        parsed = None if cache is None else cache.get(study_uid, instance.sop_uid, instance.version)
        ahead += parsed is not None
        try:
            header, sender = read_instance(instance) if parsed is None else parsed
            series.add(header.series_uid)
        except Exception as exc:  # a spool file is written atomically; this is a bug or a disk fault
            log.error("study %s: spooled instance %s cannot be used (%s); quarantined",
                      study_uid, instance.sop_uid, type(exc).__name__,
                      extra={"study_uid": study_uid, "instance_uid": instance.sop_uid, "exc_type": type(exc).__name__})
            log.debug("study %s instance %s", study_uid, instance.sop_uid, exc_info=True)
            report.unreadable[instance.sop_uid] = instance.version
            continue
        headers.append(header)
        seen[sender] = None
        report.versions[instance.sop_uid] = instance.version
    report.instances, report.series = len(headers), len(series)
    report.parsed_ahead = ahead
    report.senders = tuple(seen)
    if not headers:
        return report
    study_mapping = study_options(study_uid, report.senders, table)
    # Made ahead with the options of the same instance versions, hence of the same senders.
    resources = None if cache is None else cache.converted(study_uid, report.versions)
    try:
        if resources is None:
            resources = convert_study(headers, study_mapping)
    except PatientMismatchError as exc:
        log.debug("study %s: %s", study_uid, exc)  # the text may quote patient IDs
        raise DeliveryRejected("PatientMismatchError: the study's instances disagree on PatientID; "
                               "fix the data at the sender, then retry") from exc
    except MappingError as exc:
        raise DeliveryRejected(f"MappingError: {exc}") from exc
    del headers
    report.warnings = tuple(resources.warnings)
    for warning in resources.warnings:
        log.warning("study %s: %s", study_uid, warning, extra={"study_uid": study_uid})
    targets = study_destinations(sinks, report.senders, route)
    report.destinations = tuple(sink.name for sink in targets)
    for sink in targets:
        if sink.name in done or sink.name in refused:
            continue
        report.sink = sink.name
        try:
            done[sink.name] = sink.deliver(resources)
        except DeliveryRetryable as exc:
            report.waiting[sink.name] = exc
        except DeliveryRejected as exc:
            report.refused[sink.name] = refused[sink.name] = exc
    report.sink = None
    report.sinks = dict(done)
    for name, exc in [*report.waiting.items(), *report.refused.items()]:
        report.sink = name  # the one that failed, for the caller's log line
        raise exc
    return report


def study_destinations(sinks: Sequence[Sink], senders: Iterable[Sender], route: Route | None) -> list[Sink]:
    """The sinks a study goes to: those `route` names for its senders (every sink without a route).

    A destination named without a sink (not configured where this runs, e.g. `retry` without
    node.output_dir) is left out: nothing can be sent there.
    """
    if route is None:
        return list(sinks)
    names = set(route(senders))
    return [sink for sink in sinks if sink.name in names]


def redeliver(study_uid: str, sinks: Sequence[Sink], options: MappingOptions | None = None, *,
              dead_letters: DeadLetterBox, journal: Journal | None = None, senders: SenderTable | None = None,
              route: Route | None = None) -> DeliveryReport:
    """Deliver a dead-lettered study again (the `retry` command), with the node's pipeline,
    to its destinations not in the folder's delivered.json (those are never sent it again).

    On success the delivered instances leave the dead-letter folder (the folder goes with
    the last; instances set aside meanwhile stay) and a deliveries.jsonl line is appended.
    DeliveryRejected: the folder stays; reason.txt, the refusing destinations' reasons and
    the documents are updated, delivered.json names the destinations that took it now too,
    and the exception is raised again. DeliveryRetryable: the folder stays, only
    delivered.json gains the destinations that took it now; raised.
    KeyError when the study is not in the dead-letter folder.
    """
    instances = dead_letters.read_instances(study_uid)
    before = dead_letters.delivered(study_uid)
    done = dict(before)
    report = DeliveryReport(study_uid)
    try:
        deliver_study(study_uid, instances, sinks, options, senders=senders, done=done, report=report, route=route)
    except DeliveryRejected as exc:
        if exc.details:
            log.debug("study %s: %s", study_uid, exc.details, extra={"study_uid": study_uid})  # may quote patient IDs
        refused = {name: DestinationRefusal(str(e), e.details, e.documents) for name, e in report.refused.items()}
        reason = str(exc) if len(refused) <= 1 else "; ".join(f"{n}: {r.reason}" for n, r in refused.items())
        dead_letters.record(study_uid, reason, details=exc.details, documents=exc.documents,
                            delivered=done, refused=refused)
        raise
    except DeliveryRetryable:
        if done != before:  # those that took it now are not asked again at the next retry
            dead_letters.record_delivered(study_uid, done)
        raise
    if not dead_letters.remove_delivered(study_uid, report.versions):
        # delivered.json stays as the node wrote it joining them: who took these is not known here.
        log.warning("study %s: more instances were set aside while it was delivered; they stay in %s",
                    study_uid, dead_letters.folder(study_uid), extra={"study_uid": study_uid})
    sent = {name: result for name, result in report.sinks.items() if name not in before}
    log.info("study %s delivered from the dead-letter folder: %d instance(s) in %d series -> %s", study_uid,
             report.instances, report.series, "; ".join(f"{k}: {v}" for k, v in sent.items()) or "nothing left to send",
             extra={"study_uid": study_uid, "destination": ", ".join(sent) or None})
    if journal is not None:
        journal.append(study_uid, report.instances, "delivered (retry)", sent, series=report.series,
                       senders=report.sender_titles())
    return report
