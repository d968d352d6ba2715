"""The pynetdicom AE serving C-ECHO and C-STORE, and its listening socket.

- Association policy (scp.receive.access): a refused association gets an
  A-ASSOCIATE-RJ and a log line with the reason. Optional DICOM TLS (scp.receive.tls).
- Storage for every storage SOP class pynetdicom knows, in every transfer syntax
  pydicom knows (compressed included: pixel data is never decoded); unknown/private
  classes only with node.accept_unknown_sop_classes.
- The handlers (scp.receive.handlers) and the socket tuning (scp.receive.transport)
  are bound to the AE's events here.
"""

from __future__ import annotations

import logging

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from scp.config import NodeConfig, SecurityConfig
from scp.receive import transport
from scp.receive.access import AccessPolicy
from scp.receive.handlers import StoreHandler, handle_echo
from scp.receive.tls import TlsHandshake, tls_context
from scp.senders import SenderTable

log = logging.getLogger("scp.receive.server")

MAX_ASSOCIATIONS = 64
NETWORK_TIMEOUT = 60  # seconds
ACSE_TIMEOUT = 30
DIMSE_TIMEOUT = 60


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
        self.ae = self._build_ae()
        self._server = None

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        # The policy is ours (on_requested logs the reason); pynetdicom's own checks stay off.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_pdu_size = self.node.max_pdu
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.network_timeout = NETWORK_TIMEOUT
        ae.acse_timeout = ACSE_TIMEOUT
        ae.dimse_timeout = DIMSE_TIMEOUT
        syntaxes = list(AllTransferSyntaxes)
        ae.add_supported_context(Verification, syntaxes)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        transport.allow_unknown_storage_classes(self.node.accept_unknown_sop_classes)
        return ae

    def start(self) -> tuple[str, int]:
        handlers = [
            (evt.EVT_CONN_OPEN, self.handler.connected),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self.handler.opened),
            (evt.EVT_CONN_CLOSE, self.handler.closed),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.handler),
        ]
        if self.ssl_context is not None:
            # Before the socket is tuned; no ssl_context for pynetdicom (scp.receive.tls says why).
            handlers.insert(0, (evt.EVT_CONN_OPEN, TlsHandshake(self.ssl_context, self.ae.acse_timeout)))
        self._server = self.ae.start_server((self.node.bind, self.node.port), block=False,
                                            evt_handlers=handlers)
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
            return
        rsd, reason = refusal
        log.warning("association from %s at %s (called %s) rejected: %s", calling.strip(), address,
                    called.strip(), reason,
                    extra={"calling_aet": calling.strip(), "peer": f"{address}:{assoc.requestor.port}"})
        transport.reject(assoc, rsd)

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
