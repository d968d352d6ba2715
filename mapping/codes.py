"""Coded values: DICOM coding scheme designators → FHIR systems, Coding/CodeableConcept builders.

DICOM codes carry a short designator (PS3.16 8.2); FHIR needs a URI. The well-known
designators map to their FHIR systems; any other keeps its information as
``urn:dicom:coding-scheme:<designator>`` (a valid URI, never a bare designator).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydicom.sr._snomed_dict import mapping as _SNOMED_MAPPING

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"

DESIGNATOR_SYSTEMS: Mapping[str, str] = MappingProxyType({
    "DCM": DCM_SYSTEM,
    "SCT": SNOMED_SYSTEM,
    "SRT": SNOMED_SYSTEM,
    "LN": "http://loinc.org",
    "RADLEX": "http://www.radlex.org",
    "UCUM": "http://unitsofmeasure.org",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
})

# SNOMED RT identifiers (SRT, e.g. "T-D3000") are not SNOMED CT concept ids: translated
# with pydicom's SRT → SCT table; an untranslatable one keeps its own scheme.
_SRT_TO_SCT: Mapping[str, str] = MappingProxyType(dict(_SNOMED_MAPPING.get("SRT", {})))
_SCTID = re.compile(r"[1-9][0-9]{5,17}")
_DESIGNATOR_CHARS = re.compile(r"[^A-Za-z0-9._\-]")


@dataclass(frozen=True, slots=True)
class CodedValue:
    """One item of a DICOM code sequence (PS3.3 Table 8.8-1), decoded."""

    value: str
    designator: str = ""
    meaning: str = ""
    version: str = ""


def system_for(designator: str) -> str:
    """The FHIR system URI for a DICOM coding scheme designator."""
    designator = designator.strip()
    known = DESIGNATOR_SYSTEMS.get(designator.upper())
    if known is not None:
        return known
    return "urn:dicom:coding-scheme:" + _DESIGNATOR_CHARS.sub("_", designator or "unknown")


def coding(code: CodedValue) -> dict[str, Any]:
    """A FHIR Coding (JSON dict) for a DICOM code."""
    designator, value = code.designator.strip(), code.value.strip()
    if designator.upper() == "SRT":
        translated = _SRT_TO_SCT.get(value)
        if translated is not None:
            value = translated
        elif not _SCTID.fullmatch(value):
            # a SNOMED RT id under the SCT system would be a wrong code
            return _coding("urn:dicom:coding-scheme:SRT", value, code.meaning, code.version)
    return _coding(system_for(designator), value, code.meaning, code.version)


def _coding(system: str, value: str, meaning: str, version: str) -> dict[str, Any]:
    result: dict[str, Any] = {"system": system}
    if version.strip():
        result["version"] = version.strip()
    if value:
        result["code"] = value
    if meaning.strip():
        result["display"] = meaning.strip()
    return result


def codeable_concept(codes: tuple[CodedValue, ...] | list[CodedValue], text: str = "") -> dict[str, Any] | None:
    """A CodeableConcept from codes (and/or text); None when there is neither."""
    concept: dict[str, Any] = {}
    codings = [coding(c) for c in codes if c.value.strip()]
    if codings:
        concept["coding"] = codings
    if text.strip():
        concept["text"] = text.strip()
    return concept or None
