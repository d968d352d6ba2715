"""Output shapes of one study's resources, and the way back (parse_resources).

``bundle``: a FHIR transaction Bundle. Patient and Endpoint are conditional creates
(``ifNoneExist``: never overwrite a master record), the ImagingStudy is created unless one
with its study UID exists. A Patient without identifier cannot be matched on a server, so it
is contained in the ImagingStudy instead of being an entry of its own.

``contained``: one ImagingStudy with the Patient (and Endpoint) contained, as the
dicom-fhir-converter family produces it.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from pydantic import ValidationError

from mapping.errors import MappingError
from mapping.imaging_study import STUDY_UID_SYSTEM
from mapping.options import SHAPES
from mapping.study import StudyResources, endpoint_url, imaging_study_url, patient_url

CONTAINED_PATIENT_ID = "patient"
CONTAINED_ENDPOINT_ID = "endpoint"


def model_json(model: Any) -> dict[str, Any]:
    """A model as its FHIR JSON dict (what the server receives)."""
    return json.loads(model.model_dump_json(exclude_none=True))


def search_value(text: str) -> str:
    """A value for a search parameter in a URL: FHIR escapes (``\\``, ``|``, ``,``, ``$``) then URL encoding."""
    for char in ("\\", "|", ",", "$"):
        text = text.replace(char, "\\" + char)
    return quote(text, safe=":/.-_~@!*'()")


def token_search(system: str | None, value: str) -> str:
    """``identifier=<system>|<value>``; without a system ``identifier=|<value>``.

    A bare ``identifier=<value>`` would match the value under ANY system (FHIR token search),
    so a study could be attached to another issuer's patient who has the same MRN; ``|<value>``
    matches only identifiers that have no system, as ours has.
    """
    return f"identifier={search_value(system) if system else ''}|{search_value(value)}"


def _first_identifier(resource: dict[str, Any]) -> dict[str, Any] | None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("value"):
            return identifier
    return None


def _endpoint_ref(resources: StudyResources) -> str | None:
    return endpoint_url(resources.endpoint.address) if resources.endpoint is not None else None


def _with_references(study: dict[str, Any], subject_ref: str, endpoint_from: str | None,
                     endpoint_to: str | None) -> dict[str, Any]:
    study = dict(study)
    study["subject"] = {**study.get("subject", {}), "reference": subject_ref}
    if endpoint_from is not None and endpoint_to is not None and study.get("endpoint"):
        study["endpoint"] = [{**e, "reference": endpoint_to} if e.get("reference") == endpoint_from else e
                             for e in study["endpoint"]]
    return study


def _contained(study: dict[str, Any], *resources: dict[str, Any]) -> dict[str, Any]:
    # "contained" comes right after the resource's own metadata, as the models order it.
    head = {k: study[k] for k in ("resourceType", "id", "meta", "implicitRules", "language", "text") if k in study}
    rest = {k: v for k, v in study.items() if k not in head and k != "contained"}
    return {**head, "contained": [*study.get("contained", []), *resources], **rest}


def render_bundle(resources: StudyResources) -> dict[str, Any]:
    uid = resources.study_uid
    patient = model_json(resources.patient)
    study = model_json(resources.imaging_study)
    entries: list[dict[str, Any]] = []
    identifier = _first_identifier(patient)
    if identifier is not None:
        entries.append({"fullUrl": patient_url(uid), "resource": patient, "request": {
            "method": "POST", "url": "Patient",
            "ifNoneExist": token_search(identifier.get("system"), identifier["value"])}})
    else:
        # No identifier: a server could only create a duplicate Patient per study; keep it inside.
        patient = {"resourceType": "Patient", "id": CONTAINED_PATIENT_ID,
                   **{k: v for k, v in patient.items() if k not in ("resourceType", "id")}}
        study = _contained(_with_references(study, "#" + CONTAINED_PATIENT_ID, None, None), patient)
    if resources.endpoint is not None:
        endpoint = model_json(resources.endpoint)
        request: dict[str, Any] = {"method": "POST", "url": "Endpoint"}
        endpoint_identifier = _first_identifier(endpoint)
        if endpoint_identifier is not None:
            request["ifNoneExist"] = token_search(endpoint_identifier.get("system"), endpoint_identifier["value"])
        entries.append({"fullUrl": _endpoint_ref(resources), "resource": endpoint, "request": request})
    entries.append({"fullUrl": imaging_study_url(uid), "resource": study, "request": {
        "method": "POST", "url": "ImagingStudy",
        "ifNoneExist": token_search(STUDY_UID_SYSTEM, "urn:oid:" + uid)}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def render_contained(resources: StudyResources) -> dict[str, Any]:
    patient = model_json(resources.patient)
    patient = {"resourceType": "Patient", "id": CONTAINED_PATIENT_ID,
               **{k: v for k, v in patient.items() if k not in ("resourceType", "id")}}
    contained = [patient]
    endpoint_to = None
    if resources.endpoint is not None:
        endpoint = model_json(resources.endpoint)
        contained.append({"resourceType": "Endpoint", "id": CONTAINED_ENDPOINT_ID,
                          **{k: v for k, v in endpoint.items() if k not in ("resourceType", "id")}})
        endpoint_to = "#" + CONTAINED_ENDPOINT_ID
    study = _with_references(model_json(resources.imaging_study), "#" + CONTAINED_PATIENT_ID,
                             _endpoint_ref(resources), endpoint_to)
    return _contained(study, *contained)


def render(resources: StudyResources, shape: str = "bundle") -> dict[str, Any]:
    """The JSON-ready dict of either output shape (``bundle`` or ``contained``)."""
    if shape == "bundle":
        return render_bundle(resources)
    if shape == "contained":
        return render_contained(resources)
    raise ValueError(f"shape: expected one of {', '.join(SHAPES)}, got {shape!r}")


def to_bundle(resources: StudyResources) -> Bundle:
    """The transaction Bundle (output shape ``bundle``) as a model."""
    return Bundle.model_validate(render_bundle(resources))


def to_contained(resources: StudyResources) -> ImagingStudy:
    """The ImagingStudy with Patient (and Endpoint) contained (output shape ``contained``)."""
    return ImagingStudy.model_validate(render_contained(resources))


# --- the way back ---------------------------------------------------------------------------


def _study_uid(study: dict[str, Any]) -> str:
    for identifier in study.get("identifier") or []:
        value = identifier.get("value") or ""
        if identifier.get("system") == STUDY_UID_SYSTEM and value.startswith("urn:oid:"):
            return value[len("urn:oid:"):]
    raise MappingError("the ImagingStudy has no study UID identifier (urn:dicom:uid)")


def _without_id(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "id"}


def parse_resources(document: dict[str, Any]) -> StudyResources:
    """The inverse of render for either shape: ``render(parse_resources(render(r, s)), s) == render(r, s)``.

    Raises MappingError for a document that is neither shape, or whose resources do not
    validate. The warnings of the original conversion are not part of the document.
    """
    if not isinstance(document, dict):
        raise MappingError(f"expected a FHIR resource (a JSON object), got {type(document).__name__}")
    kind = document.get("resourceType")
    if kind == "Bundle":
        resources_by_url: dict[str, dict[str, Any]] = {}
        studies = []
        for entry in document.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == "ImagingStudy":
                studies.append(resource)
            elif entry.get("fullUrl"):
                resources_by_url[entry["fullUrl"]] = resource
        if len(studies) != 1:
            raise MappingError(f"expected a Bundle with one ImagingStudy, found {len(studies)}")
        study = studies[0]
    elif kind == "ImagingStudy":
        study, resources_by_url = document, {}
    else:
        raise MappingError(f"expected a Bundle or an ImagingStudy, got {kind!r}")
    for resource in study.get("contained") or []:
        if resource.get("id"):
            resources_by_url["#" + resource["id"]] = resource
    uid = _study_uid(study)

    subject_ref = (study.get("subject") or {}).get("reference") or ""
    patient = resources_by_url.get(subject_ref)
    if patient is None or patient.get("resourceType") != "Patient":
        raise MappingError(f"study {uid}: the ImagingStudy's subject ({subject_ref or 'none'}) is not "
                           f"a Patient in the document")
    if subject_ref.startswith("#"):
        patient = _without_id(patient)
    endpoint = None
    endpoint_from = None
    for reference in study.get("endpoint") or []:
        candidate = resources_by_url.get(reference.get("reference") or "")
        if candidate is not None and candidate.get("resourceType") == "Endpoint":
            endpoint, endpoint_from = candidate, reference["reference"]
            if endpoint_from.startswith("#"):
                endpoint = _without_id(endpoint)
            break
    canonical = {k: v for k, v in study.items() if k != "contained"}
    endpoint_to = endpoint_url(endpoint["address"]) if endpoint is not None and endpoint.get("address") else None
    canonical = _with_references(canonical, patient_url(uid), endpoint_from, endpoint_to)
    try:
        return StudyResources(
            study_uid=uid,
            patient=Patient.model_validate(patient),
            imaging_study=ImagingStudy.model_validate(canonical),
            endpoint=Endpoint.model_validate(endpoint) if endpoint is not None else None,
        )
    except ValidationError as exc:
        raise MappingError(f"study {uid}: the document's resources do not validate: "
                           f"{exc.error_count()} error(s)") from exc
