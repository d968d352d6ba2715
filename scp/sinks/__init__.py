"""Where a completed study goes: the sink protocol shared by the disk and FHIR sinks.

A sink takes one study's resources (a whole study, or a further part of one) and
merges them into what it already holds: delivering the same part twice changes
nothing, and a later part never replaces an earlier one by less. It returns a short
human-readable result ("wrote fhir-output/1.2.3.json", "ImagingStudy/17 updated"),
raises scp.errors.DeliveryRetryable for a fault that may go away and
scp.errors.DeliveryRejected for one that will not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mapping import StudyResources


class Sink(Protocol):
    name: str  # short and unique among the node's sinks: "disk", "fhir"

    def deliver(self, resources: "StudyResources") -> str: ...
