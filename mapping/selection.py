"""ImagingSelection (FHIR R5): what a Key Object Selection, a Segmentation or an RT Structure
Set instance selects, one resource per referenced series (R5 ImagingSelection has one
seriesUid). Pure: built from InstanceHeader.references; the rules are mapping/README.md
("ImagingSelection").

In R4 there is no ImagingSelection: those instances stay plain instances of the ImagingStudy
(as they also are in R5), and no selection is made.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from fhir.resources.imagingselection import ImagingSelection

from mapping.codes import CodedValue, codeable_concept
from mapping.fhirjson import STUDY_UID_SYSTEM, in_order, study_uid_value, validated
from mapping.header import KEY_OBJECT_SELECTION, RT_STRUCTURE_SET, SEGMENTATION, InstanceHeader
from mapping.imaging_study import sop_class_coding, study_identifier

# The same namespace as mapping.study's fullUrls (kept here: mapping.study imports this module).
NAMESPACE = uuid.UUID("0b7b8f4e-5c8a-5d1e-9a51-6d1c0f9c4a11")
URI_SYSTEM = "urn:ietf:rfc:3986"
# FHIR's element order (as fhir.resources writes it), for an element added after the rest
SELECTION_ORDER = MappingProxyType(
    {name: i for i, name in enumerate(["resourceType", *ImagingSelection.elements_sequence()])})

# SEG: the purpose of reference the SEG IOD gives its source images (DerivationImageSequence >
# SourceImageSequence > PurposeOfReferenceCodeSequence, CID 7202), as pydicom's liver SEG carries it.
# RTSTRUCT: DICOM has no purpose code for contour images; the images are the source the structures
# were drawn on, so the same CID 7202 code, with a text saying which kind of selection it is.
SOURCE_IMAGE = CodedValue("121322", "DCM", "Source image for image processing operation")
CODES: MappingProxyType[str, tuple[CodedValue | None, str]] = MappingProxyType({
    SEGMENTATION: (SOURCE_IMAGE, "Segmentation source images"),
    RT_STRUCTURE_SET: (SOURCE_IMAGE, "RT Structure Set contour images"),
    KEY_OBJECT_SELECTION: (None, "Key Object Selection"),  # None: the document's own title code
})


def selection_url(sop_instance_uid: str, series_uid: str) -> str:
    """The selection's fullUrl and business identifier: one per selecting instance and series."""
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, f'ImagingSelection/{sop_instance_uid}/{series_uid}')}"


def selection_identifier(selection: dict[str, Any]) -> dict[str, Any] | None:
    """The per-selection identifier (conditional create, merge key); None when absent."""
    for identifier in selection.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == URI_SYSTEM and identifier.get("value"):
            return identifier
    return None


def is_selecting(header: InstanceHeader) -> bool:
    return header.sop_class_uid in CODES


def _code(header: InstanceHeader) -> dict[str, Any]:
    code, text = CODES[header.sop_class_uid]
    if code is None:
        # A KOS: its ConceptNameCodeSequence is the document title (CID 7010, e.g. DCM 113000 "Of Interest")
        if header.concept_name is not None and header.concept_name.value:
            return codeable_concept([header.concept_name]) or {"text": text}
        return {"text": header.concept_name.meaning if header.concept_name else text}
    return codeable_concept([code], text) or {"text": text}


def _grouped(header: InstanceHeader, series_of: dict[str, str], frames: dict[tuple[str, str], str],
             warnings: list[str]) -> dict[tuple[str, str], dict[str, str]]:
    """(study UID, series UID) -> {SOP instance UID: SOP class UID}, in reference order; frames
    gets the frame of reference a series is referenced under, where one is given."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for referenced in header.references:
        if referenced.series_uid:
            key = (referenced.study_uid or header.study_uid, referenced.series_uid)
            groups.setdefault(key, {}).update(referenced.instances)
            if referenced.frame_of_reference:
                frames.setdefault(key, referenced.frame_of_reference)
            continue
        # SEG source images without a series: found among this study's instances, or left out
        for sop_uid, sop_class in referenced.instances:
            series_uid = series_of.get(sop_uid)
            if series_uid is None:
                warnings.append(f"instance {header.sop_instance_uid}: source image {sop_uid} is in no series of "
                                f"the study, left out of its ImagingSelection")
                continue
            groups.setdefault((header.study_uid, series_uid), {})[sop_uid] = sop_class
    return groups


def selections_json(headers: Sequence[InstanceHeader], study_uid: str, *, subject: dict[str, Any],
                    study_reference: str, warnings: list[str]) -> list[dict[str, Any]]:
    """The ImagingSelections of a study's selecting instances (headers in canonical order)."""
    selecting = [h for h in headers if is_selecting(h)]
    if not selecting:
        return []
    series_of = {h.sop_instance_uid: h.series_uid for h in headers}
    known = {h.sop_instance_uid: h for h in headers}
    series_numbers = {h.series_uid: h.series_number for h in headers if h.series_number is not None}
    result = []
    for header in selecting:
        frames: dict[tuple[str, str], str] = {}
        groups = _grouped(header, series_of, frames, warnings)
        if not groups:
            warnings.append(f"instance {header.sop_instance_uid}: references no series, no ImagingSelection made")
        for (ref_study, series_uid), instances in groups.items():
            selection = _selection(header, ref_study, series_uid, instances, study_uid, subject, study_reference,
                                   known, series_numbers)
            frame = frames.get((ref_study, series_uid))
            if frame:
                selection = in_order({**selection, "frameOfReferenceUid": frame}, SELECTION_ORDER)
            result.append(selection)
    return result


def _selection(header: InstanceHeader, ref_study: str, series_uid: str, instances: dict[str, str], study_uid: str,
               subject: dict[str, Any], study_reference: str, known: dict[str, InstanceHeader],
               series_numbers: dict[str, int]) -> dict[str, Any]:
    selection: dict[str, Any] = {"resourceType": "ImagingSelection", "identifier": [
        {"system": STUDY_UID_SYSTEM, "value": study_uid_value(header.sop_instance_uid)},
        {"system": URI_SYSTEM, "value": selection_url(header.sop_instance_uid, series_uid)}]}
    selection["status"] = "available"
    selection["subject"] = subject
    selection["code"] = _code(header)
    selection["studyUid"] = ref_study
    # The ImagingStudy of this study by its fullUrl; one of another study (a KOS may select from
    # several) by its study UID identifier, for the server to resolve.
    selection["derivedFrom"] = [{"reference": study_reference} if ref_study == study_uid else
                                {"type": "ImagingStudy", "identifier": study_identifier(ref_study)}]
    selection["seriesUid"] = series_uid
    number = series_numbers.get(series_uid) if ref_study == study_uid else None
    if number is not None and 0 <= number <= 2**31 - 1:
        selection["seriesNumber"] = number
    if instances:
        selection["instance"] = [_instance(uid, sop_class, known.get(uid)) for uid, sop_class in instances.items()]
    return selection


def _instance(uid: str, sop_class: str, header: InstanceHeader | None) -> dict[str, Any]:
    instance: dict[str, Any] = {"uid": uid}
    if header is not None and header.instance_number is not None and 0 <= header.instance_number <= 2**31 - 1:
        instance["number"] = header.instance_number
    instance["sopClass"] = sop_class_coding(sop_class)
    return instance


def validate_selection(selection: dict[str, Any], context: str) -> Any:
    """selection as fhir.resources' R5 ImagingSelection model; MappingError naming the failing
    elements (never their values)."""
    return validated(selection, context, "R5")
