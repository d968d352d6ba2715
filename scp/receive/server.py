"""The pynetdicom AE serving C-ECHO and C-STORE, and its listening socket.

- Association policy (scp.receive.access): a refused association gets an
  A-ASSOCIATE-RJ and a log line with the reason. Optional DICOM TLS (scp.receive.tls).
- Storage for every storage SOP class pynetdicom knows, in every transfer syntax
  pydicom knows (compressed included: pixel data is never decoded); unknown/private
  classes only with node.accept_unknown_sop_classes.
- The handlers (scp.receive.handlers) and the socket tuning (scp.receive.transport)
  are bound to the AE's events here.
- Connection limits and the A-ASSOCIATE-RQ timeout (scp.receive.limits); every timeout is a
  node.* key. `stop` ends every connection within its grace, whatever the peers do.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from scp.config import Config, NodeConfig, SecurityConfig
from scp.ops.metrics import Metrics
from scp.receive import transport
from scp.receive.access import AccessPolicy
from scp.receive.handlers import OnStored, StoreHandler, handle_echo
from scp.receive.limits import AdmissionTable, ConnectionLimits, FloodReporter
from scp.receive.tls import TlsHandshake, tls_context
from scp.senders import SenderTable
from scp.store.spool import Spool

log = logging.getLogger("scp.receive.server")

STOP_POLL = 0.05  # s between looks at the instances still in flight during a stop
CLOSE_WAIT = 1.0  # s a stop waits for the aborted connections' threads to end (they log)


class StorageServer:
    """The AE and its listening socket. `start()` returns the bound (address, port)."""

    def __init__(self, node: NodeConfig, security: SecurityConfig, handler: StoreHandler,
                 senders: SenderTable | None = None, *, reuse_port: bool = False,
                 handed_over: socket.socket | None = None, admissions: AdmissionTable | None = None,
                 flood_log: FloodReporter | None = None, on_closed: Callable[[object], None] | None = None) -> None:
        """senders: the [[senders]] table (SenderTable.from_config); None = no entries, every AE title allowed
        (the security allow-lists still apply).

        A receive worker's server (scp.receive.worker) shares the node's port (reuse_port: SO_REUSEPORT;
        handed_over: connections passed in on this AF_UNIX socket), counts its associations in the
        node's table (admissions) and floods in its log (flood_log), and reports each closed
        connection (on_closed(event))."""
        self.reuse_port = reuse_port
        self.handed_over = handed_over
        self.on_closed = on_closed
        self.node = node
        self.policy = AccessPolicy.from_config(node, security, senders)
        self.ssl_context = tls_context(security)
        self.handler = handler
        self.limits = ConnectionLimits(node, admissions=admissions, flood_log=flood_log)
        self.ae = self._build_ae()
        self._server = None
        self._gate = None

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        # The policy is ours (on_requested logs the reason); pynetdicom's own checks stay off.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_pdu_size = self.node.max_pdu
        # Counted by scp.receive.limits (pynetdicom's own count includes silent connections).
        ae.maximum_associations = transport.UNLIMITED_ASSOCIATIONS
        ae.network_timeout = self.node.network_timeout
        ae.acse_timeout = self.node.acse_timeout
        ae.dimse_timeout = self.node.dimse_timeout
        syntaxes = list(AllTransferSyntaxes)
        ae.add_supported_context(Verification, syntaxes)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        transport.allow_unknown_storage_classes(self.node.accept_unknown_sop_classes)
        return ae

    def start(self) -> tuple[str, int]:
        handlers = [
            (evt.EVT_CONN_OPEN, self.handler.connected),
            (evt.EVT_CONN_OPEN, self.limits.connected),  # after `connected`: wraps the tuned reader
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self.handler.opened),
            (evt.EVT_CONN_CLOSE, self.handler.closed),
            (evt.EVT_CONN_CLOSE, self.limits.closed),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.handler),
        ]
        if self.on_closed is not None:
            handlers.append((evt.EVT_CONN_CLOSE, self.on_closed))
        if self.ssl_context is not None:
            # Before the socket is tuned; no ssl_context for pynetdicom (scp.receive.tls says why).
            handlers.insert(0, (evt.EVT_CONN_OPEN, TlsHandshake(self.ssl_context, self.node.tls_handshake_timeout)))
        self._server = transport.start_server(self.ae, (self.node.bind, self.node.port), handlers,
                                              reuse_port=self.reuse_port, handed_over=self.handed_over)
        transport.harden_server(self._server)
        # Silent and half-sent requests wait on one thread, not two each (scp.receive.transport says why).
        self._gate = transport.RequestGate(self._server, self.node.request_timeout,
                                           whole_request=self.ssl_context is None,
                                           on_timeout=self.limits.request_timed_out).start()
        host, port = self._server.server_address[:2]
        log.info("listening on %s:%d as %s%s", host or "*", port, self.node.ae_title,
                 " (DICOM TLS)" if self.ssl_context else "")
        return host, port

    @property
    def is_listening(self) -> bool:
        """Started and not stopped (pynetdicom's server thread accepts associations)."""
        return self._server is not None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling, called = transport.requested_ae_titles(assoc)
        address = str(assoc.requestor.address)
        refusal = self.policy.check(calling, called, address)
        if refusal is None:
            refusal = self.limits.admit(assoc)  # logs its own refusals, rate-limited
            if refusal is not None:
                transport.reject(assoc, refusal[0])
            return
        rsd, reason = refusal
        log.warning("association from %s at %s (called %s) rejected: %s", calling.strip(), address,
                    called.strip(), reason,
                    extra={"calling_aet": calling.strip(), "peer": f"{address}:{assoc.requestor.port}"})
        transport.reject(assoc, rsd)

    def stop(self, grace: float | None = None) -> None:
        """Stop listening at once, let the instances in flight finish within `grace` seconds
        (node.stop_grace), then end every connection still open, whatever its peer does."""
        if self._server is None:
            return
        grace = self.node.stop_grace if grace is None else grace
        deadline = time.monotonic() + grace
        transport.stop_accepting(self._server)  # no new associations; never waits for a connection
        self._server = None
        if self._gate is not None:
            self._gate.stop()  # the connections that have not asked for an association yet
        if not self._wait_in_flight(deadline):
            log.warning("an instance was still being received or stored after %g s (node.stop_grace); "
                        "closing its association anyway (the sender resends what was not acknowledged)", grace)
        open_now = transport.active_associations(self.ae)
        for assoc in open_now:
            transport.force_close(assoc)
        ends = time.monotonic() + CLOSE_WAIT
        for assoc in open_now:  # their close lines are worth waiting a moment for, not longer
            assoc.join(max(ends - time.monotonic(), 0))
        self.handler.shutdown()  # the fsyncs already started finish (their instances were answered or not)
        self.limits.flush()

    def _wait_in_flight(self, deadline: float) -> bool:
        """Until no C-STORE is being handled and no association is in the middle of an instance."""
        while True:
            busy = [a for a in transport.active_associations(self.ae) if transport.instance_in_progress(a)]
            remaining = deadline - time.monotonic()
            if not busy and self.handler.wait_idle(max(min(remaining, STOP_POLL), 0)):
                if not any(transport.instance_in_progress(a) for a in transport.active_associations(self.ae)):
                    return True
            if remaining <= 0:
                return False
            time.sleep(min(STOP_POLL, remaining))


def receiver(config: Config, spool: Spool, on_stored: OnStored, *, archive: Spool | None = None,
             metrics: Metrics | None = None, **listening) -> StorageServer:
    """The node's DICOM side as the configuration says: the C-STORE handler on `spool` (and the
    archive), its AE. The node's own process (scp.node) and each receive worker (scp.receive.worker)
    build it here; `listening` goes to StorageServer (how a worker shares the port)."""
    node = config.node
    # Large data sets arrive into a hidden folder on the file system they end on: the archive's
    # (it takes them by rename), else the spool's.
    handler = StoreHandler(spool, on_stored, archive=archive, metrics=metrics, incoming=incoming_folder(node),
                           max_header=node.max_header_bytes)
    return StorageServer(node, config.security, handler, SenderTable.from_config(config), **listening)


def incoming_folder(node: NodeConfig) -> Path:
    """Where data sets arrive before they are stored (scp.receive.dataset)."""
    return (node.archive_dir if node.archive_dir is not None else node.spool_dir) / ".incoming"
