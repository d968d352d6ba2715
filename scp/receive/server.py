"""The DICOM side of the node: a pynetdicom AE serving C-ECHO and C-STORE.

- Association policy (`AccessPolicy`): allowed calling AE titles and peer addresses,
  the called AE title; a refused association gets an A-ASSOCIATE-RJ and a log line
  with the reason. Optional DICOM TLS (`tls_context`).
- Storage for every storage SOP class pynetdicom knows, in every transfer syntax
  pydicom knows (compressed included: pixel data is never decoded); unknown/private
  classes only with node.accept_unknown_sop_classes.
- The C-STORE handler (`StoreHandler`) always returns a DIMSE status: it spools the
  instance's header (fsync'ed) before answering success.
- Sockets stay fast against senders that never disable Nagle (dcmtk, Orthanc, many
  modalities; ../shared/peers.md): TCP_NODELAY on every accepted socket and, on Linux,
  TCP_QUICKACK re-armed before every read (the kernel clears it by itself).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from scp.config import NodeConfig, SecurityConfig
from scp.receive.dataset import OUT_OF_RESOURCES, PROCESSING_FAILURE, BadInstance, full_file, header_file, parse_received
from scp.store.spool import FileSpool

log = logging.getLogger("scp.receive.server")

SUCCESS = 0x0000
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
READ_AHEAD = 4 << 20  # bytes set aside for a PDU before its data arrives

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_NO_REASON = (0x01, 0x01, 0x01)

OnStored = Callable[[str, str], None]


@dataclass(frozen=True)
class AccessPolicy:
    """Who may open an association (SecurityConfig's allow-lists)."""

    ae_title: str
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()  # IP addresses or networks ("10.0.0.0/8")
    require_called_aet: bool = True
    _networks: tuple = field(default=(), repr=False, compare=False)

    @classmethod
    def from_config(cls, node: NodeConfig, security: SecurityConfig) -> "AccessPolicy":
        networks = []
        for entry in security.allowed_addresses:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError as exc:
                from mapping.errors import ConfigurationError
                raise ConfigurationError(f"security.allowed_addresses: {entry!r} is not an IP address "
                                         f"or network") from exc
        return cls(node.ae_title.strip(), tuple(a.strip() for a in security.allowed_calling_aets),
                   tuple(security.allowed_addresses), security.require_called_aet, tuple(networks))

    def check(self, calling_aet: str, called_aet: str, address: str) -> tuple[tuple[int, int, int], str] | None:
        """None when allowed, else (A-ASSOCIATE-RJ result/source/diagnostic, reason)."""
        if self._networks:
            try:
                peer = ipaddress.ip_address(address.split("%")[0])
            except ValueError:
                peer = None
            if peer is None or not any(peer in net for net in self._networks):
                return REJECT_NO_REASON, f"peer address {address} is not in security.allowed_addresses"
        if self.allowed_calling_aets and calling_aet.strip() not in self.allowed_calling_aets:
            return REJECT_CALLING_AE, f"calling AE title {calling_aet.strip()!r} is not in security.allowed_calling_aets"
        if self.require_called_aet and called_aet.strip() != self.ae_title:
            return REJECT_CALLED_AE, (f"called AE title {called_aet.strip()!r} is not this node's "
                                      f"({self.ae_title!r}; security.require_called_aet)")
        return None


def tls_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The server's TLS context when security.tls_cert/tls_key are set (DICOM TLS, PS3.15 B.1)."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    from mapping.errors import ConfigurationError

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(security.tls_cert), str(security.tls_key))
        if security.tls_ca is not None:
            context.load_verify_locations(cafile=str(security.tls_ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"security.tls_cert/tls_key/tls_ca: cannot load ({exc})") from exc
    context.verify_mode = ssl.CERT_REQUIRED if security.tls_verify_peer else ssl.CERT_NONE
    return context


@dataclass
class _AssociationStats:
    calling_aet: str
    address: str
    started: float
    stored: int = 0
    failed: int = 0


class StoreHandler:
    """The C-STORE handler (EVT_C_STORE): spool the header, tell the completion timer, answer.

    Dependencies are explicit: the spool, an optional archive of full instances, and
    on_stored(study_uid, sop_uid) (the completion tracker's `arrived`).
    """

    def __init__(self, spool: FileSpool, on_stored: OnStored, *, archive: FileSpool | None = None,
                 metrics=None) -> None:
        self.spool = spool
        self.archive = archive
        self.on_stored = on_stored
        self.metrics = metrics
        self._stats: dict[int, _AssociationStats] = {}
        self._gates: dict[int, _ResponseGate] = {}
        self._syncer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        self._in_flight = 0
        self._idle = threading.Condition()

    def __call__(self, event) -> int:
        with self._idle:
            self._in_flight += 1
        try:
            status = self._store(event)
        except Exception:  # the handler never raises: pynetdicom would abort the association
            status = PROCESSING_FAILURE
            log.exception("C-STORE from %s: instance %s: unexpected error (answered 0x%04X)", _calling(event),
                          _affected_sop(event), status)
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
        if self.metrics is not None:
            self.metrics.inc("instances_received" if status == SUCCESS else "instances_failed")
        return status

    def _store(self, event) -> int:
        request = event.request
        command_sop = str(request.AffectedSOPInstanceUID or "?")
        stream = request.DataSet
        if stream is None:
            return self._fail(event, command_sop, BadInstance(0xA900, "no data set"))
        view = stream.getbuffer()  # no copy of the (possibly large) data set
        try:
            try:
                instance = parse_received(view, str(event.context.transfer_syntax))
            except BadInstance as exc:
                return self._fail(event, command_sop, exc)
            calling = _calling(event)
            try:
                if self.archive is not None:
                    self.archive.store(instance.study_uid, instance.sop_uid, full_file(instance, calling))
                make_durable = self.spool.store_deferred(instance.study_uid, instance.sop_uid,
                                                         header_file(instance, calling))
            except OSError as exc:
                log.error("C-STORE from %s: instance %s of study %s not stored: %s (answered 0x%04X "
                          "out of resources)", calling, instance.sop_uid, instance.study_uid, exc, OUT_OF_RESOURCES)
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
                log.error("C-STORE from %s: instance %s of study %s not stored: fsync failed: %s", _calling(event),
                          sop_uid, study_uid, exc)
                return OUT_OF_RESOURCES
        else:
            # The fsync runs while pynetdicom encodes the response; the gate holds the response
            # on the socket until it is done (or closes the connection if it fails).
            gate.hold(self._syncer.submit(make_durable), f"instance {sop_uid} of study {study_uid}")
        self.on_stored(study_uid, sop_uid)
        return SUCCESS

    def _fail(self, event, sop_uid: str, exc: BadInstance) -> int:
        log.warning("C-STORE from %s: instance %s refused with 0x%04X: %s", _calling(event), sop_uid,
                    exc.status, exc.problem)
        return exc.status

    # --- association bookkeeping ---------------------------------------------------------------

    def opened(self, event) -> None:
        requestor = event.assoc.requestor
        self._stats[id(event.assoc)] = _AssociationStats(requestor.ae_title.strip(),
                                                         f"{requestor.address}:{requestor.port}", time.monotonic())
        if self.metrics is not None:
            self.metrics.inc("associations")

    def connected(self, event) -> None:
        """EVT_CONN_OPEN: tune the socket; gate this association's responses on durability."""
        assoc_socket = event.assoc.dul.socket
        raw = getattr(assoc_socket, "socket", None)
        if raw is None:
            return
        _tune_socket(raw, assoc_socket)
        gate = _ResponseGate(raw, assoc_socket)
        assoc_socket.send = gate.send  # this socket only, not pynetdicom's class
        self._gates[id(event.assoc)] = gate

    def closed(self, event) -> None:
        assoc = event.assoc
        gate = self._gates.pop(id(assoc), None)
        if gate is not None:
            gate.drain()
        stats = self._stats.pop(id(assoc), None)
        if stats is None:
            reader = getattr(getattr(assoc.dul, "socket", None), "recv", None)
            if not assoc.is_rejected and getattr(reader, "received", 0):  # a bare TCP probe sends nothing
                log.warning("connection from %s:%s closed without an association: it sent no valid "
                            "A-ASSOCIATE-RQ, or left before the answer", assoc.requestor.address,
                            assoc.requestor.port)
            return
        partial = getattr(assoc.dimse, "message", None)  # pynetdicom's message being reassembled
        if partial is not None:
            command = getattr(partial, "command_set", None)
            sop_uid = getattr(command, "AffectedSOPInstanceUID", None) or "?"
            log.warning("association from %s at %s: the connection ended in the middle of instance %s; "
                        "nothing of it was stored and no success was sent for it", stats.calling_aet,
                        stats.address, sop_uid)
        how = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "closed"
        # Ending without A-RELEASE (an A-ABORT, or the connection dropped) deserves a look.
        log.log(logging.INFO if assoc.is_released else logging.WARNING,
                "association from %s at %s %s after %.1f s: %d instance(s) stored, %d failed", stats.calling_aet,
                stats.address, how, time.monotonic() - stats.started, stats.stored, stats.failed)

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


def _calling(event) -> str:
    try:
        return event.assoc.requestor.ae_title.strip() or "?"
    except AttributeError:
        return "?"


def _affected_sop(event) -> str:
    """The C-STORE request's Affected SOP Instance UID, for log lines about it."""
    try:
        return str(event.request.AffectedSOPInstanceUID or "?")
    except AttributeError:
        return "?"


class StorageServer:
    """The AE and its listening socket. `start()` returns the bound (address, port)."""

    def __init__(self, node: NodeConfig, security: SecurityConfig, handler: StoreHandler) -> None:
        self.node = node
        self.policy = AccessPolicy.from_config(node, security)
        self.ssl_context = tls_context(security)
        self.handler = handler
        self.ae = self._build_ae()
        self._server = None

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        # The policy is ours (on_requested logs the reason); pynetdicom's own checks stay off.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_pdu_size = self.node.max_pdu
        ae.maximum_associations = 64
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        syntaxes = list(AllTransferSyntaxes)
        ae.add_supported_context(Verification, syntaxes)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        # pynetdicom keeps this switch module-wide; the node runs one AE per process.
        _config.UNRESTRICTED_STORAGE_SERVICE = bool(self.node.accept_unknown_sop_classes)
        return ae

    def start(self) -> tuple[str, int]:
        handlers = [
            (evt.EVT_CONN_OPEN, self.handler.connected),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self.handler.opened),
            (evt.EVT_CONN_CLOSE, self.handler.closed),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_C_STORE, self.handler),
        ]
        if self.ssl_context is not None:
            handlers.insert(0, (evt.EVT_CONN_OPEN, self._start_tls))  # before the socket is tuned
        # No ssl_context for pynetdicom: it would run the TLS handshake in its accepting thread.
        self._server = self.ae.start_server((self.node.bind, self.node.port), block=False,
                                            evt_handlers=handlers)
        host, port = self._server.server_address[:2]
        log.info("listening on %s:%d as %s%s", host or "*", port, self.node.ae_title,
                 " (DICOM TLS)" if self.ssl_context else "")
        return host, port

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def _start_tls(self, event) -> None:
        """EVT_CONN_OPEN with DICOM TLS: the handshake, on this connection's own thread.

        pynetdicom does it where connections are accepted, one at a time and without a
        timeout: a peer that connects and stays silent kept every other sender out, and a
        failed handshake left no trace. A failed handshake closes the connection, logged.
        """
        assoc_socket = event.assoc.dul.socket
        raw = assoc_socket.socket
        peer = "%s:%s" % tuple(event.address[:2])
        timeout = raw.gettimeout()
        try:
            tls = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            log.warning("TLS with %s not started: %s; connection closed", peer, exc)
            assoc_socket.close()
            return
        assoc_socket.socket = tls
        try:
            tls.settimeout(self.ae.acse_timeout)
            tls.do_handshake()
            tls.settimeout(timeout)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s; connection closed", peer, exc)
            assoc_socket.close()

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling, called = str(request.calling_ae_title), str(request.called_ae_title)
        address = str(assoc.requestor.address)
        refusal = self.policy.check(calling, called, address)
        if refusal is None:
            return
        rsd, reason = refusal
        log.warning("association from %s at %s (called %s) rejected: %s", calling.strip(), address,
                    called.strip(), reason)
        assoc.acse.send_reject(*rsd)
        # As pynetdicom's own rejection does: wait until the A-ASSOCIATE-RJ is out and the
        # peer closed, otherwise the socket is shut before the PDU leaves.
        assoc.kill()

    def stop(self, grace: float = 10.0) -> None:
        """Stop listening, let the instance in flight finish, then close the associations."""
        if self._server is None:
            return
        self._server.shutdown()  # no new associations
        if not self.handler.wait_idle(grace):
            log.warning("an instance was still being stored after %.0f s; closing anyway", grace)
        self.ae.shutdown()  # aborts the associations still open (their senders resend what was not acknowledged)
        self.handler.shutdown()
        self._server = None


def _on_echo(event) -> int:
    log.debug("C-ECHO from %s", _calling(event))
    return SUCCESS


class _ResponseGate:
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
        self.assoc_socket.event_queue.put("Evt17")  # transport closed, as pynetdicom's send reports it


def _tune_socket(raw: socket.socket, assoc_socket) -> None:
    """TCP_NODELAY now; TCP_QUICKACK before each read (Linux clears it after every ACK)."""
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.debug("TCP_NODELAY not set: %s", exc)
        return
    # Replace this one socket's reader (not pynetdicom's class): re-arm QUICKACK and read
    # straight into one buffer instead of 4 KiB pieces.
    assoc_socket.recv = _QuickAckReader(raw)


class _QuickAckReader:
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
