"""The Patient resource and its identifier (Patient module → FHIR Patient)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from mapping.datetimes import fhir_date
from mapping.header import PatientIdentity
from mapping.names import PersonName, human_names
from mapping.options import MappingOptions
from mapping.systems import as_system

IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
GENDERS = MappingProxyType({"M": "male", "F": "female", "O": "other"})


def issuer_system(identity: PatientIdentity, options: MappingOptions) -> str | None:
    """The system a patient ID's issuer stands for (README section 3), None when it gives none:
    IssuerOfPatientID listed in ``issuer_systems`` (always consulted: it is configuration);
    else, with ``use_issuer_of_patient_id``, IssuerOfPatientID as an OID, UUID or URI, else the
    UniversalEntityID of IssuerOfPatientIDQualifiersSequence (with its type)."""
    issuer = identity.issuer.strip()
    if issuer in options.issuer_systems:
        return options.issuer_systems[issuer]
    if not options.use_issuer_of_patient_id:
        return None
    system = as_system(issuer) if issuer else None
    if system is None and identity.qualifiers is not None and identity.qualifiers.universal:
        system = as_system(identity.qualifiers.universal, identity.qualifiers.universal_type)
    return system


def identifier_system(identity: PatientIdentity, options: MappingOptions, warnings: list[str]) -> str | None:
    """The system of the PRIMARY identifier (PatientID): the issuer's (issuer_system), else the
    configured patient_identifier_system; a bare issuer name is reported as a warning."""
    system = issuer_system(identity, options)
    if system is not None:
        return system
    if options.use_issuer_of_patient_id:
        if identity.issuer.strip():
            warnings.append("IssuerOfPatientID (0010,0021): neither an OID nor a URI, so no identifier system; "
                            "the configured system is used")
        elif identity.qualifiers is not None and identity.qualifiers.universal:
            warnings.append("IssuerOfPatientIDQualifiersSequence (0010,0024): UniversalEntityID neither an OID "
                            "nor a URI, so no identifier system; the configured system is used")
    return options.patient_identifier_system


def _identifier_type(identity: PatientIdentity) -> dict[str, Any]:
    """v2-0203: the qualifiers' IdentifierTypeCode (0040,0035) when sent, else MR."""
    code = identity.qualifiers.type_code if identity.qualifiers is not None else ""
    return {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": code or "MR"}]}


def _identifier(identity: PatientIdentity, system: str | None) -> dict[str, Any]:
    identifier: dict[str, Any] = {"type": _identifier_type(identity)}
    if system:
        identifier["system"] = system
    identifier["value"] = identity.patient_id.strip()
    return identifier


def patient_identifier(identity: PatientIdentity, options: MappingOptions,
                       warnings: list[str]) -> dict[str, Any] | None:
    """The primary Patient.identifier, from PatientID; None without a PatientID (FHIR forbids
    empty strings). It is what the Patient is matched on (ifNoneExist, merges, the sinks)."""
    if not identity.patient_id.strip():
        return None
    return _identifier(identity, identifier_system(identity, options, warnings))


def other_identifiers(identities: tuple[PatientIdentity, ...], primary: dict[str, Any], options: MappingOptions,
                      warnings: list[str]) -> list[dict[str, Any]]:
    """Further Patient.identifier entries from OtherPatientIDsSequence (0010,1002) items, in their
    order: each with its own issuer's system (issuer_system). An item whose issuer gives no system
    is left out with a warning (a bare value would pass for the primary namespace's); one equal
    to an identifier already present (same system and value) is left out silently.

    Unless issuers are configured to give systems (use_issuer_of_patient_id or issuer_systems),
    no item can have one: the sequence is then not used at all, silently (as before issue #11).
    """
    if not options.use_issuer_of_patient_id and not options.issuer_systems:
        return []
    seen = {(primary.get("system"), primary["value"])}
    result = []
    for identity in identities:
        value = identity.patient_id.strip()
        if not value:
            continue
        system = issuer_system(identity, options)
        if system is None:
            warnings.append("OtherPatientIDsSequence (0010,1002): an item's IssuerOfPatientID gives no identifier "
                            "system (not in issuer_systems, nor a usable OID or URI), item left out")
            continue
        if (system, value) not in seen:
            seen.add((system, value))
            result.append(_identifier(identity, system))
    return result


def gender(patient_sex: str, warnings: list[str]) -> str:
    value = patient_sex.strip()
    if value in GENDERS:
        return GENDERS[value]
    if value:
        warnings.append("PatientSex (0010,0040): non-standard value, gender set to unknown")
    return "unknown"


def patient_json(identifiers: list[dict[str, Any]], name: PersonName | None, patient_sex: str,
                 birth_date: str, warnings: list[str]) -> dict[str, Any]:
    """The Patient as a JSON dict (no id: the bundle refers to it by its fullUrl)."""
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if identifiers:
        patient["identifier"] = identifiers
    names = human_names(name)
    if names:
        patient["name"] = names
    patient["gender"] = gender(patient_sex, warnings)
    birth = fhir_date(birth_date, warnings, tag="PatientBirthDate (0010,0030)")
    if birth is not None:
        patient["birthDate"] = birth
    return patient
