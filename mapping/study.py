"""One study's instances → its FHIR resources (Patient, ImagingStudy, Endpoint).

The canonical form (StudyResources) refers from the ImagingStudy to the Patient and the
Endpoint by ``urn:uuid:`` fullUrls derived (uuid5) from the study UID and the endpoint
address, so converting the same instances again gives byte-identical output.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from mapping.endpoint import address_identifier, endpoint_json
from mapping.errors import MappingError, MultipleStudiesError, PatientMismatchError
from mapping.fhirjson import validated
from mapping.header import InstanceHeader, PatientIdentity
from mapping.imaging_study import MAX_UNSIGNED_INT, first, first_number, imaging_study_json
from mapping.options import MappingOptions
from mapping.patient import identifier_system, other_identifiers, patient_identifier, patient_json
from mapping.selection import selections_json, validate_selection
from mapping.r5 import endpoint_r5, imaging_study_r5, patient_r5

# Fixed namespace of this project's uuid5 fullUrls (never change: it would change every output).
NAMESPACE = uuid.UUID("0b7b8f4e-5c8a-5d1e-9a51-6d1c0f9c4a11")


def patient_url(study_uid: str) -> str:
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, 'Patient/' + study_uid)}"


def imaging_study_url(study_uid: str) -> str:
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, 'ImagingStudy/' + study_uid)}"


def endpoint_url(address: str) -> str:
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, 'Endpoint/' + address)}"


def endpoint_reference(address: str) -> dict[str, Any]:
    """The canonical Reference to the Endpoint at address: its fullUrl and its identifier."""
    return {"reference": endpoint_url(address), "identifier": address_identifier(address)}


@dataclass(frozen=True)
class StudyResources:
    """One study's resources in canonical form (module docstring), as FHIR JSON dicts: what
    fhir.resources' ``model_dump_json(exclude_none=True)`` gives for them, so they render
    without a model; ``validate_resources`` checks them against R4 where they leave.

    endpoints: the Endpoints the study can be retrieved from (a union over its parts and
    re-conversions, first one first), each referenced from the study and its series.
    warnings: values dropped or replaced, for the caller to log (no patient names or IDs).
    selections: R5 ImagingSelections (mapping.selection) of the study's KOS, SEG and RTSTRUCT
        instances, referring to the Patient and ImagingStudy by their fullUrls; empty for R4.
    fhir_version: the FHIR release the dicts follow, "R4" or "R5" (MappingOptions.fhir_version;
        mapping/r5.py renders R5).
    """

    study_uid: str
    patient: dict[str, Any]
    imaging_study: dict[str, Any]
    endpoints: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = field(default=())
    selections: tuple[dict[str, Any], ...] = field(default=())
    fhir_version: str = "R4"


def validate_resources(resources: StudyResources) -> None:
    """MappingError naming the study, the resource and the failing elements when one of the
    resources is not valid in its FHIR release (R4: fhir.resources.R4B models; R5:
    fhir.resources' R5 models) (a bug, or a value no mapping rule caught)."""
    for resource in (resources.patient, resources.imaging_study, *resources.endpoints):
        validated(resource, f"study {resources.study_uid}", resources.fhir_version)
    for selection in resources.selections:  # R5 only: R4 has no ImagingSelection
        validate_selection(selection, f"study {resources.study_uid}")


def as_version(resources: StudyResources, fhir_version: str) -> StudyResources:
    """resources in fhir_version: R4 resources rendered as R5 (mapping/r5.py); resources already
    in that version unchanged. R5 → R4 is refused (MappingError): R5 dropped R4 elements.
    Selections are R5 already (built only for R5) and pass through."""
    if resources.fhir_version == fhir_version:
        return resources
    if (resources.fhir_version, fhir_version) != ("R4", "R5"):
        raise MappingError(f"study {resources.study_uid}: cannot turn FHIR {resources.fhir_version} resources "
                           f"into {fhir_version}")
    return replace(resources, patient=patient_r5(resources.patient),
                   imaging_study=imaging_study_r5(resources.imaging_study),
                   endpoints=tuple(endpoint_r5(e) for e in resources.endpoints),
                   fhir_version="R5")


def as_header(instance: InstanceHeader | Dataset) -> InstanceHeader:
    if isinstance(instance, InstanceHeader):
        return instance
    if isinstance(instance, Dataset):
        return InstanceHeader.from_dataset(instance)
    raise TypeError(f"instances: expected InstanceHeader or pydicom Dataset items, got {type(instance).__name__}")


def sort_key(number: int | None, uid: str) -> tuple[bool, int, tuple[int, ...] | tuple[()], str]:
    # Numbers first (absent last), then the UID compared numerically component by component.
    # A number FHIR cannot hold is left out of the output, so it sorts as absent here too:
    # otherwise merging a study with its own output would reorder it.
    if number is not None and not 0 <= number <= MAX_UNSIGNED_INT:
        number = None
    return number is None, number or 0, _uid_key(uid), uid


def _uid_key(uid: str) -> tuple[int, ...] | tuple[()]:
    try:
        return tuple(map(int, uid.split(".")))
    except ValueError:
        return ()


def canonical_series(headers: Iterable[InstanceHeader]) -> list[list[InstanceHeader]]:
    """Instances grouped by series; series by SeriesNumber then UID, instances by InstanceNumber then UID."""
    by_series: dict[str, list[InstanceHeader]] = {}
    for header in headers:
        by_series.setdefault(header.series_uid, []).append(header)
    series = [sorted(group, key=lambda h: sort_key(h.instance_number, h.sop_instance_uid))
              for group in by_series.values()]
    return sorted(series, key=lambda s: sort_key(first_number(s, lambda h: h.series_number), s[0].series_uid))


def _check_one_patient(study_uid: str, headers: list[InstanceHeader], options: MappingOptions) -> None:
    # Compared as matched: the resolved system and the value of each instance's PatientID.
    seen: dict[tuple[str | None, str], str] = {}
    for header in headers:
        if not header.patient_id:
            continue  # no PatientID says nothing about whose images these are
        system = identifier_system(header.patient_identity, options, [])  # its warnings come with the Patient
        seen.setdefault((system, header.patient_id), header.sop_instance_uid)
    if len(seen) > 1:
        instances = ", ".join(list(seen.values())[:2])
        # The IDs themselves stay out of the message: it is logged.
        raise PatientMismatchError(f"study {study_uid}: its instances disagree on PatientID "
                                   f"({len(seen)} different values, e.g. instances {instances})")


T = TypeVar("T")


def _unique(items: Iterable[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(items))


def convert_study(instances: Iterable[InstanceHeader | Dataset],
                  options: MappingOptions = MappingOptions()) -> StudyResources:
    """One study's instances (InstanceHeader or pydicom Dataset, any order) → StudyResources.

    Raises MultipleStudiesError (several StudyInstanceUIDs, naming them), PatientMismatchError
    (instances disagree on PatientID), MappingError (no instances). A repeated SOPInstanceUID
    counts once (the last one wins).
    """
    if not isinstance(options, MappingOptions):
        raise TypeError(f"options: expected MappingOptions, got {type(options).__name__}")
    by_sop: dict[str, InstanceHeader] = {}
    for instance in instances:
        header = as_header(instance)
        by_sop.pop(header.sop_instance_uid, None)  # the last one wins, at its own position
        by_sop[header.sop_instance_uid] = header
    if not by_sop:
        raise MappingError("no instances to convert")
    study_uids = _unique(h.study_uid for h in by_sop.values())
    if len(study_uids) > 1:
        raise MultipleStudiesError(f"expected one study, got {len(study_uids)}: {', '.join(study_uids)}")
    study_uid = study_uids[0]
    _check_one_patient(study_uid, list(by_sop.values()), options)

    series = canonical_series(by_sop.values())
    headers = [h for s in series for h in s]
    warnings: list[str] = [w for h in headers for w in h.warnings]

    identity = PatientIdentity(first(headers, lambda h: h.patient_id) or "",
                               first(headers, lambda h: h.issuer_of_patient_id) or "", "",
                               first(headers, lambda h: h.patient_id_qualifiers))
    identifier = patient_identifier(identity, options, warnings)
    identifiers = [] if identifier is None else [identifier, *other_identifiers(
        first(headers, lambda h: h.other_patient_ids) or (), identifier, options, warnings)]
    patient_data = patient_json(identifiers, first(headers, lambda h: h.patient_name),
                                first(headers, lambda h: h.patient_sex) or "",
                                first(headers, lambda h: h.patient_birth_date) or "", warnings)
    subject: dict[str, Any] = {"reference": patient_url(study_uid)}
    if identifier is not None:
        subject["identifier"] = identifier
    endpoints = (endpoint_json(options.dicomweb_url),) if options.dicomweb_url else ()
    study_data = imaging_study_json(study_uid, series, options, subject=subject,
                                    endpoints=[endpoint_reference(e["address"]) for e in endpoints],
                                    warnings=warnings)
    # R5 only: in R4 the selecting instances stay plain instances of the ImagingStudy
    selections = selections_json(headers, study_uid, subject=subject, study_reference=imaging_study_url(study_uid),
                                 warnings=warnings) if options.fhir_version == "R5" else []
    resources = StudyResources(
        study_uid=study_uid,
        patient=patient_data,
        imaging_study=study_data,
        endpoints=endpoints,
        warnings=_unique(warnings),
        selections=tuple(selections),
    )
    # One mapping for both releases: built as R4, rendered as R5 when asked (mapping/r5.py).
    return as_version(resources, options.fhir_version)


def convert_datasets(datasets: Iterable[InstanceHeader | Dataset],
                     options: MappingOptions = MappingOptions()) -> dict[str, StudyResources]:
    """Any number of instances (pydicom Datasets or InstanceHeaders) → StudyResources per
    StudyInstanceUID, in first-seen order.

    Raises MappingError when an instance lacks a required UID and PatientMismatchError when
    one study's instances disagree on PatientID (use convert_study per study to handle them
    one by one).
    """
    by_study: dict[str, list[InstanceHeader]] = {}
    for instance in datasets:
        header = as_header(instance)
        by_study.setdefault(header.study_uid, []).append(header)
    return {uid: convert_study(headers, options) for uid, headers in by_study.items()}
