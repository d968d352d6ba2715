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
import time

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from scp.config import NodeConfig, SecurityConfig
from scp.receive import transport
from scp.receive.access import AccessPolicy
from scp.receive.handlers import StoreHandler, handle_echo
from scp.receive.limits import ConnectionLimits
from scp.receive.tls import TlsHandshake, tls_context
from scp.senders import SenderTable

log = logging.getLogger("scp.receive.server")

STOP_POLL = 0.05  # s between looks at the instances still in flight during a stop
CLOSE_WAIT = 1.0  # s a stop waits for the aborted connections' threads to end (they log)


class StorageServer:
    """The AE and its listening socket. `start()` returns the bound (address, port)."""

    def __init__(self, node: NodeConfig, security: SecurityConfig, handler: StoreHandler,
                 senders: SenderTable | None = None) -> None:
        """senders: the [[senders]] table (SenderTable.from_config); None = no entries, every AE title allowed
        (the security allow-lists still apply)."""
        self.node = node
        self.policy = AccessPolicy.from_config(node, security, senders)
        self.ssl_context = tls_context(security)
        self.handler = handler
        self.limits = ConnectionLimits(node)
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
        if self.ssl_context is not None:
            # Before the socket is tuned; no ssl_context for pynetdicom (scp.receive.tls says why).
            handlers.insert(0, (evt.EVT_CONN_OPEN, TlsHandshake(self.ssl_context, self.node.tls_handshake_timeout)))
        self._server = self.ae.start_server((self.node.bind, self.node.port), block=False,
                                            evt_handlers=handlers)
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
