"""The DIMSE handlers: C-STORE (spool the header, tell completion, answer) and C-ECHO.

The C-STORE handler always returns a status from scp.receive.status, never raises
(pynetdicom would abort the association). Success is answered only for an instance
whose header is durable in the spool: the fsync runs while pynetdicom encodes the
response, and the connection's response gate (scp.receive.transport) holds the
response until it is done.

Data sets arrive into an IncomingDataSet (scp.receive.dataset): small ones in memory,
large ones in a temporary file in `incoming` (a hidden folder of the archive, or of the
spool without one), so memory does not grow with instance size. The header is read from
that file; the archive takes the file by rename.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scp.ops.metrics import Metrics, SenderMetrics
from scp.receive import transport
from scp.receive.dataset import (MAX_HEADER, SPILL_THRESHOLD, BadInstance, IncomingDataSet, clear_incoming, full_file,
                                 header_file, parse_received)
from scp.logs import dimse_status
from scp.receive.status import INVALID_SOP_INSTANCE, OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS
from scp.store.part10 import file_meta, presentation_address
from scp.store.spool import Spool

log = logging.getLogger("scp.receive.handlers")

OnStored = Callable[[str, str], None]  # (study UID, SOP instance UID), called after each stored instance


@dataclass
class _AssociationStats:
    calling_aet: str
    address: str
    started: float
    stored: int = 0
    failed: int = 0
    sender: SenderMetrics | None = None  # this calling AE title's counters, looked up once
    source: str = ""  # the Source Presentation Address every spooled instance of it records


class StoreHandler:
    """The C-STORE handler (EVT_C_STORE) and the association bookkeeping around it.

    Dependencies are explicit: the spool, an optional archive of full instances, and
    on_stored(study_uid, sop_uid) (the completion tracker's `arrived`).
    """

    def __init__(self, spool: Spool, on_stored: OnStored, *, archive: Spool | None = None,
                 metrics: Metrics | None = None, incoming: Path | None = None, max_header: int = MAX_HEADER,
                 spill_threshold: int = SPILL_THRESHOLD) -> None:
        """incoming: the folder of data sets being received (None: in memory, as pynetdicom does; for
        tests of the layers above); max_header: node.max_header_bytes."""
        self.spool = spool
        self.archive = archive
        self.incoming = incoming
        self.max_header = max_header
        self.spill_threshold = spill_threshold
        self.on_stored = on_stored
        self.metrics = metrics
        self._stats: dict[int, _AssociationStats] = {}
        self._gates: dict[int, transport.ResponseGate] = {}
        self._syncer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        self._in_flight = 0
        self._idle = threading.Condition()

    def __call__(self, event) -> int:
        started = time.perf_counter()
        with self._idle:
            self._in_flight += 1
        try:
            status = self._store(event)
        except Exception:  # the handler never raises: pynetdicom would abort the association
            status = PROCESSING_FAILURE
            log.exception("C-STORE from %s: instance %s: unexpected error (answered 0x%04X)", calling_aet(event),
                          affected_sop(event), status,
                          extra=log_fields(event, instance_uid=affected_sop(event), status=dimse_status(status)))
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
        stats = self._stats.get(id(event.assoc))
        if stats is not None:
            if status == SUCCESS:
                stats.stored += 1
            else:
                stats.failed += 1
        if stats is not None and stats.sender is not None:
            stats.sender.stored(status == SUCCESS, time.perf_counter() - started)
        elif self.metrics is not None:  # no EVT_ACCEPTED seen for it (not expected): look the label up
            self.metrics.for_sender(calling_aet(event)).stored(status == SUCCESS, time.perf_counter() - started)
        return status

    def _store(self, event) -> int:
        request = event.request
        command_sop = str(request.AffectedSOPInstanceUID or "").strip("\x00 ")
        incoming = transport.received_data_set(event)
        try:
            if not command_sop:
                return self._fail(event, "?", BadInstance(INVALID_SOP_INSTANCE,
                                                          "the request's Affected SOP Instance UID is empty"))
            if incoming is None:
                stream = request.DataSet
                if stream is None:
                    return self._fail(event, command_sop, BadInstance(0xA900, "no data set"))
                return self._spool(event, command_sop, stream.getbuffer(), None)  # no copy of the data set
            if incoming.error is not None:
                log.error("C-STORE from %s: instance %s not stored: its data set could not be written to %s: %s "
                          "(answered 0x%04X out of resources)", calling_aet(event), command_sop, incoming.folder,
                          incoming.error, OUT_OF_RESOURCES,
                          extra=log_fields(event, instance_uid=command_sop, status=dimse_status(OUT_OF_RESOURCES),
                                           exc_type=type(incoming.error).__name__))
                return OUT_OF_RESOURCES
            if not incoming.spilled:
                assert incoming.buffer is not None
                return self._spool(event, command_sop, memoryview(incoming.buffer), incoming)
            mapped, view = incoming.map()
            try:
                return self._spool(event, command_sop, view, incoming)
            finally:
                mapped.close()  # _spool released the view
        finally:
            if incoming is not None:
                incoming.discard()

    def _spool(self, event, command_sop: str, view: memoryview, incoming: IncomingDataSet | None) -> int:
        """Parse, archive and spool one data set (view: its bytes; released here)."""
        try:
            try:
                instance = parse_received(view, str(event.context.transfer_syntax), self.max_header)
            except BadInstance as exc:
                return self._fail(event, command_sop, exc)
            stats = self._stats.get(id(event.assoc))  # who is known once per association, not per instance
            if stats is not None:
                calling, address = stats.calling_aet or "?", stats.source
            else:
                calling, address = calling_aet(event), source_address(event)
            try:
                if self.archive is not None:
                    self._archive(instance, incoming, calling, address)
                make_durable = self.spool.store_deferred(instance.study_uid, instance.sop_uid,
                                                         header_file(instance, calling, address))
            except OSError as exc:
                log.error("C-STORE from %s: instance %s of study %s not stored: %s (answered 0x%04X "
                          "out of resources)", calling, instance.sop_uid, instance.study_uid, exc, OUT_OF_RESOURCES,
                          extra=log_fields(event, study_uid=instance.study_uid, instance_uid=instance.sop_uid,
                                       status=dimse_status(OUT_OF_RESOURCES), exc_type=type(exc).__name__))
                return OUT_OF_RESOURCES
            study_uid, sop_uid = instance.study_uid, instance.sop_uid
            del instance  # it holds a view of the buffer, which must go before release()
        finally:
            view.release()
        gate = self._gates.get(id(event.assoc))
        if gate is None:
            try:
                make_durable()
            except OSError as exc:
                log.error("C-STORE from %s: instance %s of study %s not stored: fsync failed: %s", calling_aet(event),
                          sop_uid, study_uid, exc,
                          extra=log_fields(event, study_uid=study_uid, instance_uid=sop_uid,
                                       status=dimse_status(OUT_OF_RESOURCES), exc_type=type(exc).__name__))
                return OUT_OF_RESOURCES
        else:
            gate.hold(self._syncer.submit(make_durable), f"instance {sop_uid} of study {study_uid}")
        self.on_stored(study_uid, sop_uid)
        if log.isEnabledFor(logging.DEBUG):  # the hot path builds no log fields it would throw away
            log.debug("C-STORE from %s: instance %s of study %s stored", calling_aet(event), sop_uid, study_uid,
                      extra=log_fields(event, study_uid=study_uid, instance_uid=sop_uid, status=dimse_status(SUCCESS)))
        return SUCCESS

    def _archive(self, instance, incoming: IncomingDataSet | None, calling: str, address: str) -> None:
        """Keep the full instance: a spilled data set by renaming its file (it starts with the file meta
        built from the command; when the data set's own UIDs differ it is copied in pieces instead)."""
        assert self.archive is not None
        if incoming is not None and incoming.spilled:
            meta = file_meta(instance.sop_class_uid, instance.sop_uid, instance.transfer_syntax, calling, address)
            if meta == incoming.prefix:
                assert incoming.path is not None
                incoming.make_durable()
                self.archive.store_file(instance.study_uid, instance.sop_uid, incoming.path)
                incoming.detach()
                return
            self.archive.store(instance.study_uid, instance.sop_uid, [meta, *incoming.chunks()])
            return
        self.archive.store(instance.study_uid, instance.sop_uid, full_file(instance, calling, address))

    def _open_incoming(self, assoc_id: int, sop_class: str, sop_uid: str, syntax: str) -> IncomingDataSet:
        """The writer of one arriving data set (called by pynetdicom's reader thread, scp.receive.transport)."""
        assert self.incoming is not None
        stats = self._stats.get(assoc_id)
        calling, address = (stats.calling_aet or "?", stats.source) if stats is not None else ("?", "")
        meta = functools.partial(file_meta, sop_class, sop_uid, syntax, calling, address)
        return IncomingDataSet(self.incoming, meta, self.spill_threshold)

    def _without_instance_uid(self, event, request) -> None:
        stats = self._stats.get(id(event.assoc))
        if stats is not None:
            stats.failed += 1
        log.warning("C-STORE from %s: an instance refused with 0x%04X: the request's Affected SOP Instance UID is "
                    "empty or missing", calling_aet(event), INVALID_SOP_INSTANCE,
                    extra=log_fields(event, status=dimse_status(INVALID_SOP_INSTANCE)))

    def _fail(self, event, sop_uid: str, exc: BadInstance) -> int:
        log.warning("C-STORE from %s: instance %s refused with 0x%04X: %s", calling_aet(event), sop_uid,
                    exc.status, exc.problem, extra=log_fields(event, instance_uid=sop_uid, status=dimse_status(exc.status)))
        return exc.status

    # --- association bookkeeping ---------------------------------------------------------------

    def opened(self, event) -> None:
        """EVT_ACCEPTED: start this association's statistics."""
        requestor = event.assoc.requestor
        stats = _AssociationStats(requestor.ae_title.strip(), f"{requestor.address}:{requestor.port}",
                                  time.monotonic(), source=source_address(event))
        if self.metrics is not None:
            stats.sender = self.metrics.for_sender(stats.calling_aet)
            stats.sender.associations.inc()
        self._stats[id(event.assoc)] = stats
        log.debug("association from %s at %s accepted", stats.calling_aet, stats.address, extra=log_fields(event))

    def connected(self, event) -> None:
        """EVT_CONN_OPEN: tune the socket; gate this association's responses on durability."""
        gate = transport.tune(event)
        if gate is not None:
            self._gates[id(event.assoc)] = gate
        transport.answer_stores_without_instance_uid(event, INVALID_SOP_INSTANCE,
                                                     functools.partial(self._without_instance_uid, event))
        if self.incoming is not None:
            transport.receive_data_sets(event, functools.partial(self._open_incoming, id(event.assoc)),
                                        str(self.incoming / ".never-created"))

    def closed(self, event) -> None:
        """EVT_CONN_CLOSE: finish the pending fsyncs, log what the association did."""
        assoc = event.assoc
        gate = self._gates.pop(id(assoc), None)
        if gate is not None:
            gate.drain()
        stats = self._stats.pop(id(assoc), None)
        if stats is None:
            # A bare TCP probe sends nothing; a request cut off by node.request_timeout is logged by
            # scp.receive.limits, once per address and interval.
            if (not assoc.is_rejected and transport.bytes_received(assoc)
                    and not transport.stalled_before_request(assoc)):
                log.warning("connection from %s:%s closed without an association: it sent no valid "
                            "A-ASSOCIATE-RQ, or left before the answer", assoc.requestor.address,
                            assoc.requestor.port, extra={"peer": peer(event)})
            return
        partial = transport.partial_data_set(assoc)
        if partial is not None:
            partial.discard()  # the part of a data set that arrived before the connection ended
        sop_uid = transport.instance_in_progress(assoc)
        if sop_uid is not None:
            log.warning("association from %s at %s: the connection ended in the middle of instance %s; "
                        "nothing of it was stored and no success was sent for it", stats.calling_aet,
                        stats.address, sop_uid,
                        extra={"calling_aet": stats.calling_aet, "peer": stats.address, "instance_uid": sop_uid})
        how = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "closed"
        # Ending without A-RELEASE (an A-ABORT, or the connection dropped) deserves a look.
        log.log(logging.INFO if assoc.is_released else logging.WARNING,
                "association from %s at %s %s after %.1f s: %d instance(s) stored, %d failed", stats.calling_aet,
                stats.address, how, time.monotonic() - stats.started, stats.stored, stats.failed,
                extra={"calling_aet": stats.calling_aet, "peer": stats.address})

    def shutdown(self) -> None:
        """Finish the pending fsyncs (graceful shutdown)."""
        self._syncer.shutdown(wait=True)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no C-STORE is being handled (graceful shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True


def recover_incoming(incoming: Path) -> int:
    """At start, before anything receives: remove the data set files a killed node was receiving
    into `incoming` (none was acknowledged); how many."""
    removed = clear_incoming(incoming)
    if removed:
        log.info("removed %d incomplete received data set(s) left by an interrupted node in %s (none was "
                 "acknowledged)", removed, incoming)
    return removed


def handle_echo(event) -> int:
    """EVT_C_ECHO: always success (the node is up)."""
    log.debug("C-ECHO from %s", calling_aet(event), extra=log_fields(event))
    return SUCCESS


def calling_aet(event) -> str:
    try:
        return event.assoc.requestor.ae_title.strip() or "?"
    except AttributeError:
        return "?"


def peer(event) -> str:
    """The requestor's address:port, for the `peer` field."""
    try:
        requestor = event.assoc.requestor
        return f"{requestor.address}:{requestor.port}"
    except AttributeError:
        return "?"


def source_address(event) -> str:
    """The requestor's Source Presentation Address (a DICOM URI, scp.store.part10), for the file meta;
    "" when unknown."""
    try:
        requestor = event.assoc.requestor
        return presentation_address(str(requestor.address or ""), requestor.port)
    except AttributeError:
        return ""


def log_fields(event, **known: str) -> dict[str, str]:
    """The structured fields of a log line about this event (scp.logs.FIELDS): who sent it, and `known`."""
    return {"calling_aet": calling_aet(event), "peer": peer(event), **known}


def affected_sop(event) -> str:
    """The C-STORE request's Affected SOP Instance UID, for log lines about it."""
    try:
        return str(event.request.AffectedSOPInstanceUID or "?")
    except AttributeError:
        return "?"
