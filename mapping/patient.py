"""The Patient resource and its identifier (Patient module → FHIR Patient)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from mapping.datetimes import fhir_date
from mapping.names import PersonName, human_names
from mapping.options import MappingOptions
from mapping.systems import as_system

IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
GENDERS = MappingProxyType({"M": "male", "F": "female", "O": "other"})


def identifier_system(issuer_of_patient_id: str, options: MappingOptions, warnings: list[str]) -> str | None:
    """Patient.identifier.system: IssuerOfPatientID when configured to use it, else the configured system."""
    issuer = issuer_of_patient_id.strip()
    if options.use_issuer_of_patient_id and issuer:
        system = as_system(issuer)
        if system is not None:
            return system
        warnings.append("IssuerOfPatientID (0010,0021): neither an OID nor a URI, so no identifier system; "
                        "the configured system is used")
    return options.patient_identifier_system


def patient_identifier(patient_id: str, issuer_of_patient_id: str, options: MappingOptions,
                       warnings: list[str]) -> dict[str, Any] | None:
    """Patient.identifier from PatientID; None without a PatientID (FHIR forbids empty strings)."""
    value = patient_id.strip()
    if not value:
        return None
    identifier: dict[str, Any] = {"type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "MR"}]}}
    system = identifier_system(issuer_of_patient_id, options, warnings)
    if system:
        identifier["system"] = system
    identifier["value"] = value
    return identifier


def gender(patient_sex: str, warnings: list[str]) -> str:
    value = patient_sex.strip()
    if value in GENDERS:
        return GENDERS[value]
    if value:
        warnings.append("PatientSex (0010,0040): non-standard value, gender set to unknown")
    return "unknown"


def patient_json(identifier: dict[str, Any] | None, name: PersonName | None, patient_sex: str,
                 birth_date: str, warnings: list[str]) -> dict[str, Any]:
    """The Patient as a JSON dict (no id: the bundle refers to it by its fullUrl)."""
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if identifier is not None:
        patient["identifier"] = [identifier]
    names = human_names(name)
    if names:
        patient["name"] = names
    patient["gender"] = gender(patient_sex, warnings)
    birth = fhir_date(birth_date, warnings, tag="PatientBirthDate (0010,0030)")
    if birth is not None:
        patient["birthDate"] = birth
    return patient
