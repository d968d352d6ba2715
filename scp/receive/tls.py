"""DICOM TLS (PS3.15 B.1): the server's context, and the handshake on each connection's own thread.

pynetdicom runs the handshake where connections are accepted, one at a time and
without a timeout: a peer that connects and stays silent kept every other sender out,
and a failed handshake left no trace. The node gives pynetdicom no ssl_context and
runs the handshake itself, at EVT_CONN_OPEN, with the ACSE timeout; a failed
handshake closes the connection, logged.
"""

from __future__ import annotations

import logging
import ssl

from scp.config import SecurityConfig
from scp.errors import ConfigurationError
from scp.receive import transport

log = logging.getLogger("scp.receive.tls")


def tls_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The server's TLS context when security.tls_cert/tls_key are set."""
    if security.tls_cert is None or security.tls_key is None:
        return None
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


class TlsHandshake:
    """EVT_CONN_OPEN handler (before the socket is tuned): wrap the connection in TLS."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        self.context = context
        self.timeout = timeout

    def __call__(self, event) -> None:
        peer = "%s:%s" % tuple(event.address[:2])
        try:
            transport.wrap_in_tls(event, self.context, self.timeout)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s; connection closed", peer, exc)
            transport.close_connection(event)
