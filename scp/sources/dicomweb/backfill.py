"""Backfill: QIDO-RS /studies by StudyDate window, then WADO-RS metadata -> mapping -> sinks.

For each window of the checkpoint's range not yet done: list the studies (splitting a
window that reaches sync.page_size), then fetch and deliver each study whose signature
(series and instance counts from QIDO-RS) differs from the one delivered before, up to
sync.parallel at once. The window is recorded done (and the checkpoint saved) only when
its listing finished and every study in it was handled; a study that fails is recorded
in the checkpoint's `failed` and in the dead letter (reason, and the metadata fetched)
and is tried again on the next run. Studies without a StudyDate, which no date-range
query returns, are found by a separate paged listing of every study.

The sinks are the node's (scp.node.default_sinks): the disk sink merges with the file,
the FHIR sink merges with the server's ImagingStudy and sends nothing when it holds
everything already, so a resend is a no-op either way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mapping import StudyResources, convert_study
from mapping.dicom_json import first_value, header_from_dicom_json, study_uid_of
from mapping.errors import DicomFhirError
from mapping.options import MappingOptions
from scp.config import SyncConfig
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.sinks import Sink
from scp.sources.dicomweb.checkpoint import Checkpoint
from scp.sources.dicomweb.client import DicomWebClient
from scp.sources.dicomweb.windows import EARLIEST, Window, parse_date, windows
from scp.store.dead_letter import DeadLetterBox

log = logging.getLogger("scp.sources.dicomweb.backfill")

NUMBER_OF_SERIES = "00201206"
NUMBER_OF_INSTANCES = "00201208"
STUDY_DATE = "00080020"
INCLUDE = f"{STUDY_DATE},{NUMBER_OF_SERIES},{NUMBER_OF_INSTANCES}"
SAVE_INTERVAL = 1.0  # seconds between two checkpoint saves while windows come back empty


@dataclass
class SyncReport:
    windows_done: int = 0
    windows_total: int = 0
    windows_skipped: int = 0  # done by an earlier run
    found: int = 0
    delivered: int = 0
    unchanged: int = 0  # same signature as delivered before: neither fetched nor sent
    failed: dict[str, str] = field(default_factory=dict)
    removed: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self, requests: int) -> list[str]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        lines = [f"sync: {self.windows_done} window(s) listed ({self.windows_skipped} done before), "
                 f"{self.found} study(ies) found, {self.delivered} delivered, {self.unchanged} unchanged "
                 f"(not fetched), {len(self.failed)} failed; {requests} DICOMweb request(s) in {elapsed:.1f} s "
                 f"({self.delivered / elapsed:.1f} studies/s)"]
        if self.removed:
            lines.append(f"sync: {self.removed} deletion(s) propagated")
        if self.failed:
            lines.append("sync: failed (tried again on the next run; reasons in the dead letter): "
                         + ", ".join(sorted(self.failed)[:10]) + (" ..." if len(self.failed) > 10 else ""))
        return lines


Progress = Callable[[str, int], None]  # ("window" | "found" | "delivered", n)


def signature(obj: dict[str, Any]) -> str:
    """What says a study changed, from a QIDO-RS result: its series and instance counts."""
    return f"{first_value(obj, NUMBER_OF_SERIES)}/{first_value(obj, NUMBER_OF_INSTANCES)}"


def orthanc_id(*parts: str) -> str:
    """Orthanc's resource ID: SHA-1 of the '|'-joined identifiers, in five dash-separated groups
    (PatientID|StudyInstanceUID for a study, |SeriesInstanceUID appended for a series). Lets a
    Deleted change, which carries only this ID, be traced to the UIDs without asking Orthanc."""
    digest = hashlib.sha1("|".join(parts).encode("utf-8")).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


class Syncer:
    """One sync's work: the client, the sinks, the checkpoint, the dead letter (all passed in)."""

    def __init__(self, client: DicomWebClient, sinks: Sequence[Sink], checkpoint: Checkpoint,
                 dead_letter: DeadLetterBox, options: MappingOptions, sync: SyncConfig, *,
                 wall_clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 progress: Progress | None = None) -> None:
        self.client, self.sinks, self.checkpoint = client, list(sinks), checkpoint
        self.dead_letter, self.options, self.sync = dead_letter, options, sync
        self.wall_clock, self.sleep = wall_clock, sleep
        self.progress = progress or (lambda _what, _n: None)
        self.report = SyncReport()

    # --- listing ----------------------------------------------------------------------------

    def list_studies(self, window: Window | None) -> list[dict[str, Any]]:
        """Every study of a window (None: every study), splitting or paging as needed."""
        if window is not None:
            found = self._query(window.query, 0)
            if len(found) < self.sync.page_size:
                return found
            halves = window.split()
            if halves is not None:
                log.debug("window %s reached %d results: split", window.query, len(found))
                return self.list_studies(halves[0]) + self.list_studies(halves[1])
        return self._paged(window.query if window is not None else None)

    def _paged(self, date: str | None) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset = 0
        while True:
            page = self._query(date, offset)
            for obj in page:
                uid = study_uid_of(obj)
                if uid and uid not in seen:
                    seen.add(uid)
                    results.append(obj)
            if len(page) < self.sync.page_size:
                return results
            offset += len(page)

    def _query(self, date: str | None, offset: int) -> list[dict[str, Any]]:
        params = {"limit": str(self.sync.page_size), "includefield": INCLUDE}
        if offset:
            params["offset"] = str(offset)
        if date is not None:
            params["StudyDate"] = date
        found = self.client.get_json("studies", params, context=f"QIDO-RS StudyDate={date or '*'}")
        if found is None:
            return []
        if not isinstance(found, list):
            raise DeliveryRejected(f"QIDO-RS StudyDate={date or '*'}: the reply is not a list")
        return [obj for obj in found if isinstance(obj, dict) and study_uid_of(obj)]

    # --- one study --------------------------------------------------------------------------

    def fetch(self, study_uid: str) -> StudyResources | None:
        """The study's resources from its WADO-RS metadata; None when the server no longer has it."""
        metadata = self.client.get_json(f"studies/{study_uid}/metadata", context=f"study {study_uid}",
                                        missing_ok=True)
        if not metadata:
            return None
        if not isinstance(metadata, list):
            raise DeliveryRejected(f"study {study_uid}: WADO-RS metadata is not a list")
        headers = [header_from_dicom_json(obj) for obj in metadata if isinstance(obj, dict)]
        if self.sync.orthanc_url:  # a Deleted change names only Orthanc's ID: remember what it stands for
            with self.checkpoint.lock:
                known = self.checkpoint.state.orthanc_ids
                for header in headers:
                    known[orthanc_id(header.patient_id, header.study_uid, header.series_uid)] = [
                        header.study_uid, header.series_uid]
                    known[orthanc_id(header.patient_id, header.study_uid)] = [header.study_uid, ""]
        return convert_study(headers, self.options)

    def deliver(self, resources: StudyResources) -> dict[str, str]:
        """Hand the study to every sink, retrying a retryable fault; raises when one refuses or keeps failing."""
        results = {}
        for sink in self.sinks:
            delay = 1.0
            for attempt in range(1, self.sync.retries + 1):
                try:
                    results[getattr(sink, "name", "sink")] = sink.deliver(resources)
                    break
                except DeliveryRetryable as exc:
                    if attempt == self.sync.retries:
                        raise
                    wait = max(delay, exc.retry_after or 0)
                    log.warning("study %s: %s; trying again in %.0f s", resources.study_uid, exc, wait)
                    self.sleep(wait)
                    delay = min(delay * 2, self.sync.max_backoff)
        return results

    def sync_study(self, study_uid: str, sig: str) -> bool:
        """Fetch, map and deliver one study; record it. False when it failed (dead letter, checkpoint)."""
        context = f"study {study_uid}"
        try:
            resources = self.fetch(study_uid)
            if resources is None:
                log.info("%s: gone from the server before it could be fetched", context)
                return True
            for warning in resources.warnings:
                log.info("%s: %s", context, warning)
            results = self.deliver(resources)
        except (DeliveryRejected, DeliveryRetryable, DicomFhirError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("%s: not delivered: %s", context, reason)
            documents = dict(getattr(exc, "documents", {}) or {})
            try:
                self.dead_letter.record(study_uid, reason.splitlines()[0], details=getattr(exc, "details", ""),
                                        documents=documents)
            except (OSError, ValueError) as write_error:
                log.error("%s: the dead letter could not record it: %s", context, write_error)
            with self.checkpoint.lock:
                self.checkpoint.state.failed[study_uid] = reason.splitlines()[0]
                self.report.failed[study_uid] = reason
            return False
        log.info("%s: %s", context, "; ".join(f"{name}: {result}" for name, result in results.items()))
        with self.checkpoint.lock:
            self.checkpoint.state.studies[study_uid] = sig
            self.checkpoint.state.failed.pop(study_uid, None)
            self.report.delivered += 1
        if self.dead_letter.contains(study_uid):
            self.dead_letter.remove(study_uid)
        self.progress("delivered", 1)
        return True

    def sync_listed(self, found: list[dict[str, Any]]) -> bool:
        """Deliver the listed studies that changed since delivered; True when every one succeeded."""
        todo = []
        for obj in found:
            uid, sig = study_uid_of(obj), signature(obj)
            if self.checkpoint.state.studies.get(uid) == sig and uid not in self.checkpoint.state.failed:
                self.report.unchanged += 1
                self.progress("delivered", 1)
            else:
                todo.append((uid, sig))
        self.report.found += len(found)
        self.progress("found", len(found))
        if not todo:
            return True
        pool = ThreadPoolExecutor(max_workers=self.sync.parallel, thread_name_prefix="sync")
        try:
            return all(list(pool.map(lambda item: self.sync_study(*item), todo)))
        finally:
            # On a stop (SIGTERM, Ctrl-C) the studies in flight finish, the queued ones are dropped:
            # the window is not recorded done, so the next run lists it again.
            pool.shutdown(wait=True, cancel_futures=True)

    # --- the backfill -----------------------------------------------------------------------

    def backfill(self, today: dt.date) -> SyncReport:
        state = self.checkpoint.state
        since = parse_date(self.sync.since) if self.sync.since else EARLIEST
        until = parse_date(self.sync.until) if self.sync.until else today
        planned = windows(since, until, self.sync.window_days)
        self.report.windows_total = len(planned) + 1
        self._retry_failed()
        last_save = self.wall_clock()
        # Newest first: recent studies matter most to the people waiting for them.
        for window in reversed(planned):
            if window.key in state.windows_done:
                self.report.windows_skipped += 1
                self.progress("window", 1)
                continue
            found = self.list_studies(window)
            if self.sync_listed(found):
                with self.checkpoint.lock:
                    state.windows_done.append(window.key)
                    state.listed[window.key] = sorted(study_uid_of(obj) for obj in found)
            self.report.windows_done += 1
            # Saved after every window that delivered something; empty windows (most of a range
            # starting in 1900) only once a second: each save is two fsyncs, and losing a second
            # of empty windows costs a resumed run a few QIDO requests, no study fetched twice.
            now = self.wall_clock()
            if found or now - last_save >= SAVE_INTERVAL:
                self.checkpoint.save(now)
                last_save = now
            self.progress("window", 1)
        if not state.undated_done:
            undated = [obj for obj in self.list_studies(None) if not first_value(obj, STUDY_DATE)]
            log.info("%d study(ies) without StudyDate found by the full listing", len(undated))
            if self.sync_listed(undated):
                state.undated_done = True
            self.checkpoint.save(self.wall_clock())
        else:
            self.report.windows_skipped += 1
        self.progress("window", 1)
        if not state.failed:
            state.backfill_finished = state.backfill_finished or self.wall_clock()
        self.checkpoint.save(self.wall_clock())
        return self.report

    def _retry_failed(self) -> None:
        failed = dict(self.checkpoint.state.failed)
        if failed:
            log.info("trying again %d study(ies) that failed in an earlier run", len(failed))
            for uid in failed:
                self.sync_study(uid, "")


def metadata_document(metadata: Any) -> bytes:
    return json.dumps(metadata, indent=1).encode("utf-8")
