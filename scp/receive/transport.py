"""Every use of pynetdicom's internals, in one file: re-check this one on a pynetdicom upgrade.

pynetdicom 3.0's public API has no hook for what the node needs below the DIMSE
layer, so this module reaches into its objects (``assoc.dul.socket``, the
``AssociationSocket``'s ``send``/``recv``/``socket``/``event_queue``, ``assoc.dimse``'s
message being reassembled, ``assoc.acse``, ``assoc.requestor.primitive``) and its
module-wide ``_config`` switches. Nothing else in the project does; each function
says what it relies on.

- Sockets stay fast against senders that never disable Nagle (dcmtk, Orthanc, many
  modalities): TCP_NODELAY on every accepted socket and, on Linux, TCP_QUICKACK
  re-armed before every read (the kernel clears it by itself), with a reader that
  reads a PDU straight into one buffer that grows with what arrives (a lying PDU
  length costs no memory).
- The response gate holds an association's outgoing PDUs until the instances they
  acknowledge are durable, so the fsync overlaps the response's encoding.
- C-STORE data sets are received into a writer of the node's own (scp.receive.dataset's
  IncomingDataSet, spilling to disk past a threshold) instead of pynetdicom's in-memory
  BytesIO: pynetdicom's DIMSE reassembly writes data set fragments to a message's
  ``_data_set_file`` when it has one (its STORE_RECV_CHUNKED_DATASET path), so one is
  attached to each C-STORE message as soon as its command set is decoded
  (`receive_data_sets`). The global switch stays off: its NamedTemporaryFile lives in
  /tmp (not the spool's file system) and is flushed per fragment.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("scp.receive.transport")

TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
READ_AHEAD = 4 << 20  # bytes set aside for a PDU before its data arrives
TRANSPORT_CLOSED = "Evt17"  # the DUL state machine's event for a closed connection (PS3.8 9.2)


def allow_unknown_storage_classes(enabled: bool) -> None:
    """Accept C-STORE for SOP classes pynetdicom does not know (private, newer).

    pynetdicom keeps this switch module-wide; the node runs one AE per process.
    """
    _config.UNRESTRICTED_STORAGE_SERVICE = bool(enabled)


def _association_socket(event) -> Any:
    return event.assoc.dul.socket  # pynetdicom.transport.AssociationSocket


def close_connection(event) -> None:
    _association_socket(event).close()


def wrap_in_tls(event, context: ssl.SSLContext, timeout: float) -> None:
    """Replace the connection's socket by a TLS one and run the handshake now, with timeout.

    Raises OSError or ValueError when the handshake fails (the caller closes the connection).
    """
    assoc_socket = _association_socket(event)
    raw = assoc_socket.socket
    previous = raw.gettimeout()
    tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    assoc_socket.socket = tls
    tls.settimeout(timeout)
    tls.do_handshake()
    tls.settimeout(previous)


def tune(event) -> ResponseGate | None:
    """EVT_CONN_OPEN: TCP_NODELAY, the QUICKACK reader and a response gate on this connection.

    Only this connection's AssociationSocket is changed, never pynetdicom's class.
    Returns the gate (None when the connection has no socket to tune).
    """
    assoc_socket = _association_socket(event)
    raw = getattr(assoc_socket, "socket", None)
    if raw is None:
        return None
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.debug("TCP_NODELAY not set: %s", exc)
    else:
        assoc_socket.recv = QuickAckReader(raw)
    gate = ResponseGate(raw, assoc_socket)
    assoc_socket.send = gate.send
    return gate


def bytes_received(assoc) -> int:
    """Bytes read on the association's connection (0 also when the reader was not installed)."""
    reader = getattr(getattr(assoc.dul, "socket", None), "recv", None)
    return getattr(reader, "received", 0)


def instance_in_progress(assoc) -> str | None:
    """The Affected SOP Instance UID of a C-STORE cut off mid-message ("?" when unknown), else None."""
    partial = getattr(assoc.dimse, "message", None)  # the message pynetdicom is reassembling
    if partial is None:
        return None
    command = getattr(partial, "command_set", None)
    return str(getattr(command, "AffectedSOPInstanceUID", None) or "?")


def requested_ae_titles(assoc) -> tuple[str, str]:
    """(calling, called) AE titles of the A-ASSOCIATE-RQ being decided on (EVT_REQUESTED)."""
    request = assoc.requestor.primitive
    return str(request.calling_ae_title), str(request.called_ae_title)


def reject(assoc, result_source_diagnostic: tuple[int, int, int]) -> None:
    """Send this A-ASSOCIATE-RJ from EVT_REQUESTED and end the association.

    As pynetdicom's own rejection does: wait until the PDU is out and the peer closed,
    otherwise the socket is shut before the PDU leaves.
    """
    assoc.acse.send_reject(*result_source_diagnostic)
    assoc.kill()


class ResponseGate:
    """Holds an association's outgoing PDUs until the instances it acknowledges are durable.

    pynetdicom encodes and queues the C-STORE response as soon as the handler returns;
    its DUL thread then calls send(). The gate makes that call wait for the fsyncs the
    handler started, so the fsync and the response's encoding overlap while no success
    status leaves before its instance is on disk. When an fsync fails nothing more is
    sent: the connection is closed (the sender sees the association drop and resends
    what it was not told was stored).
    """

    def __init__(self, raw: socket.socket, assoc_socket) -> None:
        self.raw = raw
        self.assoc_socket = assoc_socket
        self._send = assoc_socket.send
        self._pending: list[tuple[Future, str]] = []
        self._lock = threading.Lock()

    def hold(self, durable: Future, what: str) -> None:
        with self._lock:
            self._pending.append((durable, what))

    def drain(self) -> bool:
        """Wait for every pending fsync; False when one failed."""
        with self._lock:
            pending, self._pending = self._pending, []
        ok = True
        for durable, what in pending:
            try:
                durable.result()
            except Exception as exc:
                log.error("%s: fsync failed (%s); closing the association instead of acknowledging it", what, exc)
                ok = False
        return ok

    def send(self, data: bytes) -> None:
        if self.drain():
            self._send(data)
            return
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.assoc_socket.event_queue.put(TRANSPORT_CLOSED)  # as pynetdicom's own send reports it


class QuickAckReader:
    """AssociationSocket.recv replacement: QUICKACK re-armed before each read, one growing buffer."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.quickack = TCP_QUICKACK is not None
        self.received = 0  # bytes, for the log line of a connection that never became an association

    def __call__(self, nr_bytes: int) -> bytearray:
        # nr_bytes is what the peer announced (a PDU length, up to 4 GiB): the buffer grows
        # with what actually arrives, so a lying header costs no memory.
        buffer = bytearray(min(nr_bytes, READ_AHEAD))
        received = 0
        raw = self.raw
        while received < nr_bytes:
            if received == len(buffer):
                buffer += bytes(min(len(buffer), nr_bytes - received))  # doubles, at most
            if self.quickack:
                try:
                    raw.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
                except OSError:
                    self.quickack = False
            with memoryview(buffer) as view:
                count = raw.recv_into(view[received:], len(buffer) - received)
            if not count:  # the peer closed: return what arrived, as pynetdicom's reader does
                return buffer[:received]
            received += count
            self.received += count
        return buffer


# --- receiving data sets (the dataset-receiving side; the socket-read side is above) -----------

Opener = Callable[[str, str, str], Any]  # (Affected SOP Class UID, Affected SOP Instance UID, transfer syntax) -> writer


class _DataSetFile:
    """What pynetdicom's reassembly and its Storage SCP use of a ``_data_set_file``: write,
    file.flush, close and name (which it unlinks after the handler). The writer does the work;
    the handler frees it (close and unlink here would be too late, or wrong after a rename)."""

    def __init__(self, writer: Any, unused_name: str) -> None:
        self.writer = writer
        self.file = self
        self.name = unused_name  # never created: pynetdicom's unlink of it is a no-op

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def flush(self) -> None:
        pass  # a flush per fragment is a syscall per fragment for nothing: durability is fsync's

    def close(self) -> None:
        pass


def receive_data_sets(event, opener: Opener, unused_name: str) -> None:
    """EVT_CONN_OPEN: this association's C-STORE data sets go to opener(...)'s writer as they arrive.

    Relies on: ``assoc.dimse.receive_primitive`` (called per P-DATA by the DUL state machine),
    ``assoc.dimse.message`` (the message being reassembled; its class becomes C_STORE_RQ once its
    command set is decoded), its ``_data_set_file`` and ``context_id``, ``assoc._accepted_cx``.
    A P-DATA holding several PDVs is passed on one PDV at a time, so the writer is attached
    between a command set's last fragment and the first fragment of its data set.
    """
    assoc = event.assoc
    dimse = assoc.dimse
    original = dimse.receive_primitive

    def attach() -> None:
        message = dimse.message
        if type(message) is not C_STORE_RQ or message._data_set_file is not None:
            return
        command = message.command_set
        try:
            syntax = str(assoc._accepted_cx[message.context_id].transfer_syntax[0])
        except (KeyError, IndexError, TypeError):
            syntax = ""
        writer = opener(str(getattr(command, "AffectedSOPClassUID", "") or ""),
                        str(getattr(command, "AffectedSOPInstanceUID", "") or ""), syntax)
        message._data_set_file = _DataSetFile(writer, unused_name)

    def receive_primitive(primitive) -> None:
        values = primitive.presentation_data_value_list
        if len(values) <= 1:
            original(primitive)
            attach()
            return
        for value in values:
            single = P_DATA()
            single.presentation_data_value_list = [value]
            original(single)
            attach()

    dimse.receive_primitive = receive_primitive


def received_data_set(event) -> Any | None:
    """The writer that received this C-STORE's data set (None: it arrived in pynetdicom's memory)."""
    holder = getattr(event.request, "_dataset_file", None)
    return getattr(holder, "writer", None)


def partial_data_set(assoc) -> Any | None:
    """The writer of a C-STORE cut off in its data set (the connection ended), else None."""
    holder = getattr(getattr(assoc.dimse, "message", None), "_data_set_file", None)
    return getattr(holder, "writer", None)


def answer_stores_without_instance_uid(event, status: int, on_answered: Callable[[Any], None]) -> None:
    """EVT_CONN_OPEN: a C-STORE request without an Affected SOP Instance UID (empty or missing) is answered
    with `status` at once, and on_answered(request) told (to log it).

    pynetdicom drops such a request as "unexpected" (is_valid_request is false) and sends nothing:
    the sender waits for its DIMSE timeout and aborts. Relies on: ``assoc._serve_request`` (called
    per request by the association's thread), ``assoc.dimse.send_msg``.
    """
    assoc = event.assoc
    original = assoc._serve_request

    def serve_request(msg, context_id: int) -> None:
        if (isinstance(msg, C_STORE) and msg.MessageIDBeingRespondedTo is None and msg.MessageID is not None
                and not str(msg.AffectedSOPInstanceUID or "").strip("\x00 ")):
            holder = getattr(msg, "_dataset_file", None)
            writer = getattr(holder, "writer", None)
            if writer is not None:
                writer.discard()
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            rsp.Status = status
            on_answered(msg)
            assoc.dimse.send_msg(rsp, context_id)
            return
        original(msg, context_id)

    assoc._serve_request = serve_request
