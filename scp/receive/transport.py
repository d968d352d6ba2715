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
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("scp.receive.transport")

TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
READ_AHEAD = 4 << 20  # bytes set aside for a PDU before its data arrives
HANDOVER_EOF_POLL = 0.2  # s between looks at a closed hand-over channel, until the worker stops
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


class _ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's server with SO_REUSEPORT set before its bind: every receive worker listens on
    the same port, the kernel spreads the connections over them (scp.receive.pool)."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _HandedOverServer(ThreadedAssociationServer):
    """pynetdicom's server with no listening socket of its own: its accept loop waits on an
    AF_UNIX socket (`channel`) on which the coordinator passes each accepted connection
    (SCM_RIGHTS, `pass_connection`); the rest (request gate, threads) is as ever."""

    channel: socket.socket  # set on the class made per server (`start_server`)

    def server_bind(self) -> None:
        self.socket.close()  # the TCP socket TCPServer made: nothing binds here
        self.socket = self.channel
        self.server_address = self.channel_address

    def server_activate(self) -> None:
        pass

    def get_request(self) -> tuple[socket.socket, Any]:
        _, fds, _, _ = socket.recv_fds(self.socket, 1, 1)
        if not fds:
            # The coordinator went away: the worker stops because of it (scp.receive.worker);
            # until then the loop looks again now and then, not in a spin.
            time.sleep(HANDOVER_EOF_POLL)
            raise OSError("the connection hand-over channel closed")
        conn = socket.socket(fileno=fds[0])
        conn.setblocking(True)
        try:
            return conn, conn.getpeername()
        except OSError:
            conn.close()
            raise

    def server_close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass


def start_server(ae: Any, address: tuple[str, int], handlers: list, *, reuse_port: bool = False,
                 handed_over: socket.socket | None = None) -> Any:
    """AE.start_server(address, block=False): the accept loop on a thread of its own.

    The two ways receive workers share one port (scp.receive.pool): reuse_port, their own
    listening sockets with SO_REUSEPORT; handed_over, connections passed in over this
    AF_UNIX socket by the coordinator, which listens (`address` is then its address, for logs).
    """
    if handed_over is None and not reuse_port:
        return ae.start_server(address, block=False, evt_handlers=handlers)
    if handed_over is not None:
        server_class = type("HandedOverServer", (_HandedOverServer,),
                            {"channel": handed_over, "channel_address": address})
    else:
        server_class = _ReusePortServer
    server = ae.make_server(address, evt_handlers=handlers, server_class=server_class)
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: AE.shutdown and active_associations see it
    return server


def pass_connection(channel: socket.socket, conn: socket.socket) -> None:
    """The coordinator's side of the hand-over: send one accepted connection to a worker
    (the caller closes its copy)."""
    socket.send_fds(channel, [b"c"], [conn.fileno()])


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
        reader.max_pdu = getattr(assoc.acceptor, "maximum_length", 0) or 0
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


PDU_HEADER = 6  # bytes: type, reserved, length (PS3.8 9.3)
P_DATA_TF = 0x04
PDU_SLACK = 64 << 10  # bytes a sender may overshoot the advertised length by (broken, not hostile)


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
        self.stalled = False  # a read timed out, or a PDU was refused (the connection is then ended)
        self.clock = time.monotonic
        self.max_pdu = 0  # the P-DATA length the node advertised (0: unlimited); set once associated
        self.oversized: int | None = None  # the length of a P-DATA PDU whose header announced more

    @property
    def received(self) -> int:  # bytes_received() reads the QuickAckReader's count through this
        return getattr(self.inner, "received", 0)

    def __call__(self, nr_bytes: int) -> bytearray:
        if self.oversized is not None and nr_bytes == self.oversized:
            # pynetdicom would read the whole PDU into memory: a sender ignoring the Maximum
            # Length it was given (PS3.8 D.1) could make the node hold its whole instance.
            log.warning("connection from %s sent a P-DATA PDU of %d bytes, longer than the %d the node accepts "
                        "(node.max_pdu); aborted", self.peer, nr_bytes, self.max_pdu, extra={"peer": self.peer})
            self.oversized, self.stalled = None, True
            return bytearray()
        data = self._read(nr_bytes)
        if nr_bytes == PDU_HEADER and self.max_pdu and len(data) == PDU_HEADER:
            kind, _, length = struct.unpack(">BBL", data)
            if kind == P_DATA_TF and length > self.max_pdu + PDU_SLACK:
                self.oversized = length
        return data

    def _read(self, nr_bytes: int) -> bytearray:
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


TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux: the connection's state is the first byte
TCP_CLOSE_WAIT = 8  # the peer sent its FIN (include/net/tcp_states.h)


def _peer_closed(sock: socket.socket) -> bool:
    """The peer closed its side (data it sent may still be buffered); False when unknown."""
    if TCP_INFO is None:
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0] == TCP_CLOSE_WAIT
    except OSError:
        return False


GATE_POLL = 0.05  # s between looks at connections whose A-ASSOCIATE-RQ has partly arrived
MAX_PEEK = 64 << 10  # bytes: a request announced longer than this goes to pynetdicom once its header is in
A_ASSOCIATE_RQ = 0x01


class RequestGate:
    """Holds accepted connections on one thread until their A-ASSOCIATE-RQ has arrived whole.

    pynetdicom gives every accepted connection two threads and a deep copy of the AE's
    supported presentation contexts (thousands of objects) before reading a byte: 150
    silent connections cost some 5 s of CPU, during which a real sender waited its turn.
    The gate replaces the server's process_request: a connection goes on to pynetdicom when
    its first PDU is in the socket buffer (peeked, not read: pynetdicom reads it as ever), or
    is anything but an A-ASSOCIATE-RQ, or the peer closed; with TLS (encrypted, nothing to
    peek at) as soon as the handshake's first bytes are in. A connection still waiting after
    request_timeout is closed and reported through on_timeout(address) (rate-limited there).
    """

    def __init__(self, server: Any, request_timeout: float, *, whole_request: bool = True,
                 on_timeout: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.request_timeout = request_timeout
        self.whole_request = whole_request
        self.on_timeout = on_timeout
        self.clock = clock
        self._hand_over = server.process_request  # ThreadingMixIn's: a thread per connection
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, tuple[Any, float]] = {}  # socket -> (client address, deadline)
        self._partial: set[socket.socket] = set()  # some bytes in, not yet the whole request
        self._incoming: list[tuple[socket.socket, Any]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="request-gate", daemon=True)

    def start(self) -> "RequestGate":
        self.server.process_request = self.process_request  # the accept loop calls this one now
        self._thread.start()
        return self

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Called by the accept loop for each new connection: queued for the gate thread."""
        with self._lock:
            if self._stopping:
                self.server.shutdown_request(request)
                return
            self._incoming.append((request, client_address))
        self._wake()

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._incoming)

    def stop(self) -> None:
        """Close every connection still waiting (none asked for anything yet)."""
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (the pipe is full) or closing

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    stopping, incoming, self._incoming = self._stopping, self._incoming, []
                if stopping:
                    for sock, _ in incoming:
                        self.server.shutdown_request(sock)
                    break
                now = self.clock()
                for sock, address in incoming:
                    self._waiting[sock] = (address, now + self.request_timeout)
                    self._check(sock)
                timeout = self._next_timeout()
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                        continue
                    self._check(key.fileobj)
                for sock in list(self._partial):
                    self._check(sock)
                self._expire()
        finally:
            for sock in list(self._waiting):
                self._forget(sock)
                self.server.shutdown_request(sock)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _next_timeout(self) -> float:
        if self._partial:
            return GATE_POLL
        if not self._waiting:
            return 1.0
        soonest = min(deadline for _, deadline in self._waiting.values())
        return max(min(soonest - self.clock(), 1.0), 0.0)

    def _check(self, sock: socket.socket) -> None:
        """Hand the connection over when its request is whole (or it is no request, or closed)."""
        if sock not in self._waiting:
            return
        try:
            head = sock.recv(MAX_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._watch(sock)
            return
        except OSError:
            head = b""  # reset by the peer
        if not head and sock not in self._partial:
            # Closed before sending a byte (a port probe, a load balancer's check): nothing to log,
            # as pynetdicom logged nothing for it, and no threads to start for it.
            self._forget(sock)
            self.server.shutdown_request(sock)
            return
        if head and self.whole_request and head[0] == A_ASSOCIATE_RQ:
            incomplete = len(head) < 6 or len(head) < min(6 + int.from_bytes(head[2:6], "big"), MAX_PEEK)
            if incomplete and not _peer_closed(sock):  # closed halfway: pynetdicom reads and logs it, as before
                self._partial.add(sock)
                self._unwatch(sock)
                return
        address, _ = self._waiting[sock]
        self._forget(sock)
        self._hand_over(sock, address)

    def _watch(self, sock: socket.socket) -> None:
        try:
            self._selector.register(sock, selectors.EVENT_READ)
        except KeyError:
            pass  # registered already

    def _unwatch(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _forget(self, sock: socket.socket) -> None:
        self._unwatch(sock)
        self._partial.discard(sock)
        self._waiting.pop(sock, None)

    def _expire(self) -> None:
        now = self.clock()
        for sock, (address, deadline) in list(self._waiting.items()):
            if now < deadline:
                continue
            self._forget(sock)
            self.server.shutdown_request(sock)
            if self.on_timeout is not None:
                try:
                    self.on_timeout(str(address[0]))
                except Exception:  # an observer: logged, the gate goes on
                    log.exception("request timeout report failed")
