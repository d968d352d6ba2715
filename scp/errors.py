"""The project's exceptions: one root, `DicomFhirError`, for everything raised on purpose.

The root lives in mapping.errors because mapping/ is the bottom layer and imports
nothing from scp/; it is re-exported here so the node's modules and callers of the
node import their errors from one place. Anything else escaping is a bug.

    DicomFhirError
        ConfigurationError      a configuration value is missing or invalid (start-up)
        MappingError            a DICOM data set cannot be mapped (mapping.errors)
            PatientMismatchError, MultipleStudiesError
        BadInstance             a received data set cannot be spooled (scp.receive.dataset)
        UnusableFileError       a file of a folder cannot be converted (scp.sources.folder)
        UnusableOutputError     an existing output file cannot be merged (scp.sinks.disk)
        DeliveryError           a completed study could not be delivered by a sink
            DeliveryRetryable   a fault that may go away: the study stays in the spool, retried
            DeliveryRejected    a fault that will not: the study goes to the dead letter

A sink raises `DeliveryRetryable` for a fault that may go away (network down,
timeout, 408, 429, 5xx): the study stays in the spool and is tried again with
backoff. It raises `DeliveryRejected` for a fault that will not go away by
itself (another 4xx, a patient mismatch): the study moves to the dead-letter
folder with the reason and whatever documents explain it.
"""

from __future__ import annotations

from mapping.errors import ConfigurationError, DicomFhirError, MappingError, PatientMismatchError

__all__ = ["DicomFhirError", "ConfigurationError", "MappingError", "PatientMismatchError", "DeliveryError",
           "DeliveryRetryable", "DeliveryRejected"]


class DeliveryError(DicomFhirError):
    """A completed study could not be delivered by a sink."""


class DeliveryRetryable(DeliveryError):
    """Transient failure; try again later.

    `retry_after` (seconds) is a lower bound from the peer (HTTP Retry-After).
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeliveryRejected(DeliveryError):
    """Permanent failure; set the study aside (dead-letter) with this reason.

    `documents` maps file names to bytes kept beside the study in the
    dead-letter folder (e.g. ``bundle.json`` sent, ``outcome.json`` received).
    The message is logged at ERROR and is the first line of reason.txt, so it never
    quotes patient names or IDs; `details` is text that may (a server's diagnostics):
    it goes to reason.txt after the first line and to DEBUG only.
    """

    def __init__(self, message: str, *, documents: dict[str, bytes] | None = None, details: str = "") -> None:
        super().__init__(message)
        self.documents = dict(documents or {})
        self.details = details
