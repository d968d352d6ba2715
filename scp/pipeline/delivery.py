"""One study's delivery: spooled headers → mapping → every sink (no threads, no spool).

`deliver_study` reads the headers one by one into mapping.InstanceHeader (memory stays
flat), converts them with mapping.convert_study and hands the result to each sink that
has not taken it yet. `redeliver` runs it for a dead-lettered study (the `retry`
command). The delivery thread around it, with retries and the dead letter, is
scp.pipeline.worker.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mapping import InstanceHeader, convert_study
from mapping.errors import MappingError, PatientMismatchError
from scp.errors import DeliveryRejected
from scp.pipeline.cache import ParseAheadCache
from scp.sinks import Sink
from scp.store.dead_letter import DeadLetterBox
from scp.store.journal import Journal
from scp.store.part10 import header_dataset
from scp.store.spool import SpooledInstance, Version

log = logging.getLogger("scp.pipeline.delivery")


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


def read_header(instance: SpooledInstance) -> InstanceHeader:
    """The InstanceHeader of one spooled header file."""
    try:
        ds = header_dataset(instance.data)
    except ValueError:  # not written by this node's spool (an older file, a copy): let pydicom read it
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(instance.data))
    return InstanceHeader.from_dataset(ds)


def deliver_study(study_uid: str, instances: Iterable[SpooledInstance], sinks: Sequence[Sink], options,
                  *, done: dict[str, str] | None = None, report: DeliveryReport | None = None,
                  cache: ParseAheadCache | None = None) -> DeliveryReport:
    """Convert one study's spooled headers and hand them to every sink not in `done`.

    Raises DeliveryRetryable / DeliveryRejected from a sink, and DeliveryRejected when
    the instances cannot be mapped together (PatientMismatchError, MappingError).
    `done` (sink name -> result) is updated as sinks succeed, so a retry skips them.
    `report`, when given, is filled in as the work goes (the caller sees what was read
    even when an exception ends the delivery).
    """
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
                      study_uid, instance.sop_uid, type(exc).__name__,
                      extra={"study_uid": study_uid, "instance_uid": instance.sop_uid, "exc_type": type(exc).__name__})
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
        log.warning("study %s: %s", study_uid, warning, extra={"study_uid": study_uid})
    for sink in sinks:
        if sink.name not in done:
            report.sink = sink.name
            done[sink.name] = sink.deliver(resources)
    report.sink = None
    report.sinks = dict(done)
    return report


def redeliver(study_uid: str, sinks: Sequence[Sink], options, *, dead_letters: DeadLetterBox,
               journal: Journal | None = None) -> DeliveryReport:
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
        if exc.details:
            log.debug("study %s: %s", study_uid, exc.details, extra={"study_uid": study_uid})  # may quote patient IDs
        dead_letters.record(study_uid, str(exc), details=exc.details, documents=exc.documents)
        raise
    if not dead_letters.remove_delivered(study_uid, report.versions):
        log.warning("study %s: more instances were set aside while it was delivered; they stay in %s",
                    study_uid, dead_letters.folder(study_uid), extra={"study_uid": study_uid})
    log.info("study %s delivered from the dead-letter folder: %d instance(s) in %d series -> %s", study_uid,
             report.instances, report.series, "; ".join(f"{k}: {v}" for k, v in report.sinks.items()),
             extra={"study_uid": study_uid, "destination": ", ".join(report.sinks) or None})
    if journal is not None:
        journal.append(study_uid, report.instances, "delivered (retry)", report.sinks, series=report.series)
    return report
