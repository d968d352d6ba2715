"""Options that change what the mapping produces (validated on construction)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mapping.errors import ConfigurationError
from mapping.systems import is_absolute_uri

Shape = Literal["bundle", "contained"]
SHAPES: tuple[str, ...] = ("bundle", "contained")
FhirVersion = Literal["R4", "R5"]
FHIR_VERSIONS: tuple[str, ...] = ("R4", "R5")


@dataclass(frozen=True)
class MappingOptions:
    """How DICOM values become FHIR values.

    patient_identifier_system: system of Patient.identifier (a URI); None = no system.
    use_issuer_of_patient_id: take the system from IssuerOfPatientID (0010,0021) when
        present (an OID becomes ``urn:oid:...``), falling back to patient_identifier_system.
    accession_system: system for the accession identifier when the dataset has no
        IssuerOfAccessionNumberSequence.
    timezone: IANA zone for DICOM times without TimezoneOffsetFromUTC; None = date precision only.
    dicomweb_url: DICOMweb root URL; when set an Endpoint is produced and referenced.
    issuer_systems: IssuerOfPatientID value -> identifier system (a URI), for issuers that are
        local names ("HOSP_A") rather than OIDs or URIs (as dcm4chee's fhirSystemByIssuerOfPatientID);
        used for PatientID and OtherPatientIDsSequence items alike.
    fhir_version: "R4" (4.0.1, the default) or "R5" (5.0.0): which FHIR release the resources follow
        (mapping/README.md, section R5). The node sets it from the configuration's fhir.version.
    """

    patient_identifier_system: str | None = None
    use_issuer_of_patient_id: bool = False
    accession_system: str | None = None
    timezone: str | None = None
    dicomweb_url: str | None = None
    issuer_systems: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    fhir_version: str = "R4"

    def __post_init__(self) -> None:
        if self.fhir_version not in FHIR_VERSIONS:
            raise ConfigurationError(f"fhir_version: expected one of {', '.join(FHIR_VERSIONS)}, "
                                     f"got {self.fhir_version!r}")
        if not isinstance(self.issuer_systems, Mapping):
            raise ConfigurationError(f"issuer_systems: expected a table of IssuerOfPatientID = system URI, "
                                     f"got {self.issuer_systems!r}")
        for issuer, system in self.issuer_systems.items():
            if not isinstance(issuer, str) or not issuer.strip():
                raise ConfigurationError(f"issuer_systems: an issuer must be a non-empty string, got {issuer!r}")
            if not isinstance(system, str) or not is_absolute_uri(system):
                raise ConfigurationError(f"issuer_systems.{issuer}: must be an absolute URI (e.g. urn:oid:1.2.3), "
                                         f"got {system!r}")
        # frozen: a read-only copy, so options stay immutable values
        object.__setattr__(self, "issuer_systems", MappingProxyType(dict(self.issuer_systems)))
        if self.timezone is not None:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ConfigurationError(
                    f"timezone: {self.timezone!r} is not an IANA time zone name"
                ) from exc
        for name in ("patient_identifier_system", "accession_system", "dicomweb_url"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigurationError(f"{name}: must be a non-empty string or absent, got {value!r}")
        for name in ("patient_identifier_system", "accession_system"):
            value = getattr(self, name)
            if value is not None and not is_absolute_uri(value):
                # FHIR requires an absolute URI; a bare name would get every study refused by the server.
                raise ConfigurationError(f"{name}: must be an absolute URI (e.g. urn:oid:1.2.3 or "
                                         f"https://hospital.example/mrn), got {value!r}")
        if self.dicomweb_url is not None and not self.dicomweb_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"dicomweb_url: must be an http(s) URL, got {self.dicomweb_url!r}")
