"""pynetdicom as the sending side of the fault, load and TLS tests.

`associate` opens an association whose C-STORE statuses can be trusted under load:
pynetdicom 3.0's requestor reactor can take a response off the DIMSE queue in the
instant `send_c_store` pauses it (its pause check races with the reactor's loop);
the response is then logged as "Received unexpected C-STORE service message" and
`send_c_store` waits for the DIMSE timeout. The patch puts such a message back where
`send_c_store` waits for it.
"""

from __future__ import annotations

import ssl

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage


def associate(port: int, *, calling: str = "PYSCU", called: str = "FHIRSCP", timeout: float = 30,
              contexts: list[tuple[str, str]] | None = None, tls: ssl.SSLContext | None = None) -> Association:
    """An association to 127.0.0.1:port (check is_established). Default context: CT in Explicit VR LE,
    the syntax tests/dicomgen.py writes files in (so they can go out as they are)."""
    ae = AE(ae_title=calling)
    for abstract, syntax in contexts or [(CTImageStorage, ExplicitVRLittleEndian)]:
        ae.add_requested_context(abstract, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout  # TLS handshake too
    assoc = ae.associate("127.0.0.1", port, ae_title=called,
                         tls_args=(tls, "localhost") if tls is not None else None)
    return keep_responses(assoc)


def keep_responses(assoc: Association) -> Association:
    """Apply the patch described above to an association (a no-op when it was refused)."""
    if assoc.is_established:
        assoc._serve_request = lambda msg, context_id: assoc.dimse.msg_queue.put((context_id, msg))
    return assoc
