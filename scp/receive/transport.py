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
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pynetdicom import _config

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


# --- connection limits and timeouts (scp.receive.limits, scp.receive.server) -------------------
#
# pynetdicom reads an accepted socket with no timeout: the listening socket's timeout is
# not inherited by accept()ed sockets, and its DUL thread reads a PDU's header and then its
# body with blocking recv() calls once select() said a byte is there. A peer that announces a
# PDU and sends nothing more blocked that thread forever; its association thread then spun in
# Association.kill() waiting for the DUL to reach Sta1, the ARTIM and idle timers never fired,
# and the server's shutdown() joined every such thread. What follows bounds every read.

UNLIMITED_ASSOCIATIONS = 1 << 20  # pynetdicom's own limit off: it counts silent connections (limits.py counts)
LISTEN_BACKLOG = 512  # socketserver listens with 5: a flood of connects would keep real senders in SYN retries
PRE_ASSOCIATION_POLL = 0.05  # s between the DUL's polls before an A-ASSOCIATE-RQ (pynetdicom: 1 ms)


def harden_server(server: Any, backlog: int = LISTEN_BACKLOG) -> None:
    """Right after AE.start_server: a wide listen backlog; the connection threads are daemons
    and never joined when the server closes (a stop must not wait for a peer)."""
    quiet = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, QuietStalls) for f in quiet.filters):
        quiet.addFilter(QuietStalls())
    server.daemon_threads = True  # read by ThreadingMixIn for each new connection's thread
    server.block_on_close = False  # ThreadingMixIn.server_close would join every connection thread
    try:
        server.socket.listen(backlog)  # listen() again only changes the backlog
    except OSError as exc:
        log.debug("listen backlog not widened: %s", exc)


def stop_accepting(server: Any) -> None:
    """Stop the accept loop and close the listening socket, without waiting for connections."""
    server.block_on_close = False
    server.shutdown()  # AssociationServer.shutdown: serve_forever ends, server_close, AE forgets it


def guard_connection(event, request_timeout: float, network_timeout: float,
                     on_request_timeout: Callable[[str], None] | None = None) -> None:
    """EVT_CONN_OPEN (after `tune`): the A-ASSOCIATE-RQ must be complete within request_timeout.

    The acceptor waits acse_timeout for the request and the DUL's ARTIM timer (PS3.8 9.1.5)
    closes a silent connection after the same time; both get request_timeout until the request
    is in (`association_requested` restores the ACSE timeout). Every read on the socket gets a
    deadline: request_timeout from now for the request, then network_timeout per read.
    on_request_timeout(peer address) is called when a request stalls past its deadline (said
    here, not at EVT_CONN_CLOSE: pynetdicom skips that event when its acceptor gives up first).
    """
    assoc = event.assoc
    assoc_socket = _association_socket(event)
    if getattr(assoc_socket, "socket", None) is None:
        return
    assoc.acse_timeout = request_timeout  # also sets dul.artim_timer.timeout
    assoc.network_timeout = network_timeout  # the DUL's idle timer, once associated
    assoc.dul._run_loop_delay = PRE_ASSOCIATION_POLL  # hundreds of silent connections must not spin
    reader = DeadlineReader(assoc_socket.recv, assoc_socket, network_timeout, peer_of(event),
                            on_request_timeout)
    reader.deadline = reader.clock() + request_timeout
    assoc_socket.recv = reader


def association_requested(assoc, acse_timeout: float) -> None:
    """EVT_REQUESTED: the request is in; the ACSE timeout and the per-read network timeout apply."""
    assoc.acse_timeout = acse_timeout
    assoc.dul._run_loop_delay = 0.001  # pynetdicom's own: latency matters once associated
    reader = getattr(getattr(assoc.dul, "socket", None), "recv", None)
    if isinstance(reader, DeadlineReader):
        reader.deadline = None
        raw = reader.assoc_socket.socket
        if raw is not None:  # the A-ASSOCIATE-AC is sent before the next read sets it
            raw.settimeout(reader.network_timeout)


def stalled_before_request(assoc) -> bool:
    """The connection ended because its A-ASSOCIATE-RQ was not complete by its deadline
    (scp.receive.limits logs those, rate-limited)."""
    reader = getattr(getattr(assoc.dul, "socket", None), "recv", None)
    return isinstance(reader, DeadlineReader) and reader.stalled and reader.deadline is not None


def requestor_address(assoc) -> str:
    """The peer's IP address (an Association's requestor), "" when unknown."""
    try:
        return str(assoc.requestor.address or "")
    except AttributeError:
        return ""


def peer_of(event) -> str:
    address = getattr(event, "address", None) or ("?", "?")
    return "%s:%s" % tuple(address[:2])


def is_requested(assoc) -> bool:
    """The A-ASSOCIATE-RQ arrived (the requestor's primitive is set)."""
    return getattr(assoc.requestor, "primitive", None) is not None


def active_associations(ae) -> list:
    """The AE's acceptor threads still running (one per connection, associated or not)."""
    return [assoc for assoc in ae.active_associations if assoc.is_acceptor]


def force_close(assoc) -> None:
    """Shut the connection down under its threads: a blocked read returns, the DUL sees the
    connection closed (Evt17) and both threads end. The sender resends what was not acknowledged."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is None:
        return
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class DeadlineReader:
    """AssociationSocket.recv wrapper: every read has a timeout, and a stall is logged.

    `deadline` (monotonic seconds) bounds the A-ASSOCIATE-RQ; after it, each read may wait
    network_timeout for the next bytes. A stalled read returns nothing instead of raising, so
    the DUL reports the connection closed (Evt17) without a traceback of its own.
    """

    def __init__(self, inner, assoc_socket, network_timeout: float, peer: str,
                 on_request_timeout: Callable[[str], None] | None = None) -> None:
        self.inner = inner
        self.on_request_timeout = on_request_timeout
        self.assoc_socket = assoc_socket
        self.network_timeout = network_timeout
        self.peer = peer
        self.deadline: float | None = None
        self.stalled = False  # a read timed out (the connection is then ended)
        self.clock = time.monotonic

    @property
    def received(self) -> int:  # bytes_received() reads the QuickAckReader's count through this
        return getattr(self.inner, "received", 0)

    def __call__(self, nr_bytes: int) -> bytearray:
        raw = self.assoc_socket.socket
        deadline = self.deadline
        timeout = self.network_timeout if deadline is None else max(deadline - self.clock(), 0.001)
        try:
            raw.settimeout(timeout)
            return self.inner(nr_bytes)
        except TimeoutError:
            self.stalled = True
            if deadline is None:
                log.warning("connection from %s stalled: no data for %g s in the middle of a PDU (%d bytes "
                            "announced); aborted (node.network_timeout)", self.peer, self.network_timeout,
                            nr_bytes, extra={"peer": self.peer})
            elif self.on_request_timeout is not None:  # logs it, rate-limited per address
                self.on_request_timeout(self.peer.rsplit(":", 1)[0])
            return bytearray()
        except OSError:
            return bytearray()  # closed under us (a stop): the DUL sees Evt17


class QuietStalls(logging.Filter):
    """pynetdicom's DUL logs "The received PDU is shorter than expected" at ERROR for every
    connection a DeadlineReader ended; the reader (or scp.receive.limits) already said why."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("The received PDU is shorter than expected"):
            return True
        dul_socket = getattr(threading.current_thread(), "socket", None)  # the DUL thread's AssociationSocket
        reader = getattr(dul_socket, "recv", None)
        return not (isinstance(reader, DeadlineReader) and reader.stalled)
