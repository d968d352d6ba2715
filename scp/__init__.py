"""dicom-fhir-scp: the network node (Storage SCP, spool, completion, delivery) and its commands.

Data flows one way: receive (or a folder) → store → pipeline → mapping → sinks. Each
sub-package is a layer and imports only from the layers below it (tests/test_layers.py
checks it):

    scp.errors, scp.config   what every layer shares: the exception tree, the configuration
    scp.web                  bounded HTTP (deadline, size cap, redirects within the base URL)
    scp.dicom                DICOM bytes: the one element walker
    scp.store                what is kept on disk: layout, durable files, spool file format,
                             spool, dead letter, journal
    scp.ops                  metrics, the /healthz and /metrics endpoint, the `status` report
    scp.sinks                where a completed study goes: the disk (scp.sinks.disk), a FHIR
                             server (scp.sinks.fhir)
    scp.pipeline             completion timers, work done ahead, the retry policy, delivery
    scp.receive              the DICOM side: access policy, TLS, handlers, status table, the
                             receive workers (pool: the coordinator's side, worker: the process), and
                             scp.receive.transport, the one module that touches pynetdicom internals
    scp.sources              instances from a folder of files (`convert`)
    scp.sources.dicomweb     studies pulled from a DICOMweb server (`sync`): client, windows,
                             checkpoint, backfill, follow, deletes
    scp.node                 the node assembled
    scp.commands, scp.cli    the command line

The on-disk layout, shared by the node, `status` and `retry`, is scp.store.layout.
The mapping itself (DICOM → FHIR, pure) is the `mapping` package; its contract is
mapping/README.md.
"""

import logging as _logging

# A library logs through its own loggers and leaves the handlers to the application
# (the command line configures them in scp.cli).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


__version__ = "0.1.0"
