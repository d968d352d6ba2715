"""The project's exceptions.

One root (`DicomFhirError`) so callers can catch everything the project raises
on purpose; anything else escaping is a bug. `scp` reuses this root.
"""

from __future__ import annotations


class DicomFhirError(Exception):
    """Root of every error the project raises on purpose."""


class ConfigurationError(DicomFhirError):
    """A configuration value is missing or invalid (raised at start-up)."""


class MappingError(DicomFhirError):
    """A DICOM dataset cannot be mapped to FHIR.

    The message names the study, the instance and the tag where known.
    """


class PatientMismatchError(MappingError):
    """Instances (or parts) of one study disagree on PatientID.

    Never merged into one subject: the study is held back (dead-letter).
    """


class MultipleStudiesError(MappingError):
    """A call that expects one study got several (the message names the UIDs)."""
