"""The ImagingStudy resource, built as one JSON dict from a study's instance headers.

Study-level values come from the first instance (in the canonical series/instance order)
that has them, so the result does not depend on the order the instances arrived in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydicom.uid import UID

from mapping.bodysite import body_site, laterality
from mapping.codes import DCM_SYSTEM, CodedValue, codeable_concept
from mapping.datetimes import Zone, combine, study_zone
from mapping.fhirjson import STUDY_UID_SYSTEM, as_written, study_uid_value
from mapping.header import InstanceHeader, Issuer
from mapping.names import display_name
from mapping.options import MappingOptions
from mapping.systems import as_system

SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
MAX_UNSIGNED_INT = 2**31 - 1
# IHE MADO 1.0.0's extension on ImagingStudy.series.instance (R4 has no element for the frame count).
NUMBER_OF_FRAMES_EXTENSION = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoNumberOfFrames"
UNKNOWN_MODALITY = "OT"  # "Other": series.modality is required in FHIR

Series = Sequence[InstanceHeader]  # one series' instances, in canonical order


def study_identifier(study_uid: str) -> dict[str, Any]:
    return {"system": STUDY_UID_SYSTEM, "value": study_uid_value(study_uid)}


def first(headers: Sequence[InstanceHeader], read: Callable[[InstanceHeader], Any]) -> Any:
    """The first non-empty value in canonical order (None when no instance has one)."""
    for header in headers:
        value = read(header)
        if value:
            return value
    return None


def first_number(headers: Sequence[InstanceHeader], read: Callable[[InstanceHeader], int | None]) -> int | None:
    """The first number that is present (0 included) in canonical order."""
    for header in headers:
        value = read(header)
        if value is not None:
            return value
    return None


def accession_identifier(headers: Sequence[InstanceHeader], options: MappingOptions,
                         warnings: list[str]) -> dict[str, Any] | None:
    number = first(headers, lambda h: h.accession_number)
    if not number:
        return None
    return typed_identifier("ACSN", number, first(headers, lambda h: h.accession_issuer),
                            options.accession_system, warnings,
                            "IssuerOfAccessionNumberSequence (0008,0051)", "the accession identifier's")


def typed_identifier(type_code: str, value: str, issuer: Issuer | None, fallback_system: str | None,
                     warnings: list[str], issuer_tag: str, what: str) -> dict[str, Any]:
    """An Identifier of a v2-0203 type (ACSN, PLAC, FILL) with its system from the issuer (an HL7 v2
    HD: the local namespace when it is an OID or URI, else the universal ID), else fallback_system."""
    identifier: dict[str, Any] = {"type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": type_code}]}}
    system = None
    if issuer is not None:
        system = as_system(issuer.local) or as_system(issuer.universal, issuer.universal_type)
        if system is None:
            warnings.append(f"{issuer_tag}: neither an OID nor a URI, not used as {what} system")
    system = system or fallback_system
    if system:
        identifier["system"] = system
    identifier["value"] = value
    return identifier


def based_on(headers: Sequence[InstanceHeader], accession: dict[str, Any] | None, options: MappingOptions,
             warnings: list[str]) -> list[dict[str, Any]]:
    """basedOn: one ServiceRequest reference by identifier per distinct order identifier: the
    study's accession identifier, then each RequestAttributesSequence item's accession number
    (ACSN), placer order number (PLAC) and filler order number (FILL), in canonical order.
    RequestedProcedureID is not used: it is unique only within its accession (mapping/README.md)."""
    identifiers = [] if accession is None else [accession]
    issuer_tag = "RequestAttributesSequence (0040,0275) > "
    for header in headers:
        for request in header.request_attributes:
            if request.accession_number:
                # An item without its own issuer shares the study's (the same order filler).
                issuer = request.accession_issuer or header.accession_issuer
                identifiers.append(typed_identifier(
                    "ACSN", request.accession_number, issuer, options.accession_system, warnings,
                    issuer_tag + "IssuerOfAccessionNumberSequence (0008,0051)", "the accession identifier's"))
            if request.placer_order:
                identifiers.append(typed_identifier(
                    "PLAC", request.placer_order, request.placer_issuer, None, warnings,
                    issuer_tag + "OrderPlacerIdentifierSequence (0040,0026)", "the placer order number's"))
            if request.filler_order:
                identifiers.append(typed_identifier(
                    "FILL", request.filler_order, request.filler_issuer, None, warnings,
                    issuer_tag + "OrderFillerIdentifierSequence (0040,0027)", "the filler order number's"))
    unique: dict[tuple[str, str | None, str], dict[str, Any]] = {}
    for identifier in identifiers:
        key = (identifier["type"]["coding"][0]["code"], identifier.get("system"), identifier["value"])
        unique.setdefault(key, identifier)
    return [{"type": "ServiceRequest", "identifier": i} for i in unique.values()]


PARTICIPATION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
# ImagingStudy.series.performer.function (extensible: series-performer-function, v3 ParticipationType).
PERFORMING_PHYSICIAN_FUNCTION = {"system": PARTICIPATION_TYPE_SYSTEM, "code": "PRF", "display": "performer"}
OPERATOR_FUNCTION = {"system": PARTICIPATION_TYPE_SYSTEM, "code": "SPRF", "display": "secondary performer"}


def series_performers(instances: Series) -> list[dict[str, Any]]:
    """series.performer: PerformingPhysicianName (PRF) then OperatorsName (SPRF), names as display
    (the first instance of the series that has each element), without duplicates."""
    performers: dict[tuple[str, str], dict[str, Any]] = {}
    for function, read in ((PERFORMING_PHYSICIAN_FUNCTION, lambda h: h.performing_physicians),
                           (OPERATOR_FUNCTION, lambda h: h.operators)):
        for person in first(instances, read) or ():
            name = display_name(person)
            if name:
                performers.setdefault((function["code"], name), {
                    "function": {"coding": [dict(function)]}, "actor": {"display": name}})
    return list(performers.values())


def _unique_codes(headers: Sequence[InstanceHeader], read: Callable[[InstanceHeader], tuple[CodedValue, ...]]
                  ) -> list[CodedValue]:
    seen: dict[tuple[str, str], CodedValue] = {}
    for header in headers:
        for code in read(header):
            seen.setdefault((code.value, code.designator.upper()), code)
    return list(seen.values())


def _concepts(codes: list[CodedValue]) -> list[dict[str, Any]]:
    # An item with a meaning but no code value keeps the meaning as text.
    concepts = [codeable_concept([c]) if c.value else codeable_concept([], c.meaning) for c in codes]
    return [c for c in concepts if c is not None]


def _number(value: int | None, tag: str, warnings: list[str]) -> int | None:
    if value is None:
        return None
    if not 0 <= value <= MAX_UNSIGNED_INT:
        warnings.append(f"{tag}: out of the range of a FHIR unsignedInt, omitted")
        return None
    return value


def instance_title(header: InstanceHeader) -> str | None:
    """SR: the concept name's meaning; documents: DocumentTitle; else ImageType joined with ``\\``.

    DocumentTitle is looked at first: an encapsulated document also carries a concept name
    (its title coded), and the contract gives documents their DocumentTitle; SR objects have
    no DocumentTitle.
    """
    if header.document_title:
        return header.document_title
    if header.concept_name is not None and header.concept_name.meaning:
        return header.concept_name.meaning
    if any(header.image_type):
        return "\\".join(header.image_type)
    return None


def sop_class_coding(sop_class_uid: str) -> dict[str, Any]:
    result = {"system": SOP_CLASS_SYSTEM, "code": "urn:oid:" + sop_class_uid}
    name = UID(sop_class_uid).name
    if name and name != sop_class_uid:
        result["display"] = name
    return result


def series_json(instances: Series, zone: Zone, warnings: list[str],
                endpoints: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    head = instances[0]
    series: dict[str, Any] = {"uid": head.series_uid}
    number = _number(first_number(instances, lambda h: h.series_number), "SeriesNumber (0020,0011)", warnings)
    if number is not None:
        series["number"] = number
    modality = first(instances, lambda h: h.modality)
    if not modality:
        warnings.append(f"Modality (0008,0060): missing in series {head.series_uid}, {UNKNOWN_MODALITY} used")
        modality = UNKNOWN_MODALITY
    series["modality"] = {"system": DCM_SYSTEM, "code": modality}
    description = first(instances, lambda h: h.series_description)
    if description:
        series["description"] = description
    series["numberOfInstances"] = len(instances)
    if endpoints:
        # IHE MADO: every series says where its instances are retrieved from.
        series["endpoint"] = [dict(e) for e in endpoints]
    site = body_site(first(instances, lambda h: h.body_part) or "")
    if site is not None:
        series["bodySite"] = site
    side_text, side_tag = first(instances, lambda h: h.laterality), "Laterality (0020,0060)"
    if not side_text:
        side_text, side_tag = first(instances, lambda h: h.image_laterality), "ImageLaterality (0020,0062)"
    side = laterality(side_text or "")
    if side is not None:
        series["laterality"] = side
    elif side_text:
        warnings.append(f"{side_tag}: not one of R, L, B, U, omitted")
    started = combine(first(instances, lambda h: h.series_date), first(instances, lambda h: h.series_time),
                      zone, warnings, date_tag="SeriesDate (0008,0021)", time_tag="SeriesTime (0008,0031)")
    if started is not None:
        series["started"] = as_written(started)
    performers = series_performers(instances)
    if performers:
        series["performer"] = performers
    sop_classes: dict[str, dict[str, Any]] = {}
    series["instance"] = [_instance_json(h, sop_classes, warnings) for h in instances]
    return series


def _instance_json(header: InstanceHeader, sop_classes: dict[str, dict[str, Any]],
                   warnings: list[str]) -> dict[str, Any]:
    sop_class = sop_classes.get(header.sop_class_uid)
    if sop_class is None:
        sop_class = sop_classes[header.sop_class_uid] = sop_class_coding(header.sop_class_uid)
    instance: dict[str, Any] = {}
    frames = _number(header.number_of_frames, "NumberOfFrames (0028,0008)", warnings)
    if frames:  # 0 frames is no image: nothing to count
        instance["extension"] = [{"url": NUMBER_OF_FRAMES_EXTENSION, "valueInteger": frames}]
    instance.update({"uid": header.sop_instance_uid, "sopClass": dict(sop_class)})
    number = _number(header.instance_number, "InstanceNumber (0020,0013)", warnings)
    if number is not None:
        instance["number"] = number
    title = instance_title(header)
    if title:
        instance["title"] = title
    return instance


def imaging_study_json(study_uid: str, series: Sequence[Series], options: MappingOptions, *,
                       subject: dict[str, Any], endpoints: Sequence[dict[str, Any]] = (),
                       warnings: list[str]) -> dict[str, Any]:
    """The ImagingStudy as a JSON dict; series and their instances already in canonical order.

    endpoints: the References to the study's Endpoints, set on the study and on every series."""
    headers = [h for s in series for h in s]
    study: dict[str, Any] = {"resourceType": "ImagingStudy", "identifier": [study_identifier(study_uid)]}
    accession = accession_identifier(headers, options, warnings)
    if accession is not None:
        study["identifier"].append(accession)
    study["status"] = "available"
    zone = study_zone(first(headers, lambda h: h.timezone_offset), options.timezone, warnings)
    series_list = [series_json(s, zone, warnings, endpoints) for s in series]
    modalities: dict[str, None] = {}
    for s in series_list:
        modalities.setdefault(s["modality"]["code"], None)
    if modalities:
        study["modality"] = [{"system": DCM_SYSTEM, "code": m} for m in modalities]
    study["subject"] = subject
    started = combine(first(headers, lambda h: h.study_date), first(headers, lambda h: h.study_time), zone,
                      warnings, date_tag="StudyDate (0008,0020)", time_tag="StudyTime (0008,0030)")
    if started is not None:
        study["started"] = as_written(started)
    requests = based_on(headers, accession, options, warnings)
    if requests:
        study["basedOn"] = requests
    referrer = display_name(first(headers, lambda h: h.referring_physician))
    if referrer:
        study["referrer"] = {"display": referrer}
    interpreters = first(headers, lambda h: h.reading_physicians) or ()
    names = [n for n in (display_name(p) for p in interpreters) if n]
    if names:
        study["interpreter"] = [{"display": n} for n in dict.fromkeys(names)]
    if endpoints:
        study["endpoint"] = [dict(e) for e in endpoints]
    study["numberOfSeries"] = len(series_list)
    study["numberOfInstances"] = sum(len(s) for s in series)
    procedures = _concepts(_unique_codes(headers, lambda h: h.procedure_codes))
    if procedures:
        study["procedureCode"] = procedures
    location = ", ".join(v for v in (first(headers, lambda h: h.institution_name),
                                     first(headers, lambda h: h.department_name)) if v)
    if location:
        study["location"] = {"display": location}
    # The study's own reason codes, then those of its requests (RequestAttributesSequence), once each.
    reasons = _concepts(_unique_codes(headers, lambda h: (
        *h.reason_codes, *(c for r in h.request_attributes for c in r.reason_codes))))
    if not reasons:
        text = first(headers, lambda h: h.reason_text)
        reasons = [{"text": text}] if text else []
    if reasons:
        study["reasonCode"] = reasons
    description = first(headers, lambda h: h.study_description)
    if description:
        study["description"] = description
    study["series"] = series_list
    return study
