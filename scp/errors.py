"""Errors raised by the node's delivery path.

A sink raises `DeliveryRetryable` for a fault that may go away (network down,
timeout, 408, 429, 5xx): the study stays in the spool and is tried again with
backoff. It raises `DeliveryRejected` for a fault that will not go away by
itself (another 4xx, a patient mismatch): the study moves to the dead-letter
folder with the reason and whatever documents explain it.
"""

from __future__ import annotations

from mapping.errors import DicomFhirError


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
    """

    def __init__(self, message: str, *, documents: dict[str, bytes] | None = None) -> None:
        super().__init__(message)
        self.documents = dict(documents or {})
