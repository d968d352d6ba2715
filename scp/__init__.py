"""dicom-fhir-scp: the network node (Storage SCP, spool, completion, delivery).

Data flows one way: receive → spool → completed study → mapping → sinks.

    scp.receive.server      pynetdicom AE: association policy (AE titles, addresses, TLS),
                    C-ECHO and C-STORE handlers that always return a DIMSE status,
                    TCP_NODELAY/TCP_QUICKACK on every accepted socket
    scp.store.spool       durable per-study store of instance headers (fsync before the
                    success status); removal of what was delivered, nothing else
    scp.pipeline.completion  per-study idle timers (clock passed in): a study is complete when
                    no instance arrived for idle_timeout seconds
    scp.pipeline.delivery    worker off the receiving path: completed study → mapping → every
                    sink; DeliveryRetryable → backoff, DeliveryRejected → dead letter
    scp.store.dead_letter set-aside studies with their reason and documents; `retry`
    scp.sinks.disk   <output_dir>/<StudyInstanceUID>.json, merged, written atomically
    scp.sinks.fhir.sink   FHIR server delivery (scp.sinks.fhir.client, scp.sinks.fhir.auth)
    scp.sources.folder     the same mapping fed from a folder of files (`convert`)

On-disk layout (shared by the node, `status` and `retry`):

    <spool_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm
        one header-only DICOM Part 10 file per received instance (pixel data and
        other bulk data left out), written to a temporary name, renamed, fsync'ed
        (one fsync makes content and name durable on ext4/XFS) before the success status
    <dead_letter_dir>/<StudyInstanceUID>/
        reason.txt, the instance headers (instances/), and the documents that explain
        the reason (bundle.json sent, outcome.json received)
    <spool_dir>/deliveries.jsonl
        one JSON line per finished delivery (time, study, instances, sink results)
"""

__version__ = "0.1.0"
